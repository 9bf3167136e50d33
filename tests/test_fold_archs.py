"""``bntool fold`` on look-alikes of deployed architectures (``examples/archs.py``).

For every architecture, with random BN statistics and affine parameters:
the normalizations that still execute after folding (counted at the aten
level) are exactly those of the BNs left, each with its specific reason; the
folded model computes the original's float64 output; the activations and drop
layers of BN+act modules still run; verification never fails; and the CLI
(``bntool fold --out`` then ``bntool.load``) gives the same tensors and
outputs. The BNs left in pre-activation blocks really cannot be folded: a
forced fold through their activation changes the output.
"""

from __future__ import annotations

import copy
import json
import pickle
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import bntool
from bntool.folding.apply import apply_plan
from bntool.folding.plan import FoldPair, FoldPlan
from bntool.norms import is_batchnorm
from examples import archs
from tests.conftest import randomize_bn
from tests.fold_models import assert_computes_original

ARCHS_FILE = Path(archs.__file__).resolve()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one intra-op thread is as fast, and spares the spin-waits of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: aten ops that normalize: every BatchNorm kernel, and the ``rsqrt`` with which
#: torchvision's / timm's frozen BNs compute their scale (nothing else here uses it).
NORMALIZATION_OPS = frozenset({
    "batch_norm", "_batch_norm_impl_index", "native_batch_norm", "_native_batch_norm_legit",
    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit_functional", "_batch_norm_with_update",
    "_batch_norm_no_update", "cudnn_batch_norm", "miopen_batch_norm", "rsqrt",
})
ACTIVATION_OPS = frozenset({"relu", "relu_", "silu", "silu_", "hardswish", "hardswish_", "hardtanh", "hardtanh_",
                            "elu", "elu_", "sigmoid", "sigmoid_"})


class _AtenOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _aten_ops(model: nn.Module, inputs) -> Counter[str]:
    with torch.no_grad(), _AtenOps() as ops:
        model(*inputs)
    return ops.counts


def _normalizations(ops: Counter[str]) -> int:
    return sum(ops[name] for name in NORMALIZATION_OPS)


def _activations(ops: Counter[str]) -> dict[str, int]:
    return {name: n for name, n in ops.items() if name in ACTIVATION_OPS}


def _bn_calls(model: nn.Module, inputs) -> Counter[str]:
    """How many times each BN module of ``model`` is called in one forward pass."""
    calls: Counter[str] = Counter({n: 0 for n, m in model.named_modules() if is_batchnorm(m)})
    handles = [model.get_submodule(n).register_forward_hook(lambda *_, n=n: calls.update([n])) for n in calls]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return calls


def _inputs(model: nn.Module, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(model.input_shape, generator=g) * 2 + 0.5,)


# ----------------------------------------------------------------------------- the architectures

PRE_ACT = "runs `act` after normalizing, so no layer after it can absorb it"


@dataclass(frozen=True)
class Arch:
    """A look-alike and what fold must do to it.

    ``left``: every BN fold must leave, with fragments of its reason.
    ``gaps``: checks (``"plan"``, ``"untouched"``) bntool does not pass yet
    on this architecture, and why; they are expected to fail, strictly.
    """

    factory: str
    kwargs: dict = field(default_factory=dict)
    left: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gaps: dict[str, str] = field(default_factory=dict)

    def build(self) -> nn.Module:
        return getattr(archs, self.factory)(**self.kwargs)


def _cat_then(nxt: str) -> tuple[str, ...]:
    return ("(`cat`) stands between", nxt)


