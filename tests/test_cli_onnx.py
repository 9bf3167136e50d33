"""``bntool fold X.onnx`` / ``bntool inspect X.onnx``: the report, the verified write, and bad or hostile files."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from bntool.onnxio.reference import run_ort
from tests.conftest import assert_one_line_error
from tests.test_onnx_fold import bn, bn_count, bn_inits, conv_graph, model, tensor


@pytest.fixture
def conv_file(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(conv_graph(2, seed=11), str(path))
    return path


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_fold_writes_a_verified_file_and_reports_each_bn(cli, conv_file, tmp_path):
    out = tmp_path / "folded.onnx"
    result = cli("fold", conv_file, "--out", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["written"] and report["bn_before"] == 1 and report["bn_after"] == 0
    assert report["folded"][0]["into"] == "conv" and report["folded"][0]["direction"] == "backward"
    assert report["verification"]["passed"]
    folded = onnx.load(str(out))
    onnx.checker.check_model(folded, full_check=True)
    assert bn_count(folded) == 0
    x = np.random.default_rng(0).normal(size=(2, 4, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(run_ort(folded, {"x": x})["y"], run_ort(onnx.load(str(conv_file)), {"x": x})["y"],
                               rtol=1e-4, atol=1e-5)


def test_dry_run_writes_nothing_and_an_existing_output_needs_force(cli, conv_file, tmp_path):
    before = _listing(tmp_path)
    assert cli("fold", conv_file, "--out", tmp_path / "f.onnx", "--dry-run").code == 0
    assert _listing(tmp_path) == before
    (tmp_path / "f.onnx").write_bytes(b"keep")
    assert_one_line_error(cli("fold", conv_file, "--out", tmp_path / "f.onnx"), "already exists")
    assert (tmp_path / "f.onnx").read_bytes() == b"keep"
    assert cli("fold", conv_file, "--out", tmp_path / "f.onnx", "--force").code == 0
    assert bn_count(onnx.load(str(tmp_path / "f.onnx"))) == 0


def test_the_human_report_names_each_fold_and_each_reason(cli, tmp_path):
    rng = np.random.default_rng(2)
    nodes = [bn("lonely", "x", "n"), helper.make_node("Relu", ["n"], ["y"], name="relu")]
    path = tmp_path / "lonely.onnx"
    onnx.save(model(nodes, [("x", [2, 3, 4, 4])], ["y"], bn_inits("lonely", 3, rng)), str(path))
    result = cli("fold", path, "--out", tmp_path / "o.onnx")
    assert result.code == 0, result.err
    text = result.out + result.err
    assert "lonely" in text and "model input" in text and "1 before, 1 after" in text


def test_inspect_shows_each_bn_what_feeds_it_and_the_statistics_findings(cli, tmp_path):
    m = conv_graph(2, seed=4)
    var = next(t for t in m.graph.initializer if t.name == "bn.var")
    values = numpy_helper.to_array(var).copy()
    values[1] = 0.0  # a dead channel
    var.CopyFrom(numpy_helper.from_array(values, "bn.var"))
    path = tmp_path / "m.onnx"
    onnx.save(m, str(path))
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    row = report["layers"][0]
    assert row["name"] == "bn" and row["fed_by"] == "conv" and row["foldable"]
    assert [f["kind"] for f in report["findings"]] == ["dead_channels"]


def test_dynamic_dimension_needs_input_shape(cli, tmp_path):
    m = conv_graph(2)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    path = tmp_path / "dyn.onnx"
    onnx.save(m, str(path))
    out = tmp_path / "o.onnx"
    assert_one_line_error(cli("fold", path, "--out", out), "dynamic dimensions", "--input-shape")
    assert not out.exists()
    assert cli("fold", path, "--out", out, "--input-shape", "3,4,5,5").code == 0


@pytest.mark.parametrize("content", [b"this is not a model at all, just text\n" * 3, "truncated"])
def test_a_file_that_is_not_onnx_or_is_cut_short_is_one_line(cli, conv_file, tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(conv_file.read_bytes()[:200] if content == "truncated" else content)
    before = _listing(tmp_path)
    assert_one_line_error(cli("fold", path, "--out", tmp_path / "o.onnx"), "bad.onnx")
    assert _listing(tmp_path) == before


def test_a_graph_onnxruntime_cannot_run_is_one_line(cli, tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "z"),
             helper.make_node("Mystery", ["z"], ["y"], name="custom", domain="com.example")]
    m = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 4, 4])], [helper.make_tensor_value_info("y", 1, [1, 4, 4, 4])],
        [tensor("w", rng.normal(size=(4, 3, 1, 1))), *bn_inits("bn", 4, rng)]),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    path = tmp_path / "custom.onnx"
    onnx.save(m, str(path))
    assert_one_line_error(cli("fold", path, "--out", tmp_path / "o.onnx"), "onnxruntime cannot run")
    assert not (tmp_path / "o.onnx").exists()


def _external(tmp_path, name="ext.onnx"):
    m = conv_graph(2, seed=5)
    path = tmp_path / name
    onnx.save(m, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="ext.data",
              size_threshold=0)
    return path


def _set_location(path, location):
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(m, str(path))


def test_external_data_stays_external(cli, tmp_path):
    path = _external(tmp_path)
    out = tmp_path / "out" / "folded.onnx"
    out.parent.mkdir()
    result = cli("fold", path, "--out", out)
    assert result.code == 0, result.err
    assert (out.parent / "folded.onnx.data").exists()
    folded = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in folded.graph.initializer)
    onnx.checker.check_model(str(out), full_check=True)


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_folder_is_refused_before_it_is_read(cli, tmp_path, where):
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _external(inner)
    secret = tmp_path / "secret.bin"
    secret.write_bytes((inner / "ext.data").read_bytes())
    if where == "parent":
        _set_location(path, "../secret.bin")
    elif where == "absolute":
        _set_location(path, str(secret))
    else:
        (inner / "ext.data").unlink()
        os.symlink(secret, inner / "ext.data")
    atime = os.stat(secret).st_atime_ns
    assert_one_line_error(cli("fold", path, "--out", inner / "o.onnx"), "outside the model's folder")
    assert not (inner / "o.onnx").exists()
    assert os.stat(secret).st_atime_ns == atime


def test_missing_or_short_external_data_is_one_line(cli, tmp_path):
    path = _external(tmp_path)
    data = tmp_path / "ext.data"
    data.write_bytes(data.read_bytes()[:10])
    assert_one_line_error(cli("fold", path, "--out", tmp_path / "o.onnx"), "cut short")
    data.unlink()
    assert_one_line_error(cli("fold", path, "--out", tmp_path / "o.onnx"), "does not exist")
    assert not (tmp_path / "o.onnx").exists()


def test_the_output_is_never_the_input(cli, conv_file):
    data = conv_file.read_bytes()
    assert_one_line_error(cli("fold", conv_file, "--out", conv_file, "--force"), "net.onnx")
    assert conv_file.read_bytes() == data


def test_a_graph_too_large_for_memory_is_refused_before_it_runs(cli, tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "z"),
             helper.make_node("Expand", ["z", "huge"], ["y"], name="expand")]
    m = model(nodes, [("x", [1, 3, 4, 4])], ["y"], [tensor("w", rng.normal(size=(4, 3, 1, 1))),
                                                   tensor("huge", [1 << 16, 1 << 16, 4, 4], np.int64),
                                                   *bn_inits("bn", 4, rng)])
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", 1, [1 << 16, 1 << 16, 4, 4]))
    path = tmp_path / "huge.onnx"
    onnx.save(m, str(path))
    assert_one_line_error(cli("fold", path, "--out", tmp_path / "o.onnx"), "GiB", "`y`")
    assert not (tmp_path / "o.onnx").exists()


def test_inspect_names_corrupt_statistics_and_fold_leaves_that_bn(cli, tmp_path):
    m = conv_graph(2, seed=6)
    var = next(t for t in m.graph.initializer if t.name == "bn.var")
    values = numpy_helper.to_array(var).copy()
    values[0], values[2] = -0.5, np.nan
    var.CopyFrom(numpy_helper.from_array(values, "bn.var"))
    path = tmp_path / "bad_stats.onnx"
    onnx.save(m, str(path))
    report = json.loads(cli("inspect", path, "--json").out)
    kinds = {f["kind"] for f in report["findings"]}
    assert {"nonfinite_statistics", "negative_variance"} <= kinds
    assert report["layers"][0]["foldable"] is False and "NaN or inf" in report["layers"][0]["fold_reason"]
    result = cli("fold", path, "--out", tmp_path / "o.onnx", "--json")
    assert result.code == 0 and json.loads(result.out)["bn_after"] == 1


def test_a_fixed_tolerance_too_tight_rejects_the_fold_and_strict_fails(cli, tmp_path):
    m = conv_graph(2, seed=8)
    path = tmp_path / "tight.onnx"
    onnx.save(m, str(path))
    result = cli("fold", path, "--out", tmp_path / "o.onnx", "--atol", "1e-30", "--rtol", "0", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["bn_after"] == 1 and report["rejected_by_verification"][0]["bn"] == "bn"
    strict = cli("fold", path, "--out", tmp_path / "s.onnx", "--atol", "1e-30", "--rtol", "0", "--strict")
    assert strict.code == 1 and not (tmp_path / "s.onnx").exists()
