"""A training run's output directory: one run at a time, finished results never overwritten by accident."""

import fcntl
import os
import tempfile

from ._io import remove_stale_temporaries

RUN_FILES = ("adapter.safetensors", "checkpoint.pt", "metrics.jsonl", "summary.json", "curves.png", "confusion.png")
LOCK_NAME = ".nearl.lock"


class RunDirError(Exception):
    """The output directory cannot be used as asked; the message says what to pass instead."""


class RunDir:
    """Claim ``path`` for one training run.

    A lock file held with ``flock`` for the life of the process stops a second
    run (or a second resume) sharing the directory; the lock goes with the
    process, so a killed run never leaves it stuck. A directory that holds a
    run's files is refused unless the run is resumed (``resume``) or replaced
    (``overwrite``: :meth:`clear` deletes the old run's files before the
    first save, so no old summary or plot sits beside a new checkpoint).

    Args:
        path: the output directory (created if missing).
        resume: continue the run whose checkpoint is there.
        overwrite: delete the run that is there and start a new one.
    """

    def __init__(self, path: str, resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite contradict each other; pass one")
        self.path = path
        try:
            os.makedirs(path, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
                pass
            self._lock = open(os.path.join(path, LOCK_NAME), "a+")
        except OSError as err:
            raise RunDirError(f"cannot write to output directory {path!r}: {err}") from err
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RunDirError(f"another nearl run is using --out {path!r} right now; wait for it or choose "
                              "another --out") from None
        try:
            remove_stale_temporaries(path)
        except OSError as err:
            self.close()
            raise RunDirError(f"cannot clean up the temporaries in {path!r}: {err}") from err
        self.existing = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
        if self.existing and not resume and not overwrite:
            state = "a finished run" if "summary.json" in self.existing else "an unfinished run"
            self.close()
            raise RunDirError(f"--out {path!r} holds {state} ({', '.join(self.existing)}); pass --resume to continue "
                              "it, --overwrite to replace it, or choose another --out")
        self.overwrite = overwrite

    def clear(self) -> None:
        """With ``overwrite``, delete the old run's files; called once every input has been checked, so a
        typo in the new run's flags never costs the old run."""
        if not self.overwrite:
            return
        try:
            for f in self.existing:
                os.unlink(os.path.join(self.path, f))
        except OSError as err:
            raise RunDirError(f"--overwrite: cannot delete the old run's files in {self.path!r}: {err}") from err
        self.existing = []

    def close(self) -> None:
        self._lock.close()
