"""Merging parallel branches of one input into one conv (``bntool.fold``'s ``merge_branches``).

Every model has random BN statistics and affine parameters (and random layer
scales). A merged block must compute the original in float64 terms, hold one
conv and no BN; a refused add keeps its branches, with the reason, and the
forced merge of each refused case is shown to change the output (so the
refusal is needed). The look-alikes of examples/reparam.py end with as many
convs as their own reparameterize and no BN.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bntool
from bntool.folding import merge_math
from bntool.norms import is_batchnorm
from examples import reparam
from tests.conftest import randomize_bn


def _bn(c):
    return nn.BatchNorm2d(c)


class Branches(nn.Module):
    """``act(sum of branches(x))``, each branch a Sequential (or None: the identity)."""

    def __init__(self, *branches, act=True):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = Block(*branches, act=act)
        self.input_shape = (2, 3, 8, 8)

    def forward(self, x):
        return self.block(self.stem(x))


class Block(nn.Module):
    def __init__(self, *branches, act=True):
        super().__init__()
        self.branches = nn.ModuleList([b if b is not None else nn.Identity() for b in branches])
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        out = self.branches[0](x)
        for b in self.branches[1:]:
            out = out + b(x)
        return self.act(out)


class Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(c, 1, 1))

    def forward(self, x):
        return x * self.gamma


def _prepare(model, seed=0):
    torch.manual_seed(seed)
    model = randomize_bn(model, seed=seed)
    for m in model.modules():
        if isinstance(m, (Scale, reparam.LayerScale2d)):
            m.gamma.data.normal_()
    return model


def _counts(model):
    return (sum(isinstance(m, nn.Conv2d) for m in model.modules()), sum(is_batchnorm(m) for m in model.modules()))


def _assert_same(model, merged, x):
    with torch.no_grad():
        want = model.double()(x.double())
        got = merged.double()(x.double())
        model.float(), merged.float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # (the merged weights are rounded to float32 once)


KINDS = {
    "conv+bn, conv+bn": lambda: (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)),
                                 nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), _bn(8))),
    "conv with bias, no bn": lambda: (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8)), nn.Conv2d(8, 8, 1)),
    "bn alone": lambda: (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), _bn(8)), _bn(8)),
    "identity": lambda: (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8)), None),
    "scale": lambda: (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8)), Scale(8)),
    "avg pool + bn": lambda: (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8)),
                              nn.Sequential(nn.AvgPool2d(3, 1, 1), _bn(8))),
    "1x3 + 3x1 + 3x3": lambda: (nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8)),
                                nn.Sequential(nn.Conv2d(8, 8, (1, 3), padding=(0, 1)), _bn(8)),
                                nn.Sequential(nn.Conv2d(8, 8, (3, 1), padding=(1, 0)), _bn(8))),
    "grouped 3x3 + 1x1 of other groups + bn": lambda: (
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), _bn(8)),
        nn.Sequential(nn.Conv2d(8, 8, 1, groups=4), _bn(8)), _bn(8)),
    "depthwise 5x5 + 3x3 + identity": lambda: (nn.Sequential(nn.Conv2d(8, 8, 5, padding=2, groups=8), _bn(8)),
                                               nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), _bn(8)),
                                               None),
    "dilated 3x3 + 1x1": lambda: (nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2), _bn(8)),
                                  nn.Sequential(nn.Conv2d(8, 8, 1), _bn(8))),
    "stride 2, 4x4 + 2x2 centred": lambda: (nn.Sequential(nn.Conv2d(8, 8, 4, 2, padding=1), _bn(8)),
                                            nn.Sequential(nn.Conv2d(8, 8, 2, 2, padding=0), _bn(8))),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_branch_kind_merges_into_one_exact_conv(kind):
    model = _prepare(Branches(*KINDS[kind]()))
    x = torch.randn(model.input_shape)
    merged, report = bntool.fold(model, example_inputs=x)
    assert report.merge is not None and len(report.merge.merges) == 1 and report.merge.passed
    block = merged.block
    assert isinstance(block, torch.fx.GraphModule)
    assert _counts(block) == (1, 0) and isinstance(block.act, nn.ReLU)  # what follows the add is kept
    assert report.merge.merges[0].conv == "block.reparam_conv"
    _assert_same(model, merged, x)


def test_merge_math_matches_the_sum_of_convolutions_in_float64():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    a = merge_math.conv(torch.randn(8, 4, 3, 3), torch.randn(8), 1, 1, 1, 2)
    b = merge_math.conv(torch.randn(8, 2, 1, 1), torch.randn(8), 1, 0, 1, 4)
    c = merge_math.then_affine(merge_math.identity(8), torch.rand(8) + 0.5, torch.randn(8))
    s = merge_math.add(merge_math.add(a, b), c, -1.0)
    want = (F.conv2d(x, a.weight, a.bias, padding=1, groups=2) + F.conv2d(x, b.weight, b.bias, groups=4)
            - (x * c.scale.reshape(1, -1, 1, 1) + c.bias.reshape(1, -1, 1, 1)))
    got = F.conv2d(x, s.weight, s.bias, s.stride, s.padding, s.dilation, s.groups)
    assert s.groups == 2 and s.kernel == (3, 3)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------- refusals


def _forced(model, x, *branch_forms):
    """The output of ``model`` with its block's branches forced into one conv of the given forms."""
    total = branch_forms[0]
    for f in branch_forms[1:]:
        total = merge_math.add(total, f)
    with torch.no_grad():
        stem = model.stem(x).double()
        return model.block.act(F.conv2d(stem, total.weight, total.bias, total.stride, total.padding, total.dilation,
                                        total.groups))


