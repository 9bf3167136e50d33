"""``bntool fold`` / ``inspect`` / ``export`` of a ``.pt2`` program, and the files bntool refuses.

The good paths check what was written (loaded back with torch, compared
with the original module); each bad input gets one line, exit 2, and nothing
written, and a file that would need unrestricted unpickling never runs its
payload (a pickle that would create a marker file leaves none).
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim

from bntool.errors import UnsafeFileError
from bntool.io.programfile import read_program
from tests.conftest import assert_one_line_error, randomize_bn
from tests.test_program_fold import SecondReader, bn_nodes


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.tail = SecondReader()

    def forward(self, x):
        return self.tail(self.stem(x)[:, :3])


X = torch.randn(2, 3, 8, 8)


@pytest.fixture(scope="module")
def model():
    return randomize_bn(Net(), seed=5)


@pytest.fixture
def program_file(tmp_path, model) -> Path:
    path = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(model, (X,)), path)
    return path


def listing(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_fold_writes_a_verified_program(cli, program_file, model, tmp_path):
    out = tmp_path / "folded.pt2"
    result = cli("fold", program_file, "--out", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert [p["bn"] for p in report["folded"]] == ["stem.1"] and report["written"]
    assert "is also read by" in report["skipped"][0]["reason"]
    folded = torch.export.load(out)
    assert bn_nodes(folded) == 1
    torch.testing.assert_close(folded.module()(X), model(X), atol=2e-5, rtol=1e-4)
    again = cli("fold", program_file, "--out", out)  # an existing output is not replaced without --force
    assert_one_line_error(again, "already exists", "--force")
    assert cli("fold", program_file, "--out", out, "--force").code == 0


def test_fold_default_output_and_dry_run(cli, program_file, tmp_path):
    before = listing(tmp_path)
    assert cli("fold", program_file, "--dry-run").code == 0
    assert listing(tmp_path) == before
    assert cli("fold", program_file).code == 0
    assert (tmp_path / "net.folded.pt2").is_file()


def test_inspect_shows_each_bn_node_and_why(cli, program_file):
    result = cli("inspect", program_file, "--json")
    assert result.code == 0, result.err
    nodes = {n["bn"]: n for n in json.loads(result.out)["program"]}
    assert nodes["stem.1"]["folds_into"] == "stem.0" and nodes["stem.1"]["direction"] == "backward"
    assert nodes["tail.bn"]["folds_into"] is None and "also read by" in nodes["tail.bn"]["reason"]
    human = cli("inspect", program_file)
    assert "tail.bn" in human.out + human.err and "also read by" in human.out + human.err


def test_export_writes_a_folded_onnx(cli, program_file, tmp_path):
    import onnx

    out = tmp_path / "net.onnx"
    result = cli("export", program_file, "--out", out, "--json")
    assert result.code == 0, result.err
    counts = {}
    for node in onnx.load(out).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    assert counts.get("BatchNormalization", 0) <= 1 and counts["Conv"] == 2


def test_model_flag_is_refused(cli, program_file, tmp_path):
    before = listing(tmp_path)
    assert_one_line_error(cli("fold", program_file, "--model", "x.py:f"), "carries its own graph", "drop --model")
    assert listing(tmp_path) == before


def test_train_mode_program_is_refused(cli, tmp_path):
    path = tmp_path / "train.pt2"
    torch.export.save(torch.export.export(randomize_bn(Net()).train(), (X,)), path)
    before = listing(tmp_path)
    assert_one_line_error(cli("fold", path), "`stem.1` normalizes with each batch's statistics", "model.eval()")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("kind", ["not-a-zip", "truncated", "other-zip", "unloadable"])
def test_bad_files_one_line(cli, program_file, tmp_path, kind):
    bad = tmp_path / f"{kind}.pt2"
    data = program_file.read_bytes()
    if kind == "not-a-zip":
        bad.write_bytes(b"not a program")
        fragment = "not a zip archive"
    elif kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
        fragment = "cut short or damaged"
    elif kind == "other-zip":
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr("notes.txt", "hello")
        fragment = "no `models/*.json`"
    else:  # a schema this torch does not know
        _rewrite(program_file, bad, "models/model.json",
                 lambda j: {**j, "schema_version": {"major": 999, "minor": 0}})
        fragment = "cannot load the program"
    before = listing(tmp_path)
    assert_one_line_error(cli("fold", bad), fragment)
    assert listing(tmp_path) == before


def _rewrite(source: Path, target: Path, suffix: str, change) -> None:
    """A copy of the archive with the JSON member ending in ``suffix`` changed (and others added / replaced)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith(suffix):
                data = json.dumps(change(json.loads(data))).encode()
            dst.writestr(info.filename, data)