ARCHS = {
    # timm BatchNormAct2d everywhere: folded completely, activations kept
    "efficientnet-b0": Arch("efficientnet_like", {"depth": 0.25}),  # every stage, one block each
    "mobilenetv2": Arch("mobilenetv2_like", {"depth": 0.25}),
    "bn-act-relu-hardswish-silu-drop": Arch("bn_act_net"),
    "bn-act-bias-none": Arch("bn_act_without_bias"),
    "bn-act-weight-none": Arch("bn_act_without_weight"),
    "regnety": Arch("regnet_like"),
    "repvgg": Arch("repvgg_like", left={
        n: ("is also read by", "goes through `add`")
        for n in ("stages.0.1.identity", "stages.1.1.identity", "stages.1.2.identity")}),
    "mobileone": Arch("mobileone_like", left={
        n: ("is also read by", "goes through `add`") for n in ("stages.0.2.identity", "stages.0.3.identity")}),
    # pre-activation: the norm before each block's first conv stays (shortcut reads its input; act after it)
    "resnetv2-preact": Arch("resnetv2_like", left={
        "stages.0.blocks.0.norm1": ("`stem.pool` is a MaxPool2d", PRE_ACT),
        "stages.0.blocks.1.norm1": ("output of `add` is also read by", PRE_ACT),
        "stages.1.blocks.0.norm1": ("(`add`) stands between", PRE_ACT),
        "stages.1.blocks.1.norm1": ("output of `add` is also read by", PRE_ACT),
        "norm": ("(`add`) stands between", PRE_ACT),
    }),
    "densenet-torchvision": Arch("densenet_like", left={
        **{f"features.denseblock{b}.denselayer{i}.norm1": _cat_then(f"`features.denseblock{b}.denselayer{i}.relu1`")
           for b in (1, 2) for i in (1, 2)},
        "features.transition1.norm": _cat_then("`features.transition1.relu`"),
        "features.norm5": _cat_then("goes through `relu`"),
    }),
    "densenet-timm": Arch("densenet_like", {"norm_act": True}, left={
        **{f"features.denseblock{b}.denselayer{i}.norm1": _cat_then(PRE_ACT) for b in (1, 2) for i in (1, 2)},
        "features.transition1.norm": _cat_then(PRE_ACT),
        "features.norm5": _cat_then(PRE_ACT),
    }),
    "dpn": Arch("dpn_like", left={
        "features.conv2_1.c1x1_w_s1.bn": ("also read by `features.conv2_1.c1x1_a.bn`", PRE_ACT),
        "features.conv2_1.c1x1_a.bn": ("also read by `features.conv2_1.c1x1_w_s1.bn`", PRE_ACT),
        "features.conv2_2.c1x1_a.bn": _cat_then(PRE_ACT),
        "features.conv3_1.c1x1_w_s2.bn": ("output of `cat` is also read by", PRE_ACT),
        "features.conv3_1.c1x1_a.bn": ("output of `cat` is also read by", PRE_ACT),
        "features.conv3_2.c1x1_a.bn": _cat_then(PRE_ACT),
        "features.conv5_bn_ac.bn": _cat_then(PRE_ACT),
    }),
    "levit-blocks": Arch("levit_like", {"head": False}),
    "levit": Arch("levit_like"),  # its NormLinear head: BatchNorm1d -> Dropout -> Linear, folded forward
    # frozen BNs of other libraries
    "torchvision-frozen-resnet": Arch("torchvision_frozen_resnet"),
    "timm-frozen-efficientnet": Arch("timm_frozen_efficientnet"),
    "detectron2-frozen-separate": Arch("conv_detectron2_frozen_bn"),
    "detectron2-frozen-resnet": Arch("detectron2_frozen_resnet"),  # the BN runs inside detectron2's Conv2d
    # mmcv and PyTorch's fusion tests
    "mmcv-bn-conv-bn": Arch("mmcv_fuse_conv_bn_model"),
    "bn-linear-bn": Arch("bn_linear_bn"),
    "quant-conv-bn-relu-conv-bn": Arch("quant_fusion_with_bias"),
    "quant-linear-bn1d": Arch("quant_linear_bn"),
    "quant-convtranspose-bn": Arch("quant_conv_transpose_bn"),
    "linear-bn1d-one-channel": Arch("linear_bn1d_one_channel"),
    "dbb": Arch("dbb_net", left={  # DiverseBranchBlock: BN-and-pad reads its BN's tensors; a BN after a pool
        **{f"{b}.dbb_avg.bn.bn": ("read outside its own call",) for b in "01"},
        **{f"{b}.dbb_1x1_kxk.bn1.bn": ("read outside its own call",) for b in "01"},
        **{f"{b}.dbb_avg.avgbn": ("an AvgPool2d",) for b in "01"}}),
    "yolov8": Arch("yolov8_like"),  # fx cannot trace it (C2f iterates a chunk): recorded; Detect caches anchors
    "dcgan-generator": Arch("dcgan_generator"),  # Linear -> view -> BatchNorm2d: each BN channel a block of features
    "dcgan-discriminator": Arch("dcgan_discriminator", left={  # the last BN folds forward across the flatten
        "model.6": ("zero-pads",), "model.10": ("zero-pads",)}),
    # module reuse and call forms
    "block-called-twice": Arch("block_called_twice"),
    "bn-shared-by-two-convs": Arch("bn_shared_by_two_convs"),
    "scalar-mul-add-between": Arch("scalar_ops_between"),
    "bn-keyword-call": Arch("keyword_bn_call"),
    "single-bn": Arch("single_bn", left={"": ("the model is a single BatchNorm",)}),
}