def _conv_bn_form(seq):
    conv, bn = seq[0], seq[1]
    k = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    form = merge_math.conv_module(conv)
    return merge_math.then_affine(form, k, bn.bias.double() - k * bn.running_mean.double())


def _refused(model, x, *fragments):
    merged, report = bntool.fold(model, example_inputs=x)
    assert report.merge.merges == ()
    reasons = " ".join(s.reason for s in report.merge.skipped)
    for fragment in fragments:
        assert fragment in reasons
    _assert_same(model, merged, x)
    return merged


def test_an_activation_inside_a_branch_is_refused_and_forcing_it_changes_the_output():
    a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8), nn.ReLU())  # RepVGG#89
    b = nn.Sequential(nn.Conv2d(8, 8, 1), _bn(8))
    model = _prepare(Branches(a, b))
    x = torch.randn(model.input_shape)
    _refused(model, x, "not linear", "ReLU")
    forced = _forced(model, x, _conv_bn_form(a), _conv_bn_form(b))
    assert not torch.allclose(forced, model.double()(x.double()), atol=1e-3)


def test_branches_with_different_strides_are_refused_and_forcing_them_changes_the_output():
    a = nn.Sequential(nn.Conv2d(8, 8, 3, 1, padding=0), _bn(8))  # 8x8 -> 6x6
    b = nn.Sequential(nn.Conv2d(8, 8, 1, 2, padding=2), _bn(8))  # 8x8 -> 6x6 as well
    model = _prepare(Branches(a, b))
    x = torch.randn(model.input_shape)
    _refused(model, x, "different strides")
    fb = _conv_bn_form(b)  # forced: the 1x1 at the 3x3's centre, at stride 1
    fb = merge_math.Linear(fb.bias, 8, weight=fb.weight, stride=(1, 1), padding=(-1, -1), dilation=(1, 1))
    forced = _forced(model, x, _conv_bn_form(a), fb)
    assert forced.shape == model(x).shape
    assert not torch.allclose(forced, model.double()(x.double()), atol=1e-3)


