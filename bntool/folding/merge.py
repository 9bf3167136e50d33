"""Which parallel branches merge into one convolution: found in the dataflow, from its facts alone.

Walking the ops in execution order, each op linear in one earlier value (its
*source*) gets the ``Linear`` it computes from it (``merge_math``): a conv or
average pool, a BN in eval form, a per-channel scale (a model tensor) or a
number, an identity module, the sum or difference of two such values of one
source. A *region* is the set of ops behind one such value that something
non-linear (or the output) reads; one holding an add of two branches becomes
one conv of its source. No method of the model is called and no class is
looked up by name. Refused, with the reason: a region with a value also read
outside it, or layers called more than once, or branches that cannot be one
kernel (``NotMergeable``); an add that a non-linear step (an activation, a BN
doing more than normalize) keeps from being linear in one input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..graph.dataflow import Dataflow
from ..graph.ops import Op
from ..norms import is_batchnorm
from ..report import Skip
from . import bnform, liveness, merge_math
from .merge_math import Linear, NotMergeable

_ADD = frozenset({"add", "add_", "__add__", "__iadd__", "iadd", "__radd__"})
_SUB = frozenset({"sub", "sub_", "subtract", "__sub__", "__isub__", "isub"})
_RSUB = frozenset({"__rsub__", "rsub"})
MUL = frozenset({"mul", "mul_", "multiply", "__mul__", "__imul__", "imul", "__rmul__"})
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)


@dataclass(frozen=True)
class Region:
    """One value computed linearly from ``source``: the ops behind it (``members``), what it computes."""

    root: int
    source: int
    members: tuple[int, ...]
    form: Linear
    branches: tuple[str, ...]  # each branch, as the layers along it ("identity" for the input itself)
    modules: tuple[str, ...]  # the modules called inside the region


@dataclass(frozen=True)
class MergePlan:
    regions: tuple[Region, ...]
    skips: tuple[Skip, ...]


def plan_merges(model: nn.Module, flow: Dataflow, prefix: str = "", channels: dict[str, int] | None = None,
                shared: dict | None = None) -> MergePlan:
    """The regions of ``flow`` that merge into one conv each, and the adds that do not, with the reason.

    ``prefix``: ``model``'s name in a larger model (for the reasons); ``channels``: the channel count each average
    pool reads, where ``flow`` measures none; ``shared``: ``bnform.analyze``'s cache."""
    modules = dict(model.named_modules())
    cut: set[int] = set()  # values that start a region of their own: a linear step reads them as its input
    near = _near_sums(flow)
    norms: dict[str, bnform.NormForm] = {}  # each BN analyzed once, and only near an add
    broken: dict[int, str] = {}  # why an op is not linear in its branches' input (kept across the rounds)
    for _ in range(16):
        forms, skips, nd_hint = _walk(model, flow, modules, cut, prefix, (channels, near, norms, shared, broken))
        more = {i for i in forms if i not in cut and any(forms.get(r, (None,))[0] == i for r in flow.readers_of(i))}
        if not more:
            break
        cut |= more
    return _regions(flow, forms, skips, nd_hint, prefix)


def _near_sums(flow: Dataflow, depth: int = 8) -> set[int]:
    """The ops within ``depth`` steps of an add of two values (before it, or after it)."""
    near: set[int] = set()
    for op in flow.ops:
        front = back = [op.index] if is_sum(op) and len(op.inputs) == 2 else []
        for _ in range(depth if front else 0):
            back = [j for i in back for j in flow.ops[i].inputs if j not in near]
            front = [j for i in front for j in flow.readers_of(i) if j not in near]
            near.update(back, front)
    return near


def _walk(model, flow, modules, cut, prefix, context):
    forms: dict[int, tuple[int, Linear, frozenset[int], tuple[str, ...]]] = {}  # op -> source, form, members, branches
    ops, broken, skips, nd_hint = flow.ops, context[4], {}, []

    def operand(i: int) -> tuple[int, Linear | None, frozenset[int], tuple[str, ...]]:
        if i in forms and i not in cut:
            return forms[i]
        op = ops[i]
        if liveness.passes_through(op):  # nn.Identity, dropout
            source, form, members, branches = operand(op.inputs[0])
            return source, form, members | {i}, branches
        return i, None, frozenset(), ("identity",)

    expiry = liveness.Expiry(flow, keep=lambda entry: any(is_sum(ops[m]) for m in entry[2]))
    for op in ops:
        expiry.forget(forms, op.index)  # (forms no later op reads: their float64 kernels go)
        try:
            result = _linear(op, flow, modules, forms, operand, nd_hint, context)
        except NotMergeable as exc:
            if is_sum(op):
                skips[_where(op, ops, forms, prefix)] = f"not merged: {exc}"
            broken[op.index] = str(exc)
            continue
        if result is not None:
            forms[op.index] = result
        elif is_sum(op) and len(op.inputs) == 2:
            why = _why_not(op, ops, forms, broken, modules)
            if why:
                skips[_where(op, ops, forms, prefix)] = f"not merged: {why}"
        elif op.kind == "module" and op.target in modules:
            broken[op.index] = f"`{prefix}{op.target}` ({type(modules[op.target]).__name__}) is not linear"
        elif op.kind == "function":
            broken[op.index] = f"`{op.target}` is not linear"
    return forms, skips, nd_hint


