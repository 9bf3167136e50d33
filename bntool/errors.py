"""Typed errors. Every user-controlled problem is raised as one of these.

A message says what failed, where (file, key, qualified layer name), expected
versus got where that helps, and what to do. The library names what to pass
in the caller's terms, its Python parameters in backticks (`` `example_inputs` ``,
`` `include` ``). The library knows no command-line flag: ``bntool.cli.main``,
the one error boundary, turns a ``BntoolError`` into ``Error: <message>`` on
stderr, with each parameter replaced by the flag that sets it
(``bntool.cli.flags``), and its ``exit_code``. A parameter whose name could
also be quoted text (`` `out` ``, `` `model` ``) is spelt through ``named``,
which the CLI points at its flags (``naming``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

_NAMES: ContextVar[Mapping[str, str] | None] = ContextVar("bntool_names", default=None)


def named(parameter: str) -> str:
    """How a message names ``parameter`` (a Python parameter in backticks, `` `out` ``): as itself, or as the caller
    chose with ``naming`` (the command line: by the flag that sets it)."""
    return (_NAMES.get() or {}).get(parameter, parameter)


@contextmanager
def naming(names: Mapping[str, str]) -> Iterator[None]:
    """Within the block, messages made with ``named`` name each parameter in ``names`` by its value instead.

    For names that could also be what a message quotes (`` `out` `` is also a
    file called ``out``), so that they cannot be replaced in the finished text.
    """
    token = _NAMES.set({**(_NAMES.get() or {}), **names})
    try:
        yield
    finally:
        _NAMES.reset(token)


class BntoolError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class InputError(BntoolError):
    """Bad input or usage: a file, flag, model spec or data set that cannot be used."""

    exit_code = 2


class UnsafeFileError(InputError):
    """Loading the file would run code from it (arbitrary unpickling)."""


class CheckpointMismatchError(InputError):
    """The weights do not fit the model they are loaded into."""


class VerificationError(BntoolError):
    """The result does not compute what the original computed; nothing was written."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None):
        super().__init__(message)
        self.report = report


def require_module(value: object, parameter: str = "model") -> None:
    """Raise ``InputError`` unless ``value`` is a built ``torch.nn.Module`` (passing the class, the factory or a
    checkpoint's path instead is an easy slip, and would fail deep inside with an ``AttributeError``)."""
    from torch import nn  # (here: the CLI imports this module before torch)

    if isinstance(value, nn.Module):
        return
    if isinstance(value, type) or callable(value):
        name = getattr(value, "__name__", type(value).__name__)
        kind = "class" if isinstance(value, type) else "function"
        raise InputError(f"`{parameter}` is the {kind} `{name}`, not a model; pass a built model, such as `{name}()`")
    if isinstance(value, (str, os.PathLike)):
        raise InputError(f"`{parameter}` is the path `{value}`, not a model; build the model, then read the checkpoint "
                         "into it with `bntool.load(path, model)`")
    raise InputError(f"`{parameter}` must be a torch.nn.Module, not a {type(value).__name__}")


def require_initialized(model: object, doing: str) -> None:
    """Raise ``InputError`` naming the first lazy module of ``model`` whose parameters are not yet created (its
    shapes are unknown until a forward pass runs); ``doing`` ends the message ("converting", "freezing")."""
    from torch.nn.modules.lazy import LazyModuleMixin

    lazy = [n for n, m in model.named_modules() if isinstance(m, LazyModuleMixin) and m.has_uninitialized_params()]
    if lazy:
        raise InputError(f"`{lazy[0]}` is an uninitialized lazy module; run one forward pass before {doing}")


def shorten(text: str, limit: int = 200) -> str:
    """``text`` cut to about ``limit`` characters at a word boundary, marked with "..." when cut."""
    text = " ".join(str(text).split())
    if len(text) <= limit:
        return text
    cut = text[:limit].rsplit(" ", 1)[0].rstrip(",;:")
    return (cut if len(cut) > limit // 2 else text[:limit]) + " ..."


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of what ``exc`` says (its type's name when it says nothing), cut to ``limit`` if given."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return shorten(line, limit) if limit else line


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
    first = first_line(exc, 120)
    return (f"ran out of memory{' ' + doing if doing else ''} on {where} ({first}); pass smaller `example_inputs` "
            'or a smaller `batch_size`, or verify on the CPU (`device="cpu"`) for a model too large for the GPU')
