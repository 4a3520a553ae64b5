"""Progress that reaches a log: a tqdm bar on a terminal, a plain line every few seconds elsewhere."""

import sys
import time
from typing import Iterable, Iterator, Optional

from tqdm import tqdm

# How often a non-terminal gets a line; a user tailing a log waits no longer than this.
EVERY_SECONDS = 5.0


class Progress:
    """Counts ``total`` units of work named ``desc``.

    On a terminal it draws a tqdm bar on stderr; when stderr is not a terminal
    (a pipe, a file, a CI log) it prints ``desc: n/total (info)`` to stdout at
    most every ``every`` seconds, so long silences never reach a log.

    Args:
        total: units expected (None if unknown).
        desc: what is counted, e.g. ``"epoch 3/20"``.
        enabled: False for non-main processes of a distributed run.
        every: seconds between plain lines (default ``EVERY_SECONDS``).
    """

    def __init__(self, total: Optional[int], desc: str, enabled: bool = True, every: Optional[float] = None):
        self.total, self.desc, self.n = total, desc, 0
        self.every = EVERY_SECONDS if every is None else every
        self.enabled = enabled
        self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True) if enabled and _terminal() else None
        self.last = time.monotonic()

    def update(self, n: int = 1, **info) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if info:
                self.bar.set_postfix(info, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            of = f"/{self.total}" if self.total is not None else ""
            extra = "  " + " ".join(f"{k} {v}" for k, v in info.items()) if info else ""
            print(f"{self.desc}: {self.n}{of}{extra}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def track(iterable: Iterable, desc: str, total: Optional[int] = None, enabled: bool = True) -> Iterator:
    """Yield from ``iterable`` while counting it with a :class:`Progress`."""
    progress = Progress(total if total is not None else _len(iterable), desc, enabled)
    try:
        for item in iterable:
            yield item
            progress.update()
    finally:
        progress.close()


def _len(iterable) -> Optional[int]:
    try:
        return len(iterable)
    except TypeError:
        return None


def _terminal() -> bool:
    return sys.stderr.isatty()
