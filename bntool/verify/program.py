"""Verification of a ``torch.export`` program: ``module()`` of the original and of the candidate on the same inputs.

``ProgramReference.of`` runs the original's ``module()`` once in its own
dtype and once with every floating tensor (its weights, buffers, constants
and inputs) in float64, keeping the outputs and the values of the probed
nodes; ``compare_program`` runs the candidate and judges each output and each
probed node with the one tolerance rule of ``compare`` (the candidate may
be ``SLACK`` times as far from float64 as the original is, with a floor;
non-finite values never pass). A probe is a pair of node names, the
original's and the candidate's, for a node the candidate renamed or
replaced (a folded BN's output is its producer's in the folded program).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch.export import ExportedProgram

from ..errors import InputError, first_line
from ..runtime.float64 import exact_float64
from ..runtime.running import tf32_disabled
from .compare import Comparison
from .tolerance import compare_one, rounding_factor


class _Recorder(torch.fx.Interpreter):
    """Runs a graph module, keeping the values of the named nodes; ``double`` runs its tensors in float64."""

    def __init__(self, module: torch.fx.GraphModule, keep: set[str], double: bool):
        super().__init__(module)
        self.keep, self.double, self.kept = keep, double, {}

    def run_node(self, n):
        value = super().run_node(n)
        if n.name in self.keep and isinstance(value, torch.Tensor):
            self.kept[n.name] = value.detach()
        return value

    def get_attr(self, target, args, kwargs):
        value = super().get_attr(target, args, kwargs)
        return _wide(value) if self.double else value


def _wide(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.detach().double()
    return value


def flat_inputs(program: ExportedProgram, inputs: Any) -> list:
    """``(args, kwargs)`` (or a tuple of args) flattened as the program's graph takes them."""
    from torch.fx import _pytree as fx_pytree

    if not (isinstance(inputs, tuple) and len(inputs) == 2 and isinstance(inputs[1], dict)):
        inputs = (tuple(inputs), {})
    spec = program.call_spec.in_spec
    if spec is None:
        return list(torch.utils._pytree.tree_leaves(inputs))
    return list(fx_pytree.tree_flatten_spec(inputs, spec))


def run_program(program: ExportedProgram, flat: Sequence[Any], keep: set[str] = frozenset(), *, double: bool = False,
                device: torch.device | None = None) -> tuple[list, dict[str, torch.Tensor]]:
    """The program's flat outputs and the kept nodes' values, from ``module()`` run on ``flat`` inputs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (torch's own pytree deprecation notes)
        module = program.module(check_guards=False)
    if device is not None:
        module = module.to(device)
    values = [(_wide(x) if double else x) for x in flat]
    if device is not None:
        values = [x.to(device) if isinstance(x, torch.Tensor) else x for x in values]
    recorder = _Recorder(module, set(keep), double)
    exact = double and (device is None or device.type == "cpu")  # float64 convolutions without torch's slow path
    with torch.no_grad(), tf32_disabled(), exact_float64(module, exact, throughout=True):
        outputs = recorder.run(*values)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return list(outputs), recorder.kept


@dataclass(frozen=True)
class ProgramReference:
    outputs: list
    float64: list | None
    layers: dict[str, torch.Tensor]
    layers64: dict[str, torch.Tensor]
    device: torch.device | None

    @classmethod
    def of(cls, program: ExportedProgram, flat: Sequence[Any], probes: Sequence[str] = (), *,
           float64: bool = True, device: torch.device | None = None) -> ProgramReference:
        try:
            outputs, layers = run_program(program, flat, set(probes), device=device)
        except Exception as exc:
            raise InputError(f"the program does not run on the verification inputs ({type(exc).__name__}: "
                             f"{first_line(exc, 200)}); pass inputs it accepts (`example_inputs` or `input_shapes`)") from exc
        high, layers64 = None, {}
        if float64:
            try:
                high, layers64 = run_program(program, flat, set(probes), double=True, device=device)
            except Exception:  # noqa: BLE001 - an op without float64 kernels: the floor alone judges
                high, layers64 = None, {}
        return cls(outputs, high, layers, layers64, device)


def compare_program(reference: ProgramReference, candidate: ExportedProgram, flat: Sequence[Any],
                    probes: Mapping[str, tuple[str, str]] = {}, *, atol: float | None = None,
                    rtol: float | None = None, fan_in: Mapping[str, int] | None = None) -> Comparison:
    """``candidate`` against the original's reference: every output, and every probe (label -> original's node
    name, candidate's node name)."""
    derived = atol is None and rtol is None
    outputs, kept = run_program(candidate, flat, {c for _, c in probes.values()}, device=reference.device)
    if len(outputs) != len(reference.outputs):
        raise InputError(f"the candidate has {len(outputs)} outputs and the original {len(reference.outputs)}")
    fan = fan_in or {}
    results = []
    for i, (orig, cand) in enumerate(zip(reference.outputs, outputs)):
        if not isinstance(orig, torch.Tensor):
            continue
        high = reference.float64[i] if derived and reference.float64 is not None else None
        if derived and high is None:
            high = orig
        results.append(compare_one(f"output {i}", orig, cand.to(orig.device), high, atol, rtol,
                                   widen=rounding_factor(fan.get(""))))
    for label, (original, mine) in probes.items():
        orig = reference.layers.get(original)
        if orig is None or mine not in kept:
            continue
        high = reference.layers64.get(original) if derived else None
        if derived and high is None:
            high = orig
        results.append(compare_one(f"layer `{label}`", orig, kept[mine].to(orig.device), high, atol, rtol,
                                   widen=rounding_factor(fan.get(label))))
    rule = "derived" if derived else f"atol={atol or 0.0:g} rtol={rtol or 0.0:g}"
    device = str(reference.device) if reference.device is not None else "cpu"
    return Comparison(tuple(results), device, rule)
