"""fold_onnx: BatchNormalization folded inside ONNX graphs (hand graphs per pattern, refusals, raw exports), proven."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from bntool.errors import VerificationError
from bntool.folding import onnx_apply
from bntool.folding.onnx_fold import fold_onnx
from bntool.folding.onnx_rules import Site
from bntool.folding.plan import FoldPair, FoldPlan
from bntool.graph.onnxflow import OnnxFlow
from bntool.onnxio.reference import run_ort
from examples import archs
from examples.models import randomize_bn_, resnet_small

F = TensorProto.FLOAT


def bn_inits(prefix: str, channels: int, rng, dtype=np.float32) -> list:
    """Randomized BN parameters (never the defaults): scale, bias, mean, positive variance."""
    return [numpy_helper.from_array(a.astype(dtype), f"{prefix}.{n}") for n, a in (
        ("scale", rng.normal(size=channels)), ("B", rng.normal(size=channels)),
        ("mean", rng.normal(size=channels)), ("var", rng.uniform(0.3, 2.0, size=channels)))]


def bn(prefix: str, x: str, y: str, **attrs):
    return helper.make_node("BatchNormalization", [x, *(f"{prefix}.{n}" for n in ("scale", "B", "mean", "var"))],
                            [y], name=prefix, **attrs)


def tensor(name: str, array, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(array).astype(dtype), name)


def model(nodes, inputs, outputs, inits, opset=17, dtype=F):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, dtype, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, dtype, None) for n in outputs], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return with_shapes(m)


def with_shapes(m):
    """The model with its outputs' shapes filled in (the checker wants them)."""
    for output in m.graph.output:
        output.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(m)
    del m.graph.output[:]
    m.graph.output.extend(inferred.graph.output)
    return m


def bn_count(m) -> int:
    return sum(n.op_type == "BatchNormalization" for n in m.graph.node)


def assert_same_outputs(original, folded, shape=None, rtol=1e-4, atol=1e-5):
    """An oracle independent of bntool's comparison: both graphs in onnxruntime on one random input."""
    feeds = {}
    rng = np.random.default_rng(7)
    for v in original.graph.input:
        if v.name in {t.name for t in original.graph.initializer}:
            continue
        dims = shape or [d.dim_value for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = rng.normal(size=dims).astype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type))
    a, b = run_ort(original, feeds), run_ort(folded, feeds)
    for name in a:
        np.testing.assert_allclose(b[name].astype(np.float64), a[name].astype(np.float64), rtol=rtol, atol=atol)


def check_valid(folded) -> None:
    onnx.checker.check_model(folded, full_check=True)
    from bntool.onnxio.reference import session

    session(folded)


# ----------------------------------------------------------------------------- patterns that fold


