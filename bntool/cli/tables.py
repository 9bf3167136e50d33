"""The comparison tables every command shows: one row per output, the layer-by-layer check in one row."""

from __future__ import annotations

from typing import Any

from ..verify.compare import Comparison, OutputComparison
from . import console


def worst(outputs) -> OutputComparison | None:
    """The output closest to (or furthest past) its tolerance: the one a summary line names."""
    outputs = list(outputs)
    if not outputs:
        return None
    return max(outputs, key=lambda o: (not o.passed, o.max_abs_error / max(o.tolerance, 1e-300)))


def comparison_rows(comparison: Comparison) -> list[list[Any]]:
    """One row per model output; the layer-by-layer probes summarised in one row (the worst layer's)."""
    rows = []
    outputs = [o for o in comparison.outputs if not o.name.startswith("layer `")]
    layers = [o for o in comparison.outputs if o.name.startswith("layer `")]
    if layers:
        w = worst(layers)
        failed = sum(not o.passed for o in layers)
        status = "ok" if not failed else f"{failed} FAILED"
        rows.append([f"{len(layers)} layers (worst {w.name[6:]})", "", f"{w.max_abs_error:.3g}",
                     f"{w.max_rel_error:.3g}", f"{w.tolerance:.3g}", "", status])
    for o in outputs:
        agree = f"{o.argmax_agreement:.1%}" if o.argmax_agreement is not None else ""
        status = "ok" if o.passed else "FAILED (NaN/inf)" if o.nonfinite else "FAILED"
        rows.append([o.name, "x".join(map(str, o.shape)), f"{o.max_abs_error:.3g}", f"{o.max_rel_error:.3g}",
                     f"{o.tolerance:.3g}", agree, status])
    return rows


def worst_summary(comparison: Comparison) -> str:
    """The worst row of the table, in the table's own numbers: ``worst `output`: max abs error ... of tolerance ...``."""
    w = worst(comparison.outputs)
    if w is None:
        return "no outputs compared"
    share = w.max_abs_error / w.tolerance if w.tolerance > 0 else 0.0
    return (f"worst {w.name}: max abs error {w.max_abs_error:.3g}, {share:.0%} of its tolerance "
            f"{w.tolerance:.3g}; max rel error {w.max_rel_error:.3g}")


def render_comparison(comparison: Comparison, title: str) -> None:
    console.table(
        f"{title} ({comparison.device}, tolerance {comparison.rule})",
        ["output", "shape", "max abs err", "max rel err", "tolerance", "argmax agree", ""],
        comparison_rows(comparison),
    )
