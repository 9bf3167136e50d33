"""``bntool export`` through the real entry point: tables, JSON, exit codes, nothing written on failure."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from examples import models as zoo
from tests.conftest import AUTO_DEVICE, assert_one_line_error, randomize_bn

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models.py"
LENET = f"{MODELS}:lenet"
RESNET = f"{MODELS}:resnet_small"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A DDP-style training checkpoint of resnet_small and a plain state dict of lenet, with their models."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    resnet = randomize_bn(zoo.resnet_small(), seed=1)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}},
               folder / "best.pth")
    lenet = randomize_bn(zoo.lenet(), seed=2)
    torch.save(lenet.state_dict(), folder / "lenet.pt")
    return {"resnet": (folder / "best.pth", resnet), "lenet": (folder / "lenet.pt", lenet)}


def expected_provider() -> str:
    """What --device auto verifies with: onnxruntime's CUDA provider on a GPU when this onnxruntime has it."""
    if AUTO_DEVICE == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        return "CUDAExecutionProvider"
    return "CPUExecutionProvider"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_export_writes_a_verified_dynamic_batch_file(cli, checkpoints, tmp_path):
    path, model = checkpoints["resnet"]
    before = _sha(path)
    out = tmp_path / "resnet.onnx"
    result = cli("export", path, "--model", RESNET, "--input-shape", "2,3,32,32", "--out", out, "--dynamic-batch")
    assert result.code == 0, result.err
    assert "Folded 11 BatchNorm" in result.out and "BatchNormalization 0" in result.out
    assert "graph optimizations off" in result.out and "Verified at batch size(s) 1, 2, 3" in result.out
    assert _sha(path) == before and _files(tmp_path) == ["resnet.onnx"]
    x = torch.randn(6, 3, 32, 32)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_json_report_is_the_only_stdout(cli, checkpoints, tmp_path):
    path, _ = checkpoints["lenet"]
    result = cli("export", path, "--model", LENET, "--out", tmp_path / "l.onnx", "--json", "--dynamic-batch",
                 "--verify-batch-sizes", "1,5")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["command"] == "export" and report["written"] and report["passed"]
    assert report["bn_left"] == 0 and len(report["fold"]["folded"]) == 4
    assert report["key_node_counts"]["Conv"] == 2 and report["key_node_counts"]["Gemm"] == 3
    assert [v["batch_size"] for v in report["verification"]] == [1, 5]
    assert report["provider"] == expected_provider() and report["checker"] == "passed"
    assert report["exporter"].startswith("torch.onnx.export(dynamo=True)") and report["opset"] >= 18


def test_no_fold_leaves_batchnorm_nodes_and_still_verifies(cli, checkpoints, tmp_path):
    path, _ = checkpoints["lenet"]
    result = cli("export", path, "--model", LENET, "--no-fold", "--out", tmp_path / "l.onnx", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["bn_left"] == 4 and report["fold"] is None and report["training_mode_bns"] == []
    assert report["verification"][0]["passed"]


def test_default_out_is_beside_the_input(cli, checkpoints):
    path, _ = checkpoints["lenet"]
    out = path.with_suffix(".onnx")
    try:
        assert cli("export", path, "--model", LENET).code == 0
        assert onnx.load(out).graph.node
    finally:
        out.unlink(missing_ok=True)


def test_inputs_from_data(cli, checkpoints, tmp_path):
    path, _ = checkpoints["lenet"]
    torch.save(torch.rand(10, 1, 28, 28), tmp_path / "inputs.pt")
    result = cli("export", path, "--model", LENET, "--data", tmp_path / "inputs.pt", "--batch-size", "4",
                 "--dynamic-batch", "--out", tmp_path / "l.onnx", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [v["batch_size"] for v in report["verification"]] == [1, 4, 5] and report["passed"]


def test_a_broken_export_exits_1_and_writes_nothing(cli, checkpoints, tmp_path, monkeypatch):
    import bntool.export.export_onnx as onnx_export

    real = onnx_export.write_onnx

    def exporter_with_one_wrong_class(model, inputs, path, spec):
        described = real(model, inputs, path, spec)
        proto = onnx.load(path)
        fc = [n for n in proto.graph.node if n.op_type == "Gemm"][-1]
        init = next(i for i in proto.graph.initializer if i.name == fc.input[1])
        weight = numpy_helper.to_array(init).copy()
        weight[2] *= 1.001  # the weights of one output class
        init.CopyFrom(numpy_helper.from_array(weight, init.name))
        onnx.save(proto, path)
        return described

    monkeypatch.setattr(onnx_export, "write_onnx", exporter_with_one_wrong_class)
    path, _ = checkpoints["lenet"]
    out = tmp_path / "r.onnx"
    result = cli("export", path, "--model", LENET, "--out", out)
    assert result.code == 1
    assert "does not match the original" in result.err and "FAILED" in result.out
    assert "Traceback" not in result.err and _files(tmp_path) == []
    kept = cli("export", path, "--model", LENET, "--out", out, "--keep-on-fail", "--json")
    assert kept.code == 1 and json.loads(kept.out)["written"] and _files(tmp_path) == ["r.onnx"]


def test_a_model_the_exporter_cannot_handle_is_one_line_with_its_reason(cli, tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "u.pt"
    torch.save(randomize_bn(zoo.untraceable_net()).state_dict(), path)
    result = cli("export", path, "--model", f"{MODELS}:untraceable_net", "--out", tmp_path / "u.onnx")
    assert_one_line_error(result, "torch.export", "data-dependent", "--exporter torchscript")
    assert _files(tmp_path) == ["u.pt"]


def test_existing_out_needs_force(cli, checkpoints, tmp_path):
    path, _ = checkpoints["lenet"]
    out = tmp_path / "l.onnx"
    out.write_bytes(b"old")
    assert_one_line_error(cli("export", path, "--model", LENET, "--out", out), "already exists", "--force")
    assert out.read_bytes() == b"old"


@pytest.mark.parametrize("case", ["no-shape", "bad-extension", "shape-and-data", "static-batch-sizes", "bad-names"])
def test_bad_input_exits_2_with_one_line(cli, checkpoints, tmp_path, case):
    path, _ = checkpoints["lenet"]
    shapeless = tmp_path / "nets.py"
    shapeless.write_text("from examples.models import lenet\n\ndef net():\n    m = lenet()\n    del m.input_shape\n"
                         "    return m\n")
    out = ["--out", tmp_path / "l.onnx"]
    args, fragments = {
        "no-shape": (["--model", f"{shapeless}:net", *out], ["--input-shape"]),
        "bad-extension": (["--model", LENET, "--out", tmp_path / "l.pt"], [".onnx"]),
        "shape-and-data": (["--model", LENET, "--input-shape", "2,1,28,28", "--data", path, *out], ["not both"]),
        "static-batch-sizes": (["--model", LENET, "--verify-batch-sizes", "1,3", *out], ["--dynamic-batch"]),
        "bad-names": (["--model", LENET, "--output-names", "a,b", *out], ["one name per output"]),
    }[case]
    assert_one_line_error(cli("export", path, *args), *fragments)
    assert not (tmp_path / "l.onnx").exists()
