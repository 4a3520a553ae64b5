"""Atomic file writes: a crash or a full disk never leaves a half-written file behind."""

import glob
import os
import tempfile
from typing import Callable

TEMP_PREFIX, TEMP_SUFFIX = "tmp-", ".part"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    The file gets the permissions a plain ``open`` would give it (0666 less the
    umask), not the 0600 of the temporary file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def remove_stale_temporaries(directory: str) -> list:
    """Delete the temporaries a killed writer left in ``directory``; the caller must hold its lock."""
    stale = glob.glob(os.path.join(glob.escape(directory), f"{TEMP_PREFIX}*{TEMP_SUFFIX}"))
    for path in stale:
        os.unlink(path)
    return stale
