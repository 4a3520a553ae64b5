"""A training run's output directory: one run at a time, finished results never overwritten by accident."""

import fcntl
import os
import shutil
import tempfile

from ._io import atomic_write_text, remove_stale_temporaries

RUN_FILES = ("adapter.safetensors", "checkpoint.pt", "metrics.jsonl", "summary.json", "curves.png", "confusion.png")
LOCK_NAME = ".nearl.lock"
# A replacing run writes here until it has a checkpoint of its own ...
STAGING_NAME = ".nearl-new"
# ... and this is the same folder while its files replace the old run's, so a crash then is finished at the next open.
COMMIT_NAME = ".nearl-commit"
# In that folder: the names of the new run's files, so a commit finished later knows which ones it moved already.
MANIFEST_NAME = "files.txt"


class RunDirError(Exception):
    """The output directory cannot be used as asked; the message says what to pass instead."""


class RunDir:
    """Claim ``path`` for one training run.

    A lock file held with ``flock`` for the life of the process stops a second
    run (or a second resume) sharing the directory; the lock goes with the
    process, so a killed run never leaves it stuck. A directory that holds a
    run's files is refused unless the run is resumed (``resume``) or replaced
    (``overwrite``). A replacing run writes into ``OUT/.nearl-new`` (see
    :attr:`write_dir`) and replaces the old run only at :meth:`commit`, once it
    has its first checkpoint: a refusal, crash, divergence or Ctrl-C before
    then leaves the old run as it was, byte for byte.

    Args:
        path: the output directory (created if missing).
        resume: continue the run whose checkpoint is there.
        overwrite: replace the run that is there, once the new one has its first checkpoint.

    Example:
        >>> out = RunDir("runs/a", overwrite=True)
        >>> save_checkpoint(out.write_dir, ...); out.commit()
    """

    def __init__(self, path: str, resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise RunDirError("--resume and --overwrite contradict each other; pass one")
        self.path = path
        self.staging = None
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
            if os.path.isdir(os.path.join(path, COMMIT_NAME)):
                self._finish_commit()
            # A replacing run killed before its first checkpoint: nothing of it to keep.
            shutil.rmtree(os.path.join(path, STAGING_NAME), ignore_errors=True)
        except OSError as err:
            self.close()
            raise RunDirError(f"cannot clean up after an earlier run in {path!r}: {err}") from err
        self.existing = [f for f in RUN_FILES if os.path.exists(os.path.join(path, f))]
        if self.existing and not resume and not overwrite:
            state = "a finished run" if "summary.json" in self.existing else "an unfinished run"
            self.close()
            raise RunDirError(f"--out {path!r} holds {state} ({', '.join(self.existing)}); pass --resume to continue "
                              "it, --overwrite to replace it, or choose another --out")
        if overwrite and self.existing:
            staging = os.path.join(path, STAGING_NAME)
            try:
                os.mkdir(staging)
            except OSError as err:
                self.close()
                raise RunDirError(f"--overwrite: cannot create {staging!r} for the new run: {err}") from err
            self.staging = staging

    @property
    def write_dir(self) -> str:
        """Where the run writes its files now: ``path``, or the staging folder until :meth:`commit`."""
        return self.staging or self.path

    @property
    def replacing(self) -> bool:
        """A run to replace is still there, untouched (``overwrite`` before :meth:`commit`)."""
        return self.staging is not None

    def commit(self) -> None:
        """Replace the old run with the new run's files; called once the new run has its first checkpoint.

        Does nothing when there is no run to replace, or it is already replaced.
        """
        if self.staging is None:
            return
        try:
            staged = [f for f in RUN_FILES if os.path.isfile(os.path.join(self.staging, f))]
            atomic_write_text(os.path.join(self.staging, MANIFEST_NAME), "".join(f + "\n" for f in staged))
            # One rename marks the point of no return: from here a crash is rolled forward at the next open.
            os.rename(self.staging, os.path.join(self.path, COMMIT_NAME))
            self.staging = None
            self._finish_commit()
        except OSError as err:
            raise RunDirError(f"--overwrite: cannot move the new run's files into {self.path!r}: {err}") from err

    def _finish_commit(self) -> None:
        commit = os.path.join(self.path, COMMIT_NAME)
        with open(os.path.join(commit, MANIFEST_NAME), encoding="utf-8") as f:
            staged = [name for name in f.read().split() if name in RUN_FILES]
        # The old run's files the new one has not written yet go first, its summary (a finished run's mark) first
        # of all, so no old summary or plot ever sits beside the new checkpoint.
        for name in sorted(set(RUN_FILES) - set(staged), key=lambda name: name != "summary.json"):
            if os.path.lexists(os.path.join(self.path, name)):
                os.unlink(os.path.join(self.path, name))
        for name in staged:
            # A file already moved by the commit this one finishes is not in the folder any more.
            if os.path.exists(os.path.join(commit, name)):
                os.replace(os.path.join(commit, name), os.path.join(self.path, name))
        shutil.rmtree(commit)

    def close(self) -> None:
        """Release the lock; a replacing run that never reached :meth:`commit` leaves nothing behind."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        self._lock.close()
