"""Work an ONNX fold does once: the weights read once (the flow built on the split model), the float64 reference
less the original computed once per value (and reused to prove the written file), the output serialized once."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from bntool.folding import onnx_fold
from bntool.folding.onnx_fold import fold_onnx, prove_file
from bntool.graph.onnxflow import OnnxFlow
from bntool.onnxio import save as save_module
from bntool.onnxio.skeleton import APART, Skeleton
from bntool.onnxio.wide import run_wide
from bntool.verify.tolerance import compare_one

F = TensorProto.FLOAT


def _conv_bn(seed: int = 0):
    """Conv (a weight kept apart) -> BN (statistics and affine randomized) -> Relu -> Conv."""
    rng = np.random.default_rng(seed)

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    c = 16
    inits = [init("w", rng.standard_normal((c, 3, 3, 3)) * 0.3), init("b", rng.standard_normal(c)),
             init("s", rng.uniform(0.5, 1.5, c)), init("t", rng.standard_normal(c)),
             init("m", rng.standard_normal(c)), init("v", rng.uniform(0.5, 2.0, c)),
             init("w2", rng.standard_normal((8, c, 3, 3)) * 0.3)]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "t", "m", "v"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [2, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, [2, 8, 8, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _largest_weight(proto) -> int:
    return max((len(t.raw_data) for t in proto.graph.initializer), default=0)


def test_the_flow_is_built_on_the_split_model_and_reads_its_weights_from_it(monkeypatch):
    model = _conv_bn()
    seen = []
    deserialize = ir.serde.deserialize_model
    monkeypatch.setattr(ir.serde, "deserialize_model", lambda proto: seen.append(_largest_weight(proto))
                        or deserialize(proto))
    split = Skeleton.of(model)
    assert "w" in split.arrays and "w2" in split.arrays
    flow = OnnxFlow.of(model, split)
    assert seen and max(seen) < APART  # (neither the model nor shape inference's copy carried a weight's bytes)
    conv = flow.position("conv")
    assert flow.constant(flow.input(conv, 1)) is split.arrays["w"]  # the split's own array, not a new copy
    assert flow.shape(flow.nodes[flow.position("bn")].outputs[0]) == (2, 16, 8, 8)  # shapes still inferred
    whole = OnnxFlow.of(model)
    np.testing.assert_array_equal(whole.constant(whole.input(conv, 1)), split.arrays["w"])


def test_a_fold_deserializes_no_weight_and_runs_the_float64_reference_once(monkeypatch, tmp_path):
    model = _conv_bn(1)
    seen, wide = [], []
    deserialize = ir.serde.deserialize_model
    monkeypatch.setattr(ir.serde, "deserialize_model", lambda proto: seen.append(_largest_weight(proto))
                        or deserialize(proto))
    monkeypatch.setattr(onnx_fold, "run_wide", lambda *a, **k: wide.append(1) or run_wide(*a, **k))
    folded, report = fold_onnx(model)
    assert report.bn_after == 0 and report.comparison.passed
    assert seen and max(seen) < APART
    path = tmp_path / "folded.onnx"
    onnx.save(folded, str(path))
    prove_file(report, path)  # (the written file judged against the deltas of the fold's own check)
    assert len(wide) == 1


def test_a_value_is_judged_from_its_delta_as_from_the_float64_reference():
    model = _conv_bn(2)
    _, report = fold_onnx(model)
    check = report.check
    point = next(v for v in check.points if v != "y")  # (a folded layer's output)
    high = run_wide(model, check.feeds, [point])
    delta = check.delta[point]
    orig = torch.from_numpy(check.original[point])
    torch.testing.assert_close(delta, torch.from_numpy(high[point]) - orig.double(), rtol=0, atol=0)
    cand = orig + 1e-4 * torch.randn(orig.shape, generator=torch.Generator().manual_seed(0))
    by_ref = compare_one("p", orig, cand, torch.from_numpy(high[point]), None, None)
    by_delta = check._one("p", point, check.original[point], cand.numpy(), delta, 0)
    assert by_delta.original_error == pytest.approx(by_ref.original_error, rel=1e-9)
    assert by_delta.candidate_error == pytest.approx(by_ref.candidate_error, rel=1e-6)
    assert not by_delta.passed  # (1e-4 off everywhere: far beyond a float32 rounding)
    assert by_delta.tolerance == pytest.approx(by_ref.tolerance, rel=1e-9)


def test_a_corrupted_channel_of_the_written_file_fails_against_the_kept_deltas(tmp_path):
    model = _conv_bn(3)
    folded, report = fold_onnx(model)
    bad = onnx.ModelProto()
    bad.CopyFrom(folded)
    weight = next(t for t in bad.graph.initializer if tuple(t.dims) == (16, 3, 3, 3))
    array = numpy_helper.to_array(weight).copy()
    array[5] *= 1.001
    weight.CopyFrom(numpy_helper.from_array(array, weight.name))
    path = tmp_path / "bad.onnx"
    onnx.save(bad, str(path))
    with pytest.raises(Exception, match="written file"):
        prove_file(report, path)


class _Counted:
    """A ModelProto whose serializations are counted (``ByteSize`` serializes it too)."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def SerializeToString(self):  # (protobuf's name)
        self.calls += 1
        return self.model.SerializeToString()

    def ByteSize(self):
        self.calls += 1
        return self.model.ByteSize()

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_the_written_model_is_serialized_once_and_is_its_bytes(tmp_path):
    model = _conv_bn(4)
    counted = _Counted(model)
    proved = []
    out, _ = save_module.save_onnx(counted, tmp_path / "out.onnx", force=False, external=False,
                                   prove=lambda tmp: proved.append(tmp.read_bytes()))
    assert counted.calls == 1
    assert out.read_bytes() == model.SerializeToString() == proved[0]


