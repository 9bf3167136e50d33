"""What one BatchNorm-like module computes, so that fold can take the normalization out of it.

A plain ``nn.BatchNorm*`` (or bntool's frozen BN) is exactly ``y = k * x + c``
per channel. Many BNs in the wild do more: timm's ``BatchNormAct2d`` calls
``F.batch_norm`` and then a drop layer and an activation; torchvision's
``FrozenBatchNorm2d`` computes ``x * scale + bias`` from its buffers; a
pre-activation block may apply its activation first. ``analyze`` traces the
module's own ``forward`` with ``torch.fx`` (every child module a leaf, the
input's rank and channel count concrete, eval mode) and looks for the
*normalization segment*: one ``batch_norm`` call on the module's own running
statistics (in eval mode), and/or a chain of per-channel multiplies and adds
whose other operand is computed from the module's buffers and constants
alone. What the segment computes, ``(k, c)``, is evaluated in float64 from
those buffers with the module's own arithmetic (so each library's eps
placement is its own). Around the segment:

* ``at_input``: the segment reads the module's input and nothing else does,
  so the producer before the module can absorb it (fold backward);
* ``at_output``: the module returns the segment's output unchanged, so the
  layer after it can absorb it (fold forward);
* the *remainder* is the traced forward with the segment replaced by its
  input: what must keep running after folding (drop, activation). When
  nothing is left, the module is simply removed.

A ``_BatchNorm`` subclass whose forward cannot be traced keeps running, with
statistics that make its normalization an exact identity (``identity``).
Tracing the forward, and the structure key that lets modules built alike
share one trace, are ``bnform_trace``'s; reading the traced nodes (which
carry data, which are static per-channel values, and their float64 values)
is ``bnform_nodes``'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import first_line
from ..norms import bn_forward_is_standard, num_features, requested_mode
from ..runtime.cloning import clone
from . import bnform_trace
from .arithmetic import bn_scale_shift
from .bnform_nodes import (
    BN_SIGNATURES,
    alpha_of,
    attribute,
    bn_args,
    bn_node_reason,
    channel_vector,
    child_module,
    data_inputs,
    data_users,
    elementwise,
    evaluate_static,
    extend_segment,
    is_data,
    is_metadata,
    node_name,
    nothing_left,
    output_source,
    static_elementwise,
)


@dataclass
class NormForm:
    """How one BN-like module normalizes. ``kind``: ``standard``, ``traced``, ``identity`` or ``none``.

    ``reason`` says why a ``none`` module cannot be folded; ``keeps`` names
    what keeps running after folding (the remainder's child modules).
    """

    kind: str
    at_input: bool = False
    at_output: bool = False
    reason: str | None = None
    note: str = ""
    keeps: tuple[str, ...] = ()
    removable: bool = False  # nothing of the module is left after folding
    _graph: torch.fx.Graph | None = field(default=None, repr=False)
    _root: nn.Module | None = field(default=None, repr=False)  # the traced clone: the graph's attributes
    _segment: tuple[torch.fx.Node, ...] = field(default=(), repr=False)

    @property
    def foldable(self) -> bool:
        return self.kind != "none"


def guess_rank(module: nn.Module) -> int:
    """The input rank a BN class implies when none was observed (BatchNorm1d: 2, 3d: 5, else 4)."""
    name = type(module).__name__.lower()
    return 2 if "1d" in name else 5 if "3d" in name else 4


def analyze(module: nn.Module, rank: int | None = None, shared: dict[Any, NormForm] | None = None) -> NormForm:
    """How ``module`` (a BN by ``norms.is_batchnorm``) normalizes an input of ``rank`` dimensions.

    ``shared``: the forms traced so far in one plan, by structure. A module
    built exactly like one traced already (``bnform_trace.structure``) gets a copy of that
    form, made its own (``_replica``), instead of a trace of its own: an
    EfficientNet's 49 BatchNormAct2d layers come in about a dozen structures.
    """
    if bn_forward_is_standard(module):
        return NormForm("standard", at_input=True, at_output=True, removable=True)
    rank = rank or guess_rank(module)
    key = bnform_trace.structure(module, rank) if shared is not None else None
    if key is not None and key in shared:
        return _replica(shared[key], module)
    try:
        root, graph, read_values = bnform_trace.trace(module, rank)
    except Exception as exc:  # fx raises many types for untraceable code
        first = first_line(exc, 200)
        if isinstance(module, _BatchNorm):
            return NormForm("identity", at_input=True, note=(
                f"torch.fx cannot trace the forward of `{type(module).__name__}` ({first}); it keeps running, "
                "with statistics that make its normalization an exact identity"))
        return NormForm("none", reason=f"torch.fx cannot trace the forward of `{type(module).__name__}` ({first}), "
                                       "so what it computes is unknown")
    form = _form_of_graph(root, graph, rank)
    if read_values and form.kind == "traced" and not form.removable and _keeps_values(module, rank, form):
        what = (f"what is left of `{type(module).__name__}` after its normalization holds values read from its "
                "tensors (a `.tolist()`, a branch on a value), which the model rebuilt from its code would not have")
        if isinstance(module, _BatchNorm):
            return NormForm("identity", at_input=True, note=f"{what}; it keeps running, with statistics that make "
                                                            "its normalization an exact identity")
        return NormForm("none", reason=what)
    if key is not None and form.kind == "traced" and not read_values:
        shared[key] = _replica(form, module)  # (a copy: apply rewrites the graph of the form it is given)
    return form


def _keeps_values(module: nn.Module, rank: int, form: NormForm) -> bool:
    """Whether what is left after folding holds values read from the module's tensors: the module is traced again
    with other values in its tensors (same layout), and what is left must come out the same, holding nothing the
    trace made (a ``_tensor_constant``)."""
    try:
        other = clone(module)
        with torch.no_grad():
            for t in (*other.parameters(), *other.buffers()):
                if t.dtype == torch.bool:
                    t.logical_not_()
                elif t.is_floating_point() or t.is_complex():
                    t.mul_(2).add_(1)
                else:
                    t.add_(1)
        root, graph, _ = bnform_trace.trace(other, rank)
        again = _form_of_graph(root, graph, rank)
    except Exception:  # noqa: BLE001 - other values, another path (or none could be made): the values matter
        return True
    if again.kind != "traced" or again.removable:
        return True
    first, second = _rest_code(form), _rest_code(again)
    return first is None or first != second


def _rest_code(form: NormForm) -> str | None:
    """The code of what ``remainder`` would build (on a copy of the graph), or None when it reads something the
    trace made rather than one of the module's own tensors or submodules."""
    graph, segment = _graph_copy(form)
    _take_out(graph, list(segment), form._root)
    own = {*form._root._parameters, *form._root._buffers, *form._root._modules}
    if any(n.op in ("get_attr", "call_module") and str(n.target).split(".")[0] not in own for n in graph.nodes):
        return None
    return graph.python_code("self").src


def _take_out(graph: torch.fx.Graph, segment: list[torch.fx.Node], root: nn.Module) -> None:
    """The normalization ``segment`` out of ``graph``: its users read its input instead."""
    source = data_inputs(segment[0])[0]
    segment[-1].replace_all_uses_with(source)
    for node in reversed(segment):
        graph.erase_node(node)
    graph.owning_module = root  # what dead-code elimination asks whether a child call is pure
    graph.eliminate_dead_code()


def _replica(form: NormForm, module: nn.Module) -> NormForm:
    """``form``, found on a module built like ``module``, made ``module``'s: its own copy of the graph, and a root
    cloned from ``module`` (in eval mode, sharing its tensors).

    Only a trace that never computed with its tensors' values is shared
    (``bnform_trace.ReadsValues``).
    """
    graph, segment = _graph_copy(form)
    return dataclasses.replace(form, _graph=graph, _root=bnform_trace.eval_clone(module), _segment=segment)


def _graph_copy(form: NormForm) -> tuple[torch.fx.Graph, tuple[torch.fx.Node, ...]]:
    """A copy of the form's graph, and its normalization segment in the copy."""
    nodes: dict[Any, Any] = {}
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(form._graph, nodes))
    return graph, tuple(nodes[n] for n in form._segment)