class _Marker:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _replace(source: Path, target: Path, member_suffix: str, data: bytes, config=None) -> None:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            payload = src.read(info.filename)
            if info.filename.endswith(member_suffix):
                payload = data
            elif config is not None and info.filename.endswith("model_weights_config.json"):
                payload = json.dumps(config(json.loads(payload))).encode()
            dst.writestr(info.filename, payload)


@pytest.mark.parametrize("where", ["weight", "example-inputs"])
def test_pickles_are_refused_and_never_run(cli, program_file, tmp_path, where):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt2"
    payload = pickle.dumps(_Marker(str(marker)))
    if where == "weight":
        def config(c):
            first = next(iter(c["config"]))
            c["config"][first]["use_pickle"] = True
            return c
        with zipfile.ZipFile(program_file) as z:
            name = json.loads(z.read(next(n for n in z.namelist() if n.endswith("model_weights_config.json"))))
        stored = next(iter(name["config"].values()))["path_name"]
        _replace(program_file, evil, f"weights/{stored}", payload, config)
    else:
        _replace(program_file, evil, "sample_inputs/model.pt", payload)
    with pytest.raises(UnsafeFileError, match="allow_pickle=True"):
        read_program(evil)
    assert_one_line_error(cli("fold", evil), "--allow-pickle")
    assert not marker.exists()


def test_a_graph_calling_a_python_function_is_refused(cli, program_file, tmp_path):
    bad = tmp_path / "calls.pt2"

    def change(j):
        for node in j["graph_module"]["graph"]["nodes"]:
            if node["target"] == "torch.ops.aten.relu.default":
                node["target"] = "torch.os.getcwd"  # reachable from `torch`: would run with the program
        return j

    _rewrite(program_file, bad, "models/model.json", change)
    before = listing(tmp_path)  # (torch 2.13's deserializer refuses it too; bntool also checks the loaded graph)
    result = cli("fold", bad)
    assert_one_line_error(result, "calls.pt2")
    assert "which is not a torch operator" in result.err or "cannot load the program" in result.err
    assert listing(tmp_path) == before


def test_dynamic_input_without_examples_needs_a_shape(cli, model, tmp_path):
    program = torch.export.export(model, (X,), dynamic_shapes=({0: Dim("batch", min=2, max=32)},))
    program._example_inputs = None
    path = tmp_path / "dyn.pt2"
    torch.export.save(program, path)
    assert_one_line_error(cli("fold", path), "dynamic shape", "--input-shape")
    result = cli("fold", path, "--input-shape", "3,3,8,8", "--out", tmp_path / "dyn.folded.pt2")
    assert result.code == 0, result.err
    folded = torch.export.load(tmp_path / "dyn.folded.pt2")
    other = torch.randn(5, 3, 8, 8)
    torch.testing.assert_close(folded.module()(other), model(other), atol=2e-5, rtol=1e-4)
    assert os.path.exists(path)


def test_the_loaded_graph_is_checked_for_calls_that_are_not_operators():
    """The second fence behind torch's deserializer: a graph calling a Python function is refused."""
    from types import SimpleNamespace

    from bntool.io.programfile import _check_calls

    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(os.getcwd, ()) and x)
    module = torch.fx.GraphModule(nn.Module(), graph)
    with pytest.raises(UnsafeFileError, match="calls `getcwd`, which is not a torch operator"):
        _check_calls(Path("p.pt2"), SimpleNamespace(graph_module=module))
    relu = torch.fx.Graph()
    y = relu.placeholder("y")
    relu.output(relu.call_function(torch.ops.aten.relu.default, (y,)))
    _check_calls(Path("p.pt2"), SimpleNamespace(graph_module=torch.fx.GraphModule(nn.Module(), relu)))


def test_the_input_is_never_the_output(cli, program_file, tmp_path):
    before = program_file.read_bytes()
    assert_one_line_error(cli("fold", program_file, "--out", program_file, "--force"), "input program")
    assert program_file.read_bytes() == before
