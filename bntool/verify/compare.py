"""Numeric verification: the original's reference outputs and the comparison (the tolerance rule: ``tolerance``).

The tolerance is derived from the model itself. A float64 copy of the original
model is the reference; the original in its own dtype is some distance from
it (its rounding error). The candidate (folded, frozen, exported...) passes
when it is no more than ``SLACK`` times that far from the reference, with a
floor of a few units of the dtype's rounding at the output's scale. A fold
that is wrong in one channel of one layer lands far outside that band.
``atol`` / ``rtol`` replace the derived rule with a plain
``|candidate - original| <= atol + rtol * |original|`` check.
Whatever the rule, an output with a NaN or an infinity, in the candidate or
in the original, never passes: equal NaNs prove nothing.

``Reference.of`` runs the original once (in its own dtype and in float64,
layer by layer on the verification device: ``running.run_on``) and keeps what
every later comparison on the same inputs needs; ``compare`` runs a candidate
and judges each output and probed layer against it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..deprecation import plumbing
from ..errors import InputError, require_module
from ..runtime.running import flatten_outputs, resolve_device, run_on, tf32_disabled
from ..runtime.spill import TensorStore
from .tolerance import OutputComparison, rounding_factor
from .tolerance import compare_one as _compare_one


@dataclass(frozen=True)
class Comparison:
    """Every output of one check. ``passed`` only if every output passed."""

    outputs: tuple[OutputComparison, ...]
    device: str
    rule: str

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)

    @property
    def max_abs_error(self) -> float:
        return max((o.max_abs_error for o in self.outputs), default=0.0)

    @property
    def max_rel_error(self) -> float:
        return max((o.max_rel_error for o in self.outputs), default=0.0)

    def failure_message(self, what: str) -> str:
        bad = [o for o in self.outputs if not o.passed]
        parts = [
            f"`{o.name}` has non-finite values ({o.nonfinite}), which are never verified" if o.nonfinite else
            f"`{o.name}` max abs error {o.max_abs_error:.3g} > tolerance {o.tolerance:.3g} "
            f"(max rel error {o.max_rel_error:.3g})"
            for o in bad
        ]
        return f"{what} does not match the original on {self.device}: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "device": self.device,
            "rule": self.rule,
            "outputs": [dataclasses.asdict(o) for o in self.outputs],
        }


@dataclass(frozen=True)
class Reference:
    """The original model on fixed inputs, for every comparison against them (computed once, reused).

    ``outputs``: its outputs in its own dtype; ``layers``: the outputs of the
    probed layers (by label); ``float64``: its outputs in float64, and
    ``layer_deltas``: for each probed layer, float64 minus own-dtype output,
    for the derived tolerance. The deltas are tiny next to the outputs, so
    they are kept in bfloat16 (their own error stays below 0.4%), and no
    layer output is kept in float64. Layer outputs beyond a few tens of MB go
    to an unlinked temporary file (``spill.TensorStore``), not to memory.
    """

    outputs: tuple[tuple[str, torch.Tensor], ...]
    layers: TensorStore
    float64: tuple[tuple[str, torch.Tensor], ...] | None
    layer_deltas: TensorStore
    device: torch.device

    @classmethod
    def of(
        cls,
        original: nn.Module,
        inputs: Sequence[torch.Tensor],
        *,
        device: str | torch.device = "auto",
        probes: Sequence[str] = (),
        float64: bool = True,
    ) -> Reference:
        """Run ``original`` (eval mode, TF32 off) on ``inputs``, and in float64 when ``float64``, layer by layer."""
        device = resolve_device(device)
        layers, deltas = TensorStore(), TensorStore()

        def keep(label: str, output: torch.Tensor) -> None:
            layers.put(label, output)

        def measure(label: str, output: torch.Tensor) -> None:
            mine = layers.get(label) if label in layers else None
            if mine is not None and mine.shape == output.shape and mine.is_floating_point():
                deltas.put(label, output.double().sub(mine).to(torch.bfloat16))  # (one float64 tensor, not two)

        with tf32_disabled():
            outputs = run_on(original, inputs, device, probes=probes, on_probe=keep)
            high = run_on(original, inputs, device, torch.float64, probes=probes, on_probe=measure) if float64 else None
        return cls(tuple(outputs), layers, tuple(high) if high is not None else None, deltas, device)


def compare(
    original: nn.Module | None,
    candidate: nn.Module | Callable[[Sequence[torch.Tensor]], Any],
    inputs: Sequence[torch.Tensor],
    *,
    device: str | torch.device = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    candidate_train: bool = False,
    **internal: Any,
) -> Comparison:
    """Compare ``candidate`` with ``original`` (eval mode) on ``inputs``, TF32 off.

    ``candidate`` is a module (run in eval mode unless ``candidate_train``) or
    a callable taking the list of inputs (an onnxruntime session, say) and
    returning outputs of the same structure. The models given are not
    changed, and a model not on ``device`` is run there rather than copied.
    (``probes``, ``reference`` and ``fan_in``, bntool's own plumbing, are
    accepted for one release with a ``FutureWarning``: ``compare_layers``.)
    """
    plumbing(internal, ("probes", "reference", "fan_in"), "compare",
             "call `bntool.verify.compare.compare_layers` for a layer-by-layer check")
    return compare_layers(original, candidate, inputs, device=device, atol=atol, rtol=rtol,
                          candidate_train=candidate_train, **internal)


def compare_layers(
    original: nn.Module | None,
    candidate: nn.Module | Callable[[Sequence[torch.Tensor]], Any],
    inputs: Sequence[torch.Tensor],
    *,
    device: str | torch.device = "auto",
    atol: float | None = None,
    rtol: float | None = None,
    candidate_train: bool = False,
    probes: Sequence[str] = (),
    reference: Reference | None = None,
    fan_in: Mapping[str, int] | None = None,
) -> Comparison:
    """``compare``, also at chosen layers, against a reference computed before.

    ``probes`` names modules, present
    in both models, whose outputs are compared too: a layer-by-layer check
    sees an error in one channel that the final output may hide (a ReLU that
    zeroes it, a sigmoid that saturates). ``reference`` (``Reference.of``, with at least
    these probes) saves running the original again. ``fan_in`` gives, per
    probed module (and ``""`` for the outputs), the largest fan-in of the
    candidate's recomputed weights it depends on; the floor of the derived
    tolerance widens with it (``rounding_factor``). The models given are not
    changed, and a model not on ``device`` is run there layer by layer rather
    than copied.
    """
    if original is not None:
        require_module(original, "original")
    derived = atol is None and rtol is None
    if reference is None or (derived and reference.float64 is None):
        reference = Reference.of(original, inputs, device=device, probes=probes, float64=derived)
    device = reference.device
    probes = tuple(probes) if isinstance(candidate, nn.Module) else ()
    layers: list[OutputComparison] = []
    unknown: list[str] = []

    def check(label: str, output: torch.Tensor) -> None:
        if label not in reference.layers:
            unknown.append(label)
            return
        delta = reference.layer_deltas.get(label) if derived and label in reference.layer_deltas else None
        widen = rounding_factor((fan_in or {}).get(label.split("`")[1]))
        layers.append(_compare_one(label, reference.layers.get(label), output, None, atol, rtol, delta=delta,
                                   widen=widen))

    with tf32_disabled():
        if isinstance(candidate, nn.Module):
            candidate_out = run_on(candidate, inputs, device, train=candidate_train, probes=probes, on_probe=check)
        else:
            candidate_out = flatten_outputs(candidate(inputs))
    names = [n for n, _ in candidate_out]
    if names != [n for n, _ in reference.outputs] or unknown:
        raise InputError(
            "the candidate's outputs do not have the original's structure: "
            f"{[n for n, _ in reference.outputs]} vs {names + unknown}"
        )
    high = dict(reference.float64) if derived and reference.float64 is not None else {}
    widen = rounding_factor((fan_in or {}).get(""))
    results = [_compare_one(name, orig, cand.to(orig.device), high.get(name), atol, rtol, widen=widen)
               for (name, orig), (_, cand) in zip(reference.outputs, candidate_out)]
    rule = "derived" if derived else f"atol={atol or 0.0:g} rtol={rtol or 0.0:g}"
    return Comparison(outputs=tuple(results + layers), device=str(device), rule=rule)