def conv_graph(dims=2, groups=1, bias=True, cin=4, cout=6, seed=0):
    rng = np.random.default_rng(seed)
    k = [3] * dims
    w = tensor("w", rng.normal(size=(cout, cin // groups, *k)))
    inits = [w, *bn_inits("bn", cout, rng)] + ([tensor("b", rng.normal(size=cout))] if bias else [])
    conv = helper.make_node("Conv", ["x", "w", *(["b"] if bias else [])], ["c"], name="conv", group=groups,
                            pads=[1] * (2 * dims))
    return model([conv, bn("bn", "c", "y")], [("x", [2, cin, *([5] * dims)])], ["y"], inits)


def convtranspose_graph(groups=2, cin=4, cout=6, seed=0):
    rng = np.random.default_rng(seed)
    inits = [tensor("w", rng.normal(size=(cin, cout // groups, 3, 3))), tensor("b", rng.normal(size=cout)),
             *bn_inits("bn", cout, rng)]
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], name="deconv", group=groups, strides=[2, 2])
    return model([node, bn("bn", "c", "y")], [("x", [2, cin, 4, 4])], ["y"], inits)


def gemm_graph(trans_b=1, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(5, 8)) if trans_b else rng.normal(size=(8, 5))
    inits = [tensor("w", w), *bn_inits("bn", 5, rng)] + ([tensor("b", rng.normal(size=5))] if bias else [])
    node = helper.make_node("Gemm", ["x", "w", *(["b"] if bias else [])], ["g"], name="fc", transB=trans_b,
                            alpha=0.75, beta=1.5)
    return model([node, bn("bn", "g", "y")], [("x", [3, 8])], ["y"], inits)


def matmul_graph(with_add=False, seed=0):
    rng = np.random.default_rng(seed)
    inits = [tensor("w", rng.normal(size=(8, 5))), *bn_inits("bn", 5, rng), tensor("b", rng.normal(size=5))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm")]
    if with_add:
        nodes.append(helper.make_node("Add", ["m", "b"], ["a"], name="bias"))
    nodes.append(bn("bn", "a" if with_add else "m", "y"))
    return model(nodes, [("x", [3, 8])], ["y"], inits)


def forward_graph(op="Conv", seed=0):
    """BN -> layer, the BN's input a Relu (nothing to fold backward into)."""
    rng = np.random.default_rng(seed)
    if op == "Conv":
        inits = [*bn_inits("bn", 4, rng), tensor("w", rng.normal(size=(6, 2, 3, 3))), tensor("b", rng.normal(size=6))]
        layer = helper.make_node("Conv", ["n", "w", "b"], ["y"], name="conv", group=2)
        shape = [2, 4, 6, 6]
    elif op == "Gemm":
        inits = [*bn_inits("bn", 4, rng), tensor("w", rng.normal(size=(4, 3))), tensor("b", rng.normal(size=3))]
        layer = helper.make_node("Gemm", ["n", "w", "b"], ["y"], name="fc", alpha=0.5, beta=2.0)
        shape = [3, 4]
    else:
        inits = [*bn_inits("bn", 4, rng), tensor("w", rng.normal(size=(4, 3)))]
        layer = helper.make_node("MatMul", ["n", "w"], ["y"], name="mm")
        shape = [3, 4]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn("bn", "r", "n"), layer]
    return model(nodes, [("x", shape)], ["y"], inits)


CASES = {
    "conv1d": lambda: conv_graph(1), "conv2d": lambda: conv_graph(2), "conv3d": lambda: conv_graph(3),
    "conv2d-nobias": lambda: conv_graph(2, bias=False), "conv2d-grouped": lambda: conv_graph(2, groups=2),
    "conv2d-depthwise": lambda: conv_graph(2, groups=4, cin=4, cout=8),
    "convtranspose-grouped-in-ne-out": lambda: convtranspose_graph(2, 4, 6),
    "gemm-transB1": lambda: gemm_graph(1), "gemm-transB0": lambda: gemm_graph(0),
    "gemm-nobias": lambda: gemm_graph(1, bias=False),
    "matmul": lambda: matmul_graph(False), "matmul-add": lambda: matmul_graph(True),
    "forward-conv": lambda: forward_graph("Conv"), "forward-gemm": lambda: forward_graph("Gemm"),
    "forward-matmul": lambda: forward_graph("MatMul"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_each_pattern_folds_exactly_and_the_file_is_valid(case):
    original = CASES[case]()
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0 and report.bn_after == 0 and len(report.done) == 1, report.skipped
    assert report.passed and any(o.name.startswith("layer `") for o in report.comparison.outputs)
    check_valid(folded)
    assert_same_outputs(original, folded)
    assert [o.name for o in folded.graph.output] == [o.name for o in original.graph.output]
    assert bn_count(original) == 1  # the input model is not changed


@pytest.mark.parametrize("opset", [7, 9, 14, 15])
def test_bn_opset_versions_fold(opset):
    original = conv_graph(2, seed=opset)
    original.opset_import[0].version = opset
    if opset < 9:
        original.graph.node[1].attribute.append(helper.make_attribute("spatial", 1))
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0 and report.passed
    assert_same_outputs(original, folded)


def test_float16_weights_fold_within_the_derived_tolerance():
    rng = np.random.default_rng(3)
    inits = [tensor("w", rng.normal(size=(6, 4, 3, 3)) * 0.3, np.float16), tensor("b", rng.normal(size=6), np.float16),
             *bn_inits("bn", 6, rng, np.float16)]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv"), bn("bn", "c", "y")]
    original = model(nodes, [("x", [2, 4, 5, 5])], ["y"], inits, dtype=TensorProto.FLOAT16)
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0 and report.passed
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}
    assert_same_outputs(original, folded, rtol=1e-2, atol=1e-2)


def test_forward_and_backward_into_one_layer_compose():
    rng = np.random.default_rng(5)
    inits = [*bn_inits("bn1", 4, rng), tensor("w", rng.normal(size=(6, 4, 1, 1))), *bn_inits("bn2", 6, rng)]
    nodes = [helper.make_node("Relu", ["x"], ["r"]), bn("bn1", "r", "n"),
             helper.make_node("Conv", ["n", "w"], ["c"], name="conv"), bn("bn2", "c", "y")]
    original = model(nodes, [("x", [2, 4, 5, 5])], ["y"], inits)
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0 and {p.direction for p in report.done} == {"forward", "backward"}
    assert_same_outputs(original, folded)


# ----------------------------------------------------------------------------- refusals


def _forced(original, bn_name: str, layer_name: str, direction: str):
    """The fold the rules refused, made anyway: it must not compute what the original computes."""
    flow = OnnxFlow.of(original)
    b, layer = flow.position(bn_name), flow.position(layer_name)
    plan = FoldPlan((FoldPair(bn_name, layer_name, direction, "removed", flow.op(layer)),), (), "onnx")
    return onnx_apply.apply_onnx(original, flow, plan, {bn_name: [Site(b, layer, direction, None, layer)]})


def test_a_producer_with_other_readers_is_refused_and_forcing_it_breaks_the_other_reader():
    rng = np.random.default_rng(1)
    inits = [tensor("w", rng.normal(size=(4, 3, 3, 3))), *bn_inits("bn", 4, rng)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y"),
             helper.make_node("Relu", ["c"], ["z"], name="side")]
    original = model(nodes, [("x", [1, 3, 6, 6])], ["y", "z"], inits)
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 1 and "is also read by `side`" in report.plan.reason_for("bn")
    forced = _forced(original, "bn", "conv", "backward")
    for node in forced.graph.node:  # the other reader now sees the conv's folded output
        node.input[:] = ["y" if name == "c" else name for name in node.input]
    with pytest.raises(AssertionError):
        assert_same_outputs(original, forced)


def test_forward_into_a_zero_padded_conv_is_refused_and_forcing_it_is_wrong_at_the_border():
    original = forward_graph("Conv")
    conv = original.graph.node[2]
    conv.attribute.append(helper.make_attribute("pads", [1, 1, 1, 1]))
    with_shapes(original)
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 1 and "zero-pads its input" in report.plan.reason_for("bn")
    with pytest.raises(AssertionError):
        assert_same_outputs(original, _forced(original, "bn", "conv", "forward"))


def test_a_training_mode_bn_is_refused_and_folding_its_statistics_would_be_wrong():
    original = conv_graph(2)
    original.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    original.graph.node[1].output.extend(["running_mean", "running_var"])
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 1 and "training_mode=1" in report.plan.reason_for("bn")
    with pytest.raises(AssertionError):
        assert_same_outputs(original, _forced(original, "bn", "conv", "backward"))


def test_a_standalone_bn_on_a_graph_input_is_named_and_left_as_a_bn():
    rng = np.random.default_rng(2)
    nodes = [bn("bn", "x", "n"), helper.make_node("Relu", ["n"], ["y"], name="relu")]
    original = model(nodes, [("x", [2, 3, 4, 4])], ["y"], bn_inits("bn", 3, rng))
    folded, report = fold_onnx(original)
    reason = report.plan.reason_for("bn")
    assert bn_count(folded) == 1 and "model input" in reason and "`x`" in reason
    assert [n.op_type for n in folded.graph.node] == ["BatchNormalization", "Relu"]


def test_qdq_wrapped_and_input_weights_are_refused():
    rng = np.random.default_rng(4)
    inits = [tensor("wq", rng.integers(-5, 5, size=(4, 3, 1, 1)), np.int8), tensor("s", 0.1),
             tensor("zp", 0, np.int8), *bn_inits("bn", 4, rng)]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["w"], name="dq"),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn("bn", "c", "y")]
    original = model(nodes, [("x", [1, 3, 4, 4])], ["y"], inits)
    _, report = fold_onnx(original)
    assert "Q/DQ" in report.plan.reason_for("bn")
    graph_input = conv_graph(2, bias=False)
    weight = next(t for t in graph_input.graph.initializer if t.name == "w")
    graph_input.graph.initializer.remove(weight)
    graph_input.graph.input.append(helper.make_tensor_value_info("w", F, [6, 4, 3, 3]))
    _, report = fold_onnx(graph_input)
    assert "graph input (`w`)" in report.plan.reason_for("bn")


def test_a_weight_shared_by_two_folded_layers_gets_a_copy_each_and_its_other_reader_keeps_it():
    rng = np.random.default_rng(6)
    w = tensor("w", rng.normal(size=(4, 4, 1, 1)))
    inits = [w, *bn_inits("bn1", 4, rng), *bn_inits("bn2", 4, rng)]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c1"], name="conv1"), bn("bn1", "c1", "y1"),
             helper.make_node("Conv", ["x", "w"], ["c2"], name="conv2"), bn("bn2", "c2", "y2"),
             helper.make_node("Conv", ["x", "w"], ["y3"], name="conv3")]
    original = model(nodes, [("x", [1, 4, 3, 3])], ["y1", "y2", "y3"], inits)
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0 and report.passed
    by_name = {n.name: n for n in folded.graph.node}
    weights = {by_name[c].input[1] for c in ("conv1", "conv2")}
    assert len(weights) == 2 and "w" not in weights and by_name["conv3"].input[1] == "w"
    kept = next(t for t in folded.graph.initializer if t.name == "w")
    assert kept.SerializeToString() == w.SerializeToString()
    assert_same_outputs(original, folded)


def test_untouched_nodes_initializers_names_and_metadata_are_kept_bit_for_bit():
    original = randomized_export(resnet_small(), (1, 3, 16, 16), dynamo=False)
    original.doc_string = "doc"
    helper.set_model_props(original, {"author": "me"})
    folded, report = fold_onnx(original)
    assert report.passed and bn_count(folded) == 0
    before = {t.name: t.SerializeToString() for t in original.graph.initializer}
    read_by_layers = {n.input[k] for n in original.graph.node if n.op_type in ("Conv", "Gemm") for k in (1, 2)
                      if k < len(n.input)}
    bn_params = {i for n in original.graph.node if n.op_type == "BatchNormalization" for i in n.input[1:]}
    for t in folded.graph.initializer:
        if t.name in before and t.name not in read_by_layers:
            assert t.SerializeToString() == before[t.name], t.name
    assert not bn_params & {t.name for t in folded.graph.initializer}
    untouched = [n.SerializeToString() for n in original.graph.node if n.op_type not in ("Conv", "Gemm",
                                                                                        "BatchNormalization")]
    now = {n.SerializeToString() for n in folded.graph.node}
    assert all(n in now for n in untouched)
    assert folded.doc_string == "doc" and {p.key: p.value for p in folded.metadata_props} == {"author": "me"}
    assert [o.SerializeToString() for o in folded.opset_import] == [o.SerializeToString() for o in original.opset_import]
    assert [i.SerializeToString() for i in folded.graph.input] == [i.SerializeToString() for i in original.graph.input]


def test_a_fold_verification_blames_is_dropped_and_the_rest_verified(monkeypatch):
    original = conv_graph(2, seed=9)
    rng = np.random.default_rng(9)
    original.graph.initializer.extend([tensor("w2", rng.normal(size=(5, 6, 1, 1))), *bn_inits("bn2", 5, rng)])
    original.graph.node[1].output[0] = "y0"
    original.graph.node.extend([helper.make_node("Conv", ["y0", "w2"], ["c2"], name="conv2"), bn("bn2", "c2", "y")])
    del original.graph.output[:]
    original.graph.output.append(helper.make_tensor_value_info("y", F, None))
    with_shapes(original)
    real = onnx_apply.scale_producer

    def corrupt(weight, bias, k, c, **kw):  # one channel of conv2's fold wrong by 1%
        new_weight, new_bias = real(weight, bias, k, c, **kw)
        if weight.shape[0] == 5:
            new_bias = new_bias.clone()
            new_bias[2] += 0.01 * (1 + abs(float(new_bias[2])))
        return new_weight, new_bias

    monkeypatch.setattr(onnx_apply, "scale_producer", corrupt)
    _, report = fold_onnx(original)
    assert [p.bn for p in report.done] == ["bn"] and [s.bn for s in report.rejected] == ["bn2"]
    assert "rejected by verification" in report.plan.reason_for("bn2") and report.passed
    with pytest.raises(VerificationError):
        fold_onnx(original, strict=True)


# ----------------------------------------------------------------------------- raw exports


def randomized_export(net, shape, dynamo: bool, tmp=None):
    import io

    net = randomize_bn_(net, seed=3).eval()
    x = torch.randn(*shape)
    buffer = io.BytesIO()
    if dynamo:
        program = torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False)
        return program.model_proto
    torch.onnx.export(net, (x,), buffer, dynamo=False, do_constant_folding=False)
    return onnx.load_from_string(buffer.getvalue())


EXPORTS = {
    "resnet": (resnet_small, (1, 3, 16, 16)),
    "mobilenetv2": (lambda: archs.mobilenetv2_like(), (1, 3, 32, 32)),
    "efficientnet": (lambda: archs.efficientnet_like(), (1, 3, 32, 32)),
}


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
@pytest.mark.parametrize("arch", list(EXPORTS))
def test_raw_exports_fold_every_bn_and_stay_equal(arch, dynamo):
    factory, shape = EXPORTS[arch]
    original = randomized_export(factory(), shape, dynamo)
    folded, report = fold_onnx(original)
    assert bn_count(original) > 0
    assert report.passed and bn_count(folded) == report.bn_after
    assert report.bn_after == 0, report.skipped
    check_valid(folded)
    assert_same_outputs(original, folded, rtol=1e-3, atol=1e-4)
    unread_before = {t.name for t in original.graph.initializer} - {i for n in original.graph.node for i in n.input}
    unread_now = {t.name for t in folded.graph.initializer} - {i for n in folded.graph.node for i in n.input}
    assert unread_now <= unread_before  # (no weight left behind: the dynamo exporter's Shape readers go)


# ----------------------------------------------------------------------------- through view ops and Concat


def test_a_bn_after_a_channel_concat_is_split_between_its_producers():
    rng = np.random.default_rng(12)
    inits = [tensor("w1", rng.normal(size=(3, 4, 3, 3))), tensor("w2", rng.normal(size=(5, 4, 1, 1))),
             tensor("b2", rng.normal(size=5)), *bn_inits("bn", 8, rng)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Concat", ["c1", "c2"], ["cat"], name="cat", axis=1), bn("bn", "cat", "y")]
    original = model(nodes, [("x", [2, 4, 5, 5])], ["y"], inits)
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0 and sorted(p.into for p in report.done) == ["conv1", "conv2"]
    assert (report.bn_before, report.bn_after) == (1, 0)
    assert_same_outputs(original, folded)


def test_a_concat_on_another_axis_is_refused():
    rng = np.random.default_rng(13)
    inits = [tensor("w1", rng.normal(size=(4, 4, 1, 1))), tensor("w2", rng.normal(size=(4, 4, 1, 1))),
             *bn_inits("bn", 4, rng)]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1"),
             helper.make_node("Conv", ["x", "w2"], ["c2"], name="conv2"),
             helper.make_node("Concat", ["c1", "c2"], ["cat"], name="cat", axis=2), bn("bn", "cat", "y")]
    original = model(nodes, [("x", [2, 4, 5, 5])], ["y"], inits)
    _, report = fold_onnx(original)
    assert "`Concat`" in report.plan.reason_for("bn")


def levit_linear_norm(transpose: bool):
    """LeViT's LinearNorm: Linear on (B, N, C), flatten(0, 1) (or a Transpose to (B, C, N)), BatchNorm1d, back."""
    rng = np.random.default_rng(14)
    inits = [tensor("w", rng.normal(size=(8, 6))), tensor("b", rng.normal(size=6)), *bn_inits("bn", 6, rng),
             tensor("flat", [-1, 6], np.int64), tensor("back", [2, 5, 6], np.int64)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="linear"),
             helper.make_node("Add", ["m", "b"], ["a"], name="bias")]
    if transpose:
        nodes += [helper.make_node("Transpose", ["a"], ["t"], name="t", perm=[0, 2, 1]), bn("bn", "t", "y")]
    else:
        nodes += [helper.make_node("Reshape", ["a", "flat"], ["r"], name="flatten"), bn("bn", "r", "n"),
                  helper.make_node("Reshape", ["n", "back"], ["y"], name="unflatten")]
    return model(nodes, [("x", [2, 5, 8])], ["y"], inits)


