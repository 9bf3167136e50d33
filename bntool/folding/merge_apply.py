"""Branch-merge surgery: the module that computes a merged add gets one conv in place of its branches.

A region (``merge.plan_merges``) is found in the whole model's dataflow; the
add lives in some module's forward. ``merge_region`` looks for the innermost
module holding every layer of the region whose own trace shows the same
region, and puts in its place an ``fx.GraphModule`` of its forward in which
the region is one call to a new conv (``reparam_conv``) of the region's
input; everything else that module computes (the activation after the add,
an SE...) and every name it holds are kept. The merged weight is computed in
float64 and rounded once to the branches' dtype. ``replay`` does the same on
a freshly built model, with the recorded hyper-parameters, for
``bntool.load`` (the weights come from the file).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from ..errors import InputError, first_line
from ..graph.dataflow import Dataflow
from ..graph.fx import fx_ops, op_nodes, trace
from .merge import Region, common, plan_merges
from .merge_math import Linear, NotMergeable

_CONV_TYPES = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class Merge:
    """One merged add: the module it was in (``block``), the new conv, the branches it replaced, its kernel."""

    block: str
    conv: str
    branches: tuple[str, ...]
    removed: tuple[str, ...]  # the layers of the branches (gone from the model)
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    pools: tuple[tuple[str, int], ...] = ()  # the channels each average pool of the branches read

    def step(self) -> dict[str, Any]:
        return {"pools": dict(self.pools), "block": self.block, "conv": self.conv, "removed": list(self.removed),
                "in_channels": self.in_channels, "out_channels": self.out_channels, "kernel": list(self.kernel),
                "stride": list(self.stride), "padding": list(self.padding), "dilation": list(self.dilation),
                "groups": self.groups}


def merge_region(model: nn.Module, region: Region, channels: dict[str, int] | None = None,
                 recorded: dict[str, Any] | None = None, shared: dict | None = None) -> Merge:
    """Replace ``region`` (found in ``model``'s dataflow) by one conv, in place; NotMergeable with the reason.

    ``recorded``: a merge step from a file (``Merge.step``): the conv is built with its hyper-parameters,
    and the region must have them.
    """
    names = region.modules
    owner, why = common(names), None
    while owner:
        done = _try_owner(model, owner, names, channels, recorded, shared)
        if isinstance(done, Merge):
            return done
        why = why or done  # (the innermost module's reason)
        owner = owner.rpartition(".")[0]
    raise NotMergeable(why or "the add is in the model's own forward; bntool replaces the module that computes "
                       "it, and cannot replace the model itself")


def _try_owner(model, owner: str, names, channels, recorded, shared=None) -> Merge | str:
    """The merge made in ``owner``'s forward, else why it cannot be made there."""
    module = model.get_submodule(owner)
    try:
        graph = trace(module)
    except Exception as exc:  # noqa: BLE001 - fx raises many types: a module higher up may trace
        return (f"torch.fx cannot trace `{owner}` ({first_line(exc, 120)}), so its forward cannot be rewritten "
                "with one conv")
    flow = Dataflow(fx_ops(module, graph), "fx")
    local = {n[len(owner) + 1:]: c for n, c in (channels or {}).items() if n.startswith(owner + ".")}
    want = tuple(n[len(owner) + 1:] for n in names)
    found = [r for r in plan_merges(module, flow, channels=local, shared=shared).regions if r.modules == want]
    if len(found) != 1:
        return f"`{owner}` traced alone does not add up these branches the same way"
    region = found[0]
    form = region.form
    if recorded is not None:
        _must_match(form, recorded, owner)
    nodes = op_nodes(graph)
    taken = {n.split(".")[0] for n in (str(node.target) for node in graph.nodes if node.op in ("call_module",
                                                                                              "get_attr"))}
    conv_name = recorded["conv"].rpartition(".")[2] if recorded else next(
        n for n in ("reparam_conv", *(f"reparam_conv_{i}" for i in range(1, 1000))) if n not in taken)
    conv = _new_conv(form, module, names, model, recorded is None)
    root = nodes[region.root]
    with graph.inserting_before(root):
        new = graph.call_module(conv_name, (nodes[region.source],))
    root.replace_all_uses_with(new)
    for i in sorted(region.members, reverse=True):
        if not nodes[i].users:
            graph.erase_node(nodes[i])
    graph.lint()
    objects: dict[str, Any] = {conv_name: conv}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target != conv_name:
            objects[str(node.target)] = _attribute(module, str(node.target))
    replacement = torch.fx.GraphModule(objects, graph)
    replacement.train(module.training)
    _put(model, owner, module, replacement)
    pools = tuple((n, c) for n, c in (channels or {}).items() if n in names)
    branches = tuple("->".join(p if p == "identity" else f"{owner}.{p}" for p in b.split("->"))
                     for b in region.branches)
    return Merge(owner, f"{owner}.{conv_name}", branches, tuple(names), form.in_channels,
                 form.out_channels, form.kernel, form.stride, form.padding, form.dilation, form.groups, pools)


def _new_conv(form: Linear, module: nn.Module, names, model: nn.Module, with_values: bool) -> nn.Module:
    like = next((model.get_submodule(n).weight for n in names if hasattr(model.get_submodule(n), "weight")
                 and isinstance(model.get_submodule(n).weight, torch.Tensor)), None)
    if like is None:
        like = next(iter(model.get_submodule(names[0]).buffers()))
    dtype = like.dtype if like.is_floating_point() else torch.float32
    kind = _CONV_TYPES[len(form.kernel)]
    conv = kind(form.in_channels, form.out_channels, form.kernel, stride=form.stride, padding=form.padding,
                dilation=form.dilation, groups=form.groups, bias=True, device=like.device, dtype=dtype)
    if with_values:
        with torch.no_grad():
            conv.weight.copy_(form.weight.to(dtype))  # (rounded once, from float64)
            conv.bias.copy_(form.bias.to(dtype))
    return conv


def _must_match(form: Linear, recorded: dict[str, Any], owner: str) -> None:
    got = {"in_channels": form.in_channels, "out_channels": form.out_channels, "kernel": list(form.kernel),
           "stride": list(form.stride), "padding": list(form.padding), "dilation": list(form.dilation),
           "groups": form.groups}
    wanted = {k: recorded.get(k) for k in got}
    if got != wanted:
        raise InputError(f"the file's recipe merges branches of `{owner}` into a conv {wanted}, but this model's "
                         f"branches make {got}; build the model from the code the checkpoint was made from")


def _attribute(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _put(model: nn.Module, name: str, old: nn.Module, new: nn.Module) -> None:
    """``new`` at every place the model holds ``old`` (under ``name`` at least)."""
    for _, parent in model.named_modules(remove_duplicate=False):
        for key, child in list(parent._modules.items()):
            if child is old:
                parent._modules[key] = new


# ----------------------------------------------------------------------------- replay


def replay(model: nn.Module, step: dict[str, Any]) -> None:
    """Rebuild a recorded merge's structure on a freshly built model: each block with its one conv."""
    for entry in step.get("merges", []):
        removed, block = tuple(entry.get("removed", ())), str(entry.get("block", ""))
        try:
            for name in (block, *removed):
                model.get_submodule(name)
        except AttributeError:
            raise InputError(f"the file's recipe merges the branches `{'`, `'.join(removed)}` of `{block}`, but the "
                             "model has no such layers; build the model from the code the checkpoint was made "
                             "from") from None
        try:
            done = _try_owner(model, block, removed, entry.get("pools") or {}, entry)
        except NotMergeable as exc:
            done = str(exc)
        why = f" ({done})" if isinstance(done, str) else ""
        if not isinstance(done, Merge):
            raise InputError(f"the file's recipe merges the branches of `{block}`, but this model's forward does not "
                             f"add them up the same way{why}; build the model from the code the checkpoint was "
                             "made from")
