"""The reasons a BN is left, worded once for every front end (module dataflow and ONNX graph alike).

Each function returns the words ``Skip.reason`` carries; the rules of
``rules`` / ``layers`` (modules) and ``onnx_rules`` (ONNX graphs) call the
same ones, so a situation reads the same whatever the BN came from.
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


def multiplied_by_zero(producer: str) -> str:
    return f"the output of `{producer}` is multiplied by 0 before the BN"


def not_exact_either(backward: str, forward: str) -> str:
    return f"{backward}; folding forward is not exact either: {forward}"


UNKNOWN_SHAPE = "the shape of its input is unknown; pass example inputs"
