"""inspect: what is going on with every BN of a model or a checkpoint (``inspect``, ``findings``, ``picture``).

The one name kept here is the deprecated ``bntool.inspection.plot`` (now ``bntool.plot``),
warned for one release; it is looked up on use, so importing the package imports nothing.
"""

from __future__ import annotations

import warnings
from typing import Any


def __getattr__(name: str) -> Any:
    if name == "plot":
        warnings.warn("`bntool.inspection.plot` is now `bntool.plot`; the old name goes in the next release",
                      FutureWarning, stacklevel=2)
        from .picture import plot

        return plot
    raise AttributeError(f"module 'bntool.inspection' has no attribute {name!r}")
