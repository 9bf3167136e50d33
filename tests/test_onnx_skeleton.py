"""A ModelProto run and checked with its weights kept apart (``onnxio.skeleton``): the same results and verdicts as
the model serialized whole."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from bntool.onnxio.skeleton import Skeleton

F = TensorProto.FLOAT


def _conv_model(in_channels=3, seed=0, extra=()):
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((16, in_channels, 3, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 16, 3, 3)).astype(np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Conv", ["r", "w2"], ["y"]), *extra]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, 6, 6])],
                              [helper.make_tensor_value_info("y", F, [1, 16, 4, 4])], [w, b, w2])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(payload):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def test_a_session_with_the_weights_from_memory_computes_what_the_whole_model_computes():
    model = _conv_model()
    skeleton = Skeleton.of(model)
    assert set(skeleton.arrays) == {"w", "w2"}  # (b is small: it stays in the structure)
    x = {"x": np.random.default_rng(1).standard_normal((1, 3, 6, 6)).astype(np.float32)}
    got = skeleton.run(x, ["c"], {"c": F}, threads=1)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(helper.make_tensor_value_info("c", F, None))
    want = dict(zip(["y", "c"], _session(copy.SerializeToString()).run(["y", "c"], x)))
    assert set(got) == {"y", "c"}
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value)


def _matmul_model(rows: int):
    w = numpy_helper.from_array(np.ones((rows, 300), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", F, [2, 6])],
                              [helper.make_tensor_value_info("y", F, [2, 300])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_the_checker_sees_a_weight_kept_apart_by_its_type_and_shape():
    skeleton = Skeleton.of(_matmul_model(rows=7))  # (a 7-row weight for 6 input features)
    cut = skeleton._as_inputs()
    assert "w" in {i.name for i in cut.graph.input} and "w" not in {t.name for t in cut.graph.initializer}
    with pytest.raises(Exception, match="Incompatible dimensions"):
        onnx.checker.check_model(cut.SerializeToString(), full_check=True)
    with pytest.raises(Exception, match="Incompatible dimensions"):
        skeleton.check(full_check=True)
    Skeleton.of(_matmul_model(rows=6)).check(full_check=True)


def test_a_tensor_the_checker_would_reject_is_never_kept_apart():
    model = _conv_model()
    model.graph.initializer[0].float_data.extend([1.0])  # (raw data and float data both: invalid)
    skeleton = Skeleton.of(model)
    assert "w" not in skeleton.arrays
    with pytest.raises(Exception, match="one and only one value field"):
        skeleton.check(full_check=False)


def test_a_large_tensor_read_for_its_data_stays_a_whole_initializer_in_the_checked_copy():
    indices = numpy_helper.from_array(np.zeros((300,), np.int64), "idx")
    model = _conv_model(extra=[helper.make_node("Gather", ["y", "idx"], ["g"], axis=1)])
    model.graph.initializer.append(indices)
    skeleton = Skeleton.of(model)
    assert "idx" in skeleton.arrays  # (kept apart for onnxruntime, which reads it from memory)
    cut = skeleton._as_inputs()
    kept = {t.name: t for t in cut.graph.initializer}
    assert kept["idx"].raw_data == indices.raw_data and "idx" not in {i.name for i in cut.graph.input}
    assert "w2" in {i.name for i in cut.graph.input}


def test_a_candidate_shares_the_arrays_of_the_weights_it_did_not_change():
    original = _conv_model()
    candidate = onnx.ModelProto()
    candidate.CopyFrom(original)
    changed = numpy_helper.to_array(candidate.graph.initializer[2]) * 2
    candidate.graph.initializer[2].CopyFrom(numpy_helper.from_array(changed, "w2"))
    first = Skeleton.of(original)
    second = Skeleton.of(candidate, like=first)
    assert second.arrays["w"] is first.arrays["w"]
    assert second.arrays["w2"] is not first.arrays["w2"]
    np.testing.assert_array_equal(second.arrays["w2"], changed)