def _regions(flow, forms, skips, nd_hint, prefix) -> MergePlan:
    ops = flow.ops
    regions = []
    for i, (source, form, members, branches) in forms.items():
        if not any(is_sum(ops[m]) and len(ops[m].inputs) == 2 for m in members):
            continue
        readers = flow.readers_of(i)
        if readers and all(r in forms and i in forms[r][2] for r in readers):
            continue  # not the end of the region
        names = tuple(ops[m].target for m in sorted(members) if ops[m].kind == "module")
        where = f"`{prefix}{common(names)}`"
        outside = [(m, r) for m in members if m != i for r in flow.readers_of(m) if r not in members]
        if outside:
            m, r = outside[0]
            label = [f"{prefix}{ops[j].target}" if ops[j].kind == "module" else f"{ops[j].target} #{j}" for j in (m, r)]
            skips[where] = f"not merged: `{label[0]}` inside the branches is also read by `{label[1]}`"
            continue
        called = [n for n in names if len(flow.calls.get(n, ())) > 1]
        if called:
            skips[where] = f"not merged: `{prefix}{called[0]}` is called more than once"
            continue
        if form.weight is None and not names:
            continue
        form = merge_math.as_conv(form, nd_hint[0] if nd_hint else 2)
        regions.append(Region(i, source, tuple(sorted(members)), form, branches, names))
    return MergePlan(tuple(regions), tuple(Skip(k, v) for k, v in skips.items()))


