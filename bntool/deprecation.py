"""Old spellings of the public API, accepted for one release with a ``FutureWarning`` that names the new one.

Every operation takes ``op(model, <required data>, *, include, exclude,
example_inputs, inplace, verify, device, seed, atol, rtol, ...)``. What it
took before keeps working until the next release: example inputs passed by
position, ``consume`` (now ``inplace``), ``only`` (now ``include``), and
``export_onnx(model, example_inputs, path)`` (now ``export_onnx(model, path,
example_inputs=...)``).
"""

from __future__ import annotations

import warnings
from typing import Any

from .errors import InputError


class _Unset:
    """An argument not given (``None`` is a value some parameters take)."""

    def __repr__(self) -> str:
        return "<not given>"


UNSET: Any = _Unset()


def warn(message: str, stacklevel: int = 4) -> None:
    """A ``FutureWarning`` pointing at the caller of the public function (helper -> function -> caller)."""
    warnings.warn(message, FutureWarning, stacklevel=stacklevel)


def positional(parameter: str, positional: Any, keyword: Any, op: str) -> Any:
    """A keyword-only ``parameter`` given by position (the old spelling, warned) or by keyword; never both."""
    if positional is UNSET:
        return keyword
    if keyword is not None:
        raise InputError(f"`{op}` got `{parameter}` both by position and by keyword; pass it once, "
                         f"as `{parameter}=...`")
    warn(f"passing `{parameter}` to `{op}` by position is deprecated and stops working in the next release; "
         f"pass `{parameter}=...`")
    return positional


def renamed(old: str, old_value: Any, new: str, new_value: Any, op: str) -> Any:
    """The value of ``new``, or of its older name ``old`` (warned); never both."""
    if old_value is UNSET:
        return new_value
    if new_value is not None and new_value is not False:
        raise InputError(f"pass `{new}` or its older name `{old}`, not both")
    warn(f"`{old}` of `{op}` is deprecated and stops working in the next release; pass `{new}` instead")
    return old_value


def plumbing(given: dict[str, Any], names: tuple[str, ...], op: str, instead: str) -> None:
    """Keyword arguments ``op`` took as bntool's own plumbing (``names``): accepted one release, warned; anything
    else is the ``TypeError`` Python would raise."""
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise TypeError(f"{op}() got an unexpected keyword argument {unknown[0]!r}")
    if given:
        warn(f"{', '.join(f'`{k}`' for k in given)} of `{op}` is bntool's internal plumbing and stops working in the "
             f"next release; {instead}")
