"""``bntool.export_onnx``: structure of the file (node counts, names, opset), and onnxruntime == PyTorch."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

import bntool
from bntool.errors import InputError, VerificationError
from bntool.export import export_onnx as onnx_export
from bntool.onnxio.check import training_mode_bns
from bntool.onnxio.ort import verify_onnx
from bntool.runtime.shapes import make_inputs
from examples import models as zoo
from tests.conftest import randomize_bn


def _model(factory, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(factory(), seed=seed)


def _ort(path, *inputs: torch.Tensor) -> list[np.ndarray]:
    """An independent onnxruntime run (default session options), for checks that do not go through bntool."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bn_count(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


ZOO = {
    "resnet_small": (zoo.resnet_small, "Conv"),
    "mlp_bn1d": (zoo.mlp_bn, "Gemm"),
    "conv1d": (zoo.conv1d_net, "Conv"),
    "conv3d": (zoo.conv3d_net, "Conv"),
    "convtranspose2d_groups2": (lambda: zoo.convtranspose_net(2, groups=2), "ConvTranspose"),
}


@pytest.fixture(scope="module", params=list(ZOO))
def zoo_export(request, tmp_path_factory):
    factory, op = ZOO[request.param]
    model = _model(factory)
    before = _state(model)
    inputs = make_inputs(model)
    path = tmp_path_factory.mktemp(request.param) / "model.onnx"
    report = bntool.export_onnx(model, path, example_inputs=inputs)
    return model, before, inputs, path, report, op


def test_folded_export_has_no_batchnorm_and_matches_pytorch(zoo_export):
    model, before, inputs, path, report, op = zoo_export
    assert report.passed and report.written and path.exists()
    assert report.bn_left == 0 and report.fold is not None and not report.fold.plan.skips
    assert len(report.fold.plan.pairs) == _bn_count(model)
    assert report.facts.node_counts[op] >= 1 and report.facts.checker_error is None
    assert report.training_bns == () and report.exporter.startswith("torch.onnx.export(dynamo=True)")
    assert [c.batch_size for c in report.verification.checks] == [inputs[0].shape[0]]
    with torch.no_grad():
        expected = model(*inputs)
    np.testing.assert_allclose(_ort(path, *inputs)[0], expected.numpy(), rtol=1e-4, atol=1e-5)


def test_the_model_is_never_modified(zoo_export):
    model, before, *_ = zoo_export
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert _bn_count(model) > 0  # the fold happened on a copy


def test_report_serialises(zoo_export):
    *_, path, report, op = zoo_export
    d = report.to_dict()
    assert d["output"] == str(path) and d["passed"] and d["checker"] == "passed"
    assert d["key_node_counts"]["BatchNormalization"] == 0 and d["key_node_counts"][op] >= 1
    assert d["size_bytes"] == path.stat().st_size and d["external_data"] == []
    assert d["verification"][0]["passed"] and d["fold"]["verification"]["passed"]


# ----------------------------------------------------------------------------- dynamic batch, several inputs / outputs


@pytest.fixture(scope="module")
def two_io(tmp_path_factory):
    model = _model(zoo.two_io_net)
    path = tmp_path_factory.mktemp("two_io") / "two.onnx"
    report = bntool.export_onnx(model, path, example_inputs=make_inputs(model), dynamic_batch=True)
    return model, path, report


def test_two_inputs_and_a_dict_output_keep_their_names(two_io):
    model, path, report = two_io
    assert report.passed and report.bn_left == 0
    assert report.input_names == ("image", "features") and report.output_names == ("logits", "embedding")
    names = [o.name for o in report.verification.checks[0].comparison.outputs]
    assert names == ["output['logits']", "output['embedding']"]