def rebound(form: NormForm, module: nn.Module) -> NormForm:
    """``form``, found on a module of which ``module`` is a clone (or ``module`` itself), made ``module``'s.

    The traced graph names attributes, so it serves any clone; its root (the
    trace's own clone, which also holds the constants the trace made) takes
    ``module``'s children, parameters and buffers, so that what is left after
    folding is built from ``module``'s and never from the module analyzed.
    """
    root = form._root
    if root is None:
        return form
    for store in ("_modules", "_parameters", "_buffers"):
        theirs, mine = root.__dict__[store], module.__dict__[store]
        if set(theirs) != set(mine):
            raise ValueError(f"`{type(module).__name__}` is not a clone of the module analyzed")
        theirs.update(mine)
    return form


def scale_shift(module: nn.Module, form: NormForm, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k, c)``, float64 per channel, such that the module's normalization is ``k * x + c`` (on the CPU)."""
    if form.kind in ("standard", "identity"):
        return bn_scale_shift(module.running_mean, module.running_var, module.eps, module.weight, module.bias)
    module = form._root if form._root is not None else module
    channels = num_features(module)
    k = torch.ones(channels, dtype=torch.float64)
    c = torch.zeros(channels, dtype=torch.float64)
    values: dict[torch.fx.Node, Any] = {}
    for node in form._segment:
        if node.target in BN_SIGNATURES:
            args = bn_args(node)
            tensors = [None if args[n] is None else attribute(module, args[n].target)
                       for n in ("running_mean", "running_var", "weight", "bias")]
            k_bn, c_bn = (t.cpu() for t in bn_scale_shift(tensors[0], tensors[1], float(args["eps"]), tensors[2],
                                                            tensors[3]))
            k, c = k_bn * k, k_bn * c + c_bn
            continue
        op, data_first, operand = elementwise(node)
        t = channel_vector(evaluate_static(module, operand, values), channels, rank or guess_rank(module)).cpu()
        if op == "mul":
            k, c = k * t, c * t
        elif op == "div":
            k, c = k / t, c / t
        elif op == "add":
            c = c + t * alpha_of(node)
        elif data_first:  # x - t
            c = c - t * alpha_of(node)
        else:  # t - x
            k, c = -k, t - c
    return k, c