def _params(check: str) -> list:
    """Every architecture; where bntool has a known gap in ``check``, expected to fail (strictly)."""
    return [pytest.param(name, id=name, marks=[pytest.mark.xfail(strict=True, reason=a.gaps[check])]
                         if check in a.gaps else []) for name, a in ARCHS.items()]


@dataclass
class Folded:
    original: nn.Module
    folded: nn.Module
    inputs: tuple[torch.Tensor, ...]
    report: bntool.FoldReport
    state_before: dict[str, torch.Tensor]  # the original's state dict before folding
    attributes_before: dict[str, set[str]]  # each module's attribute names before folding


_FOLDED: dict[str, Folded] = {}


def _folded(name: str) -> Folded:
    """An architecture with random BN state, and its fold (strict: a verification failure raises), once per session."""
    if name not in _FOLDED:
        torch.manual_seed(0)
        model = randomize_bn(ARCHS[name].build(), seed=1)
        inputs = _inputs(model)
        before = copy.deepcopy(model.state_dict())
        with torch.no_grad():  # what the model's own eval forward caches on itself (YOLO's anchors) is not the fold's
            model.eval()(*inputs)
        attributes = {n: set(vars(m)) for n, m in model.named_modules()}
        # the fold rules alone: merging parallel branches (on by default) is tests/test_merge.py's
        folded, report = bntool.fold(model, example_inputs=inputs, strict=True, merge_branches=False)
        _FOLDED[name] = Folded(model, folded, inputs, report, before, attributes)
    return _FOLDED[name]


# ----------------------------------------------------------------------------- every architecture


