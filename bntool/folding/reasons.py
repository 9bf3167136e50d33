"""The reasons a BN is left, worded once for every front end (module dataflow, ONNX graph, torch.export program).

Each function returns the words ``Skip.reason`` carries; the rules of
``rules`` / ``layers`` (modules), ``onnx_rules`` (ONNX graphs) and
``program`` (programs) call the same ones, so a situation reads the same
whatever the BN came from. Names are shown as the front end names layers
(a module's qualified name, a node's name, or a program's tensor owner).
"""

from __future__ import annotations

from collections.abc import Sequence

GRAPH_INPUT = "is applied to a model input, so no layer produces what it normalizes"
MODEL_OUTPUT = "its output is a model output, with no layer after it"


def shown(names: Sequence[str], limit: int = 3) -> str:
    return ", ".join(f"`{n}`" for n in names[:limit]) or "nothing"


def a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def also_read(source: str, readers: Sequence[str]) -> str:
    return f"the output of `{source}` is also read by {shown(readers)}"


def stands_between(op: str) -> str:
    return f"an operation (`{op}`) stands between its input's producer and the BN"


def read_by(readers: Sequence[str]) -> str:
    return f"its output is read by {shown(readers)}, not by one layer it could fold into"


def goes_through(reader: str) -> str:
    return f"its output goes through `{reader}` before reaching a layer"


def reads_others(reader: str) -> str:
    return f"`{reader}` reads other tensors besides the BN's output"


def cannot_fold_into(name: str, kind: str) -> str:
    return f"`{name}` is {a(kind)}, which bntool cannot fold into"


def transposed_forward(consumer: str) -> str:
    return f"`{consumer}` is a transposed conv, into which bntool folds only from the output side"


def channels_differ(name: str, channels: int, side: str, features: int) -> str:
    return f"`{name}` has {channels} {side} channels but the BN has {features}"


def zero_pads(consumer: str) -> str:
    return f"`{consumer}` zero-pads its input, and the padding would not see the BN's shift"


NO_STATISTICS = ("has no running statistics (track_running_stats=False), so eval mode normalizes with batch "
                 "statistics; run `bntool recalibrate` to give it statistics, then fold")


def multiplied_by_zero(producer: str) -> str:
    return f"the output of `{producer}` is multiplied by 0 before the BN"


def linear_axis(rank: int) -> str:
    return f"it normalizes axis 1 of a {rank}-D input, but the Linear's features are on the last axis"


def reshape_channels(layer: str) -> str:
    return f"the reshape between `{layer}` and the BN does not map each channel of `{layer}` into one channel of the BN"


def called_often(layer: str, calls: int, bn: str) -> str:
    return (f"`{layer}` is called {calls} times in one forward pass, and folding would change every call, "
            f"not only the ones next to `{bn}`")


def not_exact_either(backward: str, forward: str) -> str:
    return f"{backward}; folding forward is not exact either: {forward}"


UNKNOWN_SHAPE = "the shape of its input is unknown; pass example inputs"


def rejected(into: str, point: str, error: float, tolerance: float) -> str:
    return (f"rejected by verification: folded into `{into}`, layer `{point}` differed from the "
            f"original by {error:.3g} (tolerance {tolerance:.3g})")