def test_a_kernel_centred_only_by_padding_on_one_side_merges_exactly():
    """A 4x4 kernel at stride 2 with padding 1 reads taps -1..2 around each output's origin; a 1x1 with no padding
    reads tap 0: it goes at index 1 of the 4x4 (not its centre, which there is none of), exactly."""
    model = _prepare(Branches(nn.Sequential(nn.Conv2d(8, 8, 4, 2, padding=1), _bn(8)),
                              nn.Sequential(nn.Conv2d(8, 8, 1, 2, padding=0), _bn(8))))
    x = torch.randn(model.input_shape)
    merged, report = bntool.fold(model, example_inputs=x)
    assert report.merge.merges[0].kernel == (4, 4) and report.merge.merges[0].padding == (1, 1)
    _assert_same(model, merged, x)


def test_kernels_off_one_grid_are_refused_and_forcing_them_onto_it_changes_the_output():
    a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=2, dilation=2), _bn(8))  # taps -2, 0, 2
    b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8))  # taps -1, 0, 1: not on the dilated grid
    model = _prepare(Branches(a, b))
    x = torch.randn(model.input_shape)
    _refused(model, x, "do not lie on one grid")
    fb = _conv_bn_form(b)  # forced: as if dilated too
    fb = merge_math.Linear(fb.bias, 8, weight=fb.weight, stride=(1, 1), padding=(2, 2), dilation=(2, 2))
    assert not torch.allclose(_forced(model, x, _conv_bn_form(a), fb), model.double()(x.double()), atol=1e-3)


def test_an_even_kernel_padded_on_one_side_is_refused():
    a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8))
    b = nn.Sequential(nn.Conv2d(8, 8, 2, padding="same"), _bn(8))  # PyTorch pads 0 before, 1 after
    model = _prepare(Branches(a, b))
    _refused(model, torch.randn(model.input_shape), "padding `same` and an even kernel")


class ReadElsewhere(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 1), _bn(8))

    def forward(self, x):
        b = self.b(x)
        return torch.relu(self.a(x) + b), b.sigmoid()


def test_a_branch_read_elsewhere_is_refused():
    model = _prepare(nn.Sequential(nn.Conv2d(3, 8, 1), ReadElsewhere()))
    x = torch.randn(2, 3, 8, 8)
    merged, report = bntool.fold(model, example_inputs=x)
    assert report.merge.merges == ()
    assert any("is also read by" in s.reason for s in report.merge.skipped)
    assert not any(isinstance(m, torch.fx.GraphModule) for m in merged.modules())


def test_a_bn_not_in_eval_form_is_refused_and_merging_it_with_identity_statistics_changes_the_output():
    a = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, track_running_stats=False))
    b = nn.Sequential(nn.Conv2d(8, 8, 1), _bn(8))
    model = _prepare(Branches(a, b))
    x = torch.randn(model.input_shape)
    merged, report = bntool.fold(model, example_inputs=x)
    assert report.merge.merges == () and isinstance(merged.block, Block)
    assert any("not in eval form" in s.reason or "more than normalize" in s.reason for s in report.merge.skipped)
    fa = merge_math.conv_module(a[0])
    fa = merge_math.then_affine(fa, a[1].weight.double() / (1 + a[1].eps) ** 0.5, a[1].bias.double())
    assert not torch.allclose(_forced(model, x, fa, _conv_bn_form(b)), model.double()(x.double()), atol=1e-3)


def test_no_merge_branches_leaves_the_branches_to_the_fold():
    model = _prepare(Branches(*KINDS["bn alone"]()))
    merged, report = bntool.fold(model, example_inputs=torch.randn(model.input_shape), merge_branches=False)
    assert report.merge is None and not isinstance(merged.block, torch.fx.GraphModule)
    assert [s.bn for s in report.skipped] == ["block.branches.1"]


