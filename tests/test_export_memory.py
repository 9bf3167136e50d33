"""``bntool export`` without holding the model twice: the original run once per batch size, no deep copy, the file
written and read one tensor at a time (``bntool.onnxio.stream``, ``bntool.onnxio.scanning``), and the checks as strong as on the whole file."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import bntool
from bntool.errors import VerificationError
from bntool.export import write as onnx_write
from bntool.onnxio import scanning as onnx_scanning
from bntool.onnxio import stream as onnx_stream
from bntool.onnxio.check import compare_initializers, inspect_file, read_structure
from examples import models as zoo
from tests.conftest import randomize_bn

ROOT = Path(__file__).resolve().parents[1]
RESNET = f"{ROOT / 'examples' / 'models.py'}:resnet_small"


def _big(name: str, shape=(128, 160), seed: int = 0) -> TensorProto:
    """A float32 initializer above ``IN_PLACE_MIN``: left in the file when scanned."""
    array = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    assert array.nbytes >= onnx_stream.IN_PLACE_MIN
    return numpy_helper.from_array(array, name)


def _matmul_file(path: Path, weight: TensorProto, *, node_input: str = "w") -> Path:
    """x (1, 128) @ w + b, with ``weight`` embedded."""
    bias = numpy_helper.from_array(np.arange(weight.dims[1], dtype=np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", node_input], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, weight.dims[1]])], [weight, bias])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


# ----------------------------------------------------------------------------- the original, once per batch size


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "resnet.pt"
    torch.save(randomize_bn(zoo.resnet_small(), seed=1).state_dict(), path)
    return path


def _count_forwards_and_deep_copies(monkeypatch):
    """Forwards of the loaded model while it is the original (BatchNorm still in it), by input dtype and batch,
    and ``copy.deepcopy`` calls on modules."""
    import bntool.cli.common as common

    forwards, copies = [], []
    real_load, real_deepcopy = common.load_source, copy.deepcopy

    def load_source(*args, **kwargs):
        source = real_load(*args, **kwargs)
        root = source.model

        def count(module, args, output):
            unfolded = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())
            if module is root and unfolded and type(args[0]) is torch.Tensor:  # not the exporter's fake tensors
                forwards.append((args[0].dtype, args[0].shape[0]))

        root.register_forward_hook(count)
        return source

    def deepcopy(x, *args, **kwargs):
        if isinstance(x, nn.Module):
            copies.append(type(x).__name__)
        return real_deepcopy(x, *args, **kwargs)

    monkeypatch.setattr(common, "load_source", load_source)
    monkeypatch.setattr(copy, "deepcopy", deepcopy)
    return forwards, copies


def test_dynamic_batch_export_runs_the_original_twice_per_batch_size_and_copies_no_model(
        cli, resnet_checkpoint, tmp_path, monkeypatch):
    forwards, copies = _count_forwards_and_deep_copies(monkeypatch)
    result = cli("export", resnet_checkpoint, "--model", RESNET, "--input-shape", "2,3,32,32", "--dynamic-batch",
                 "--device", "cpu", "--out", tmp_path / "r.onnx", "--json")
    assert result.code == 0, result.err
    # batch sizes 1, 2 and 3: float32 (its outputs) and float64 (the reference), each once; fold's run at the
    # export batch serves onnxruntime's check at that batch too
    assert sorted(forwards, key=str) == sorted([(dt, b) for b in (1, 2, 3) for dt in (torch.float32, torch.float64)],
                                               key=str)
    assert copies == []


def test_the_library_runs_the_original_twice_per_batch_size_and_leaves_it_as_it_was(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = randomize_bn(zoo.resnet_small(), seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forwards, copies = [], []
    model.register_forward_hook(lambda m, args, out: forwards.append((args[0].dtype, args[0].shape[0]))
                                if m is model and type(args[0]) is torch.Tensor else None)
    real = copy.deepcopy
    monkeypatch.setattr(copy, "deepcopy", lambda x, *a, **k: (copies.append(x) if isinstance(x, nn.Module) else None)
                        or real(x, *a, **k))
    for fold in (True, False):
        forwards.clear()
        report = bntool.export_onnx(model, tmp_path / f"{fold}.onnx", example_inputs=(torch.randn(1, 3, 32, 32),),
                                    fold=fold, dynamic_batch=True, device="cpu")
        assert report.passed and [c.batch_size for c in report.verification.checks] == [1, 2]
        assert sorted(forwards, key=str) == sorted([(torch.float32, 1), (torch.float64, 1), (torch.float32, 2),
                                                    (torch.float64, 2)], key=str)
    assert copies == [] and not model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(model._forward_hooks) == 1  # the test's own hook: export took its own off


def test_a_consumed_model_is_folded_exported_and_released(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(zoo.resnet_small(), seed=3)
    report = bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=(torch.randn(2, 3, 32, 32),), device="cpu",
                                inplace=True)
    assert report.passed and report.bn_left == 0 and report.initializers_checked > 10
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())  # folded in place
    assert {t.device.type for t in (*model.parameters(), *model.buffers())} == {"meta"}  # its memory given back


# ----------------------------------------------------------------------------- writing one tensor at a time


def test_the_streamed_file_is_byte_for_byte_what_the_exporter_saves(tmp_path):
    torch.manual_seed(0)
    model, _ = bntool.fold(randomize_bn(zoo.resnet_small(), seed=4), example_inputs=(torch.randn(1, 3, 32, 32),),
                           device="cpu")
    program = torch.onnx.export(model, (torch.randn(1, 3, 32, 32),), dynamo=True, verbose=False)
    onnx_write.save_onnx(program, tmp_path / "streamed.onnx", external_data=None)
    program.save(str(tmp_path / "whole.onnx"))
    streamed = (tmp_path / "streamed.onnx").read_bytes()
    assert streamed == (tmp_path / "whole.onnx").read_bytes()
    assert len(read_structure(tmp_path / "streamed.onnx").stored) == 2  # the two convs of layer3.0 went that way


def test_write_model_refuses_a_tensor_of_the_wrong_size(tmp_path):
    weight = _big("w")
    stand_in = TensorProto()
    stand_in.CopyFrom(weight)
    stand_in.ClearField("raw_data")
    stand_in.data_location = TensorProto.EXTERNAL
    entry = stand_in.external_data.add()
    entry.key, entry.value = "location", onnx_stream.PENDING
    model = onnx.load(str(_matmul_file(tmp_path / "m.onnx", weight)))
    model.graph.initializer[0].CopyFrom(stand_in)
    good = onnx_stream.Pending(len(weight.raw_data), lambda f: f.write(weight.raw_data))
    onnx_stream.write_model(model, {"w": good}, tmp_path / "ok.onnx")
    assert (tmp_path / "ok.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    # numpy writes to the file descriptor itself, past Python's buffer: the bytes still land in their place
    array = numpy_helper.to_array(weight)
    onnx_stream.write_model(model, {"w": onnx_stream.Pending(array.nbytes, array.tofile)}, tmp_path / "np.onnx")
    assert (tmp_path / "np.onnx").read_bytes() == (tmp_path / "m.onnx").read_bytes()
    short = onnx_stream.Pending(len(weight.raw_data), lambda f: f.write(weight.raw_data[:-4]))
    with pytest.raises(ValueError, match="bytes written for a tensor of"):
        onnx_stream.write_model(model, {"w": short}, tmp_path / "bad.onnx")
    with pytest.raises(ValueError, match="no bytes for the initializer"):
        onnx_stream.write_model(model, {}, tmp_path / "bad.onnx")


# ----------------------------------------------------------------------------- reading one tensor at a time


def test_scan_leaves_large_tensors_in_the_file_and_says_where_they_lie(tmp_path):
    weight = _big("w")
    path = _matmul_file(tmp_path / "m.onnx", weight)
    found = onnx_scanning.scan(path)
    assert set(found.stored) == {"w"} and found.stored["w"].embedded
    stored = found.stored["w"]
    assert path.read_bytes()[stored.offset:stored.offset + stored.length] == weight.raw_data
    small = next(t for t in found.model.graph.initializer if t.name == "b")
    assert small.raw_data  # small tensors are read whole
    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(found.model)
    rebuilt.graph.initializer[0].raw_data = weight.raw_data
    assert rebuilt.SerializeToString() == onnx.load(str(path)).SerializeToString()


def test_a_truncated_file_cannot_be_read_back(tmp_path):
    path = _matmul_file(tmp_path / "m.onnx", _big("w"))
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(VerificationError, match="cannot be read back"):
        read_structure(path)


def test_one_changed_byte_in_a_large_tensor_is_a_difference(tmp_path):
    weight = _big("w")
    model = nn.Module()
    model.w = nn.Parameter(torch.from_numpy(numpy_helper.to_array(weight).copy()))
    path = _matmul_file(tmp_path / "m.onnx", weight)
    assert compare_initializers(path, model) == (1, [])
    data = bytearray(path.read_bytes())
    at = onnx_scanning.scan(path).stored["w"].offset + 40_000  # past the first chunk's start, inside the weights
    data[at] ^= 1
    path.write_bytes(bytes(data))
    assert compare_initializers(path, model) == (1, ["w"])
    model.w = nn.Parameter(model.w.detach().double())  # same values, another type: differs too
    _matmul_file(path, weight)
    assert compare_initializers(path, model) == (1, ["w"])


def test_the_checker_sees_the_graph_of_a_file_with_large_embedded_tensors(tmp_path):
    ok = inspect_file(_matmul_file(tmp_path / "ok.onnx", _big("w")))
    assert ok.checker_error is None and ok.node_counts == {"Add": 1, "MatMul": 1}
    broken = inspect_file(_matmul_file(tmp_path / "broken.onnx", _big("w"), node_input="nowhere"))
    assert broken.checker_error is not None and "nowhere" in broken.checker_error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.onnx", "ok.onnx"]  # the in-place copy is gone


def test_a_large_tensor_of_the_wrong_size_fails_the_check_as_on_the_whole_file(tmp_path):
    weight = _big("w")
    weight.raw_data = weight.raw_data[:-4]
    path = _matmul_file(tmp_path / "short.onnx", weight)
    with pytest.raises(onnx.checker.ValidationError, match="raw_data size"):  # what the whole-file checker says
        onnx.checker.check_model(str(path), full_check=True)
    facts = inspect_file(path)
    assert facts.checker_error is not None and "raw_data size" in facts.checker_error and "(tensor name: w)" \
        in facts.checker_error


def test_export_with_external_data_is_checked_on_the_file_itself(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(zoo.resnet_small(), seed=5)
    report = bntool.export_onnx(model, tmp_path / "e.onnx", example_inputs=(torch.randn(1, 3, 32, 32),),
                                external_data=True, device="cpu")
    assert report.passed and report.facts.external_data == ("e.onnx.data",) and report.initializers_checked > 3
    found = onnx_scanning.scan(tmp_path / "e.onnx")
    assert found.stored and not any(s.embedded for s in found.stored.values())


# ----------------------------------------------------------------------------- the benchmark's measure


def test_the_memory_benchmark_measures_each_child_alone(tmp_path, load_benchmark):
    import sys

    bench = load_benchmark("bench_memory")
    bare = bench.measure([sys.executable, "-c", "pass"])
    grown = bench.measure([sys.executable, "-c", "data = b'x' * 100_000_000"])
    failed = bench.measure([sys.executable, "-c", "import sys; sys.exit('bntool said no')"])
    assert bare.code == 0 and bare.peak < 60e6  # this test's own process (torch, a few hundred MB) is not counted
    assert 95e6 < grown.peak - bare.peak < 130e6
    assert failed.code == 1 and failed.error == "bntool said no"
    argv, out = bench.command_line("export", "wide", tmp_path / "w.safetensors", tmp_path / "d.pt", tmp_path, "cpu", 8)
    assert argv[:2] == ["export", str(tmp_path / "w.safetensors")] and "wide_resnet" in argv[3] and out.suffix == ".onnx"
