"""fold_onnx inside If / Loop / Scan bodies (nested too) and through multiplies and adds by a constant number."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from bntool.folding.onnx_fold import fold_onnx
from bntool.onnxio.check import iter_nodes
from bntool.onnxio.reference import run_ort
from tests.test_onnx_fold import bn, bn_inits, check_valid, tensor

F, B, I64 = TensorProto.FLOAT, TensorProto.BOOL, TensorProto.INT64
SHAPE = [2, 4, 5, 5]


def all_bns(m) -> int:
    return sum(n.op_type == "BatchNormalization" for n in iter_nodes(m))


def conv(name, x, w, y, bias=None):
    return helper.make_node("Conv", [x, w, *([bias] if bias else [])], [y], name=name, pads=[1, 1, 1, 1])


def conv_bn(prefix, x, y, rng, weight=None):
    """``x -> Conv -> BN -> y`` (4 channels in and out) with its own randomized weight (unless ``weight`` names
    one) and bias, and randomized BN state: (nodes, initializers)."""
    w = weight or f"{prefix}.w"
    inits = ([] if weight else [tensor(w, rng.normal(size=(4, 4, 3, 3)) * 0.3)]) + \
        [tensor(f"{prefix}.b", rng.normal(size=4)), *bn_inits(f"{prefix}.bn", 4, rng)]
    return [conv(f"{prefix}.conv", x, w, f"{prefix}.c", f"{prefix}.b"), bn(f"{prefix}.bn", f"{prefix}.c", y)], inits


def vi(name, elem=F, shape=SHAPE):
    return helper.make_tensor_value_info(name, elem, shape)


def make(nodes, inits, outputs, inputs=(("x", F, SHAPE),), opset=17):
    """The model (valid by ``onnx.checker``'s full check); ``outputs``: names (of shape ``SHAPE``) or (name, shape)."""
    outputs = [vi(o) if isinstance(o, str) else vi(o[0], F, o[1]) for o in outputs]
    graph = helper.make_graph(nodes, "g", [vi(*i) for i in inputs], outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def feeds_of(m, rng, **given):
    out = {}
    for v in m.graph.input:
        if v.name in given:
            out[v.name] = given[v.name]
        else:
            dims = [d.dim_value for d in v.type.tensor_type.shape.dim]
            dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
            out[v.name] = rng.normal(size=dims).astype(dtype) if dtype == np.float32 else np.ones(dims, dtype)
    return out


def same(original, folded, **given):
    """An oracle apart from bntool's check: both graphs in onnxruntime on random inputs (and ``given`` ones)."""
    feeds = feeds_of(original, np.random.default_rng(5), **given)
    a, b = run_ort(original, feeds), run_ort(folded, feeds)
    return all(np.allclose(b[k], a[k], rtol=1e-4, atol=1e-4) for k in a)


def folded_ok(original, **given):
    """Fold, then: valid (checker full_check, onnxruntime loads it), equal on the given inputs; a reason for each
    BN left."""
    folded, report = fold_onnx(original)
    check_valid(folded)
    assert (report.passed or not report.plan.pairs) and same(original, folded, **given)
    assert all(s.reason for s in report.plan.skips)
    assert all_bns(folded) == report.bn_after == len(report.plan.skips)
    return folded, report


# ----------------------------------------------------------------------------- If


def if_model(seed=0, shared=False):
    """``x -> Conv -> h``; ``If(flag)``: each branch its own ``Conv -> BN`` on ``h`` (``shared``: both convs read
    one weight of the main graph, ``W``)."""
    rng = np.random.default_rng(seed)
    then_nodes, then_inits = conv_bn("t", "h", "yt", rng, weight="W" if shared else None)
    else_nodes, else_inits = conv_bn("e", "h", "ye", rng, weight="W" if shared else None)
    then_g = helper.make_graph(then_nodes, "then", [], [vi("yt")], then_inits)
    else_g = helper.make_graph(else_nodes, "else", [], [vi("ye")], else_inits)
    nodes = [conv("stem", "x", "w0", "h"),
             helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    inits = [tensor("w0", rng.normal(size=(4, 4, 3, 3)) * 0.3)]
    inits += [tensor("W", rng.normal(size=(4, 4, 3, 3)) * 0.3)] if shared else []
    return make(nodes, inits, ["y"], [("x", F, SHAPE), ("flag", B, [])])


def test_bns_in_both_branches_of_an_if_fold_into_their_convs_and_each_branch_stays_equal():
    original = if_model(1)
    folded, report = folded_ok(original)
    assert report.bn_before == 2 and report.bn_after == 0
    assert {(p.bn, p.into) for p in report.plan.pairs} == {
        ("branch/then_branch/t.bn", "branch/then_branch/t.conv"),
        ("branch/else_branch/e.bn", "branch/else_branch/e.conv")}
    for flag in (True, False):  # (each branch, whichever the verification inputs took)
        assert same(original, folded, flag=np.array(flag))


def test_one_main_graph_weight_read_by_the_convs_of_both_branches_gets_one_folded_version_per_branch():
    original = if_model(3, shared=True)
    folded, report = folded_ok(original)
    assert report.bn_after == 0
    branches = {a.name: a.g for a in next(n for n in folded.graph.node if n.op_type == "If").attribute}
    weights = {}
    for name, graph in branches.items():
        held = {t.name: t for g in (graph, folded.graph) for t in g.initializer}
        weights[name] = numpy_helper.to_array(held[next(n for n in graph.node if n.op_type == "Conv").input[1]])
    assert not np.array_equal(weights["then_branch"], weights["else_branch"])  # (each its own BN's scale)
    for flag in (True, False):
        assert same(original, folded, flag=np.array(flag))


def test_a_wrong_fold_in_the_branch_the_inputs_do_not_take_is_caught_and_only_that_bn_is_left(monkeypatch):
    from bntool.folding import onnx_apply

    original = if_model(2)  # (bntool's verification inputs hold flag=False: the else branch)
    real = onnx_apply._fold_layer

    def broken(flow, layer, sides):
        weight, bias = real(flow, layer, sides)
        return weight, bias + (1.0 if flow.label(layer).endswith("t.conv") else 0.0)

    monkeypatch.setattr(onnx_apply, "_fold_layer", broken)
    folded, report = fold_onnx(original)
    assert [p.bn for p in report.plan.pairs] == ["branch/else_branch/e.bn"]
    reason = report.plan.reason_for("branch/then_branch/t.bn")
    assert reason.startswith("rejected by verification") and "`branch/then_branch`" in reason
    assert same(original, folded, flag=np.array(True)) and same(original, folded, flag=np.array(False))


# ----------------------------------------------------------------------------- Loop, Scan, nested


def loop_model(weight="inside", seed=0, scan_output=False):
    """``Loop`` twice over ``h = Relu(BN(Conv(h)))`` from ``h = x``; the body conv's weight is the body's own
    (``inside``), the main graph's read only in the body (``outer``), or the main graph's read also by a main-graph
    conv (``shared``)."""
    rng = np.random.default_rng(seed)
    outer = weight != "inside"
    nodes, inits = conv_bn("l", "h", "hb", rng, weight="W" if outer else None)
    nodes += [helper.make_node("Relu", ["hb"], ["h_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    nodes += [helper.make_node("Sigmoid", ["hb"], ["each"])] if scan_output else []
    body = helper.make_graph(nodes, "body", [vi("i", I64, []), vi("cond_in", B, []), vi("h", F, SHAPE)],
                             [vi("cond_out", B, []), vi("h_out", F, SHAPE)] + ([vi("each")] if scan_output else []),
                             inits)
    outputs = ["y"] + ([("trace", [2, *SHAPE])] if scan_output else [])
    main = [helper.make_node("Loop", ["trips", "go", "x"], [o if isinstance(o, str) else o[0] for o in outputs],
                             name="loop", body=body)]
    main_inits = [numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go")]
    if outer:
        main_inits.append(tensor("W", rng.normal(size=(4, 4, 3, 3)) * 0.3))
    if weight == "shared":
        main.append(conv("side", "x", "W", "z"))
        outputs.append("z")
    return make(main, main_inits, outputs)


@pytest.mark.parametrize("weight", ["inside", "outer", "shared"])
def test_a_bn_in_a_loop_body_folds_into_its_conv_with_the_weight_wherever_it_is_held(weight):
    original = loop_model(weight, seed=3)
    folded, report = folded_ok(original)
    assert report.bn_after == 0 and [(p.bn, p.into) for p in report.plan.pairs] == [("loop/body/l.bn", "loop/body/l.conv")]
    body = next(n for n in folded.graph.node if n.op_type == "Loop").attribute[0].g
    main = {t.name: numpy_helper.to_array(t) for t in folded.graph.initializer}
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    body_conv = next(n for n in body.node if n.op_type == "Conv")
    if weight == "shared":  # the body's conv gets a folded copy in its body; the main graph's conv keeps W as it was
        assert body_conv.input[1] != "W" and body_conv.input[1] in {t.name for t in body.initializer}
        np.testing.assert_array_equal(main["W"], before["W"])
    elif weight == "outer":  # its one reader: rewritten where it is
        assert body_conv.input[1] == "W" and not np.array_equal(main["W"], before["W"])


def scan_model(seed=0):
    """``Scan`` over the first axis of ``xs``: each slice through ``Conv -> BN``, summed into a state."""
    rng = np.random.default_rng(seed)
    nodes, inits = conv_bn("s", "xt", "yb", rng)
    nodes += [helper.make_node("Add", ["acc", "yb"], ["acc_out"]), helper.make_node("Identity", ["yb"], ["ys_t"])]
    body = helper.make_graph(nodes, "body", [vi("acc", F, SHAPE), vi("xt", F, SHAPE)],
                             [vi("acc_out", F, SHAPE), vi("ys_t", F, SHAPE)], inits)
    scan = helper.make_node("Scan", ["acc0", "xs"], ["total", "ys"], name="scan", body=body, num_scan_inputs=1)
    return make([scan], [tensor("acc0", np.zeros(SHAPE))], ["total", ("ys", [3, *SHAPE])], [("xs", F, [3, *SHAPE])])


def test_a_bn_in_a_scan_body_folds_and_both_scan_outputs_stay_equal():
    original = scan_model(4)
    _, report = folded_ok(original)
    assert report.bn_after == 0 and [p.into for p in report.plan.pairs] == ["scan/body/s.conv"]


def nested_model(seed=0):
    """A ``Loop`` whose body holds an ``If`` (on the loop's outer flag) with ``Conv -> BN`` in each branch."""
    rng = np.random.default_rng(seed)
    then_nodes, then_inits = conv_bn("t", "h", "yt", rng)
    else_nodes, else_inits = conv_bn("e", "h", "ye", rng)
    branch = helper.make_node("If", ["flag"], ["hb"], name="pick",
                              then_branch=helper.make_graph(then_nodes, "then", [], [vi("yt")], then_inits),
                              else_branch=helper.make_graph(else_nodes, "else", [], [vi("ye")], else_inits))
    body = helper.make_graph([branch, helper.make_node("Tanh", ["hb"], ["h_out"]),
                              helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
                             [vi("i", I64, []), vi("cond_in", B, []), vi("h", F, SHAPE)],
                             [vi("cond_out", B, []), vi("h_out", F, SHAPE)])
    loop = helper.make_node("Loop", ["trips", "go", "x"], ["y"], name="loop", body=body)
    return make([loop], [numpy_helper.from_array(np.array(2, np.int64), "trips"),
                         numpy_helper.from_array(np.array(True), "go")], ["y"], [("x", F, SHAPE), ("flag", B, [])])


def test_bns_in_an_if_nested_in_a_loop_fold_and_both_branches_are_proven():
    original = nested_model(5)
    folded, report = folded_ok(original)
    assert sorted(p.bn for p in report.plan.pairs) == ["loop/body/pick/else_branch/e.bn",
                                                       "loop/body/pick/then_branch/t.bn"]
    assert report.bn_after == 0
    assert same(original, folded, flag=np.array(True)) and same(original, folded, flag=np.array(False))


# ----------------------------------------------------------------------------- refusals


def test_a_bn_in_a_branch_fed_from_the_main_graph_is_left_and_folding_it_there_would_break_the_other_branch():
    rng = np.random.default_rng(6)
    inits = [tensor("w0", rng.normal(size=(4, 4, 3, 3)) * 0.3), tensor("b0", rng.normal(size=4)),
             *bn_inits("o.bn", 4, rng)]
    then_g = helper.make_graph([bn("o.bn", "h", "yt")], "then", [], [vi("yt")])
    else_g = helper.make_graph([helper.make_node("Relu", ["h"], ["ye"])], "else", [], [vi("ye")])
    nodes = [conv("stem", "x", "w0", "h", "b0"),
             helper.make_node("If", ["flag"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    original = make(nodes, inits, ["y"], [("x", F, SHAPE), ("flag", B, [])])
    _, report = folded_ok(original)
    assert report.bn_after == 1 and not report.plan.pairs
    reason = report.plan.reason_for("branch/then_branch/o.bn")
    assert "`h` comes from outside the If body `branch/then_branch`" in reason and "output of the If body" in reason
    # forced: the BN folded into the stem conv (exact for the then branch) changes what the else branch sees
    arrays = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in original.graph.initializer}
    k = arrays["o.bn.scale"] / np.sqrt(arrays["o.bn.var"] + 1e-5)
    forced = onnx.ModelProto()
    forced.CopyFrom(original)
    for t in forced.graph.initializer:
        if t.name in ("w0", "b0"):
            value = arrays[t.name] * (k[:, None, None, None] if t.name == "w0" else k)
            value = value + (arrays["o.bn.B"] - k * arrays["o.bn.mean"] if t.name == "b0" else 0)
            t.CopyFrom(tensor(t.name, value))
    then = next(a.g for a in forced.graph.node[1].attribute if a.name == "then_branch")
    then.node[0].CopyFrom(helper.make_node("Identity", ["h"], ["yt"]))
    assert same(original, forced, flag=np.array(True)) and not same(original, forced, flag=np.array(False))


def test_a_bn_on_a_loop_carried_value_is_left_and_folding_it_into_what_feeds_the_loop_would_break_later_trips():
    rng = np.random.default_rng(7)
    nodes = [bn("c.bn", "h", "hb"), conv("c.conv", "hb", "c.w", "h_out"),
             helper.make_node("Identity", ["cond_in"], ["cond_out"])]
    body = helper.make_graph(nodes, "body", [vi("i", I64, []), vi("cond_in", B, []), vi("h", F, SHAPE)],
                             [vi("cond_out", B, []), vi("h_out", F, SHAPE)],
                             [tensor("c.w", rng.normal(size=(4, 4, 3, 3)) * 0.3), *bn_inits("c.bn", 4, rng)])
    inits = [tensor("w0", rng.normal(size=(4, 4, 3, 3)) * 0.3),
             numpy_helper.from_array(np.array(2, np.int64), "trips"), numpy_helper.from_array(np.array(True), "go")]
    main = [conv("stem", "x", "w0", "h0"), helper.make_node("Loop", ["trips", "go", "h0"], ["y"], name="loop",
                                                           body=body)]
    original = make(main, inits, ["y"])
    _, report = folded_ok(original)
    assert report.bn_after == 1
    reason = report.plan.reason_for("loop/body/c.bn")
    assert "`h` is an input of the Loop body `loop/body`" in reason and "zero-pads" in reason
    # forced: the BN folded into the stem conv that makes the first trip's `h`: the second trip goes without it
    params = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in body.initializer}
    k = params["c.bn.scale"] / np.sqrt(params["c.bn.var"] + 1e-5)
    forced = onnx.ModelProto()
    forced.CopyFrom(original)
    forced.graph.initializer[0].CopyFrom(tensor("w0", numpy_helper.to_array(inits[0]) * k[:, None, None, None]))
    forced.graph.initializer.append(tensor("b0", params["c.bn.B"] - k * params["c.bn.mean"]))
    forced.graph.node[0].input.append("b0")
    forced_body = forced.graph.node[1].attribute[0].g
    forced_body.node[0].CopyFrom(helper.make_node("Identity", ["h"], ["hb"]))
    trips = {"trips": np.array(1, np.int64)}
    once, twice = original, onnx.ModelProto()
    twice.CopyFrom(forced)
    assert not same(original, forced)  # (two trips)
    for m in (once, twice):
        m.graph.initializer[1].CopyFrom(numpy_helper.from_array(trips["trips"], "trips"))
    assert same(once, twice)  # (one trip: exact)


# ----------------------------------------------------------------------------- multiply / add by a number


def steps_model(steps, seed=0, bn_first=False):
    """``x -> Conv -> steps -> BN -> y`` (or ``x -> BN -> steps -> Conv`` without padding, ``bn_first``); each step
    ``(op, value, constant_first)``: an initializer of that value, a ``Constant`` node when ``value`` is a list."""
    rng = np.random.default_rng(seed)
    inits = [tensor("w", rng.normal(size=(4, 4, 3, 3)) * 0.3), tensor("b", rng.normal(size=4)),
             *bn_inits("bn", 4, rng)]
    nodes, inputs, value = [], [("x", F, SHAPE)], "x" if bn_first else "c"
    if bn_first:
        nodes.append(bn("bn", "x", "n"))
        value = "n"
    else:
        nodes.append(conv("conv", "x", "w", "c", "b"))
    for k, (op, number, first) in enumerate(steps):
        name = f"k{k}"
        if isinstance(number, list):
            nodes.append(helper.make_node("Constant", [], [name], value=tensor(name, number)))
        elif isinstance(number, str):
            name = number
            inputs.append((number, F, [1]))
        else:
            inits.append(tensor(name, number))
        nodes.append(helper.make_node(op, [name, value] if first else [value, name], [f"s{k}"], name=f"{op.lower()}{k}"))
        value = f"s{k}"
    if bn_first:
        nodes.append(helper.make_node("Conv", [value, "w", "b"], ["y"], name="conv"))
        return make(nodes, inits, [("y", [2, 4, 3, 3])], inputs)
    nodes.append(bn("bn", value, "y"))
    return make(nodes, inits, ["y"], inputs)


@pytest.mark.parametrize("steps", [
    [("Mul", 1.7, False), ("Add", [0.3], False)],
    [("Mul", -0.6, True), ("Sub", [2.5], False), ("Div", 1.3, False)],
    [("Sub", 0.4, True), ("Add", -1.2, True)],
])
def test_a_bn_after_multiplies_and_adds_by_numbers_folds_into_the_conv_through_them(steps):
    original = steps_model(steps, seed=8)
    folded, report = folded_ok(original)
    assert report.bn_after == 0 and [(p.into, p.direction) for p in report.plan.pairs] == [("conv", "backward")]
    assert [n.op_type for n in folded.graph.node if n.op_type != "Constant"] == ["Conv"] + [s[0] for s in steps]
    assert report.plan.pairs[0].through != (1.0, 0.0)


def test_a_bn_before_a_multiply_by_a_number_folds_forward_into_the_conv_after_it():
    original = steps_model([("Mul", 0.8, False), ("Add", 0.5, False)], seed=9, bn_first=True)
    _, report = folded_ok(original)
    assert report.bn_after == 0 and [(p.into, p.direction) for p in report.plan.pairs] == [("conv", "forward")]


@pytest.mark.parametrize(("steps", "words"), [
    ([("Mul", "scale", False)], "`mul0` multiplies by `scale`, which is a graph input"),
    ([("Mul", [[[1.0]], [[2.0]], [[3.0]], [[4.0]]], False)], "`mul0` multiplies by a constant of 4 elements"),
    ([("Div", 2.0, True)], "`div0` divides a number by its input"),
    ([("Mul", 0.0, False)], "multiplied by 0"),
])
def test_a_step_that_is_not_a_multiply_or_add_by_a_number_is_refused_and_named(steps, words):
    original = steps_model(steps, seed=10)
    _, report = folded_ok(original) if "scale" not in str(steps) else \
        folded_ok(original, scale=np.array([1.5], np.float32))
    assert report.bn_after == 1 and words in report.plan.reason_for("bn")


def test_inspect_lists_the_bns_inside_subgraphs_with_where_they_sit(cli, tmp_path):
    import json

    path = tmp_path / "nested.onnx"
    onnx.save(nested_model(11), str(path))
    result = cli("inspect", path, "--json")
    assert result.code == 0, result.err
    rows = {r["name"]: r for r in json.loads(result.out)["layers"]}
    assert set(rows) == {"loop/body/pick/then_branch/t.bn", "loop/body/pick/else_branch/e.bn"}
    assert rows["loop/body/pick/then_branch/t.bn"]["fold_into"].startswith("loop/body/pick/then_branch/t.conv")


def test_a_loop_that_runs_no_trip_on_the_verification_inputs_proves_nothing_and_its_bn_is_left():
    original = loop_model("inside", seed=12)
    trips = next(t for t in original.graph.initializer if t.name == "trips")
    trips.CopyFrom(numpy_helper.from_array(np.array(0, np.int64), "trips"))
    _, report = folded_ok(original)
    assert report.bn_after == 1 and not report.plan.pairs
    assert "the body `loop/body` ran no trip on the verification inputs" in report.plan.reason_for("loop/body/l.bn")


def test_a_wrong_fold_in_a_loop_body_is_caught_at_its_layer_on_every_trip(monkeypatch):
    from bntool.folding import onnx_apply

    original = loop_model("inside", seed=13)
    real = onnx_apply._fold_layer

    def broken(flow, layer, sides):
        weight, bias = real(flow, layer, sides)
        return weight, bias * 1.01

    monkeypatch.setattr(onnx_apply, "_fold_layer", broken)
    _, report = folded_ok(original)
    assert report.bn_after == 1  # (named by its layer check, not by the graph output's: onnx_blame words differ)
    assert report.plan.reason_for("loop/body/l.bn").startswith(
        "rejected by verification: folded into `loop/body/l.conv`, layer `loop/body/l.bn` differed")


def test_a_loop_with_a_scan_output_folds_and_its_stacked_output_is_compared_trip_by_trip():
    original = loop_model("inside", seed=14, scan_output=True)
    folded, report = folded_ok(original)
    assert report.bn_after == 0 and run_ort(folded, feeds_of(original, np.random.default_rng(0)))["trace"].shape == \
        (2, *SHAPE)


def test_folds_in_an_if_inside_a_loop_that_runs_no_trip_are_not_taken_as_proven():
    original = nested_model(15)
    next(t for t in original.graph.initializer if t.name == "trips").CopyFrom(
        numpy_helper.from_array(np.array(0, np.int64), "trips"))
    _, report = folded_ok(original)
    assert report.bn_after == 2 and not report.plan.pairs
    assert all("the body `loop/body` ran no trip" in s.reason for s in report.plan.skips)


def test_a_bn_after_a_product_of_two_computed_tensors_is_refused_and_both_are_named():
    rng = np.random.default_rng(16)
    inits = [tensor("w", rng.normal(size=(4, 4, 3, 3)) * 0.3), *bn_inits("bn", 4, rng)]
    nodes = [conv("conv", "x", "w", "c"), helper.make_node("Sigmoid", ["c"], ["gate"]),
             helper.make_node("Mul", ["c", "gate"], ["m"], name="se"), bn("bn", "m", "y")]
    _, report = folded_ok(make(nodes, inits, ["y"]))
    assert report.bn_after == 1
    assert "`se` (Mul) combines `c` and `gate`, two computed tensors" in report.plan.reason_for("bn")


def test_a_raw_export_of_a_scripted_net_folds_the_bns_of_its_loop_and_its_branch():
    import io

    import torch
    from torch import nn

    from examples.models import randomize_bn_

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x, n: int):
            for _ in range(n):
                x = torch.relu(self.bn(self.conv(x)))
            if bool(x.sum() > 0):
                x = self.bn2(self.conv2(x))
            return x

    buffer = io.BytesIO()
    torch.onnx.export(torch.jit.script(randomize_bn_(Net(), seed=17).eval()), (torch.randn(1, 4, 6, 6), 3), buffer,
                      dynamo=False, do_constant_folding=False, input_names=["x", "n"])
    original = onnx.load_from_string(buffer.getvalue())
    x = np.random.default_rng(0).normal(size=(1, 4, 6, 6)).astype(np.float32)
    folded, report = fold_onnx(original, example_inputs={"x": x, "n": np.array(3)})
    check_valid(folded)
    assert report.passed and report.bn_after == 0
    assert {p.into for p in report.plan.pairs} == {"/Loop/body/conv/Conv", "/If/then_branch/conv2/Conv"}
    assert same(original, folded, x=x, n=np.array(3))


def test_a_body_value_too_large_for_memory_is_refused_before_anything_runs():
    from bntool.errors import InputError

    huge = [1 << 16, 1 << 16, 4, 4]

    def branch(tag):
        nodes = [helper.make_node("Expand", ["h", f"shape_{tag}"], [f"big_{tag}"], name=f"grow_{tag}"),
                 helper.make_node("ReduceSum", [f"big_{tag}"], [f"sum_{tag}"], keepdims=0)]
        graph = helper.make_graph(nodes, tag, [], [vi(f"sum_{tag}", F, [])], [tensor(f"shape_{tag}", huge, np.int64)])
        graph.value_info.append(vi(f"big_{tag}", F, huge))
        return graph

    original = if_model(18)
    original.graph.node.append(helper.make_node("If", ["flag"], ["z"], name="blow", then_branch=branch("then"),
                                                else_branch=branch("else")))
    original.graph.output.append(vi("z", F, []))
    with pytest.raises(InputError, match=r"`big_else` \(made by `blow/else_branch/grow_else`\) would take .* GiB"):
        fold_onnx(original)