def test_a_merge_that_verification_blames_is_left_out_and_the_rest_kept(monkeypatch):
    from bntool.folding import merge_apply
    from bntool.folding import reparam as reparam_module

    real = merge_apply.merge_region

    def corrupt_the_second(model, region, *args, **kwargs):
        done = real(model, region, *args, **kwargs)
        if done.block == "2":
            with torch.no_grad():
                model.get_submodule(done.conv).weight[0].mul_(3)
        return done

    monkeypatch.setattr(reparam_module, "merge_region", corrupt_the_second)
    model = _prepare(reparam.yolov6_net())
    x = torch.randn(model.input_shape)
    merged, report = bntool.fold(model, example_inputs=x)
    assert [m.block for m in report.merge.merges] == ["0", "1"]
    assert [s.name for s in report.merge.rejected] == ["`2`"] and "rejected by verification" in \
        report.merge.rejected[0].reason
    assert report.passed and report.merge.passed and _counts(merged) == (4, 1)  # (block 2: two convs, its identity BN)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- files


def test_the_merged_model_round_trips_through_save_and_load(tmp_path):
    build = lambda: reparam.fastvit_t8(pos_emb=True, layers=(1, 1, 1, 1))
    model = _prepare(build())
    x = torch.randn(model.input_shape)
    merged, _ = bntool.fold(model, example_inputs=x)
    out = bntool.save(merged, tmp_path / "merged.safetensors", build=build)
    loaded = bntool.load(out, build()).eval()
    assert _counts(loaded) == _counts(merged) and _counts(loaded)[1] == 0
    with torch.no_grad():
        assert torch.equal(loaded(x), merged(x))


def test_a_file_whose_blocks_do_not_add_up_the_same_way_is_refused(tmp_path):
    model = _prepare(reparam.yolov6_net())
    merged, _ = bntool.fold(model, example_inputs=torch.randn(model.input_shape))
    out = bntool.save(merged, tmp_path / "merged.safetensors")
    with pytest.raises(bntool.errors.InputError, match="build the model from the code"):
        bntool.load(out, reparam.acnet_net())


def test_onnx_export_of_a_merged_model_has_one_conv_per_block(tmp_path):
    model = _prepare(reparam.yolov6_net())
    x = torch.randn(model.input_shape)
    report = bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=x)
    ops = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    assert ops.count("Conv") == 3 and "BatchNormalization" not in ops and "Add" not in ops
    assert len(report.fold.merge.merges) == 3


# ----------------------------------------------------------------------------- look-alikes


NETS = {
    "repvgg_a0": lambda: reparam.repvgg_a0(depths=(1, 2, 2, 1)),
    "mobileone_s0": lambda: reparam.mobileone_s0(depths=(1, 2, 2, 1), branches=2),
    "fastvit_t8": lambda: reparam.fastvit_t8(layers=(1, 1, 2, 1)),
    "fastvit_t8+repcpe": lambda: reparam.fastvit_t8(layers=(1, 1, 1, 1), pos_emb=True),
    "repvit_m1": lambda: reparam.repvit_m1(depths=(1, 1, 2, 1)),
    "acnet": reparam.acnet_net,
    "yolov6": reparam.yolov6_net,
    "dbb_style": reparam.dbb_style_net,
}


@pytest.mark.parametrize("name", list(NETS))
def test_each_look_alike_merges_to_no_more_convs_than_its_own_method_and_no_bn(name):
    model = _prepare(NETS[name]())
    x = torch.randn(model.input_shape)
    merged, report = bntool.fold(model, example_inputs=x)
    own = reparam.reparameterize_model(model).eval()
    convs, bns = _counts(merged)
    own_convs, _ = _counts(own)
    assert bns == 0 and convs <= own_convs and report.merge.skipped == () and report.merge.rejected == ()
    if name in ("acnet", "yolov6", "dbb_style"):  # no method of their own: every block is one conv
        assert convs == len(model) - 1
    with torch.no_grad():
        want = model.double()(x.double())
        model.float()
        assert (merged(x).double() - want).abs().max() <= report.merge.comparison.outputs[-1].tolerance
        torch.testing.assert_close(own(x), merged(x), atol=1e-3, rtol=1e-3)  # (the look-alike's own merge agrees)


