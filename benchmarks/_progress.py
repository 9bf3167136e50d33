"""Progress of a benchmark as it goes: one line per step on stderr, flushed, with the time so far.

The results stay on stdout (line-buffered, so a pipe or a log shows each as it
comes); the progress lines say what is running during the minutes in between.
"""

from __future__ import annotations

import sys
import time

_START = time.perf_counter()


def start() -> None:
    """Line-buffer stdout, so that results reach a pipe or a log as they are printed."""
    sys.stdout.reconfigure(line_buffering=True)


def step(message: str) -> None:
    print(f"[{time.perf_counter() - _START:6.1f} s] {message}", file=sys.stderr, flush=True)