def remainder(module: nn.Module, form: NormForm) -> nn.Module | None:
    """The module to put in the BN's place: its forward with the normalization taken out (None: nothing left)."""
    if form.removable:
        return None
    _take_out(form._graph, list(form._segment), form._root)
    rest = torch.fx.GraphModule(form._root, form._graph, class_name=f"{type(module).__name__}WithoutNorm")
    rest.train(requested_mode(module))  # (a frozen BN reads eval mode; what is left follows the model)
    return rest


# ----------------------------------------------------------------------------- the segment


def _form_of_graph(module: nn.Module, graph: torch.fx.Graph, rank: int) -> NormForm:
    name = type(module).__name__
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    norms = [n for n in nodes if n.op == "call_function" and n.target in BN_SIGNATURES]
    if len(norms) > 1:
        return NormForm("none", reason=f"`{name}` calls batch_norm {len(norms)} times in its forward")
    if norms:
        reason = bn_node_reason(module, norms[0], name)
        if reason:
            return NormForm("none", reason=reason)
        segment = extend_segment(module, [norms[0]], rank)
    else:
        start = [u for u in data_users(placeholders[0]) if static_elementwise(module, u, rank)] if placeholders else []
        if len(start) != 1:
            return NormForm("none", reason=f"the forward of `{name}` neither calls batch_norm nor scales and shifts "
                                           "its input per channel with values from its buffers")
        segment = extend_segment(module, start, rank)
    first, last = segment[0], segment[-1]
    source = data_inputs(first)[0]
    at_input = bool(placeholders) and source is placeholders[0] and data_users(source) == [first]
    at_output = output_source(graph, module) is last and len(last.users) == 1
    form = NormForm("traced", at_input=at_input, at_output=at_output, _graph=graph, _root=module,
                    _segment=tuple(segment))
    form.keeps = tuple(dict.fromkeys(
        str(n.target) if n.op == "call_module" else node_name(n) for n in nodes
        if n.op in ("call_module", "call_function", "call_method") and n not in segment and is_data(n)
        and not is_metadata(n) and n.target is not torch._assert
        and not (n.op == "call_module" and isinstance(child_module(module, n.target), nn.Identity))))
    form.removable = nothing_left(module, graph, segment, placeholders)
    return form