def test_a_block_fx_cannot_trace_keeps_its_branches_with_the_reason():
    """DingXiaoH's DiverseBranchBlock pads with slice assignments (examples/archs.py): its forward cannot be
    rewritten, so even the branches that do add up linearly (k x k + 1 x 1) stay, and the report says why."""
    from examples import archs

    model = _prepare(archs.dbb_net())
    x = torch.randn(model.input_shape)
    merged, report = bntool.fold(model, example_inputs=x)
    assert report.merge.merges == () and {s.name for s in report.merge.skipped} == {"`0`", "`1`"}
    assert all("torch.fx cannot trace" in s.reason for s in report.merge.skipped)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- CLI

REPARAM_FILE = str(Path(reparam.__file__).resolve())


def test_the_cli_merges_by_default_reports_each_block_and_no_merge_branches_turns_it_off(cli, tmp_path):
    import json

    model = _prepare(reparam.yolov6_net())
    torch.save(model.state_dict(), tmp_path / "ckpt.pth")
    spec = f"{REPARAM_FILE}:yolov6_net"
    result = cli("fold", tmp_path / "ckpt.pth", "--model", spec, "--out", tmp_path / "m.safetensors", "--json")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert [m["block"] for m in data["merge"]["merged"]] == ["0", "1", "2"]
    assert data["merge"]["merged"][2]["kernel"] == [3, 3] and "2.rbr_identity" in data["merge"]["merged"][2]["branches"]
    loaded = bntool.load(tmp_path / "m.safetensors", reparam.yolov6_net()).eval()
    assert _counts(loaded) == (3, 0)
    x = torch.randn(model.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-4)
    human = cli("fold", tmp_path / "ckpt.pth", "--model", spec, "--dry-run")
    assert human.code == 0 and "Merged the branches of 3 block(s)" in human.out + human.err
    off = cli("fold", tmp_path / "ckpt.pth", "--model", spec, "--dry-run", "--json", "--no-merge-branches")
    data = json.loads(off.out)
    assert off.code == 0 and "merge" not in data and "2.rbr_identity" in [s["bn"] for s in data["skipped"]]


def test_a_1x1_then_kxk_branch_merges_when_exact_and_is_refused_when_a_shift_meets_the_padding():
    """DBB's 1x1 -> kxk: the kxk conv's zero padding pads the 1x1's output, so a shift between them (a BN) would
    be seen at the border: exact with no shift, refused with one (and forcing it changes the border)."""
    seq = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), nn.Conv2d(16, 8, 3, padding=1, groups=2, bias=False), _bn(8))
    model = _prepare(Branches(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8)), seq, _bn(8)))
    x = torch.randn(model.input_shape)
    merged, report = bntool.fold(model, example_inputs=x)
    assert len(report.merge.merges) == 1 and _counts(merged.block) == (1, 0)
    _assert_same(model, merged, x)
    shifted = nn.Sequential(nn.Conv2d(8, 16, 1, bias=False), _bn(16), nn.Conv2d(16, 8, 3, padding=1, bias=False))
    model = _prepare(Branches(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), _bn(8)), shifted))
    _refused(model, x, "padded border")
    first = merge_math.then_affine(merge_math.conv_module(shifted[0]), *_k_c(shifted[1]))
    forced = merge_math.conv_after(merge_math.Linear(first.bias, 8, weight=first.weight, stride=(1, 1),
                                                     padding=(0, 0), dilation=(1, 1)),
                                   merge_math.conv_module(shifted[2]).__class__(
                                       torch.zeros(8, dtype=torch.float64), 16,
                                       weight=shifted[2].weight.detach().double(), stride=(1, 1), padding=(0, 0),
                                       dilation=(1, 1)))
    forced = merge_math.Linear(forced.bias, 8, weight=forced.weight, stride=(1, 1), padding=(1, 1), dilation=(1, 1))
    assert not torch.allclose(_forced(model, x, _conv_bn_form(model.block.branches[0]), forced),
                              model.double()(x.double()), atol=1e-3)


def _k_c(bn):
    k = bn.weight.double() / (bn.running_var.double() + bn.eps).sqrt()
    return k, bn.bias.double() - k * bn.running_mean.double()
