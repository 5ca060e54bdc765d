"""How commands report as they go: progress bars that suit where they are shown (tqdm's bar
on a terminal; in a log file, make demo's log, a sweep's sweep.log, CI, one plain line every
10 seconds and at the end instead of thousands of carriage-return updates), and counts in
words.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


class _Lines:
    """A stream for tqdm that writes each of its updates as a line of its own."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(*, enabled: bool = True, **kw) -> tqdm:
    """tqdm(**kw), or a log-friendly one when stderr is not a terminal; `enabled=False`: a
    bar that shows nothing."""
    if not enabled or sys.stderr.isatty():
        return tqdm(disable=not enabled, **kw)
    # In a log a bar's last line is its result: it stays (leave), whatever a terminal would do.
    return tqdm(file=_Lines(sys.stderr), mininterval=10, ncols=100, **{**kw, "leave": True})


def plural(n: int, word: str, many: str | None = None) -> str:
    """'1 epoch', '8 epochs'; '1 class', '2 classes' with `many`."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"
