"""The one tolerance rule: how far a candidate's output may be from the original's, and the judgement of one output.

The tolerance is derived from the model itself (``compare``'s docstring says
how); ``compare_one`` judges one output (or probed layer) of a candidate
against the original's, and ``OutputComparison`` is the verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def compare_one(
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
    found = nonfinite(orig, cand)
    finite = found is None
    if finite and ref is None and delta is not None and orig.numel() and delta.shape == orig.shape:
        return _against_delta(name, orig, cand, delta, widen)  # (a probed layer: the hot path)
    a, r = atol or 0.0, rtol or 0.0
    max_abs = scale = 0.0
    original_error = candidate_error = None if ref is None and delta is None else 0.0
    within = True
    for o64, c64, r64, d64 in _chunks(orig, cand, ref, delta):  # (float64 copies of one chunk at a time)
        both = None if finite else torch.isfinite(c64) & torch.isfinite(o64)  # the non-finite fail the output already
        if both is not None:  # compare where both are finite
            o64, c64 = torch.where(both, o64, 0.0), torch.where(both, c64, 0.0)
        difference = c64 - o64
        max_abs = max(max_abs, difference.abs().max().item())
        scale = max(scale, o64.abs().max().item())
        if ref is None and delta is not None:  # the reference is orig + delta: its errors are |delta|, |c - o - delta|
            d64 = _where_finite(d64, both)
            original_error = max(original_error, d64.abs().max().item())
            candidate_error = max(candidate_error, difference.sub_(d64).abs_().max().item())
        elif ref is not None:
            r64 = _where_finite(r64, both)
            original_error = max(original_error, (o64 - r64).abs().max().item())
            candidate_error = max(candidate_error, (c64 - r64).abs().max().item())
        else:
            within = within and bool((difference.abs_() <= a + r * o64.abs()).all())
    max_rel = max_abs / scale if scale > 0 else max_abs
    if original_error is not None:
        floor = FLOOR_EPS.get(orig.dtype, 8.0) * torch.finfo(orig.dtype).eps * max(scale, 1e-30)
        tolerance = widen * max(SLACK * original_error, floor)
        passed = finite and candidate_error <= tolerance
    else:
        tolerance = a + r * scale
        passed = finite and within
    agreement = None
    if orig.dim() == 2 and orig.shape[1] > 1:
        agreement = (orig.argmax(dim=1) == cand.argmax(dim=1)).double().mean().item()
    return OutputComparison(
        name=name,
        shape=tuple(orig.shape),
        max_abs_error=max_abs,
        max_rel_error=max_rel,
        tolerance=tolerance,
        passed=passed,
        original_error=original_error,
        candidate_error=candidate_error,
        argmax_agreement=agreement,
        nonfinite=found,
    )


#: elements of an output compared at a time (each comparison holds a few float64 copies of a chunk)
CHUNK = 1 << 18


def _chunks(orig: torch.Tensor, cand: torch.Tensor, ref: torch.Tensor | None, delta: torch.Tensor | None):
    """``orig``, ``cand``, ``ref`` and ``delta`` in float64 on ``orig``'s device, a chunk of elements at a time
    (whole where a shape differs from ``orig``'s)."""
    whole = any(t is not None and t.shape != orig.shape for t in (ref, delta))
    tensors = [t if t is None or whole else t.reshape(-1) for t in (orig, cand, ref, delta)]
    step = orig.numel() if whole else CHUNK
    for start in range(0, orig.numel(), max(step, 1)):
        yield tuple(None if t is None else (t if whole else t[start:start + step]).to(orig.device, torch.float64)
                    for t in tensors)


def _against_delta(name: str, orig: torch.Tensor, cand: torch.Tensor, delta: torch.Tensor,
                   widen: float) -> OutputComparison:
    """``compare_one`` of finite outputs against ``orig + delta``, the same figures from one float64 tensor per
    chunk (``cand - orig``, then less ``delta``, in place) and maxima of magnitudes taken from the minimum and
    maximum (exact): no float64 copies of ``orig`` and ``delta``, no tensors of absolute values."""
    scale = max_abs = original_error = candidate_error = 0.0
    for o, c, d in zip(*(t.reshape(-1).split(CHUNK) for t in (orig, cand, delta))):
        difference = c.to(torch.float64, copy=True).sub_(o)
        scale, max_abs = max(scale, _max_magnitude(o)), max(max_abs, _max_magnitude(difference))
        original_error = max(original_error, _max_magnitude(d))
        candidate_error = max(candidate_error, _max_magnitude(difference.sub_(d.to(difference.device))))
    floor = FLOOR_EPS.get(orig.dtype, 8.0) * torch.finfo(orig.dtype).eps * max(scale, 1e-30)
    tolerance = widen * max(SLACK * original_error, floor)
    agreement = None
    if orig.dim() == 2 and orig.shape[1] > 1:
        agreement = (orig.argmax(dim=1) == cand.argmax(dim=1)).double().mean().item()
    return OutputComparison(name, tuple(orig.shape), max_abs, max_abs / scale if scale > 0 else max_abs, tolerance,
                            candidate_error <= tolerance, original_error, candidate_error, agreement, None)


def _max_magnitude(values: torch.Tensor) -> float:
    low, high = torch.aminmax(values)
    return max(abs(low.item()), abs(high.item()))


def _where_finite(values: torch.Tensor, both: torch.Tensor | None) -> torch.Tensor:
    return values if both is None else torch.where(both, values, 0.0)


def nonfinite(orig: torch.Tensor, cand: torch.Tensor) -> str | None:
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
