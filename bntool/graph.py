"""Who feeds whom: the dataflow around every BatchNorm.

For each BN module this finds what produced its input (a module, an
operation, or a model input), how many readers that producer's output has,
how many times each module is called, and what reads the BN's output. The
fold rules in ``fold.py`` decide from these facts alone.

Two ways to see the dataflow:

* ``torch.fx`` symbolic tracing, when the model traces: the whole program,
  every branch. BN, conv and linear modules (subclasses included) are leaves.
* Recording a real forward pass on the verification inputs, when fx cannot
  trace (data-dependent control flow...): module hooks on the leaf modules
  plus a ``TorchFunctionMode`` that sees every tensor operation between
  them. Tensors are identified by ``(id, _version)``, so an in-place op
  (``relu_``, ``+=``) between a conv and its BN is seen as standing between
  them. Only the branches the inputs take are seen; the report says so.
"""

from __future__ import annotations

import dataclasses

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .norms import is_batchnorm

#: Module types that ``fold`` can fold a BN into (from either side).
FOLDABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


@dataclass(frozen=True)
class BNSite:
    """The facts around one BN module, as seen by ``dataflow``."""

    bn: str
    calls: int
    input_rank: int | None
    producer: str | None  # qualified name of the module whose output the BN reads
    producer_op: str | None  # "input" or the op between (e.g. "relu"), when no module produced it
    producer_readers: tuple[str, ...]  # everything that reads the producer's output (BN included)
    producer_calls: int
    consumers: tuple[str, ...]  # everything that reads the BN's output ("output" = model output)
    consumer: str | None  # the module that is the BN output's only reader, if there is one
    consumer_calls: int


@dataclass(frozen=True)
class Dataflow:
    sites: dict[str, BNSite]
    method: str  # "fx" or "recorded"
    note: str = ""


def bn_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_batchnorm(m)]


def dataflow(model: nn.Module, example_inputs: Sequence[torch.Tensor] | None) -> Dataflow:
    """Dataflow around every BN: fx when the model traces, else a recorded forward pass."""
    try:
        graph_module = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for untraceable code
        if example_inputs is None:
            raise
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        sites = _recorded_sites(model, example_inputs)
        return Dataflow(sites, "recorded", f"torch.fx cannot trace the model ({reason}); dataflow was recorded "
                        "from a forward pass on the verification inputs, so only the branches they take are seen")
    sites = _fx_sites(model, graph_module)
    if any(_next_to_linear(model, site) for site in sites.values()):
        ranks = _ranks(model, example_inputs)
        sites = {name: dataclasses.replace(site, input_rank=ranks.get(name)) for name, site in sites.items()}
    return Dataflow(sites, "fx")


def _next_to_linear(model: nn.Module, site: BNSite) -> bool:
    """Only a Linear neighbour makes the BN's input rank matter (conv channels are always axis 1)."""
    return any(
        name is not None and isinstance(model.get_submodule(name), nn.Linear) for name in (site.producer, site.consumer)
    )


# ----------------------------------------------------------------------------- fx


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_batchnorm(m) or isinstance(m, FOLDABLE_TYPES) or super().is_leaf_module(m, qualname)


