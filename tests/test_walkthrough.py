"""The walkthrough (examples/walkthrough.py) end to end, and each claim it prints."""

from __future__ import annotations

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("onnxruntime")

from examples import walkthrough  # noqa: E402


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("walkthrough")
    result = walkthrough.main(["--out-dir", str(out)])
    result["out"] = out
    return result


pytestmark = pytest.mark.slow


def test_trains_to_a_real_accuracy(figures):
    assert figures["test_accuracy"] >= 93.0
    assert (figures["out"] / "digits.pth").exists()


def test_inspect_sees_every_bn_foldable(figures):
    assert figures["inspect"] == {"layers": 4, "foldable": 4, "findings": []}
    assert (figures["out"] / "inspect.png").read_bytes()[:4] == b"\x89PNG"


def test_fold_keeps_accuracy(figures):
    assert figures["folded_layers"] == 4 and figures["bn_left_after_fold"] == 0
    assert abs(figures["folded_accuracy"] - figures["test_accuracy"]) <= 0.1


def test_shift_hurts_and_recalibration_recovers(figures):
    assert figures["shifted_accuracy"] <= figures["test_accuracy"] - 20
    assert figures["recalibrated_accuracy"] >= figures["shifted_accuracy"] + 20
    assert figures["recalibrated_accuracy"] >= figures["test_accuracy"] - 3


def test_frozen_fine_tuning_keeps_statistics_and_accuracy(figures):
    assert figures["frozen_statistics_change"] == 0.0
    assert figures["frozen_finetuned_accuracy"] >= figures["test_accuracy"] - 1.0
    assert figures["unfrozen_statistics_change"] > 0.0  # what freezing prevents


def test_onnx_matches_pytorch(figures):
    assert abs(figures["onnx_accuracy"] - figures["test_accuracy"]) <= 0.1
    assert figures["onnx_agreement"] >= 99.9
