"""Why a BatchNorm does not fold: the phrases every fold front end says the same way.

The module fold (``rules`` / ``layers``) and the program fold (``program``)
meet the same situations; each reason is written here once, so that a user
reads the same words whichever graph bntool walked. Names are shown as the
front end names layers (a module's qualified name, or a program's tensor
owner).
"""

from __future__ import annotations

from collections.abc import Sequence

NO_STATISTICS = ("has no running statistics (track_running_stats=False), so eval mode normalizes with batch "
                 "statistics; run `bntool recalibrate` to give it statistics, then fold")
MODEL_INPUT = "is applied to a model input, so no layer produces what it normalizes"
MODEL_OUTPUT = "its output is a model output, with no layer after it"
FORWARD_TRANSPOSED = "`{}` is a transposed conv, into which bntool folds only from the output side"


def also_read_by(source: str, readers: Sequence[str]) -> str:
    shown = ", ".join(f"`{r}`" for r in readers[:3])
    return f"the output of `{source}` is also read by {shown}"


def operation_between(op: str) -> str:
    return f"an operation (`{op}`) stands between its input's producer and the BN"


def multiplied_by_zero(producer: str) -> str:
    return f"the output of `{producer}` is multiplied by 0 before the BN"


def read_by(readers: Sequence[str]) -> str:
    shown = ", ".join(f"`{r}`" for r in readers[:3]) or "nothing"
    return f"its output is read by {shown}, not by one layer it could fold into"


def goes_through(op: str) -> str:
    return f"its output goes through `{op}` before reaching a layer"


def reads_others(layer: str) -> str:
    return f"`{layer}` reads other tensors besides the BN's output"


def channel_count(layer: str, channels: int, features: int, *, backward: bool) -> str:
    side = "output" if backward else "input"
    return f"`{layer}` has {channels} {side} channels but the BN has {features}"


def linear_axis(rank: int) -> str:
    return f"it normalizes axis 1 of a {rank}-D input, but the Linear's features are on the last axis"


def reshape_channels(layer: str) -> str:
    return f"the reshape between `{layer}` and the BN does not map each channel of `{layer}` into one channel of the BN"


def zero_pads(layer: str) -> str:
    return f"`{layer}` zero-pads its input, and the padding would not see the BN's shift"


def called_often(layer: str, calls: int, bn: str) -> str:
    return (f"`{layer}` is called {calls} times in one forward pass, and folding would change every call, "
            f"not only the ones next to `{bn}`")


def not_exact_either(backward: str, forward: str) -> str:
    return f"{backward}; folding forward is not exact either: {forward}"


def rejected(into: str, point: str, error: float, tolerance: float) -> str:
    return (f"rejected by verification: folded into `{into}`, layer `{point}` differed from the "
            f"original by {error:.3g} (tolerance {tolerance:.3g})")