def test_dynamic_batch_is_verified_at_several_sizes_and_runs_at_any(two_io):
    model, path, report = two_io
    assert report.dynamic_batch and [c.batch_size for c in report.verification.checks] == [1, 2, 3]
    assert all(isinstance(d, str) for d in report.facts.batch_dims)
    image, features = torch.randn(7, 3, 16, 16), torch.randn(7, 8)
    with torch.no_grad():
        expected = model(image, features)
    logits, embedding = _ort(path, image, features)
    np.testing.assert_allclose(logits, expected["logits"].numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(embedding, expected["embedding"].numpy(), rtol=1e-4, atol=1e-5)


def test_dynamic_batch_at_the_sizes_asked_for(tmp_path):
    model = _model(zoo.mlp_bn)
    report = bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=torch.randn(4, 32), dynamic_batch=True,
                                verify_batch_sizes=[1, 5], opset=18)
    assert [c.batch_size for c in report.verification.checks] == [1, 5] and report.passed
    assert report.opset == 18 and onnx.load(tmp_path / "m.onnx").opset_import[0].version == 18


# ----------------------------------------------------------------------------- --no-fold, frozen, training mode


def test_no_fold_keeps_batchnorm_nodes_that_onnxruntime_still_matches(tmp_path):
    # Given in training mode: the file must still hold inference-mode BNs (running statistics), never training ops.
    model = _model(zoo.mlp_bn).train()
    report = bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=make_inputs(model), fold=False)
    assert report.passed and report.fold is None and report.optimized == "constants"
    assert report.bn_left == _bn_count(model) == 2 and report.training_bns == ()
    assert "training mode" in report.notes[0]
    assert all(m.training for m in model.modules())  # the caller's flags are untouched


def test_frozen_model_exports_folded_and_unfolded(tmp_path):
    from bntool.freezing.freeze import freeze
    from bntool.frozen import FrozenBatchNorm2d

    frozen, _ = freeze(_model(zoo.lenet))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    inputs = make_inputs(frozen)
    folded = bntool.export_onnx(frozen, tmp_path / "f.onnx", example_inputs=inputs)
    assert folded.passed and folded.bn_left == 0 and len(folded.fold.plan.pairs) == 4
    kept = bntool.export_onnx(frozen, tmp_path / "k.onnx", example_inputs=inputs, fold=False)
    assert kept.passed and kept.bn_left == 4 and kept.training_bns == ()


# ----------------------------------------------------------------------------- the proofs catch broken files


def test_a_corrupted_initializer_is_caught_by_verification(tmp_path):
    # One output channel of the last transposed conv: nothing after it can hide the error. (Verification is at the
    # outputs: a channel that a ReLU zeroes on every verification input cannot be seen there.)
    model = _model(lambda: zoo.convtranspose_net(2))
    inputs = make_inputs(model)
    path = tmp_path / "decoder.onnx"
    bntool.export_onnx(model, path, example_inputs=inputs)
    assert verify_onnx(model, path, inputs).passed  # the control: the file as written matches
    proto = onnx.load(path)
    last = [n for n in proto.graph.node if n.op_type == "ConvTranspose"][-1]
    init = next(i for i in proto.graph.initializer if i.name == last.input[1])
    weight = numpy_helper.to_array(init).copy()
    weight[:, 1] *= 1.001  # (in, out, kh, kw): output channel 1
    init.CopyFrom(numpy_helper.from_array(weight, init.name))
    onnx.save(proto, tmp_path / "broken.onnx")
    result = verify_onnx(model, tmp_path / "broken.onnx", inputs)
    assert not result.passed and "does not match the original" in result.failures()[0]


def test_a_broken_exporter_writes_nothing(tmp_path, monkeypatch):
    real = onnx_export.write_onnx

    def exporter_with_a_wrong_output_bias(model, inputs, path, spec):
        described = real(model, inputs, path, spec)
        proto = onnx.load(path)
        last_gemm = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
        init = next(i for i in proto.graph.initializer if i.name == last_gemm.input[2])
        bias = numpy_helper.to_array(init).copy()
        bias[0] += 0.05
        init.CopyFrom(numpy_helper.from_array(bias, init.name))
        onnx.save(proto, path)
        return described

    monkeypatch.setattr(onnx_export, "write_onnx", exporter_with_a_wrong_output_bias)
    model = _model(zoo.mlp_bn)
    with pytest.raises(VerificationError, match="does not match") as info:
        bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=make_inputs(model))
    assert not info.value.report.written and not info.value.report.passed and list(tmp_path.iterdir()) == []


