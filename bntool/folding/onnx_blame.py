"""Which folds inside ``If`` / ``Loop`` / ``Scan`` bodies a failed verification of an ONNX fold is due to.

A layer inside a body cannot be an extra output of the main graph, so such
folds are checked at the graph outputs only. When those differ and no
main-graph layer check names a pair (``fold._blame``), each body's folds are
tried alone, the other folds left out: the pairs of the first body whose
folds alone make an output differ are blamed, and the rest re-verified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..verify.compare import Comparison
from .plan import FoldPair, FoldPlan

LEFT_OUT = "left out while the folds of one subgraph were tried alone"


def blame_bodies(plan: FoldPlan, sites: Mapping[str, Any], comparison: Comparison,
                 trial: Callable[[dict[str, str]], Comparison]) -> dict[str, str]:
    """The pairs (BN label -> reason) of the first body whose folds alone fail; ``trial(rejected)`` verifies the
    plan made with ``rejected`` left. Empty when no body's folds fail alone (or none are in a body)."""
    bodies: dict[str, list[FoldPair]] = {}
    for pair in plan.pairs:
        path = sites[pair.bn][0].graph
        if path:
            bodies.setdefault(path, []).append(pair)
    if not bodies or comparison.passed:
        return {}
    for path, pairs in bodies.items():
        inside = {p.bn for p in pairs}
        result = comparison if len(bodies) == 1 and len(inside) == len({p.bn for p in plan.pairs}) else \
            trial({p.bn: LEFT_OUT for p in plan.pairs if p.bn not in inside})
        if result.passed:
            continue
        bad = next(o for o in result.outputs if not o.passed)
        named = bad.name if "`" in bad.name else f"`{bad.name}`"
        why = (f"{named} had non-finite values ({bad.nonfinite})" if bad.nonfinite else bad.name
               if bad.tolerance == 0.0 and bad.max_abs_error == float("inf") else
               f"{named} differed by {bad.max_abs_error:.3g} (tolerance {bad.tolerance:.3g})")
        return {p.bn: (f"rejected by verification: folded into `{p.into}` inside `{path}`; with the folds of "
                       f"that subgraph alone, {why}") for p in pairs}
    return {}