def _if_model():
    """A dynamic batch through a Conv (a weight over the size limit), a Reshape, and an If whose branches read it."""
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([0, 16, 64], np.int64), "shape")
    flag = numpy_helper.from_array(np.array(True), "flag")

    def branch(op, name):
        return helper.make_graph([helper.make_node(op, ["r"], [f"{name}_out"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_out", TensorProto.UNDEFINED, None)])

    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["c", "shape"], ["r"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=branch("Relu", "then"),
                              else_branch=branch("Neg", "else"))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", F, None)], [w, shape, flag])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _typed(model):
    return {(g.name, v.name): (v.dtype, v.shape) for g in model.graphs()
            for v in [*g.inputs, *(o for n in g for o in n.outputs)]}


def test_shape_inference_types_every_value_as_onnx_irs_pass_does_without_deserializing_its_result(monkeypatch):
    from onnx_ir.passes.common import ShapeInferencePass

    from bntool.graph.onnx_shapes import infer_shapes

    proto = _if_model()
    want = ShapeInferencePass(strict_mode=False)(ir.serde.deserialize_model(proto)).model
    got = ir.serde.deserialize_model(proto)
    calls = []
    monkeypatch.setattr(ir.serde, "deserialize_model", lambda p: calls.append(p))
    infer_shapes(got, proto)
    assert not calls
    assert _typed(got) == _typed(want)
    assert _typed(got)[("then", "then_out")] == (ir.DataType.FLOAT, ir.Shape(["N", 16, 64]))  # (inside a branch)
    assert _typed(got)[("g", "c")][1] == ir.Shape(["N", 16, 8, 8])


def test_fold_and_inspect_take_a_model_or_a_path_and_name_themselves_on_anything_else():
    # catches: the shared reading of `model_or_path` losing the operation's name, or letting another type through
    from bntool.errors import InputError
    from bntool.inspection.onnx_inspect import inspect_onnx

    for op, call in (("fold_onnx", fold_onnx), ("inspect_onnx", inspect_onnx)):
        with pytest.raises(InputError, match=rf"^{op} takes an onnx.ModelProto or a path, got a bytes$"):
            call(b"not a model")