def test_training_mode_batchnorm_is_found_in_every_form():
    def bn(name, outputs, **attrs):
        return helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], outputs, name=name, **attrs)

    graph = helper.make_graph(
        [bn("eval", ["y0"]), bn("eval_explicit", ["y1"], training_mode=0), bn("flag", ["y2"], training_mode=1),
         bn("outputs", ["y3", "rm", "rv"]), bn("opset6", ["y4"], is_test=0), bn("opset6_test", ["y5"], is_test=1)],
        "g", [], [],
    )
    found = {t.node: t.reason for t in training_mode_bns(helper.make_model(graph))}
    assert set(found) == {"flag", "outputs", "opset6"}
    assert "training_mode=1" in found["flag"] and "3 outputs" in found["outputs"]


def test_training_mode_batchnorm_from_the_exporter_fails_the_export(tmp_path):
    # The TorchScript exporter writes a BN without running statistics as a training-mode op.
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU()).eval()
    with pytest.raises(VerificationError, match="training mode") as info:
        bntool.export_onnx(model, tmp_path / "t.onnx", example_inputs=torch.randn(2, 3, 8, 8), exporter="torchscript")
    assert info.value.report.training_bns and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- exporter limits and bad input


def test_a_model_the_exporter_cannot_handle_is_an_input_error_with_its_reason(tmp_path):
    model = _model(zoo.untraceable_net)
    with pytest.raises(InputError) as info:
        bntool.export_onnx(model, tmp_path / "u.onnx", example_inputs=make_inputs(model))
    message = str(info.value)
    assert "data-dependent" in message and "models.py:" in message and "`exporter=\"torchscript\"`" in message
    assert len(message.splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_weights_can_go_to_external_data_and_move_into_place_together(tmp_path):
    model = _model(zoo.conv1d_net)
    report = bntool.export_onnx(model, tmp_path / "c.onnx", example_inputs=make_inputs(model), external_data=True)
    assert report.passed and report.facts.external_data == ("c.onnx.data",)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx", "c.onnx.data"]
    assert report.facts.size_bytes == sum(p.stat().st_size for p in tmp_path.iterdir())


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"input_names": ["a", "b"]}, "one name per input"),
        ({"output_names": ["x", "x"]}, "repeat"),
        ({"verify_batch_sizes": [3]}, "`dynamic_batch=True`"),
        ({"exporter": "tf2onnx"}, "unknown exporter"),
    ],
    ids=["input-names", "output-names", "static-batch-sizes", "exporter"],
)
def test_bad_arguments_are_input_errors(tmp_path, kwargs, fragment):
    model = _model(zoo.mlp_bn)
    with pytest.raises(InputError, match=fragment):
        bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=make_inputs(model), **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_replaced_only_with_force(tmp_path):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"old")
    model = _model(zoo.mlp_bn)
    with pytest.raises(InputError, match="pass `force=True` to replace it"):
        bntool.export_onnx(model, out, example_inputs=make_inputs(model))
    assert out.read_bytes() == b"old"
    assert bntool.export_onnx(model, out, example_inputs=make_inputs(model), force=True).passed
    assert onnx.load(out).graph.node and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_import_bntool_does_not_import_onnx(imported_by_bntool):
    assert "bntool.export.export_onnx" in imported_by_bntool  # (`bntool.export_onnx` was looked up)
    assert sorted(m for m in ("onnx", "onnxruntime") if m in imported_by_bntool) == []


def test_replacing_an_external_data_export_removes_its_old_weights_file(tmp_path):
    model = _model(zoo.conv1d_net)
    out = tmp_path / "c.onnx"
    bntool.export_onnx(model, out, example_inputs=make_inputs(model), external_data=True)
    assert (tmp_path / "c.onnx.data").exists()
    report = bntool.export_onnx(model, out, example_inputs=make_inputs(model), external_data=False, force=True)
    assert report.passed and report.facts.external_data == ()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.onnx"]