def _node_label(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    if node.op == "placeholder":
        return "input"
    if node.op == "output":
        return "output"
    target = node.target
    return getattr(target, "__name__", str(target))


def _fx_sites(model: nn.Module, graph: torch.fx.Graph) -> dict[str, BNSite]:
    modules = dict(model.named_modules())
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    sites = {}
    for node in graph.nodes:
        if node.op != "call_module" or not is_batchnorm(modules.get(str(node.target))):
            continue
        name = str(node.target)
        if name in sites:
            continue
        source = node.args[0] if node.args else None
        producer = producer_op = None
        readers: tuple[str, ...] = ()
        if isinstance(source, torch.fx.Node):
            readers = tuple(_node_label(u) for u in source.users)
            if source.op == "call_module":
                producer = str(source.target)
            else:
                producer_op = _node_label(source)
        consumers = tuple(_node_label(u) for u in node.users)
        users = list(node.users)
        consumer = str(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
        sites[name] = BNSite(
            bn=name,
            calls=calls[name],
            input_rank=None,
            producer=producer,
            producer_op=producer_op,
            producer_readers=readers,
            producer_calls=calls.get(producer, 0) if producer else 0,
            consumers=consumers,
            consumer=consumer,
            consumer_calls=calls.get(consumer, 0) if consumer else 0,
        )
    return sites


def _ranks(model: nn.Module, example_inputs) -> dict[str, int]:
    """Rank of each BN's input, from one hooked forward pass (fx graphs carry no shapes)."""
    if example_inputs is None:
        return {}
    ranks: dict[str, int] = {}
    def hook(name):
        def record(module, args) -> None:
            ranks.setdefault(name, args[0].dim())

        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in model.named_modules() if is_batchnorm(m)]
    try:
        _forward(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return ranks


def _forward(model: nn.Module, example_inputs) -> Any:
    from .verify import inputs_must_fit, model_device, training_flags

    device = model_device(model)
    inputs = [t.to(device) for t in example_inputs]
    with torch.no_grad(), training_flags(model, False), inputs_must_fit(model, inputs):
        return model(*inputs)


# ----------------------------------------------------------------------------- recorded


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    """Records, for every tensor version, who produced it and who read it."""

    def __init__(self) -> None:
        super().__init__()
        self.producer: dict[tuple[int, int], str] = {}
        self.readers: defaultdict[tuple[int, int], list[str]] = defaultdict(list)
        self.keep: list[torch.Tensor] = []  # keeps ids unique for the whole pass
        self.depth = 0  # > 0 inside a recorded leaf module

    def key(self, t: torch.Tensor) -> tuple[int, int]:
        self.keep.append(t)
        return id(t), t._version

    def read(self, label: str, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self.readers[self.key(t)].append(label)

    def wrote(self, label: str, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            self.producer[self.key(t)] = label

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth:
            return func(*args, **kwargs)
        inputs = _tensors((args, kwargs))
        keys = [(id(t), t._version) for t in inputs]
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        if outputs:  # shape/dtype queries are not data reads
            label = getattr(func, "__name__", str(func))
            for t, k in zip(inputs, keys):
                self.keep.append(t)
                self.readers[k].append(label)
            self.wrote(label, outputs)
        return out


def _recorded_sites(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> dict[str, BNSite]:
    rec = _Recorder()
    modules = dict(model.named_modules())
    leaves = {n: m for n, m in modules.items() if n and (not any(m.children()) or is_batchnorm(m))}
    calls: Counter[str] = Counter()
    bn_inputs: dict[str, list[tuple[tuple[int, int], int]]] = defaultdict(list)
    bn_outputs: dict[str, list[tuple[int, int]]] = defaultdict(list)
    pending: dict[str, list[tuple[int, int]]] = {}

    def pre_hook(name):
        def hook(module, args):
            calls[name] += 1
            inputs = _tensors(args)
            pending[name] = [rec.key(t) for t in inputs]
            if is_batchnorm(module) and inputs:
                bn_inputs[name].append((rec.key(inputs[0]), inputs[0].dim()))
            rec.depth += 1

        return hook

    def post_hook(name):
        def hook(module, args, output):
            rec.depth -= 1
            for k in pending.pop(name, []):
                rec.readers[k].append(name)
            outputs = _tensors(output)
            rec.wrote(name, outputs)
            if is_batchnorm(module):
                bn_outputs[name].extend(rec.key(t) for t in outputs)

        return hook

    handles = []
    for name, m in leaves.items():
        handles.append(m.register_forward_pre_hook(pre_hook(name)))
        handles.append(m.register_forward_hook(post_hook(name)))
    from .verify import inputs_must_fit, model_device, training_flags

    device = model_device(model)
    inputs = [t.to(device) for t in example_inputs]
    try:
        with torch.no_grad(), training_flags(model, False), inputs_must_fit(model, inputs), rec:
            rec.wrote("input", inputs)
            rec.read("output", _tensors(model(*inputs)))
    finally:
        for h in handles:
            h.remove()

    sites = {}
    for name in bn_inputs:
        (in_key, rank), = bn_inputs[name][:1]
        producer_label = rec.producer.get(in_key, "input")
        producer = producer_label if producer_label in leaves else None
        consumers = tuple(dict.fromkeys(r for k in bn_outputs[name] for r in rec.readers.get(k, [])))
        consumer = consumers[0] if len(consumers) == 1 and consumers[0] in leaves else None
        sites[name] = BNSite(
            bn=name,
            calls=calls[name],
            input_rank=rank,
            producer=producer,
            producer_op=None if producer else producer_label,
            producer_readers=tuple(rec.readers.get(in_key, [])),
            producer_calls=calls[producer] if producer else 0,
            consumers=consumers,
            consumer=consumer,
            consumer_calls=calls[consumer] if consumer else 0,
        )
    return sites