@pytest.mark.parametrize("transpose", [False, True], ids=["reshape", "transpose"])
def test_a_matmul_behind_a_reshape_or_transpose_that_keeps_channels_whole_folds(transpose):
    original = levit_linear_norm(transpose)
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0 and report.done[0].into == "linear", report.skipped
    assert_same_outputs(original, folded)


def test_a_reshape_that_mixes_channels_is_refused():
    rng = np.random.default_rng(15)
    inits = [tensor("w", rng.normal(size=(8, 6))), *bn_inits("bn", 3, rng), tensor("shape", [6, 3], np.int64)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="linear"),
             helper.make_node("Reshape", ["m", "shape"], ["r"], name="reshape"), bn("bn", "r", "y")]
    original = model(nodes, [("x", [3, 8])], ["y"], inits)  # (3, 6) -> (6, 3): a BN channel mixes features
    _, report = fold_onnx(original)
    assert "does not keep each channel whole" in report.plan.reason_for("bn")


def test_blocks_of_features_reshaped_into_channels_fold_as_in_a_dcgan_generator():
    rng = np.random.default_rng(16)
    inits = [tensor("w", rng.normal(size=(12, 4))), tensor("b", rng.normal(size=12)), *bn_inits("bn", 3, rng),
             tensor("shape", [-1, 3, 2, 2], np.int64)]
    nodes = [helper.make_node("Gemm", ["z", "w", "b"], ["g"], name="fc", transB=1),
             helper.make_node("Reshape", ["g", "shape"], ["r"], name="view"), bn("bn", "r", "y")]
    original = model(nodes, [("z", [2, 4])], ["y"], inits)
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0 and report.done[0].into == "fc"
    assert_same_outputs(original, folded)