def test_the_op_count_sees_every_kind_of_normalization():
    """One normalization per BN call, whatever the BN's library: the counts below can be trusted."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), archs.BatchNormAct2d(4), archs.TorchvisionFrozenBatchNorm2d(4),
        archs.Detectron2FrozenBatchNorm2d(4), archs.FrozenBatchNormAct2d(4), nn.Flatten(), nn.BatchNorm1d(4 * 16),
    )
    randomize_bn(model)
    ops = _aten_ops(model, (torch.randn(2, 3, 4, 4),))
    assert _normalizations(ops) == 6
    assert _activations(ops) == {"relu_": 2}


@pytest.mark.parametrize("name", _params("plan"))
def test_folded_model_runs_only_the_normalizations_that_must_stay(name):
    f = _folded(name)
    model, folded, inputs, report = f.original, f.folded, f.inputs, f.report
    expected = ARCHS[name].left
    calls = _bn_calls(model, inputs)
    assert _normalizations(_aten_ops(model, inputs)) == sum(calls.values())
    assert _normalizations(_aten_ops(folded, inputs)) == sum(calls[bn] for bn in expected)
    assert {s.bn for s in report.plan.skips} == set(expected)
    assert {p.bn for p in report.plan.pairs} == set(calls) - set(expected)
    for bn, fragments in expected.items():
        reason = report.plan.reason_for(bn)
        assert all(f in reason for f in fragments), (bn, reason)


@pytest.mark.parametrize("name", list(ARCHS))
def test_folded_model_computes_the_original_without_a_verification_failure(name):
    f = _folded(name)  # strict: any verification failure would have raised
    assert f.report.comparison.passed and f.report.rejected == ()
    assert_computes_original(f.folded, f.original, f.inputs)
    assert_computes_original(f.folded, f.original, _inputs(f.original, seed=1))  # not only the verification inputs


@pytest.mark.parametrize("name", list(ARCHS))
def test_activations_of_bn_act_modules_still_run(name):
    f = _folded(name)
    assert _activations(_aten_ops(f.folded, f.inputs)) == _activations(_aten_ops(f.original, f.inputs))


@pytest.mark.parametrize("name", _params("untouched"))
def test_fold_leaves_the_given_model_as_it_was(name):
    """Same tensors, and still picklable: nothing of the fold's tracing is left behind in the user's modules."""
    f = _folded(name)
    state = f.original.state_dict()
    assert state.keys() == f.state_before.keys()
    assert all(torch.equal(f.state_before[k], v) for k, v in state.items())
    assert {n: set(vars(m)) for n, m in f.original.named_modules()} == f.attributes_before  # no `_tensor_constant0`
    pickle.dumps(f.original)


def test_folded_levit_holds_no_tracing_leftovers():
    """timm's LeViT caches attention biases per device in a dict: tracing must not leave an fx Proxy in it."""
    f = _folded("levit-blocks")
    with torch.no_grad():
        f.folded(*f.inputs)
    cache = f.folded.blocks[0].attn.attention_bias_cache
    assert all(isinstance(v, torch.Tensor) for v in cache.values()), cache
    pickle.dumps(f.folded)


#: One of each thing a recipe must rebuild on a fresh model: BN+act rewritten (with drop, with act Identity, with a
#: bias the BN lacked), pre-activation BNs left, the three foreign frozen BNs, a fold through reshapes, through
#: scalar steps, into two producers, into one conv from both sides, into a block called twice.
CLI_ROUND_TRIP = ["bn-act-relu-hardswish-silu-drop", "bn-act-bias-none", "resnetv2-preact", "dpn", "levit-blocks",
                  "torchvision-frozen-resnet", "timm-frozen-efficientnet", "detectron2-frozen-separate",
                  "scalar-mul-add-between", "bn-shared-by-two-convs", "mmcv-bn-conv-bn", "block-called-twice",
                  "dcgan-generator", "dcgan-discriminator", "dbb", "yolov8"]


@pytest.mark.parametrize("name", CLI_ROUND_TRIP)
def test_cli_fold_then_load_gives_the_same_tensors_and_outputs(cli, tmp_path, name):
    f = _folded(name)
    arch = ARCHS[name]
    checkpoint, out = tmp_path / "trained.pth", tmp_path / "folded.safetensors"
    torch.save(f.original.state_dict(), checkpoint)
    result = cli("fold", checkpoint, "--model", f"{ARCHS_FILE}:{arch.factory}", "--model-args",
                 json.dumps(arch.kwargs), "--out", out, "--json")
    assert result.code == 0, result.err
    assert len(json.loads(result.out)["folded"]) == len(f.report.plan.pairs)
    loaded = bntool.load(out, model=arch.build()).eval()
    expected = f.folded.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    with torch.no_grad():
        got, expected_out = tree_leaves(loaded(*f.inputs)), tree_leaves(f.folded(*f.inputs))
    assert len(got) == len(expected_out) and all(torch.equal(a, b) for a, b in zip(got, expected_out))
    assert _aten_ops(loaded, f.inputs) == _aten_ops(f.folded, f.inputs)


# ----------------------------------------------------------------------------- BN + act modules


