"""Progress lines for long work: a bar on a terminal, plain lines elsewhere."""

import io
import re
import threading
import time

import pytest

from megabridge.progress import Progress, Waiting, human_bytes, human_seconds

pytestmark = pytest.mark.unit


def test_plain_lines_with_bytes_rate_and_eta():
    out = io.StringIO()
    with Progress("hf-to-megatron", total=4, stream=out, every=0.0) as bar:
        for _ in range(2):
            bar.update(nbytes=1_500_000)
    lines = out.getvalue().splitlines()
    assert re.fullmatch(r"hf-to-megatron: 1/4 tensors, 1.5 MB, .*B/s, ETA \d+s", lines[0]), lines
    assert re.fullmatch(r"hf-to-megatron: 2/4 tensors, 3 MB, .*B/s, ETA \d+s in \d+s", lines[-1])


def test_plain_lines_are_rate_limited_and_thread_safe():
    out = io.StringIO()
    bar = Progress("export", total=None, unit="document", stream=out, every=3600)
    workers = [threading.Thread(target=lambda: [bar.update() for _ in range(500)])
               for _ in range(4)]  # fmt: skip
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    bar.close()
    (line,) = out.getvalue().splitlines()  # only the final line within the interval
    assert line.startswith("export: 2000 documents, ") and "ETA" not in line


def test_disabled_prints_nothing():
    out = io.StringIO()
    with Progress("x", total=2, stream=out, enabled=False) as bar:
        bar.update()
    assert out.getvalue() == ""


def test_terminal_gets_a_bar_and_a_final_line():
    out = io.StringIO()
    with Progress("x", total=2, stream=out, tty=True) as bar:
        bar.update(2, nbytes=10)
    assert "\r" in out.getvalue()  # tqdm redraws in place
    assert out.getvalue().rstrip().splitlines()[-1].startswith("x: 2/2 tensors, 10 B")


def test_waiting_is_silent_when_quick_and_reports_when_slow():
    quick = io.StringIO()
    with Waiting("saving", stream=quick, after=5.0):
        pass
    assert quick.getvalue() == ""
    slow = io.StringIO()
    with Waiting("saving", stream=slow, after=0.05, every=0.05):
        time.sleep(0.3)
    lines = slow.getvalue().splitlines()
    assert lines[0] == "saving... 0s" and lines[-1] == "saving: done in 0s", lines


def test_human_units():
    assert human_bytes(999) == "999 B" and human_bytes(2_470_000_000) == "2.47 GB"
    assert human_seconds(59) == "59s" and human_seconds(125) == "2m05s"
    assert human_seconds(7300) == "2h01m"
