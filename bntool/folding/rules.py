"""The fold rules: which BatchNorm folds into which layer, and why each other one does not.

``plan_from_dataflow`` decides from the dataflow (``graph.py``) and from what
each BN module computes (``bnform.py``) alone; it returns data
(``foldplan``): a ``FoldPlan`` of ``FoldPair`` s and, for every other BN, a
``Skip`` with its reason. ``bntool fold``, ``bntool inspect`` and the reports
all read the same plan.

The rules, for every call of a BN:

* **backward** into the module whose output it normalizes (its *producer*):
  the BN's normalization reads its input directly; between producer and BN
  stand only multiplies / adds by numbers (kept, and accounted for) and
  row-major reshapes that keep each of the producer's channels within one
  BN channel (the same channel, or a block of them); nothing else reads
  the producer's output or anything in between; and every call of the
  producer feeds this BN. A BN called after several producers folds into
  each of them; a block called twice folds once.
* **forward** into the one module that reads its output (its *consumer*),
  when backward is not possible: the BN's output is its normalization's
  output (no activation after it), the same conditions mirrored, and the
  consumer is a linear or a conv with no zero padding.

(The backward and forward walks mirror each other and read best side by
side; what a layer must be to take a fold is ``foldlayers``'.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import require_module
from ..graph.dataflow import Dataflow, dataflow
from ..graph.ops import is_layer_function
from ..norms import bn_forward_is_standard, has_statistics, is_batchnorm
from ..report import Skip
from . import bnform, reasons
from .layers import channel_reason, has_padding, layer_reason, parameter_owners, read_elsewhere_reason
from .plan import CONVS, TRANSPOSED, FoldPair, FoldPlan


@dataclass(frozen=True)
class _Link:
    """The path from one BN call to the module at its other end, through ops that are kept."""

    module: str | None = None
    op: int = -1
    through: tuple[float, float] = (1.0, 0.0)
    reshaped: bool = False
    blocker: str | None = None


def plan_fold(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None = None) -> FoldPlan:
    """Which BNs fold into which layer, and why each other BN does not."""
    require_module(model)
    return plan_from_dataflow(model, dataflow(model, example_inputs))


def plan_from_dataflow(model: nn.Module, flow: Dataflow, rejected: Mapping[str, str] | None = None,
                       forms: dict[str, bnform.NormForm] | None = None) -> FoldPlan:
    """The plan for ``model``; BNs in ``rejected`` (name -> reason) are left, with that reason.

    ``forms``, when given, receives what each BN of a pair computes (``bnform.analyze``), for ``apply_plan``
    to use instead of tracing each BN again.
    """
    modules = dict(model.named_modules())
    owners = parameter_owners(model)
    read = [op.target for op in flow.tensor_reads]  # model tensors the forward reads directly
    shared: dict = {}  # BN subclass forms by structure: each structure is traced once
    pairs: list[FoldPair] = []
    skips: list[Skip] = []
    for name in [n for n, m in modules.items() if is_batchnorm(m)]:  # (bn_names, from the modules at hand)
        if rejected and name in rejected:
            skips.append(Skip(name, rejected[name]))
            continue
        result = _plan_bn(name, modules[name], flow, modules, owners, read, shared)
        if isinstance(result, str):
            skips.append(Skip(name, result))
        else:
            pairs.extend(result[0])
            if forms is not None:
                forms[name] = result[1]
    return FoldPlan(tuple(pairs), tuple(skips), flow.method, flow.note)


def _plan_bn(name: str, bn: nn.Module, flow: Dataflow, modules, owners, read: Sequence[str] = (),
             shared: dict | None = None) -> tuple[list[FoldPair], bnform.NormForm] | str:
    """The BN's pairs and what it computes, or why it does not fold. ``read``: the model tensors the forward reads
    directly, outside the calls of the modules that hold them."""
    calls = flow.calls.get(name, ())
    if name == "":
        return "the model is a single BatchNorm: there is no layer to fold it into"
    if not calls:
        host = _called_ancestor(name, flow)
        if host is not None:
            return (f"runs inside `{host}` (a {type(modules[host]).__name__} with its own forward), which bntool "
                    "treats as one layer and does not look into")
        if flow.method == "recorded":
            return "did not run on the verification inputs, so its dataflow is unknown"
        return "is never called in the model's eval-mode forward (a training-only branch, or unused)"
    outside = next((t for t in read if t.startswith(f"{name}.")), None)
    if outside is not None:  # (DiverseBranchBlock pads with values computed from its BN's statistics)
        return (f"its tensors are also read outside its own call (`{outside}`), and folding would change or remove "
                "them")
    if not has_statistics(bn):
        return reasons.NO_STATISTICS
    if bn._forward_pre_hooks:
        return "has a forward pre-hook, which would see its input already normalized after folding"
    rank = _rank(flow, calls, bn)
    form = bnform.analyze(bn, rank, shared)
    if not form.foldable:
        return form.reason or "its forward is not a BatchNorm bntool can fold"
    becomes = {"standard": "removed", "identity": "identity"}.get(form.kind, "removed" if form.removable else "rewritten")

    def pair(target: str, direction: str, through: tuple[float, float]) -> FoldPair:
        return FoldPair(name, target, direction, becomes, type(modules[target]).__name__, through,
                        rank if becomes == "rewritten" else None, form.keeps if becomes == "rewritten" else ())

    backward = _backward(name, bn, form, calls, flow, modules, owners)
    if not isinstance(backward, str):
        return [pair(target, "backward", through) for target, through in backward], form
    forward = _forward(name, bn, form, calls, flow, modules, owners)
    if not isinstance(forward, str):
        return [pair(target, "forward", through) for target, through in forward], form
    return reasons.not_exact_either(backward, forward)


def _called_ancestor(name: str, flow: Dataflow) -> str | None:
    """The nearest enclosing module that the dataflow saw called as one op (``a.conv`` for ``a.conv.norm``)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:i]) in flow.calls:
            return ".".join(parts[:i])
    return None