def test_forward_through_a_flatten_into_a_linear():
    rng = np.random.default_rng(17)
    inits = [*bn_inits("bn", 3, rng), tensor("w", rng.normal(size=(5, 12))), tensor("b", rng.normal(size=5))]
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"), bn("bn", "r", "n"),
             helper.make_node("Flatten", ["n"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "w", "b"], ["y"], name="fc", transB=1)]
    original = model(nodes, [("x", [2, 3, 2, 2])], ["y"], inits)
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0 and report.done[0].direction == "forward"
    assert_same_outputs(original, folded)


def test_a_shape_reader_does_not_block_a_fold_and_still_reads_the_right_value():
    original = conv_graph(2, seed=18)
    original.graph.node.append(helper.make_node("Shape", ["c"], ["s"], name="shape"))
    original.graph.output.append(helper.make_tensor_value_info("s", TensorProto.INT64, [4]))
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0 and report.passed
    check_valid(folded)
    assert_same_outputs(original, folded)


def test_a_one_channel_bn_after_a_linear_folds_into_every_feature():
    rng = np.random.default_rng(19)
    inits = [tensor("w", rng.normal(size=(3, 5))), tensor("b", rng.normal(size=5)), *bn_inits("bn", 1, rng)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="linear"),
             helper.make_node("Add", ["b", "m"], ["a"], name="bias"), bn("bn", "a", "y")]
    original = model(nodes, [("x", [4, 1, 3])], ["y"], inits)
    folded, report = fold_onnx(original)
    assert bn_count(folded) == 0, report.skipped
    assert_same_outputs(original, folded)


