"""The float64 run of an ONNX graph in torch (``onnxio.wide``) against onnx.reference's own kernels, op by op."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from bntool.onnxio.reference import as_float64
from bntool.onnxio.wide import OPS, run_wide

RNG = np.random.default_rng(0)


def _x(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _model(op, inputs, attrs=None, opset=18, outputs=1, consts=None):
    """One ``op`` node: ``inputs`` are graph inputs (float32 arrays), ``consts`` initializers (any dtype)."""
    consts = consts or {}
    names = [*inputs, *consts]
    order = attrs.pop("_order") if attrs and "_order" in attrs else names
    node = helper.make_node(op, order, [f"y{i}" for i in range(outputs)], **(attrs or {}))
    graph = helper.make_graph(
        [node], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, a.shape) for n, a in inputs.items()],
        [helper.make_empty_tensor_value_info(f"y{i}") for i in range(outputs)],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in consts.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _oracle(model, feeds):
    """onnx.reference's own kernels (no bntool kernel) on the float64 copy; where onnx.reference computes in
    float32 (Erf, HardSwish's 1/6), the formula in float64; a grouped ConvTranspose (onnx.reference's fails)
    group by group."""
    node = model.graph.node[0]
    x = {k: v.astype(np.float64) for k, v in feeds.items()}
    if node.op_type == "Erf":
        return {"y0": np.vectorize(math.erf, otypes=[np.float64])(x["x"])}
    if node.op_type == "HardSwish":
        return {"y0": x["x"] * np.clip(x["x"] / 6 + 0.5, 0, 1)}
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    if node.op_type == "ConvTranspose" and group > 1:
        parts = []
        for g in range(group):
            step, out = x["w"].shape[0] // group, x["w"].shape[1]
            one = {"x": x["x"][:, g * step:(g + 1) * step], "w": x["w"][g * step:(g + 1) * step],
                   "b": x["b"][g * out:(g + 1) * out]}
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "group"}
            parts.append(_oracle(_model("ConvTranspose", one, attrs), one)["y0"])
        return {"y0": np.concatenate(parts, axis=1)}
    wide = as_float64(model)
    results = ReferenceEvaluator(wide).run(None, {k: v.astype(np.float64) for k, v in feeds.items()})
    return dict(zip([o.name for o in wide.graph.output], results))


def i64(*values):
    return np.array(values, dtype=np.int64)


CASES = {
    "conv2d-pads-strides-dilations": ("Conv", {"x": _x(1, 4, 9, 8), "w": _x(6, 4, 3, 3)},
                                      {"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]}, {}),
    "conv1d-bias": ("Conv", {"x": _x(2, 3, 11), "w": _x(5, 3, 3), "b": _x(5)}, {"pads": [1, 1]}, {}),
    "conv3d-grouped": ("Conv", {"x": _x(1, 4, 5, 5, 5), "w": _x(4, 2, 2, 2, 2)}, {"group": 2}, {}),
    "conv-depthwise-small-map": ("Conv", {"x": _x(1, 6, 5, 5), "w": _x(12, 1, 3, 3), "b": _x(12)},
                                 {"group": 6, "pads": [1, 1, 1, 1], "strides": [2, 2]}, {}),
    "conv-same-upper": ("Conv", {"x": _x(1, 2, 7, 6), "w": _x(3, 2, 4, 3)},
                        {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, {}),
    "conv-same-lower": ("Conv", {"x": _x(1, 2, 7, 6), "w": _x(3, 2, 4, 3)},
                        {"auto_pad": "SAME_LOWER", "strides": [2, 1]}, {}),
    "conv-transpose-groups-output-padding": (
        "ConvTranspose", {"x": _x(1, 4, 5, 4), "w": _x(4, 3, 3, 2), "b": _x(6)},
        {"group": 2, "strides": [2, 3], "output_padding": [1, 2], "pads": [1, 0, 0, 1]}, {}),
    "conv-transpose-1d-dilated": ("ConvTranspose", {"x": _x(2, 3, 6), "w": _x(3, 2, 3)},
                                  {"dilations": [2], "strides": [2], "pads": [1, 2]}, {}),
    "batchnorm": ("BatchNormalization", {"x": _x(2, 3, 4, 4), "s": _x(3), "b": _x(3), "m": _x(3),
                                         "v": np.abs(_x(3)) + 0.1}, {"epsilon": 1e-3}, {}),
    "gemm-plain": ("Gemm", {"a": _x(3, 4), "b": _x(4, 5), "c": _x(5)}, {}, {}),
    "gemm-transA-transB-alpha-beta": ("Gemm", {"a": _x(4, 3), "b": _x(5, 4), "c": _x(3, 1)},
                                      {"transA": 1, "transB": 1, "alpha": 0.7, "beta": -1.3}, {}),
    "gemm-no-c": ("Gemm", {"a": _x(3, 4), "b": _x(5, 4)}, {"transB": 1}, {}),
    "matmul-batched": ("MatMul", {"a": _x(2, 3, 4), "b": _x(4, 5)}, {}, {}),
    "add-broadcast": ("Add", {"a": _x(2, 3, 4), "b": _x(3, 1)}, {}, {}),
    "sub": ("Sub", {"a": _x(2, 3), "b": _x(3)}, {}, {}),
    "mul": ("Mul", {"a": _x(2, 3), "b": _x(2, 1)}, {}, {}),
    "div": ("Div", {"a": _x(2, 3), "b": np.abs(_x(2, 3)) + 0.5}, {}, {}),
    "pow": ("Pow", {"a": np.abs(_x(2, 3)) + 0.1, "b": _x(3)}, {}, {}),
    "relu": ("Relu", {"x": _x(3, 4)}, {}, {}),
    "sigmoid": ("Sigmoid", {"x": _x(3, 4)}, {}, {}),
    "tanh": ("Tanh", {"x": _x(3, 4)}, {}, {}),
    "exp": ("Exp", {"x": _x(3, 4)}, {}, {}),
    "sqrt": ("Sqrt", {"x": np.abs(_x(3, 4))}, {}, {}),
    "neg": ("Neg", {"x": _x(3, 4)}, {}, {}),
    "abs": ("Abs", {"x": _x(3, 4)}, {}, {}),
    "erf": ("Erf", {"x": _x(3, 4)}, {}, {}),
    "reciprocal": ("Reciprocal", {"x": np.abs(_x(3, 4)) + 0.5}, {}, {}),
    "leaky-relu": ("LeakyRelu", {"x": _x(3, 4)}, {"alpha": 0.3}, {}),
    "hard-sigmoid": ("HardSigmoid", {"x": 4 * _x(3, 4)}, {"alpha": 0.3, "beta": 0.4}, {}),
    "hard-swish": ("HardSwish", {"x": 4 * _x(3, 4)}, {}, {}),
    "clip-inputs": ("Clip", {"x": _x(3, 4)}, {}, {"lo": np.float32(-0.5), "hi": np.float32(0.7)}),
    "clip-max-only": ("Clip", {"x": _x(3, 4)}, {"_order": ["x", "", "hi"]}, {"hi": np.float32(0.2)}),
    "identity": ("Identity", {"x": _x(3, 4)}, {}, {}),
    "cast-to-float": ("Cast", {"x": _x(3, 4)}, {"to": TensorProto.FLOAT}, {}),
    "castlike": ("CastLike", {"x": _x(3, 4), "y": _x(1)}, {}, {}),
    "maxpool-pads-dilations": ("MaxPool", {"x": _x(1, 2, 9, 8)},
                               {"kernel_shape": [3, 2], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                "dilations": [2, 1]}, {}),
    "averagepool-count-include-pad": ("AveragePool", {"x": _x(1, 2, 7, 7)},
                                      {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
                                       "count_include_pad": 1}, {}),
    "averagepool-exclude-pad": ("AveragePool", {"x": _x(1, 2, 7, 6)},
                                {"kernel_shape": [3, 2], "pads": [1, 1, 1, 1]}, {}),
    "global-average": ("GlobalAveragePool", {"x": _x(2, 3, 4, 5)}, {}, {}),
    "global-max": ("GlobalMaxPool", {"x": _x(2, 3, 4, 5)}, {}, {}),
    "reduce-mean-axes": ("ReduceMean", {"x": _x(2, 3, 4)}, {"keepdims": 0}, {"axes": i64(0, -1)}),
    "reduce-mean-all": ("ReduceMean", {"x": _x(2, 3, 4)}, {}, {}),
    "reduce-sum-axes": ("ReduceSum", {"x": _x(2, 3, 4)}, {}, {"axes": i64(1)}),
    "softmax": ("Softmax", {"x": _x(2, 3, 4)}, {"axis": 1}, {}),
    "reshape-zero-and-minus-one": ("Reshape", {"x": _x(2, 3, 4)}, {}, {"shape": i64(0, -1, 2)}),
    "flatten-axis-2": ("Flatten", {"x": _x(2, 3, 4, 5)}, {"axis": 2}, {}),
    "flatten-negative-axis": ("Flatten", {"x": _x(2, 3, 4, 5)}, {"axis": -1}, {}),
    "transpose": ("Transpose", {"x": _x(2, 3, 4)}, {"perm": [1, 2, 0]}, {}),
    "transpose-default": ("Transpose", {"x": _x(2, 3, 4)}, {}, {}),
    "unsqueeze-negative": ("Unsqueeze", {"x": _x(2, 3)}, {}, {"axes": i64(0, -1)}),
    "squeeze-axes": ("Squeeze", {"x": _x(1, 3, 1, 2)}, {}, {"axes": i64(-2)}),
    "squeeze-all": ("Squeeze", {"x": _x(1, 3, 1, 2)}, {}, {}),
    "concat": ("Concat", {"a": _x(2, 3), "b": _x(2, 1)}, {"axis": -1}, {}),
    "expand-bidirectional": ("Expand", {"x": _x(3, 1)}, {}, {"shape": i64(2, 1, 4)}),
    "gather-negative-indices": ("Gather", {"x": _x(4, 3, 2)}, {"axis": 1}, {"idx": np.array([[0, -1], [2, 1]])}),
    "shape-start-end": ("Shape", {"x": _x(2, 3, 4, 5)}, {"start": 1, "end": -1}, {}),
    "constant": ("Constant", {}, {"value": numpy_helper.from_array(_x(2, 3))}, {}),
}

# ops whose torch version declines these attributes: the node runs in onnx.reference, with the same result
FALLS_BACK = {
    "maxpool-ceil-mode": ("MaxPool", {"x": _x(1, 2, 8, 8)}, {"kernel_shape": [3, 3], "strides": [2, 2],
                                                             "ceil_mode": 1}, {}),
    "averagepool-ceil-mode": ("AveragePool", {"x": _x(1, 2, 8, 8)},
                              {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "pads": [1, 1, 1, 1],
                               "count_include_pad": 1}, {}),
    "conv-transpose-same-upper": ("ConvTranspose", {"x": _x(1, 2, 4, 4), "w": _x(2, 3, 3, 3)},
                                  {"auto_pad": "SAME_UPPER", "strides": [2, 2]}, {}),
    "pad-reflect (no torch version)": ("Pad", {"x": _x(1, 2, 4, 4)}, {"mode": "reflect"},
                                       {"pads": i64(0, 0, 1, 2, 0, 0, 2, 1)}),
    "cast-to-int": ("Cast", {"x": 3 * _x(3, 4)}, {"to": TensorProto.INT64}, {}),
}


def _run_both(case):
    op, inputs, attrs, consts = case
    model = _model(op, inputs, dict(attrs), consts=consts)
    fallbacks = Counter()
    got = run_wide(model, inputs, fallbacks=fallbacks)
    want = _oracle(model, inputs)
    assert set(got) == set(want) == {"y0"}
    assert got["y0"].dtype == want["y0"].dtype and got["y0"].shape == want["y0"].shape
    scale = max(1.0, float(np.abs(want["y0"]).max()))
    np.testing.assert_allclose(got["y0"], want["y0"], rtol=0, atol=1e-12 * scale)
    return fallbacks


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_op_in_torch_float64_equals_onnx_reference(name):
    assert _run_both(CASES[name]) == Counter()  # (computed by torch: onnx.reference ran nothing)


@pytest.mark.parametrize("name", sorted(FALLS_BACK))
def test_what_torch_declines_runs_in_onnx_reference_per_node(name):
    assert _run_both(FALLS_BACK[name]) == Counter({FALLS_BACK[name][0]: 1})


def test_every_op_in_torch_is_tested():
    assert set(OPS) <= {case[0] for case in CASES.values()}


def test_clip_of_opset_6_takes_its_bounds_from_attributes():
    x = _x(3, 4)
    model = _model("Clip", {"x": x}, {"min": -0.3, "max": 0.4}, opset=6)
    fallbacks = Counter()
    got = run_wide(model, {"x": x}, fallbacks=fallbacks)["y0"]
    bounds = np.float32(-0.3).astype(np.float64), np.float32(0.4).astype(np.float64)  # (float attributes)
    np.testing.assert_array_equal(got, np.clip(x.astype(np.float64), *bounds))
    assert not fallbacks


def test_a_graph_with_a_subgraph_runs_whole_in_onnx_reference():
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y0"], then_branch=then, else_branch=other)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = np.array([-1.0, 0.5, 2.0], np.float32)
    fallbacks = Counter()
    got = run_wide(model, {"x": x, "c": np.array(False)}, fallbacks=fallbacks)["y0"]
    np.testing.assert_array_equal(got, -x.astype(np.float64))
    assert fallbacks == Counter({"(whole graph)": 1})


def test_intermediate_values_are_returned_in_float64_and_freed_values_are_not_needed():
    x = _x(2, 3)
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["a", "w"], ["b"]),
             helper.make_node("Add", ["b", "a"], ["y0"])]
    w = _x(3)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y0", TensorProto.FLOAT, [2, 3])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    got = run_wide(model, {"x": x}, ["a", "b"])
    a = np.maximum(x.astype(np.float64), 0)
    np.testing.assert_array_equal(got["a"], a)
    np.testing.assert_array_equal(got["b"], a * w.astype(np.float64))
    np.testing.assert_array_equal(got["y0"], a * w.astype(np.float64) + a)
    assert all(v.dtype == np.float64 for v in got.values())
