"""Numeric verification: the original's reference outputs, the comparison, and the one tolerance rule.

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

from ..errors import InputError, require_module
from ..runtime.running import flatten_outputs, resolve_device, run_on, tf32_disabled
from ..runtime.spill import TensorStore
from .validity import all_finite

#: The candidate may be this many times further from the float64 reference
#: than the original model in its own dtype is. Folded weights are rounded
#: once more than the original's, so a folded layer can sit several times
#: further from float64 than the original's own layer (measured up to 9x on
#: EfficientNet-B0 projections): 16 keeps every correct fold measured at
#: under half its tolerance, while a 0.1% error in one channel is still
#: hundreds of times over it.
SLACK = 16.0
#: Floor, in units of the dtype's machine epsilon times the output's largest
#: magnitude, below which differences are never called failures. A float64
#: model's reference is no more precise than the model (the original's distance
#: to it is 0), so there the floor alone must hold a correct fold's own
#: rounding: measured up to 1.3x of 8 units on float64 look-alikes (2 correct
#: folds in 100 were rejected), so 32; a 0.1% error is still 10^11 times over.
FLOOR_EPS = {torch.float64: 32.0, torch.float32: 8.0, torch.float16: 8.0, torch.bfloat16: 8.0}
#: A candidate whose weights were recomputed (folded) carries their rounding, about one unit each, summed
#: over a layer's fan-in: the tolerance grows with ``sqrt(fan_in / FAN_IN_FREE)`` for fan-ins above this.
FAN_IN_FREE = 64


def rounding_factor(fan_in: int | None) -> float:
    """How much the tolerance widens for outputs that depend on rounded weights with this fan-in."""
    return max(1.0, (fan_in / FAN_IN_FREE) ** 0.5) if fan_in else 1.0


@dataclass(frozen=True)
class OutputComparison:
    """One output tensor: how far the candidate is from the original."""

    name: str
    shape: tuple[int, ...]
    max_abs_error: float
    max_rel_error: float
    tolerance: float
    passed: bool
    original_error: float | None = None
    candidate_error: float | None = None
    argmax_agreement: float | None = None
    nonfinite: str | None = None  # which side holds NaN / inf values, and how many


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
                deltas.put(label, (output - mine.double()).to(torch.bfloat16))

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
    probes: Sequence[str] = (),
    reference: Reference | None = None,
    fan_in: Mapping[str, int] | None = None,
) -> Comparison:
    """Compare ``candidate`` with ``original`` (eval mode) on ``inputs``, TF32 off.

    ``candidate`` is a module (run in eval mode unless ``candidate_train``) or
    a callable taking the list of inputs (an onnxruntime session, say) and
    returning outputs of the same structure. ``probes`` names modules, present
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


def _compare_one(
    name: str,
    orig: torch.Tensor,
    cand: torch.Tensor,
    ref: torch.Tensor | None,
    atol: float | None,
    rtol: float | None,
    delta: torch.Tensor | None = None,
    widen: float = 1.0,
) -> OutputComparison:
    """One output against the original: within the derived tolerance of the float64 reference ``ref``
    (or ``orig + delta``), widened by ``widen``; or within ``atol``/``rtol`` of the original."""
    if orig.shape != cand.shape:
        return OutputComparison(name, tuple(orig.shape), float("inf"), float("inf"), 0.0, False)
    if not orig.is_floating_point():
        equal = bool(torch.equal(orig, cand))
        return OutputComparison(name, tuple(orig.shape), 0.0 if equal else float("inf"), 0.0, 0.0, equal)
    nonfinite = _nonfinite(orig, cand)
    finite = nonfinite is None
    o64, c64 = orig.double(), cand.double()
    both = None if finite else torch.isfinite(c64) & torch.isfinite(o64)  # the non-finite fail the output already
    if both is not None:  # compare where both are finite
        o64, c64 = torch.where(both, o64, 0.0), torch.where(both, c64, 0.0)
    difference = c64 - o64
    diff = difference.abs()
    scale = o64.abs().max().item() if o64.numel() else 0.0
    max_abs = diff.max().item() if diff.numel() else 0.0
    max_rel = max_abs / scale if scale > 0 else max_abs
    original_error = candidate_error = None
    if ref is None and delta is not None:  # the reference is orig + delta: its errors are |delta|, |c - o - delta|
        d64 = _where_finite(delta.to(o64.device, torch.float64), both)
        original_error = d64.abs().max().item() if o64.numel() else 0.0
        candidate_error = difference.sub_(d64).abs_().max().item() if c64.numel() else 0.0
    elif ref is not None:
        r64 = _where_finite(ref.double().to(o64.device), both)
        original_error = (o64 - r64).abs().max().item() if o64.numel() else 0.0
        candidate_error = (c64 - r64).abs().max().item() if c64.numel() else 0.0
    if original_error is not None:
        floor = FLOOR_EPS.get(orig.dtype, 8.0) * torch.finfo(orig.dtype).eps * max(scale, 1e-30)
        tolerance = widen * max(SLACK * original_error, floor)
        passed = finite and candidate_error <= tolerance
    else:
        a, r = atol or 0.0, rtol or 0.0
        tolerance = a + r * scale
        passed = finite and bool((diff <= a + r * o64.abs()).all())
    agreement = None
    if orig.dim() == 2 and orig.shape[1] > 1:
        agreement = (orig.argmax(dim=1) == cand.argmax(dim=1)).double().mean().item()
    return OutputComparison(name=name, shape=tuple(orig.shape), max_abs_error=max_abs, max_rel_error=max_rel,
                            tolerance=tolerance, passed=passed, original_error=original_error,
                            candidate_error=candidate_error, argmax_agreement=agreement, nonfinite=nonfinite)


def _where_finite(values: torch.Tensor, both: torch.Tensor | None) -> torch.Tensor:
    return values if both is None else torch.where(both, values, 0.0)


def _nonfinite(orig: torch.Tensor, cand: torch.Tensor) -> str | None:
    """``None`` if both are finite, else which side holds how many NaN / inf values."""
    if all_finite(cand) and all_finite(orig):
        return None
    parts = []
    for side, tensor in (("candidate", cand), ("original", orig)):
        nan, inf = int(torch.isnan(tensor).sum()), int(torch.isinf(tensor).sum())
        if nan or inf:
            what = " and ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "inf")) if n)
            parts.append(f"{what} of {tensor.numel()} in the {side}")
    return "; ".join(parts) or None
