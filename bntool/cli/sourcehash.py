"""The source file's sha256, computed on a thread while the command works.

A written file records its source's name and sha256 (``io.writing.metadata_for``).
Hashing a 100 MB checkpoint takes about 0.07 s of CPU; hashlib lets go of the
GIL while it digests, so on a thread it overlaps the operation (whose forward
passes leave a core idle between their kernels) instead of adding to the
command's time. The digest is the file's bytes either way.
"""

from __future__ import annotations

import threading
from typing import Any


def hash_meanwhile(source: Any) -> threading.Thread:
    """Start computing ``source.loaded.sha256`` (a cached property: kept once computed) on a thread; join it
    before the write reads it."""
    thread = threading.Thread(target=_hash, args=(source.loaded,), name="bntool-source-sha256", daemon=True)
    thread.start()
    return thread


def _hash(loaded: Any) -> None:
    try:
        loaded.sha256  # noqa: B018 - a cached property: computed and kept
    except OSError:
        pass  # (asked again at the write, where the error is the command's own)
