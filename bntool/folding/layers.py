"""What a layer must be to take a BN's fold, and why it cannot: the rules ``foldrules`` asks of each producer or
consumer it finds.

A foldable class running its class's own arithmetic; its weight and bias
held (not recomputed by a parametrization or a pre-hook), not shared with
another module, not read elsewhere in the forward; its channel axis mapping
each of its channels into one BN channel (the same one, or a block of them
across a reshape); no zero padding in front of a forward fold.
"""

from __future__ import annotations

import math
from collections import defaultdict

from torch import nn
from torch.nn.utils import parametrize

from ..graph.dataflow import Dataflow
from ..graph.ops import FOLDABLE_TYPES
from ..norms import num_features, standard_forward
from . import reasons


def layer_reason(module: nn.Module, name: str, owners, functional: bool = False) -> str | None:
    """Why ``module`` (named ``name``) cannot take a fold at all, or None. ``owners``: ``parameter_owners``;
    ``functional``: every call is the layer's own ``F.conv*`` / ``F.linear`` inside a forward of its own."""
    if not isinstance(module, FOLDABLE_TYPES):
        return reasons.cannot_fold_into(name, type(module).__name__)
    if not functional and not standard_forward(module, FOLDABLE_TYPES):
        return f"`{name}` is {_a(type(module).__name__)} with its own forward, so its arithmetic is unknown"
    recomputed = _recomputed_tensor(module)
    if recomputed:
        return (f"the {recomputed} of `{name}` is recomputed at every call (weight_norm, spectral_norm or another "
                "parametrization), so a folded value written there would not be used")
    shared = [o for o, m in owners.get(id(module.weight), ()) if m is not module]  # (itself at another place: no)
    if shared:
        return f"the weight of `{name}` is shared with `{shared[0]}`, which folding would change too"
    return None


_a = reasons.a


def _recomputed_tensor(module: nn.Module) -> str | None:
    """``"weight"`` / ``"bias"`` when the layer computes it at each call instead of holding it.

    ``torch.nn.utils.parametrize`` turns it into a property; the older
    ``weight_norm`` / ``spectral_norm`` keep it as a plain attribute that a
    pre-hook overwrites. Either way it is neither a parameter nor a buffer.
    """
    for key in ("weight", "bias"):
        if parametrize.is_parametrized(module, key):
            return key
        if key not in module._parameters and key not in module._buffers:
            return key
    return None


def read_elsewhere_reason(flow: Dataflow, layer: str) -> str | None:
    """The forward reads the layer's weight or bias other than in the layer's own call (``y * conv.weight.mean()``):
    that reader would see the folded values."""
    own = (f"{layer}.weight", f"{layer}.bias")
    for op in flow.tensor_reads:
        if op.target in own:
            for r in flow.readers_of(op.index):
                reader = flow.ops[r]
                if not (reader.kind == "module" and reader.target == layer and reader.functional):
                    return f"`{op.target}` is also read by `{reader.target}`, which would see the folded values"
    return None


def channel_reason(bn: nn.Module, layer: nn.Module, name: str, reshaped: bool, layer_op: int, flow: Dataflow, call: int,
                   *, backward: bool) -> str | None:
    """The layer's channel axis must be the BN's axis 1, element for element (or the BN has one channel)."""
    features = num_features(bn)
    linear = isinstance(layer, nn.Linear)
    if backward:
        channels = layer.out_features if linear else layer.out_channels
    else:
        channels = layer.in_features if linear else layer.in_channels
    if features == 1:  # one channel: the same k and c for everything
        return None
    if not linear and not reshaped:
        if channels != features:
            side = "output" if backward else "input"
            return reasons.channels_differ(name, channels, side, features)
        return None
    bn_shape = flow.shape(call)[0]
    layer_in, layer_out = flow.shape(layer_op)
    layer_shape = layer_out if backward else layer_in
    if bn_shape is None or layer_shape is None:
        return reasons.UNKNOWN_SHAPE
    axis = len(layer_shape) - 1 if linear else 1
    if same_channels(layer_shape, axis, bn_shape):
        return None
    if linear and not reshaped:
        return reasons.linear_axis(len(bn_shape))
    return reasons.reshape_channels(name)


def same_channels(layer_shape: tuple[int, ...], axis: int, bn_shape: tuple[int, ...]) -> bool:
    """Whether a row-major reshape from ``layer_shape`` to ``bn_shape`` maps every element of the layer's channel
    ``f`` (on ``axis``) to the BN's channel (axis 1) ``f // m``, the same for all of them.

    ``m == 1``: the channel axis kept, element for element (LeViT's
    ``flatten(0, 1)``). ``m > 1``: each BN channel is a block of ``m``
    consecutive layer channels: a Linear's features reshaped into channels
    and positions (a DCGAN generator's ``fc(z).view(-1, C, H, W)`` before a
    ``BatchNorm2d``), or a BN's channels and positions flattened into a
    Linear's features (``fc(bn(x).flatten(1))``). Row-major, element
    ``(lead, f, t)`` of the layer's side is ``(lead, f // m, (f % m) * T + t)``
    of the BN's when the leading sizes agree and the BN's positions number
    ``m`` times the layer's (``T``).
    """
    if len(bn_shape) < 2 or math.prod(layer_shape[:axis]) != bn_shape[0]:
        return False
    channels, features = layer_shape[axis], bn_shape[1]
    if features == 0 or channels % features:
        return False
    return math.prod(bn_shape[2:]) == (channels // features) * math.prod(layer_shape[axis + 1:])


def has_padding(conv: nn.Module) -> bool:
    padding = conv.padding
    if isinstance(padding, str):
        return padding != "valid" and any(k > 1 for k in conv.kernel_size)
    return any(p != 0 for p in padding)


def parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """Every place of every module holding each parameter, by the parameter's id."""
    owners: dict[int, list[tuple[str, nn.Module]]] = defaultdict(list)
    for name, module in model.named_modules(remove_duplicate=False):
        for param in module._parameters.values():  # (module.parameters(recurse=False), without its machinery)
            if param is not None:
                owners[id(param)].append((name, module))
    return owners
