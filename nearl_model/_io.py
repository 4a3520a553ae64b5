"""Atomic file writes: a crash or a full disk never leaves a half-written file behind."""

import glob
import io
import os
import tempfile
from typing import Callable

TEMP_PREFIX, TEMP_SUFFIX = "tmp-", ".part"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    # A filesystem that allocates late (ext4, XFS, NFS) may report a full disk only here, not at write().
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The file gets the permissions a plain ``open`` would give it (0666 less the
    umask), not the 0600 of the temporary file. A failed write raises OSError and
    leaves ``path`` as it was.
    """
    directory = os.path.dirname(os.path.abspath(path))
    # The name says whose temporary it is: tmp-checkpoint.pt-x1y2z3.part.
    fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{os.path.basename(path)}-", suffix=TEMP_SUFFIX, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_save_figure(path: str, fig, **kwargs) -> None:
    """A matplotlib figure as PNG, rendered in memory first so a failed write is an OSError, not half a file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    atomic_write_bytes(path, buf.getvalue())


def remove_stale_temporaries(directory: str) -> list:
    """Delete the temporaries a killed writer left in ``directory``; the caller must hold its lock."""
    stale = glob.glob(os.path.join(glob.escape(directory), f"{TEMP_PREFIX}*{TEMP_SUFFIX}"))
    for path in stale:
        os.unlink(path)
    return stale
