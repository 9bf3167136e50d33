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

(The backward and forward rules mirror each other and read best side by
side, as methods of one ``_Planner``; the walks from a BN call to the layer at
the other end are ``walks``'; what a layer must be to take a fold is
``layers``'.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import require_module
from ..graph.dataflow import Dataflow, dataflow
from ..norms import bn_forward_is_standard, has_statistics, is_batchnorm
from ..report import Skip
from . import bnform, reasons
from .layers import channel_reason, has_padding, layer_reason, parameter_owners, read_elsewhere_reason
from .plan import CONVS, TRANSPOSED, FoldPair, FoldPlan
from .walks import Link, by_module, downstream, functional, upstream


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
    planner = _Planner(model, flow)
    pairs: list[FoldPair] = []
    skips: list[Skip] = []
    for name in [n for n, m in planner.modules.items() if is_batchnorm(m)]:  # (bn_names, from the modules at hand)
        if rejected and name in rejected:
            skips.append(Skip(name, rejected[name]))
            continue
        result = planner.plan_bn(name)
        if isinstance(result, str):
            skips.append(Skip(name, result))
        else:
            pairs.extend(result[0])
            if forms is not None:
                forms[name] = result[1]
    return FoldPlan(tuple(pairs), tuple(skips), flow.method, flow.note)


@dataclass(frozen=True)
class _BN:
    """One BN being planned: its name, module, what it computes and the ops that call it."""

    name: str
    module: nn.Module
    form: bnform.NormForm
    calls: tuple[int, ...]


class _Planner:
    """What every BN of one model is planned against: the dataflow, the model's modules, which module owns each
    parameter, the tensors the forward reads directly, and the BN subclass forms traced so far (by structure: each
    structure is traced once)."""

    def __init__(self, model: nn.Module, flow: Dataflow):
        self.flow = flow
        self.modules = dict(model.named_modules())
        self.owners = parameter_owners(model)
        self.read = [op.target for op in flow.tensor_reads]  # model tensors the forward reads directly
        self.shared: dict = {}

    def plan_bn(self, name: str) -> tuple[list[FoldPair], bnform.NormForm] | str:
        """The BN's pairs and what it computes, or why it does not fold."""
        flow, modules, module = self.flow, self.modules, self.modules[name]
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
        # the model tensors the forward reads outside the calls of the modules that hold them
        outside = next((t for t in self.read if t.startswith(f"{name}.")), None)
        if outside is not None:  # (DiverseBranchBlock pads with values computed from its BN's statistics)
            return (f"its tensors are also read outside its own call (`{outside}`), and folding would change or "
                    "remove them")
        if not has_statistics(module):
            return reasons.NO_STATISTICS
        if module._forward_pre_hooks:
            return "has a forward pre-hook, which would see its input already normalized after folding"
        rank = _rank(flow, calls, module)
        form = bnform.analyze(module, rank, self.shared)
        if not form.foldable:
            return form.reason or "its forward is not a BatchNorm bntool can fold"
        becomes = {"standard": "removed", "identity": "identity"}.get(form.kind,
                                                                       "removed" if form.removable else "rewritten")

        def pair(target: str, direction: str, through: tuple[float, float]) -> FoldPair:
            return FoldPair(name, target, direction, becomes, type(modules[target]).__name__, through,
                            rank if becomes == "rewritten" else None, form.keeps if becomes == "rewritten" else ())

        bn = _BN(name, module, form, calls)
        backward = self.backward(bn)
        if not isinstance(backward, str):
            return [pair(target, "backward", through) for target, through in backward], form
        forward = self.forward(bn)
        if not isinstance(forward, str):
            return [pair(target, "forward", through) for target, through in forward], form
        return reasons.not_exact_either(backward, forward)

    # ------------------------------------------------------------------------- backward

    def backward(self, bn: _BN) -> list[tuple[str, tuple[float, float]]] | str:
        if not bn.form.at_input:
            return f"`{type(bn.module).__name__}` does other work on its input before normalizing it"
        links = [upstream(self.flow, call) for call in bn.calls]
        blocked = next((link.blocker for link in links if link.blocker), None)
        if blocked:
            return blocked
        result = []
        for producer, group in by_module(links).items():
            module = self.modules[producer]
            reason = self.refusal(bn, producer, group)
            if reason:
                return reason
            if group[0].through[0] == 0.0:
                return reasons.multiplied_by_zero(producer)
            if module._forward_hooks:
                return f"`{producer}` has forward hooks, which would see its output already normalized after folding"
            reason = self.channels_refusal(bn, producer, links, backward=True)
            if reason:
                return reason
            result.append((producer, group[0].through))
        return result

    # ------------------------------------------------------------------------- forward

    def forward(self, bn: _BN) -> list[tuple[str, tuple[float, float]]] | str:
        if not bn.form.at_output:
            what = ", ".join(f"`{k}`" for k in bn.form.keeps) or "other work"
            return f"`{type(bn.module).__name__}` runs {what} after normalizing, so no layer after it can absorb it"
        links = [downstream(self.flow, call) for call in bn.calls]
        blocked = next((link.blocker for link in links if link.blocker), None)
        if blocked:
            return blocked
        result = []
        for consumer, group in by_module(links).items():
            module = self.modules[consumer]
            if isinstance(module, TRANSPOSED):
                return reasons.transposed_forward(consumer)
            reason = self.refusal(bn, consumer, group)
            if reason:
                return reason
            if module._forward_pre_hooks:
                return f"`{consumer}` has a forward pre-hook, which would see the BN's input after folding"
            reason = self.channels_refusal(bn, consumer, links, backward=False)
            if reason:
                return reason
            if isinstance(module, CONVS) and module.padding_mode == "zeros" and has_padding(module):
                return reasons.zero_pads(consumer)
            result.append((consumer, group[0].through))
        return result

    # ------------------------------------------------------------------------- refusals both ways share

    def refusal(self, bn: _BN, layer: str, group: list[Link]) -> str | None:
        """Why ``layer`` (the producer or the consumer, reached by the links in ``group``) cannot take ``bn``'s
        fold: what the layer is, who else reads it, its other calls, and what stands between the two."""
        return (layer_reason(self.modules[layer], layer, self.owners, functional(self.flow, group))
                or read_elsewhere_reason(self.flow, layer)
                or _all_calls_reason(self.flow, layer, group, bn.name)
                or _through_reason(group, layer, bn.name))

    def channels_refusal(self, bn: _BN, layer: str, links: list[Link], *, backward: bool) -> str | None:
        """Why the channels of ``layer`` do not line up with ``bn``'s, at any call that reaches it."""
        for link, call in zip(links, bn.calls):
            if link.module == layer:
                reason = channel_reason(bn.module, self.modules[layer], layer, link.reshaped, link.op, self.flow,
                                        call, backward=backward)
                if reason:
                    return reason
        return None


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


# ----------------------------------------------------------------------------- refusals of a layer


def _all_calls_reason(flow: Dataflow, layer: str, group: list[Link], bn: str) -> str | None:
    calls = flow.calls.get(layer, ())
    if set(calls) - {link.op for link in group}:
        return reasons.called_often(layer, len(calls), bn)
    return None


def _through_reason(group: list[Link], layer: str, bn: str) -> str | None:
    if len({link.through for link in group}) > 1:
        return f"the operations between `{layer}` and `{bn}` differ from call to call"
    return None