EXTRA = {
    "levit": (lambda: archs.levit_like(), None),
    "dcgan-generator": (lambda: archs.dcgan_generator(), None),
    "yolov8": (lambda: archs.yolov8_like(), None),
}


@pytest.mark.parametrize("arch", list(EXTRA))
def test_exports_with_reshapes_and_concats_fold_every_bn(arch):
    net = EXTRA[arch][0]()
    original = randomized_export(net, net.input_shape, dynamo=False)
    folded, report = fold_onnx(original)
    assert report.passed and report.bn_after == 0, report.skipped
    assert_same_outputs(original, folded, rtol=1e-3, atol=1e-4)


def test_initializers_listed_as_graph_inputs_are_folded_and_the_inputs_kept_consistent():
    import io

    net = randomize_bn_(resnet_small(), seed=4).eval()
    buffer = io.BytesIO()
    torch.onnx.export(net, (torch.randn(1, 3, 16, 16),), buffer, dynamo=False, do_constant_folding=False,
                      keep_initializers_as_inputs=True)
    original = onnx.load_from_string(buffer.getvalue())
    folded, report = fold_onnx(original)
    assert report.passed and report.bn_after == 0 and "listed as graph inputs" in report.plan.note
    initializers = {t.name for t in folded.graph.initializer}
    assert {v.name for v in folded.graph.input} - initializers == {"input.1"} or \
        len({v.name for v in folded.graph.input} - initializers) == 1
    assert initializers <= {v.name for v in folded.graph.input}
    check_valid(folded)
    assert_same_outputs(original, folded)


