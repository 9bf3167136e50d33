"""The 0.2 call order of ``freeze`` / ``unfreeze`` (the selection second), accepted one more release.

``freeze(model, example_inputs=None, *, include=None, ...)`` is the shape of
every operation; before, the second positional argument was ``include``
(then ``exclude``, ...). A call that still passes a selection there (a
pattern, a list of patterns, or more than one positional argument) is mapped
to the keywords with a ``FutureWarning`` naming them.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def _is_selection(value: Any) -> bool:
    if isinstance(value, str):
        return True
    # (an empty list selected as it did: no forward of a BatchNorm model takes no inputs)
    return isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value)


def selection_was_positional(*old_names: str) -> Callable[[F], F]:
    """Map a 0.2-style call ``func(model, include, exclude, ...)`` (``old_names`` in order) to keywords."""

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            rest = args[1:]
            old = bool(rest) and (_is_selection(rest[0]) or (rest[0] is None and len(rest) > 1))
            if not old and len(rest) <= 1:
                return func(*args, **kwargs)
            if not old or len(rest) > len(old_names):
                raise TypeError(f"{func.__name__}() takes 2 positional arguments but {len(args)} were given")
            names = old_names[: len(rest)]
            for name, value in zip(names, rest):
                if name in kwargs:
                    raise TypeError(f"{func.__name__}() got multiple values for argument '{name}'")
                kwargs[name] = value
            spelled = ", ".join(f"`{name}=`" for name in names)
            warnings.warn(
                f"passing the selection to `{func.__name__}` by position is deprecated and will stop working in the "
                f"next release: the second positional argument is `example_inputs`; pass {spelled} by keyword, "
                f"e.g. `{func.__name__}(model, include={rest[0]!r})`",
                FutureWarning, stacklevel=2)
            return func(args[0], **kwargs)

        return call  # type: ignore[return-value]

    return wrap