def test_bn_act_keeps_its_drop_layer_and_activation_in_the_bns_place():
    f = _folded("bn-act-relu-hardswish-silu-drop")
    folded, pairs = f.folded, {p.bn: p for p in f.report.plan.pairs}
    assert pairs["bn1"].bn_becomes == "rewritten" and pairs["bn1"].keeps == ("drop", "act")
    assert pairs["ds.bn2"].keeps == ("act",)
    assert pairs["bn2"].bn_becomes == "removed"  # act Identity, drop Identity: nothing left to run
    assert isinstance(folded.bn1.drop, nn.Dropout) and folded.bn1.drop.p == 0.1
    assert isinstance(folded.bn1.act, nn.ReLU) and isinstance(folded.ds.bn2.act, nn.Hardswish)
    assert isinstance(folded.bn2, nn.Identity)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert torch.equal(folded.ds.bn2(x.clone()), nn.functional.hardswish(x))  # (its Hardswish is in place)
    torch.manual_seed(0)  # the drop layer is the model's own: in training it drops
    assert (copy.deepcopy(folded.bn1).train()(torch.ones(4, 8, 5, 5)) == 0).any()


def test_exported_bn_act_network_has_no_batchnorm_and_every_activation(tmp_path):
    """The exporter's own BN fusion is off: what is left in the file is what bntool folded."""
    f = _folded("bn-act-relu-hardswish-silu-drop")
    path = tmp_path / "net.onnx"
    report = bntool.export_onnx(f.original, path, example_inputs=f.inputs, optimize=False)
    assert report.written and report.passed
    nodes = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert nodes["BatchNormalization"] == 0
    # ReLU once; Hardswish in the DS block's two norms; SiLU (Sigmoid * x) in three places plus the SE gate
    assert (nodes["Relu"], nodes["HardSwish"], nodes["Sigmoid"]) == (1, 2, 4), nodes


# ----------------------------------------------------------------------------- what must not be folded


def _forward_fold(model: nn.Module, bn: str, into: str) -> nn.Module:
    """``model`` with ``bn`` folded forward into ``into`` whatever runs between them (its act kept)."""
    plain = type(model.get_submodule(bn)) is nn.BatchNorm2d
    pair = FoldPair(bn, into, "forward", "removed" if plain else "rewritten", "Conv2d", rank=4)
    return apply_plan(copy.deepcopy(model), FoldPlan((pair,), (), "forced"))


PRE_ACTIVATION = {
    "resnetv2-norm1-into-conv1": ("resnetv2_like", {}, "stages.0.blocks.1.norm1", "stages.0.blocks.1.conv1", "act"),
    "densenet-timm-norm1-into-conv1": ("densenet_like", {"norm_act": True}, "features.denseblock1.denselayer2.norm1",
                                       "features.denseblock1.denselayer2.conv1", "act"),
    "densenet-torchvision-norm1-over-relu1": ("densenet_like", {}, "features.denseblock1.denselayer2.norm1",
                                              "features.denseblock1.denselayer2.conv1", None),
    "dpn-bn-act-conv": ("dpn_like", {}, "features.conv2_2.c1x1_a.bn", "features.conv2_2.c1x1_a.conv", "act"),
}


@pytest.mark.parametrize("name", list(PRE_ACTIVATION))
def test_pre_activation_norms_really_cannot_fold_forward(name):
    """Forcing the forward fold through the activation changes the output; without the activation it would not.

    (That fold leaves these BNs, with the activation as the reason, is checked with the architectures above.)
    """
    factory, kwargs, bn, into, act = PRE_ACTIVATION[name]
    torch.manual_seed(0)
    model = randomize_bn(getattr(archs, factory)(**kwargs), seed=1)
    inputs = _inputs(model)
    assert not bntool.compare(model, _forward_fold(model, bn, into), inputs).passed
    if act is None:  # torchvision: the ReLU is a module of its own between the BN and the conv
        model.get_submodule(bn.rsplit(".", 1)[0]).relu1 = nn.Identity()
    else:
        setattr(model.get_submodule(bn), act, nn.Identity())
    assert bntool.compare(model, _forward_fold(model, bn, into), inputs).passed