def test_a_bn_inside_an_if_branch_fed_from_the_main_graph_is_named_and_left_while_the_main_graph_folds():
    rng = np.random.default_rng(20)
    inner = helper.make_graph([bn("inner_bn", "cc", "out")], "then", [], [helper.make_tensor_value_info("out", F, None)],
                              bn_inits("inner_bn", 6, rng))
    other = helper.make_graph([helper.make_node("Identity", ["cc"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", F, None)])
    original = conv_graph(2, seed=20)
    original.graph.node[1].output[0] = "y0"
    original.graph.initializer.append(tensor("flag", True, np.bool_))
    original.graph.node.append(helper.make_node("Identity", ["y0"], ["cc"]))
    original.graph.node.append(helper.make_node("If", ["flag"], ["y"], then_branch=inner, else_branch=other))
    original = with_shapes(original)
    folded, report = fold_onnx(original)
    reason = report.plan.reason_for("If (output `y`)/then_branch/inner_bn")
    assert [p.bn for p in report.done] == ["bn"] and "comes from outside the If body" in reason
    assert report.bn_before == 2 and report.bn_after == 1
    assert_same_outputs(original, folded)


def test_the_library_takes_example_inputs_or_input_shapes_and_names_them_when_missing():
    import bntool
    from bntool.errors import InputError

    original = conv_graph(2, seed=21)
    original.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(InputError, match="`input_shapes`"):
        bntool.fold_onnx(original)
    x = np.random.default_rng(0).normal(size=(3, 4, 5, 5)).astype(np.float32)
    for kwargs in ({"example_inputs": {"x": x}}, {"example_inputs": [x]}, {"input_shapes": [(3, 4, 5, 5)]}):
        folded, report = bntool.fold_onnx(original, **kwargs)
        assert report.passed and report.comparison is not None and bn_count(folded) == 0
    folded, report = bntool.fold_onnx(original, verify=False)
    assert report.comparison is None and bn_count(folded) == 0


def test_bfloat16_weights_are_folded_in_float64_and_rounded_once():
    import ml_dtypes

    rng = np.random.default_rng(22)
    bf16 = ml_dtypes.bfloat16
    inits = [tensor("w", rng.normal(size=(6, 4)), bf16), tensor("b", rng.normal(size=6), bf16),
             *bn_inits("bn", 6, rng, bf16)]
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc", transB=1), bn("bn", "g", "y")]
    original = model(nodes, [("x", [2, 4])], ["y"], inits, dtype=TensorProto.BFLOAT16)
    folded, _ = fold_onnx(original, verify=False)  # (onnxruntime runs no bfloat16 Gemm on the CPU)
    arrays = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in original.graph.initializer}
    k = arrays["bn.scale"] / np.sqrt(arrays["bn.var"] + 1e-5)
    expected_w = (arrays["w"].astype(np.float32) * k.astype(np.float32)[:, None]).astype(bf16)
    expected_b = (k * (arrays["b"] - arrays["bn.mean"]) + arrays["bn.B"]).astype(bf16)
    got = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    fc = next(n for n in folded.graph.node if n.op_type == "Gemm")
    assert got[fc.input[1]].dtype == bf16 and got[fc.input[2]].dtype == bf16
    np.testing.assert_array_equal(got[fc.input[1]].view(np.uint16), expected_w.view(np.uint16))
    np.testing.assert_array_equal(got[fc.input[2]].view(np.uint16), expected_b.view(np.uint16))