def _rank(flow: Dataflow, calls: tuple[int, ...], bn: nn.Module) -> int | None:
    """The BN's input rank where its form depends on it (a forward of its own): what a 2d / 3d BN class says,
    else measured (a BatchNorm1d takes 2-D or 3-D inputs; another class may take anything)."""
    if bn_forward_is_standard(bn):
        return None
    if isinstance(bn, (nn.BatchNorm2d, nn.BatchNorm3d)):
        return 4 if isinstance(bn, nn.BatchNorm2d) else 5
    shape = flow.shape(calls[0])[0]
    return len(shape) if shape is not None else None


# ----------------------------------------------------------------------------- backward


def _backward(name, bn, form, calls, flow: Dataflow, modules, owners) -> list[tuple[str, tuple[float, float]]] | str:
    if not form.at_input:
        return f"`{type(bn).__name__}` does other work on its input before normalizing it"
    links = [_upstream(flow, call) for call in calls]
    blocked = next((link.blocker for link in links if link.blocker), None)
    if blocked:
        return blocked
    result = []
    for producer, group in _by_module(links).items():
        module = modules[producer]
        reason = (layer_reason(module, producer, owners, _functional(flow, group))
                  or read_elsewhere_reason(flow, producer)
                  or _all_calls_reason(flow, producer, group, name)
                  or _through_reason(group, producer, name))
        if reason:
            return reason
        if group[0].through[0] == 0.0:
            return reasons.multiplied_by_zero(producer)
        if module._forward_hooks:
            return f"`{producer}` has forward hooks, which would see its output already normalized after folding"
        for link, call in zip(links, calls):
            if link.module == producer:
                reason = channel_reason(bn, module, producer, link.reshaped, link.op, flow, call, backward=True)
                if reason:
                    return reason
        result.append((producer, group[0].through))
    return result


