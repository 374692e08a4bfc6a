"""The curve arithmetic of scripts/performance/fp8_loss_curve.py (its runs need a GPU): the
mean over seeds, the 20-step blocks and the comparison against bf16."""

import pytest

from tests.helpers import performance_script

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def curves():
    return performance_script("fp8_loss_curve")


def test_the_mean_over_seeds_is_taken_at_the_steps_every_run_logged(curves):
    a = {1: 4.0, 2: 3.0, 3: 2.0}
    b = {1: 6.0, 2: 5.0}  # stopped by --run-limit after step 2
    assert curves.mean_curve([a, b]) == {1: 5.0, 2: 4.0}
    assert curves.mean_curve([a]) == a
    assert curves.mean_curve([]) == {}


def test_blocks_and_the_worst_moving_average(curves):
    window = curves.WINDOW
    reference = {s: 10.0 for s in range(1, 3 * window + 1)}
    other = {**reference, **{s: 10.5 for s in range(2 * window + 1, 2 * window + 6)}}
    other.pop(3 * window)  # the last block is one step short
    blocks = curves.block_means(other)
    assert sorted(blocks) == [1, window + 1]  # only full blocks
    step, worst, _, _ = curves.compare(reference, other, start=1)
    # five steps 5% high inside one 20-step window: 1.25% at the window holding all five
    assert worst == pytest.approx(5 * 0.5 / window / 10.0)
    assert 2 * window + 5 <= step < 3 * window
