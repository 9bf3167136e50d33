"""Typed errors. Every user-controlled problem is raised as one of these.

A message says what failed, where (file, key, qualified layer name), expected
versus got where that helps, and what to do. ``bntool.cli.main`` turns a
``BntoolError`` into ``Error: <message>`` on stderr and its ``exit_code``.
"""

from __future__ import annotations


class BntoolError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InputError(BntoolError):
    """Bad input or usage: a file, flag, model spec or data set that cannot be used."""

    exit_code = 2


class UnsafeFileError(InputError):
    """Loading the file would run code from it (arbitrary unpickling)."""


class CheckpointMismatchError(InputError):
    """The weights do not fit the model built from ``--model``."""


class VerificationError(BntoolError):
    """The result does not compute what the original computed; nothing was written."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None):
        super().__init__(message)
        self.report = report


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to about ``limit`` characters at a word boundary, marked with "..." when cut."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:")
    return (cut if len(cut) > limit // 2 else text[:limit]) + " ..."


def user_exit(exc: BaseException) -> str:
    """What user code did instead of returning: ``called sys.exit(3)`` or ``raised Boom: why``."""
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    text = shorten(str(exc), 120)
    return f"raised {type(exc).__name__}{': ' + text if text else ''}"


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is an allocation failure (host or GPU), whatever raised it."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "out of memory", "Cannot allocate memory", "bad_alloc"))


def out_of_memory_message(exc: BaseException, doing: str = "") -> str:
    where = "the GPU" if "CUDA" in str(exc) or "cuda" in str(exc) else "the machine"
    first = shorten((str(exc).strip().splitlines() or [type(exc).__name__])[0], 120)
    return (f"ran out of memory{' ' + doing if doing else ''} on {where} ({first}); pass a smaller --input-shape "
            "or --batch-size, or use --device cpu for a model too large for the GPU")