def _upstream(flow: Dataflow, call: int) -> _Link:
    op = flow.ops[call]
    if not op.inputs:
        return _Link(blocker="it is called without a tensor input")
    current, index = call, op.inputs[0]
    a, s, reshaped = 1.0, 0.0, False
    while True:
        source = flow.ops[index]
        others = [r for r in flow.readers_of(index) if r != current]
        if others:
            return _Link(blocker=reasons.also_read_by(source.target, [flow.ops[r].target for r in others]))
        if source.kind == "input":
            return _Link(blocker=reasons.MODEL_INPUT)
        if source.kind == "module" and source.affine is None and not source.reshape:
            return _Link(source.target, index, (a, s), reshaped)
        if source.affine is not None:
            a, s = a * source.affine[0], a * source.affine[1] + s
        elif source.reshape:
            reshaped = True
        elif source.kind == "function" and is_layer_function(source.target):
            return _Link(blocker=f"its input comes from a `{source.target}` whose weight, bias or settings are not "
                                 "one layer's own (a weight computed in the forward, such as weight standardization), "
                                 "so folding into it would not be exact")
        else:
            return _Link(blocker=reasons.operation_between(source.target))
        if not source.inputs:
            return _Link(blocker=f"`{source.target}` makes its input from nothing bntool can fold into")
        current, index = index, source.inputs[0]


# ----------------------------------------------------------------------------- forward


def _forward(name, bn, form, calls, flow: Dataflow, modules, owners) -> list[tuple[str, tuple[float, float]]] | str:
    if not form.at_output:
        what = ", ".join(f"`{k}`" for k in form.keeps) or "other work"
        return f"`{type(bn).__name__}` runs {what} after normalizing, so no layer after it can absorb it"
    links = [_downstream(flow, call) for call in calls]
    blocked = next((link.blocker for link in links if link.blocker), None)
    if blocked:
        return blocked
    result = []
    for consumer, group in _by_module(links).items():
        module = modules[consumer]
        if isinstance(module, TRANSPOSED):
            return reasons.FORWARD_TRANSPOSED.format(consumer)
        reason = (layer_reason(module, consumer, owners, _functional(flow, group))
                  or read_elsewhere_reason(flow, consumer)
                  or _all_calls_reason(flow, consumer, group, name)
                  or _through_reason(group, consumer, name))
        if reason:
            return reason
        if module._forward_pre_hooks:
            return f"`{consumer}` has a forward pre-hook, which would see the BN's input after folding"
        for link, call in zip(links, calls):
            if link.module == consumer:
                reason = channel_reason(bn, module, consumer, link.reshaped, link.op, flow, call, backward=False)
                if reason:
                    return reason
        if isinstance(module, CONVS) and module.padding_mode == "zeros" and has_padding(module):
            return reasons.zero_pads(consumer)
        result.append((consumer, group[0].through))
    return result


def _downstream(flow: Dataflow, call: int) -> _Link:
    current = call
    a, s, reshaped = 1.0, 0.0, False
    while True:
        readers = flow.readers_of(current)
        if len(readers) != 1:
            return _Link(blocker=reasons.read_by([flow.ops[r].target for r in readers]))
        reader = flow.ops[readers[0]]
        if reader.kind == "output":
            return _Link(blocker=reasons.MODEL_OUTPUT)
        if reader.kind == "module" and reader.affine is None and not reader.reshape:
            if reader.inputs != (current,):
                return _Link(blocker=reasons.reads_others(reader.target))
            return _Link(reader.target, reader.index, (a, s), reshaped)
        if reader.affine is not None and reader.inputs == (current,):
            a, s = reader.affine[0] * a, reader.affine[0] * s + reader.affine[1]
        elif reader.reshape:
            reshaped = True
        else:
            return _Link(blocker=reasons.goes_through(reader.target))
        current = reader.index


# ----------------------------------------------------------------------------- shared rules


def _by_module(links: list[_Link]) -> dict[str, list[_Link]]:
    groups: defaultdict[str, list[_Link]] = defaultdict(list)
    for link in links:
        groups[link.module].append(link)
    return dict(groups)


def _functional(flow: Dataflow, group: list[_Link]) -> bool:
    """Every call is the layer's own ``F.conv*`` / ``F.linear`` inside a forward of its own."""
    return all(flow.ops[link.op].functional for link in group)


def _all_calls_reason(flow: Dataflow, layer: str, group: list[_Link], bn: str) -> str | None:
    calls = flow.calls.get(layer, ())
    if set(calls) - {link.op for link in group}:
        return reasons.called_often(layer, len(calls), bn)
    return None


def _through_reason(group: list[_Link], layer: str, bn: str) -> str | None:
    if len({link.through for link in group}) > 1:
        return f"the operations between `{layer}` and `{bn}` differ from call to call"
    return None
