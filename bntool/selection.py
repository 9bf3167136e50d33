"""Choosing layers by name: ``include`` / ``exclude`` fnmatch patterns on qualified module names.

One rule for every operation that takes a selection (freeze, unfreeze,
recalibrate): a pattern matches a layer's qualified name or any of its
ancestors' (``layer1`` selects ``layer1.0.bn1``), no ``include`` selects every
candidate, ``exclude`` wins over ``include``, and a pattern that matches no
candidate is an error that lists them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

from .errors import InputError
from .norms import is_batchnorm


def patterns(value: str | Iterable[str] | None) -> list[str]:
    """``"a"`` -> ``["a"]``; an iterable of patterns as a list; ``None`` -> ``[]``."""
    return [value] if isinstance(value, str) else list(value or ())


def matches(name: str, pattern: str) -> bool:
    """fnmatch on the qualified name or on any of its ancestors."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


def select(
    candidates: Sequence[str],
    include: str | Iterable[str] | None,
    exclude: str | Iterable[str] | None,
    *,
    what: str,
    owner: str,
) -> tuple[list[str], dict[str, str]]:
    """The candidates selected, in order, and for each other candidate why not.

    ``what`` names the candidates in messages ("BatchNorm"), ``owner`` the
    model they belong to.
    """
    include, exclude = patterns(include), patterns(exclude)
    for parameter, given in (("include", include), ("exclude", exclude)):
        for pattern in given:
            if not any(matches(name, pattern) for name in candidates):
                shown = ", ".join(f"`{n}`" for n in candidates[:8]) + (", ..." if len(candidates) > 8 else "")
                available = f"the {len(candidates)} there are {shown}" if candidates else "it has none"
                raise InputError(
                    f"{parameter} pattern `{pattern}` matches no {what} layer in `{owner}`; {available} — patterns "
                    "are fnmatch on qualified module names, e.g. `layer1.*`"
                )
    selected, left = [], {}
    for name in candidates:
        hit = next((p for p in exclude if matches(name, p)), None)
        if include and not any(matches(name, p) for p in include):
            left[name] = "not selected by the include patterns"
        elif hit is not None:
            left[name] = f"excluded by the exclude pattern `{hit}`"
        else:
            selected.append(name)
    return selected, left


def unselected_bns(model, include: str | Iterable[str] | None, exclude: str | Iterable[str] | None) -> dict[str, str]:
    """The BNs of ``model`` that ``include`` / ``exclude`` leave, each with the reason (``select``'s one rule)."""
    if include is None and exclude is None:
        return {}
    candidates = [n for n, m in model.named_modules() if is_batchnorm(m)]
    return select(candidates, include, exclude, what="BatchNorm", owner=type(model).__name__)[1]