def test_a_wrong_weight_in_a_channel_no_input_reaches_is_caught_by_the_initializer_check(tmp_path, monkeypatch):
    """Channel 0 is always zeroed by the ReLU, so the outputs cannot show its weights; the bit-for-bit check can."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)), seed=1)
    with torch.no_grad():
        model[1].weight[0], model[1].bias[0] = 1.0, -1e4  # channel 0 is dead after the ReLU
    inputs = (torch.randn(2, 3, 8, 8),)
    real = onnx_export.write_onnx

    def exporter_with_a_wrong_dead_channel(model, inputs, path, spec):
        described = real(model, inputs, path, spec)
        proto = onnx.load(path)
        init = next(i for i in proto.graph.initializer if i.name == "0.weight")
        weight = numpy_helper.to_array(init).copy()
        weight[0] *= 1.5
        init.CopyFrom(numpy_helper.from_array(weight, init.name))
        onnx.save(proto, path)
        shutil.copy(path, tmp_path.parent / f"{tmp_path.name}-broken.onnx")
        return described

    monkeypatch.setattr(onnx_export, "write_onnx", exporter_with_a_wrong_dead_channel)
    with pytest.raises(VerificationError, match=r"1 initializer\(s\) differ from the model's tensors: `0.weight`") as info:
        bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=inputs)
    assert not info.value.report.written and list(tmp_path.iterdir()) == []
    # the outputs alone do not show it
    folded, _ = bntool.fold(model, example_inputs=inputs)
    assert verify_onnx(folded, tmp_path.parent / f"{tmp_path.name}-broken.onnx", {2: inputs}).passed


def test_every_weight_of_a_folded_export_is_compared(zoo_export):
    model, _, inputs, _, report, _ = zoo_export
    folded, _ = bntool.fold(model, example_inputs=inputs)
    convs = [m for m in folded.modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d)]
    assert report.initializers_checked >= len(convs)  # every conv weight (Linear weights may be renamed)


def test_a_bn_the_exporters_optimizer_fuses_itself_is_not_a_false_mismatch(tmp_path):
    """bntool leaves the BN after a weight-normed conv (the PyTorch weight is recomputed at every call); in ONNX the
    weight is a constant and the optimizer fuses the BN into the conv, writing a new ``0.bias``. That initializer is
    the optimizer's, not a corrupt copy of the model's: the export is written, verified by onnxruntime, and says so;
    every other initializer is still compared bit for bit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 6, 3)), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3), nn.BatchNorm2d(4))
    model = randomize_bn(model, seed=3).eval()
    inputs = (torch.randn(2, 3, 10, 10),)
    report = bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=inputs)
    assert report.written and report.passed
    assert [s.bn for s in report.fold.plan.skips] == ["1"] and report.bn_left == 0  # fused by the optimizer
    [note] = [n for n in report.notes if "optimizer computed" in n]
    assert "`0.bias`" in note
    names = {i.name for i in onnx.load(tmp_path / "m.onnx").graph.initializer}
    assert {"3.weight", "3.bias"} <= names and report.initializers_checked == 2


@pytest.mark.parametrize("dtype,name", [(torch.float64, "float64"), (torch.bfloat16, "bfloat16")])
def test_a_model_in_a_dtype_onnxruntime_cannot_run_is_an_input_error_with_what_to_do(tmp_path, dtype, name):
    """onnxruntime's CPU provider has no float64 Conv, and ONNX no bfloat16 Conv: the file cannot be verified, so it
    is not written, and the message says to export in float32 (not a staging path)."""
    model = _model(zoo.lenet).to(dtype)
    x = make_inputs(model)
    with pytest.raises(InputError) as info:
        bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=x)
    message = str(info.value)
    assert f"onnxruntime cannot run this {name} model" in message and "`model.float()`" in message
    assert ".bntool-" not in message and list(tmp_path.iterdir()) == []
