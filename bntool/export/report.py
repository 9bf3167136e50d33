"""What an ONNX export reports: the file, what it holds, the fold before it, and its proof."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from ..folding.fold import FoldReport
from ..folding.plan import FoldPair
from ..onnxio.check import KEY_OPS, OnnxFacts, TrainingBN
from ..onnxio.ort import OnnxVerification
from ..report import Skip, contract
from ..verify.compare import Comparison


@dataclass(frozen=True)
class ExportReport:
    """The file written, what it holds, and its proof (``verification``: onnxruntime against PyTorch).

    ``done`` / ``skipped``: the BNs folded before export, and those left (with the reason); ``comparison``: the
    onnxruntime comparison at every batch size, as one; ``passed`` is None when not verified (``verify=False``)
    and nothing else failed.
    """

    path: str
    written: bool
    exporter: str
    opset: int
    optimized: str
    dynamic_batch: bool
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    facts: OnnxFacts
    fold: FoldReport | None
    verification: OnnxVerification | None
    export_seconds: float
    failures: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    initializers_checked: int = 0  # initializers compared bit for bit with the model's tensors of the same name
    verified: bool = True

    @property
    def passed(self) -> bool | None:
        return False if self.failures else True if self.verified else None

    @property
    def done(self) -> tuple[FoldPair, ...]:
        return self.fold.done if self.fold is not None else ()

    @property
    def skipped(self) -> tuple[Skip, ...]:
        return self.fold.skipped if self.fold is not None else ()

    @property
    def comparison(self) -> Comparison | None:
        """Every batch size's comparison as one (outputs named ``output (batch N)``), or None if not verified."""
        v = self.verification
        if v is None or not v.checks:
            return None
        outputs = tuple(dataclasses.replace(o, name=f"{o.name} (batch {c.batch_size})")
                        for c in v.checks for o in c.comparison.outputs)
        first = v.checks[0].comparison
        return Comparison(outputs, f"onnxruntime ({v.provider}) vs {first.device}", first.rule)

    def recipe_step(self) -> dict[str, Any]:
        """What the file is: the fold's step (None with ``fold=False``) exported to ONNX (no recipe is stored in it)."""
        return {"op": "export_onnx", "fold": self.fold.recipe_step() if self.fold is not None else None,
                "exporter": self.exporter, "opset": self.opset, "dynamic_batch": self.dynamic_batch}

    @property
    def bn_left(self) -> int:
        return self.facts.bn_left

    @property
    def training_bns(self) -> tuple[TrainingBN, ...]:
        return self.facts.training_bns

    def to_dict(self) -> dict[str, Any]:
        f = self.facts
        v = self.verification
        checks = [{"batch_size": c.batch_size, **c.comparison.to_dict()} for c in v.checks] if v else []
        return {
            "output": self.path, "written": self.written, "passed": self.passed, "failures": list(self.failures),
            "exporter": self.exporter, "torch_version": torch.__version__, "opset": self.opset,
            "optimized": self.optimized, "dynamic_batch": self.dynamic_batch,
            "input_names": list(self.input_names), "output_names": list(self.output_names),
            "size_bytes": f.size_bytes, "external_data": list(f.external_data), "checker": f.checker_error or "passed",
            "bn_left": f.bn_left, "training_mode_bns": [dataclasses.asdict(t) for t in f.training_bns],
            "key_node_counts": {op: f.node_counts.get(op, 0) for op in KEY_OPS}, "node_counts": f.node_counts,
            "fold": self.fold.to_dict() if self.fold is not None else None,
            "provider": v.provider if v else None,
            "verification": checks,
            "export_seconds": round(self.export_seconds, 3), "notes": list(self.notes),
            "initializers_checked": self.initializers_checked,
            # (``bn`` beside ``layer`` in the skip entries: the older key, kept for one release)
            **contract("export_onnx", self, dict.fromkeys(p.bn for p in self.done),
                       checks if self.verified else None, old_name="bn"),
        }
