"""The operation contract: one report protocol for every operation, ``verify=False`` said, and the old spellings.

Every operation (fold, recalibrate, freeze, unfreeze, export) returns a report
that satisfies ``bntool.Report``, whose ``to_dict()`` carries ``op``,
``passed``, ``done``, ``skipped: [{"layer", "reason"}]``, ``verification`` and
``recipe_step``; with ``verify=False`` ``passed`` is None, never True. The
spellings the contract replaced (positional example inputs, ``consume``,
``only``, ``export_onnx(model, inputs, path)``, ``compare``'s and ``save``'s
plumbing) keep working for one release with a ``FutureWarning``.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import bntool
from bntool.errors import InputError, VerificationError
from bntool.onnxio.ort import OrtLoadError
from bntool.report import CONTRACT_KEYS
from examples import models as zoo
from tests.conftest import randomize_bn

X = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))


def _lenet(seed: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(zoo.lenet(), seed=seed)


def _batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return [torch.rand(8, 1, 28, 28, generator=gen) * 2 + 0.5 for _ in range(3)]


def _run(op: str, verify: bool, tmp_path):
    """Each operation on LeNet (BNs `1`, `5`, `10`, `13`), leaving BN `13` out where the operation selects."""
    model = _lenet()
    if op == "fold":
        return bntool.fold(model, exclude="13", example_inputs=X, verify=verify)[1]
    if op == "recalibrate":
        return bntool.recalibrate(model, _batches(), exclude="13", verify=verify)
    if op == "freeze":  # (`1`, already frozen, is left too)
        model, _ = bntool.freeze(model, include="1", example_inputs=X)
        return bntool.freeze(model, exclude="13", example_inputs=X, verify=verify)[1]
    if op == "unfreeze":
        frozen, _ = bntool.freeze(model, example_inputs=X)
        return bntool.unfreeze(frozen, exclude="13", example_inputs=X, verify=verify)[1]
    if op == "convert":
        return bntool.convert(model, "syncbatchnorm", exclude="13", example_inputs=X, verify=verify)[1]
    return bntool.export_onnx(model, tmp_path / f"{verify}.onnx", exclude="13", example_inputs=X, verify=verify,
                              device="cpu")


OPS = ["fold", "recalibrate", "freeze", "unfreeze", "convert", "export_onnx"]
#: the key each operation's skip entries had before ``layer`` (kept one release); unfreeze skips nothing
OLD_SKIP_KEY = {"fold": "bn", "export_onnx": "bn", "freeze": "name", "recalibrate": "name"}
#: the layer each operation leaves in ``_run``, and why
SKIPPED = {"fold": {"13": "exclude pattern `13`"}, "export_onnx": {"13": "exclude pattern `13`"},
           "recalibrate": {"13": "exclude pattern `13`"},
           "freeze": {"13": "exclude pattern `13`", "1": "already frozen"},
           "convert": {"13": "exclude pattern `13`"}}


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "not-verified"])
@pytest.mark.parametrize("op", OPS)
def test_every_report_satisfies_the_protocol(op, verify, tmp_path):
    # catches: a report without one of the names, a to_dict() without a contract key, passed=True when nothing
    # was verified (the 0.2 behaviour), done / skipped / recipe_step in to_dict() disagreeing with the report
    report = _run(op, verify, tmp_path)
    assert isinstance(report, bntool.Report)
    data = report.to_dict()
    assert set(CONTRACT_KEYS) <= set(data)
    json.dumps(data)  # JSON as it is
    assert data["op"] == op
    assert data["passed"] is report.passed
    assert report.passed is (True if verify else None)
    assert (data["verification"] is None) is (not verify)
    assert data["recipe_step"] == report.recipe_step()
    names = [getattr(d, "bn", None) or getattr(d, "name", None) for d in report.done]
    assert data["done"] == list(dict.fromkeys(names)) and data["done"]
    assert "13" not in data["done"]
    if op == "unfreeze":
        assert data["skipped"] == []  # a frozen layer not selected stays frozen, as it was: nothing left undone
        assert data["done"] == ["1", "5", "10"]
    else:
        left = {s["layer"]: s for s in data["skipped"]}
        assert set(left) == set(SKIPPED[op])
        for layer, why in SKIPPED[op].items():
            assert why in left[layer]["reason"]
            if op in OLD_SKIP_KEY:  # (convert is new: it has no older key)
                assert left[layer][OLD_SKIP_KEY[op]] == layer  # the older key, beside `layer`, for one release
        assert sorted(s.name for s in report.skipped) == sorted(SKIPPED[op])
    if verify and op not in ("recalibrate",):
        assert report.comparison is not None and report.comparison.passed


def test_the_report_classes_are_exported():
    for name in ("FoldReport", "RecalibrationReport", "FreezeReport", "UnfreezeReport", "ExportReport", "Report"):
        assert name in bntool.__all__ and getattr(bntool, name).__name__ == name


def test_a_fold_that_crashed_has_not_passed():
    # catches: ``passed`` read as "comparison is None or ..." (True for a report whose folded model did not run)
    from bntool.folding.fold import FoldReport
    from bntool.folding.plan import FoldPlan

    assert FoldReport(FoldPlan((), (), "fx"), None).passed is False
    assert FoldReport(FoldPlan((), (), "fx"), None, verified=False).passed is None


# ----------------------------------------------------------------------------- selection in fold and export


def test_fold_selects_with_the_one_rule_and_leaves_the_rest_with_the_reason():
    model = _lenet()
    folded, report = bntool.fold(model, include=["1", "5"], exclude="5", example_inputs=X)
    assert [p.bn for p in report.done] == ["1"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons == {"5": "excluded by the exclude pattern `5`", "10": "not selected by the include patterns",
                       "13": "not selected by the include patterns"}
    assert report.rejected == ()  # left by the selection, not by verification
    kinds = {n: type(m).__name__ for n, m in folded.named_modules()}
    assert kinds["1"] == "Identity" and kinds["5"] == "BatchNorm2d" and kinds["13"] == "BatchNorm1d"
    with torch.no_grad():
        torch.testing.assert_close(folded(X), model(X), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="include pattern `nope` matches no BatchNorm layer"):
        bntool.fold(model, include="nope", example_inputs=X)


def test_export_folds_only_the_selected_and_keeps_the_rest_in_the_file(tmp_path):
    # optimize=False: the exporter's own optimizer would fuse the BN left (its own fold, not bntool's)
    report = bntool.export_onnx(_lenet(), tmp_path / "m.onnx", include="1", example_inputs=X, optimize=False,
                                device="cpu")
    assert report.passed and [p.bn for p in report.done] == ["1"]
    assert report.bn_left == 3 and report.facts.node_counts.get("BatchNormalization") == 3  # `5`, `10`, `13`
    assert {s.name for s in report.skipped} == {"5", "10", "13"}
    with pytest.raises(InputError, match="with `fold=False` nothing is folded"):
        bntool.export_onnx(_lenet(), tmp_path / "n.onnx", include="1", example_inputs=X, fold=False)
    assert not (tmp_path / "n.onnx").exists()


def test_export_without_verify_runs_no_onnxruntime_and_says_not_verified(tmp_path, monkeypatch):
    import bntool.export.prove as proof

    def no_onnxruntime(*args, **kwargs):
        raise AssertionError("onnxruntime ran although verify=False")

    monkeypatch.setattr(proof, "verify_file", no_onnxruntime)
    report = bntool.export_onnx(_lenet(), tmp_path / "m.onnx", example_inputs=X, verify=False)
    assert report.written and (tmp_path / "m.onnx").exists()
    assert report.passed is None and report.verification is None and report.comparison is None
    assert report.fold.passed is None  # the fold was not verified either
    data = report.to_dict()
    assert data["passed"] is None and data["verification"] is None


def test_onnxruntime_failing_to_load_is_a_typed_error(tmp_path):
    # catches: the export telling "cannot load" apart by the message's text (a reworded message would slip through)
    from bntool.onnxio.ort import verify_onnx

    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not an onnx file")
    with pytest.raises(OrtLoadError) as info:
        verify_onnx(_lenet(), path, (X,), device="cpu")
    assert isinstance(info.value, VerificationError) and info.value.reason
    assert str(info.value) == f"onnxruntime cannot load the file: {info.value.reason}"
    assert str(path.parent) not in info.value.reason


# ----------------------------------------------------------------------------- old spellings, one release


def _future(match: str):
    return pytest.warns(FutureWarning, match=match)


def test_fold_inputs_by_position_warn_and_give_the_same_fold():
    model = _lenet()
    with _future(r"pass `example_inputs=\.\.\.`"):
        old, old_report = bntool.fold(model, X)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new, new_report = bntool.fold(model, example_inputs=X)
    assert old_report.plan == new_report.plan
    for (name, a), (_, b) in zip(old.state_dict().items(), new.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(InputError, match="`fold` got `example_inputs` both by position and by keyword"):
        bntool.fold(model, X, example_inputs=X)


def test_export_old_order_and_consume_warn_and_still_work(tmp_path):
    model = _lenet()
    with _future("pass `example_inputs="):
        old = bntool.export_onnx(model, X, tmp_path / "old.onnx", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        new = bntool.export_onnx(model, tmp_path / "new.onnx", example_inputs=X, device="cpu")
    assert old.passed and new.passed and (tmp_path / "old.onnx").read_bytes() == (tmp_path / "new.onnx").read_bytes()
    handed = _lenet()
    with _future("`consume` of `export_onnx` is deprecated.*pass `inplace` instead"):
        report = bntool.export_onnx(handed, tmp_path / "c.onnx", example_inputs=X, consume=True, device="cpu")
    assert report.passed and next(handed.parameters()).device.type == "meta"  # handed over, as with inplace=True
    with pytest.raises(InputError, match="pass `inplace` or its older name `consume`, not both"):
        bntool.export_onnx(_lenet(), tmp_path / "d.onnx", example_inputs=X, consume=True, inplace=True)


def test_recalibrate_only_and_positional_num_batches_warn_and_select_the_same():
    a, b = _lenet(), _lenet()
    with _future("`only` of `recalibrate` is deprecated.*pass `include` instead"):
        old = bntool.recalibrate(a, _batches(), only=["1", "5"])
    new = bntool.recalibrate(b, _batches(), include=["1", "5"])
    assert [layer.name for layer in old.layers] == [layer.name for layer in new.layers] == ["1", "5"]
    assert torch.equal(a[1].running_var, b[1].running_var)
    with _future(r"pass `num_batches=\.\.\.`"):
        report = bntool.recalibrate(_lenet(), _batches(), 2)
    assert report.num_batches == 2
    with pytest.raises(InputError, match="pass it once, as `num_batches=...`"):
        bntool.recalibrate(_lenet(), _batches(), 2, num_batches=2)
    with pytest.raises(InputError, match="pass `include` or its older name `only`, not both"):
        bntool.recalibrate(_lenet(), _batches(), only="1", include="5")


def test_compare_and_save_plumbing_warn_and_still_work(tmp_path):
    from bntool.io import checkpoint
    from bntool.verify.compare import Reference

    model = _lenet()
    reference = Reference.of(model, (X,), device="cpu", probes=["1"])
    with _future("`probes`, `reference` of `compare` is bntool's internal plumbing"):
        comparison = bntool.compare(None, model, (X,), probes=["1"], reference=reference)
    assert comparison.passed and {o.name for o in comparison.outputs} == {"output", "layer `1`"}
    with pytest.raises(TypeError, match="unexpected keyword argument 'probe'"):
        bntool.compare(model, model, (X,), probe=["1"])
    bntool.save(model, tmp_path / "a.safetensors")
    seen = []
    with _future("`source`, `check` of `save` is bntool's internal plumbing"):
        bntool.save(model, tmp_path / "b.safetensors", source=checkpoint.read(tmp_path / "a.safetensors"),
                    check=seen.append)
    assert len(seen) == 1 and checkpoint.read(tmp_path / "b.safetensors").metadata["source"]["file"] == "a.safetensors"
    path = tmp_path / "m.onnx"
    bntool.export_onnx(model, path, example_inputs=X, device="cpu")
    with _future("`references` of `verify_onnx` is bntool's internal plumbing"):
        verification = bntool.verify_onnx(model, path, (X,), device="cpu",
                                          references={2: Reference.of(model, (X,), device="cpu")})
    assert verification.passed