# ----------------------------------------------------------------------------- specific rules


def _report(name: str) -> bntool.FoldReport:
    return _folded(name).report


def _pairs(name: str) -> list[tuple[str, str, str]]:
    return sorted((p.bn, p.into, p.direction) for p in _report(name).plan.pairs)


def test_block_called_twice_folds_once_into_its_conv():
    assert _pairs("block-called-twice") == [("block.bn", "block.conv", "backward")]


def test_bn_shared_by_two_convs_folds_into_each():
    assert _pairs("bn-shared-by-two-convs") == [("bn", "conv1", "backward"), ("bn", "conv2", "backward")]


def test_scalar_multiply_and_add_between_conv_and_bn_are_kept_and_accounted_for():
    [pair] = _report("scalar-mul-add-between").plan.pairs
    assert (pair.into, pair.through) == ("conv", (0.5, 2.0))


def test_bn_on_the_input_and_bn_after_the_same_layer_both_fold():
    """mmcv's BN -> ConvModule: the input BN folds forward and the block's BN backward, into one conv."""
    assert _pairs("mmcv-bn-conv-bn") == [("0", "1.conv", "forward"), ("1.bn", "1.conv", "backward"),
                                         ("2.bn", "2.conv", "backward")]
    assert _pairs("bn-linear-bn") == [("0", "1", "forward"), ("2", "1", "backward")]


def test_levit_linear_norm_folds_through_its_reshapes():
    pairs = _pairs("levit-blocks")
    assert ("blocks.0.attn.qkv.bn", "blocks.0.attn.qkv.linear", "backward") in pairs
    assert ("blocks.1.mlp.ln2.bn", "blocks.1.mlp.ln2.linear", "backward") in pairs
    assert ("stem.conv3.bn", "stem.conv3.linear", "backward") in pairs


def test_a_users_hook_on_a_folded_bn_sees_what_it_saw_before():
    torch.manual_seed(0)
    model = randomize_bn(archs.bn_act_net(), seed=1)
    seen: list[torch.Tensor] = []
    model.bn1.register_forward_hook(lambda m, args, out: seen.append(out.clone()))
    model.conv_head.register_forward_hook(lambda m, args, out: None)  # a hook on a producer: that BN stays
    inputs = _inputs(model)
    folded, report = bntool.fold(model, example_inputs=inputs)
    assert "bn1" in {p.bn for p in report.plan.pairs}
    assert "forward hooks" in report.plan.reason_for("bn2")
    seen.clear()
    with torch.no_grad():
        model(*inputs)
        folded(*inputs)
    assert len(seen) == 2
    torch.testing.assert_close(seen[1], seen[0], rtol=1e-5, atol=1e-5)


def test_detectron2_frozen_bn_folds_with_its_own_eps():
    """Its eps is 1e-3 on running_var down to 0.1: the float64 check above would see a fold made with another eps."""
    f = _folded("detectron2-frozen-separate")
    assert f.original.bn1.eps == 1e-3 and len(f.report.plan.pairs) == 2
    wrong = copy.deepcopy(f.original)
    wrong.bn1.eps = 1e-5
    with pytest.raises(AssertionError):
        assert_computes_original(f.folded, wrong, f.inputs)


@pytest.mark.parametrize("name,seed", [("yolov8", 20), ("repvgg", 13)])
def test_a_float64_model_folds_without_a_false_rejection(name, seed):
    """A float64 model's reference is the model itself, so only the floor of the tolerance holds the fold's own
    rounding; these two were rejected at 1.04x and 1.28x of an 8-unit floor."""
    torch.manual_seed(seed)
    model = randomize_bn(ARCHS[name].build(), seed=seed).eval().double()
    x = torch.randn(*model.input_shape, dtype=torch.float64)
    folded, report = bntool.fold(model, example_inputs=(x,))
    assert report.rejected == (), [(s.bn, s.reason) for s in report.rejected]
    assert report.comparison.passed