def _linear(op: Op, flow: Dataflow, modules, forms, operand: Callable, nd_hint: list[int], context):
    """``(source, Linear, members, branches)`` when ``op`` is linear in one earlier value, else None."""
    ops, (channels, near, norms, shared, broken) = flow.ops, context
    if op.kind == "module" and op.target in modules and len(op.inputs) == 1:
        module = modules[op.target]
        source, inner, members, branches = operand(op.inputs[0])
        name = op.target
        if op.affine is not None and not op.reshape:
            if inner is None:
                return None
            a, s = op.affine
            return source, merge_math.then_affine(inner, torch.tensor(a), torch.tensor(s)), members | {op.index}, \
                branches
        if isinstance(module, CONVS):
            outer = merge_math.conv_module(module)
            nd_hint.append(module.weight.dim() - 2)
            if inner is not None and (inner.weight is None or len(flow.readers_of(op.inputs[0])) == 1):
                try:
                    return source, merge_math.conv_after(inner, outer), members | {op.index}, \
                        tuple(f"{b}->{name}" for b in branches)
                except NotMergeable as exc:  # (the reason, for an add this keeps from merging)
                    broken[op.inputs[0]] = f"`{name}` reads it: {exc}"
            if inner is not None:
                return op.inputs[0], outer, frozenset({op.index}), (name,)
            return source, outer, members | {op.index}, (name,)
        if isinstance(module, POOLS):
            if not module.count_include_pad or module.ceil_mode or getattr(module, "divisor_override", None):
                return None
            nd = POOLS.index(type(module)) + 1 if type(module) in POOLS else None
            count = (channels or {}).get(name)
            if count is None and channels is None:
                shape = flow.shape(op.index)[0]
                count = shape[1] if shape is not None and len(shape) == (nd or 0) + 2 else None
            if inner is not None or nd is None or count is None:
                return None
            form = merge_math.pool(count, module.kernel_size, module.stride, module.padding, nd)
            return source, form, members | {op.index}, (name,)
        if is_batchnorm(module):
            if op.index not in near:
                return None
            form = norms[name] if name in norms else norms.setdefault(name, bnform.analyze(module, None, shared))
            if not (form.kind == "standard" or (form.kind == "traced" and form.removable)):
                raise NotMergeable(f"`{name}` does more than normalize ({form.reason or 'its forward keeps running'})")
            if getattr(module, "running_mean", None) is None or getattr(module, "running_var", None) is None:
                raise NotMergeable(f"`{name}` is not in eval form (it normalizes with the batch's statistics)")
            if module.running_mean.is_meta:  # (a model built on the meta device, for its structure)
                k = c = torch.zeros(module.running_mean.shape, dtype=torch.float64)
            else:
                k, c = bnform.scale_shift(module, form)
            if inner is None:
                inner, members, branches = merge_math.identity(k.shape[0]), frozenset(), ("identity",)
            if inner.out_channels != k.shape[0]:
                return None
            tail = tuple(f"{b}->{name}" if b != "identity" else name for b in branches)
            return source, merge_math.then_affine(inner, k, c), members | {op.index}, tail
        return None
    if op.kind != "function":
        return None
    if op.affine is not None and len(op.inputs) == 1:
        source, inner, members, branches = operand(op.inputs[0])
        if inner is None:
            return None
        a, s = op.affine
        return source, merge_math.then_affine(inner, torch.tensor(a), torch.tensor(s)), members | {op.index}, branches
    if len(op.inputs) != 2:
        return None
    if op.target in MUL:
        const = [j for j in op.inputs if _constant(j, ops, modules) is not None]
        data = [j for j in op.inputs if j not in const]
        if len(const) != 1 or len(data) != 1:
            return None
        source, inner, members, branches = operand(data[0])
        tensor = _constant(const[0], ops, modules)
        if inner is None:  # a scale of the input itself
            inner = merge_math.identity(tensor.numel())
        steps = chain(const[0], ops)
        nd = inner.weight.dim() - 2 if inner.weight is not None else (nd_hint[0] if nd_hint else None)
        shape = list(tensor.shape)[next((k for k, n in enumerate(tensor.shape) if n != 1), tensor.dim()):]
        if tensor.numel() != inner.out_channels or (len(steps) == 1 and shape != [tensor.numel()] + [1] * (nd or -1)):
            return None  # (a model tensor read as it is must lie along the channels: (C, 1, 1) for a 2-d conv)
        return source, merge_math.then_affine(inner, tensor.detach().double().reshape(-1), torch.zeros(())), \
            members | {op.index, *steps}, branches
    if not is_sum(op):
        return None
    (sa, fa, ma, ba), (sb, fb, mb, bb) = (operand(j) for j in op.inputs)
    if sa != sb or (fa is None and fb is None):
        return None
    channels = (fa or fb).in_channels
    fa = fa if fa is not None else merge_math.identity(channels)
    fb = fb if fb is not None else merge_math.identity(channels)
    sign = -1.0 if op.target in _SUB else 1.0
    if op.target in _RSUB:
        fa, fb = fb, fa
        sign = -1.0
    return sa, merge_math.add(fa, fb, sign), ma | mb | {op.index}, ba + bb


def _constant(i: int, ops, modules) -> torch.Tensor | None:
    """The model tensor an op reads (through reshapes), else None."""
    steps = chain(i, ops)
    if not steps:
        return None
    op = ops[steps[-1]]
    owner, _, attr = op.target.rpartition(".")
    module = modules.get(owner)
    value = getattr(module, attr, None) if module is not None else None
    return value if isinstance(value, torch.Tensor) else None


def chain(i: int, ops) -> list[int]:
    """``i`` and the reshapes back to a model tensor read directly (``gamma.view(1, -1, 1, 1)``), else []."""
    found = []
    while True:
        op = ops[i]
        found.append(i)
        if op.kind == "attr":
            return found
        if op.kind != "function" or not op.reshape or len(op.inputs) != 1:
            return []
        i = op.inputs[0]


def is_sum(op: Op) -> bool:
    return op.kind == "function" and op.target in (_ADD | _SUB | _RSUB) and op.affine is None


def _why_not(op: Op, ops, forms, broken: dict[int, str], modules) -> str | None:
    """Why an add of two values is not linear in one input, when a branch of it is (else None: nothing to say)."""
    sources = {j: forms[j][0] if j in forms else j for j in op.inputs}  # where each operand's linear part starts
    for j, start in sources.items():
        if start not in broken:
            continue
        for other, other_start in sources.items():
            if other != j and any(other_start in (k, forms.get(k, (k,))[0]) for k in ops[start].inputs):
                return f"a branch is not linear in the input of the others: {broken[start]}"
    return None


def _where(op: Op, ops, forms, prefix: str) -> str:
    names = [ops[m].target for j in op.inputs if j in forms for m in forms[j][2] if ops[m].kind == "module"]
    names += [ops[j].target for j in op.inputs if ops[j].kind == "module"]
    return f"`{prefix}{common(names)}` ({op.target} #{op.index})"


def common(names) -> str:
    """The module that holds every one of ``names`` (their longest common dotted prefix)."""
    return ".".join(os.path.commonprefix([n.split(".") for n in names])) if names else ""
