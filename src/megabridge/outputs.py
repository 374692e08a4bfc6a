"""Output folders that concurrent runs cannot corrupt: one writer, a private staging folder,
and a final rename that never replaces what it was not allowed to.

Every folder megabridge writes as a whole (a converted HF folder or Megatron
checkpoint, an exported adapter) goes through OutputFolder:

* ``claim()`` refuses an existing output without ``--overwrite``, an output that is a
  dangling symlink, or one equal to / inside / holding an input; then takes an
  exclusive ``flock`` on ``.<name>.lock`` beside the output. A second writer of the
  same path fails at once with one line. The kernel drops the lock when its process
  dies, so a killed run never leaves a stale lock behind.
* Holding the lock, it removes the staging folders of earlier runs that were killed
  (only a lock holder creates them, so any it finds are leftovers), and makes its own,
  ``.<name>.tmp-<pid>-<random>``.
* ``publish()`` renames the staging folder to the output. If the output appeared in the
  meantime (written by something that ignored the lock) it is kept, and the run fails,
  unless ``--overwrite`` was given.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from megabridge.errors import UserError


def check_output(path: str | Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Refuse, in one line, an output that may not be written; returns it as a Path."""
    final = Path(path)
    if final.is_symlink() and not final.exists():
        raise UserError(
            f"output {final} is a symlink to {os.readlink(final)}, which does not exist"
        )
    if final.exists() and not overwrite:
        raise UserError(f"output {final} already exists (pass --overwrite to replace it)")
    target = final.resolve()
    for source in inputs:
        source = Path(source).resolve()
        if target == source or source.is_relative_to(target) or target.is_relative_to(source):
            raise UserError(
                f"output {final} overlaps the input {source}: writing it would destroy the input"
            )
    return final


class OutputFolder:
    """One run's claim on an output folder; see the module docstring."""

    def __init__(self, path: str | Path, overwrite: bool = False, inputs: Iterable | None = ()):
        self.final = Path(path)
        self.overwrite = overwrite
        self.inputs = list(inputs or ())
        self.staging: Path | None = None
        self._lock_fd: int | None = None

    @property
    def lock_path(self) -> Path:
        return self.final.with_name(f".{self.final.name}.lock")

    def claim(self) -> Path:
        """Lock the output and make a fresh staging folder; returns the staging folder."""
        check_output(self.final, self.overwrite, self.inputs)
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            self._lock()
            self._remove_leftovers()
            self.staging = Path(
                tempfile.mkdtemp(
                    prefix=f".{self.final.name}.tmp-{os.getpid()}-", dir=self.final.parent
                )
            )
        except OSError as e:
            self.release()
            raise UserError(f"cannot write output {self.final}: {e.strerror or e}") from None
        return self.staging

    def _lock(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(
                    f"output {self.final} is being written by another process "
                    f"(it holds {self.lock_path}); wait for it or choose another output"
                ) from None
            # The previous holder unlinks the file as it lets go: a lock on an unlinked file
            # guards nothing, so take the one that is at the path now.
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                return
            os.close(fd)

    def _remove_leftovers(self) -> None:
        name = self.final.name
        for pattern in (f".{name}.tmp-*", f".{name}.old-*", f".{name}.tmp"):
            for leftover in self.final.parent.glob(pattern):
                shutil.rmtree(leftover, ignore_errors=True)

    def publish(self) -> Path:
        """Rename the staging folder to the output (see the module docstring)."""
        assert self.staging is not None, "publish() before claim()"
        final = self.final
        if (final.exists() or final.is_symlink()) and not self.overwrite:
            self.abandon()
            raise UserError(
                f"output {final} appeared while this run was writing it; left it as it is "
                "(pass --overwrite to replace it)"
            )
        try:
            self._rename_into_place()
            _fsync_dir(final.parent)
        except OSError as e:
            self.abandon()
            raise UserError(f"cannot write output {final}: {e.strerror or e}") from None
        self.staging = None
        self.release()
        return final

    def _rename_into_place(self) -> None:
        final = self.final
        if not (final.exists() or final.is_symlink()):
            os.rename(self.staging, final)
            return
        # --overwrite: the old output steps aside, and comes back if the new one cannot go in
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, old / "previous")
        try:
            os.rename(self.staging, final)
        except OSError:
            os.rename(old / "previous", final)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)

    def abandon(self) -> None:
        """Remove the staging folder and let go of the output; the output is left as it was."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None


@contextlib.contextmanager
def output_folder(
    path: str | Path, overwrite: bool = False, inputs: Iterable = ()
) -> Iterator[Path]:
    """Write into the yielded staging folder; it becomes ``path`` on success only."""
    out = OutputFolder(path, overwrite, inputs)
    staging = out.claim()
    try:
        yield staging
    except BaseException:
        out.abandon()
        raise
    out.publish()


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
