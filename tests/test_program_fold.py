"""``bntool.fold`` of ``torch.export`` programs: one small program per rule and per known bug of other passes.

Every model has random BN statistics and affine parameters. Each fold is
checked against the original module in float64 terms (``assert_close`` with
tolerances of a few float32 units), for structure (BN nodes left), for
validity (``module()`` runs, ``torch.export.save`` / ``load`` round trip,
``run_decompositions``) and, for each refusal, a forced fold (the refused
pair applied anyway) must change the output: the refusal is needed.
"""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from torch import nn
from torch.export import Dim

import bntool
from bntool.errors import InputError
from bntool.folding.program import ProgramFold, plan_program
from bntool.folding.program_apply import apply_program
from bntool.graph.program import BN_OPS, TRAINING_BN_OPS, ProgramGraph
from bntool.graph.program_layers import layer_of
from examples.archs import BatchNormAct2d
from tests.conftest import randomize_bn

IRS = ["default", "decomposed"]


def bn_nodes(program) -> int:
    return sum(n.op == "call_function" and (n.target in BN_OPS or n.target in TRAINING_BN_OPS)
               for n in program.graph.nodes)


def export(model: nn.Module, *inputs, ir: str = "default", **kwargs):
    program = torch.export.export(randomize_bn(model), inputs, **kwargs)
    return program.run_decompositions() if ir == "decomposed" else program


def roundtrip(program):
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    return torch.export.load(buffer)


def assert_valid_and_equal(original, folded, *inputs, atol=2e-5):
    """``folded`` computes what ``original`` does, also after save / load and run_decompositions."""
    want = original.module()(*inputs)
    for candidate in (folded, roundtrip(folded), folded.run_decompositions()):
        torch.testing.assert_close(candidate.module()(*inputs), want, atol=atol, rtol=1e-4)
    placeholders = [n for n in folded.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == len(folded.graph_signature.input_specs)
    targets = {s.target for s in folded.graph_signature.input_specs if s.target}
    assert targets == set(folded.state_dict) | set(folded.constants)  # nothing dangling, nothing missing


def forced(program, bn: str, layer_name: str, direction: str):
    """The program with ``bn`` folded into ``layer_name`` although the rules refused it."""
    pg = ProgramGraph(program)
    site = next(s for s in pg.bn_sites() if s.name == bn)
    layer = next(layer_of(pg, n) for n in program.graph.nodes if layer_of(pg, n) is not None
                 and layer_of(pg, n).name == layer_name)
    return apply_program(program, (ProgramFold(site, layer, direction, (1.0, 0.0), site.output.name),))[0]


class Seq(nn.Sequential):
    pass


@pytest.mark.parametrize("ir", IRS)
@pytest.mark.parametrize("case", ["conv1d", "conv2d-grouped", "conv3d", "convT2d-grouped", "convT1d", "convT3d",
                                  "conv-no-bias", "affine-false", "bn-act"])
def test_backward_folds_every_conv_kind(case, ir):
    torch.manual_seed(0)
    dims = {"conv1d": 1, "conv3d": 3, "convT1d": 1, "convT3d": 3}.get(case, 2)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    convt = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    if case.startswith("convT"):
        layer = convt(4, 6, 3, groups=2 if "grouped" in case else 1, stride=2)  # executorch#22517
    else:
        layer = conv(4, 6, 3, groups=2 if "grouped" in case else 1, bias=case != "conv-no-bias")
    bn = (BatchNormAct2d(6, act_layer=nn.SiLU) if case == "bn-act"
          else norm(6, affine=case != "affine-false"))
    x = torch.randn(2, 4, *([6] * dims))
    program = export(Seq(layer, bn, nn.ReLU()), x, ir=ir)
    folded, report = bntool.fold(program)
    assert bn_nodes(program) == 1 and bn_nodes(folded) == 0
    assert [(p.bn, p.into, p.direction) for p in report.done] == [("1", "0", "backward")]
    assert report.passed and not report.skipped
    assert_valid_and_equal(program, folded, x)
    assert bn_nodes(program) == 1  # the original is not changed


@pytest.mark.parametrize("ir", IRS)
def test_linear_on_n_c_folds_and_mm_gets_a_bias(ir):
    x = torch.randn(8, 5)
    program = export(Seq(nn.Linear(5, 7, bias=False), nn.BatchNorm1d(7)), x, ir=ir)
    folded, report = bntool.fold(program)
    assert bn_nodes(folded) == 0 and report.passed
    assert_valid_and_equal(program, folded, x)
    assert "0.bias" in folded.state_dict


class LinearOnSequence(nn.Module):
    """executorch#17736: Linear over L of an (N, C, L) tensor, then BatchNorm1d(C): C == L, so shapes agree."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.bn = nn.BatchNorm1d(6)

    def forward(self, x):
        return self.bn(self.fc(x))


@pytest.mark.parametrize("ir", IRS)
def test_linear_on_n_c_l_is_the_wrong_axis(ir):
    x = torch.randn(3, 6, 6)
    program = export(LinearOnSequence(), x, ir=ir)
    folded, report = bntool.fold(program)
    assert not report.done and bn_nodes(folded) == 1
    reason = report.skipped[0].reason  # (the decomposed IR runs the Linear as a view, an mm, and a view back)
    assert ("Linear's features are on the last axis" if ir == "default" else
            "the reshape between `fc` and the BN does not map each channel of `fc`") in reason
    broken = forced(program, "bn", "fc", "backward")
    assert not torch.allclose(broken.module()(x), program.module()(x), atol=1e-3)


class SecondReader(nn.Module):
    """executorch#20601: the conv's output is read by the BN and by an add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize("ir", IRS)
def test_a_producer_with_other_readers_is_refused(ir):
    x = torch.randn(2, 3, 6, 6)
    program = export(SecondReader(), x, ir=ir)
    _, report = bntool.fold(program)
    assert not report.done
    reason = report.skipped[0].reason
    assert "is also read by" in reason and "`conv`" in reason
    broken = forced(program, "bn", "conv", "backward")
    assert not torch.allclose(broken.module()(x), program.module()(x), atol=1e-3)


class SharedWeight(nn.Module):
    """pytorch/ao#2795: one conv (one weight) in two chains, each with its own BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn1 = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.conv(x)) - self.bn2(self.conv(x * 2))


@pytest.mark.parametrize("ir", IRS)
def test_a_shared_weight_gets_a_copy_per_fold(ir):
    x = torch.randn(2, 3, 6, 6)
    program = export(SharedWeight(), x, ir=ir)
    folded, report = bntool.fold(program)
    assert bn_nodes(folded) == 0 and len(report.done) == 2
    assert_valid_and_equal(program, folded, x)
    weights = [n for n in folded.graph.nodes if n.op == "placeholder" and "weight" in n.name]
    assert len(weights) == 2  # one per chain; the first is its own again, the second a copy


class ForwardOnly(nn.Module):
    """The BN reads a model input: it folds forward into the conv after it (no padding) or the linear."""

    def __init__(self, padding: int = 0, linear: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm2d(3) if not linear else nn.BatchNorm1d(3)
        self.conv = nn.Conv2d(3, 4, 3, padding=padding) if not linear else nn.Linear(3, 4)

    def forward(self, x):
        return self.conv(self.bn(x) * 0.5)


@pytest.mark.parametrize("ir", IRS)
@pytest.mark.parametrize("linear", [False, True], ids=["conv", "linear"])
def test_forward_fold_into_the_reader(linear, ir):
    x = torch.randn(4, 3) if linear else torch.randn(2, 3, 6, 6)
    program = export(ForwardOnly(linear=linear), x, ir=ir)
    folded, report = bntool.fold(program)
    assert [(p.into, p.direction, p.through) for p in report.done] == [("conv", "forward", (0.5, 0.0))]
    assert_valid_and_equal(program, folded, x)


@pytest.mark.parametrize("ir", IRS)
def test_forward_fold_into_a_padded_conv_is_refused(ir):
    x = torch.randn(2, 3, 6, 6)
    program = export(ForwardOnly(padding=1), x, ir=ir)
    _, report = bntool.fold(program)
    assert not report.done and "zero-pads its input" in report.skipped[0].reason
    broken = forced(program, "bn", "conv", "forward")
    assert not torch.allclose(broken.module()(x), program.module()(x), atol=1e-3)


class ScalarsAndReshape(nn.Module):
    """Linear -> view -> * 2 + 1 -> BatchNorm2d (a DCGAN generator's head, each BN channel a block of features)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3 * 4 * 4)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, z):
        return self.bn(self.fc(z).view(-1, 3, 4, 4) * 2 + 1).relu()


@pytest.mark.parametrize("ir", IRS)
def test_scalar_steps_and_channel_keeping_reshapes(ir):
    z = torch.randn(2, 5)
    program = export(ScalarsAndReshape(), z, ir=ir)
    folded, report = bntool.fold(program)
    assert bn_nodes(folded) == 0 and report.done[0].through == (2.0, 1.0)
    assert_valid_and_equal(program, folded, z)


def test_dynamic_shapes_are_kept():
    x = torch.randn(4, 3, 8, 8)
    batch = Dim("batch", min=2, max=64)
    program = export(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x, dynamic_shapes=({0: batch},))
    folded, _ = bntool.fold(program)
    assert str(folded.range_constraints) == str(program.range_constraints)
    other = torch.randn(9, 3, 8, 8)
    torch.testing.assert_close(roundtrip(folded).module()(other), program.module()(other), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("ir", IRS)
def test_a_program_in_train_mode_is_refused(ir):
    x = torch.randn(4, 3, 8, 8)
    program = torch.export.export(randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).train(), (x,))
    program = program.run_decompositions() if ir == "decomposed" else program  # (_native_batch_norm_legit_functional)
    with pytest.raises(InputError, match=r"BatchNorm `1` normalizes with each batch's statistics.*model.eval\(\)"):
        bntool.fold(program)
    assert plan_program(program).training


def test_a_fold_verification_blames_is_dropped_and_the_rest_kept(monkeypatch):
    """One fold made wrong in one channel: verification rejects it alone, the other stays folded."""
    from bntool.folding import program_apply

    x = torch.randn(2, 3, 8, 8)
    program = export(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)), x)
    real = program_apply.scale_producer

    def corrupt(weight, bias, k, c, **kwargs):
        new_weight, new_bias = real(weight, bias, k, c, **kwargs)
        if new_weight.shape[0] == 5:
            new_bias = new_bias.clone()
            new_bias[2] += 1e-3
        return new_weight, new_bias

    monkeypatch.setattr(program_apply, "scale_producer", corrupt)
    folded, report = bntool.fold(program)
    assert [p.bn for p in report.done] == ["1"] and [s.bn for s in report.rejected] == ["3"]
    assert "rejected by verification" in report.rejected[0].reason
    assert report.passed and bn_nodes(folded) == 1
    with pytest.raises(bntool.VerificationError):
        bntool.fold(program, strict=True)


def test_non_finite_never_verifies():
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    program = export(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x)
    with pytest.raises(bntool.VerificationError, match="non-finite"):
        bntool.fold(program, example_inputs=(x,))


def test_inputs_from_shapes_when_the_program_stores_none():
    x = torch.randn(2, 3, 8, 8)
    program = export(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), x, dynamic_shapes=({0: Dim("b", max=32)},))
    program = dataclasses.replace(program) if False else program
    program._example_inputs = None
    from bntool.folding.program_fold import program_inputs

    with pytest.raises(InputError, match=r"dynamic shape .* pass `input_shapes`"):
        program_inputs(program, None, None, 0)
    (made,) = program_inputs(program, None, [(3, 3, 8, 8)], 0)
    assert made.shape == (3, 3, 8, 8)


#: look-alikes that export quickly (examples/archs.py), each with the IR it is checked in
ARCH_CASES = [("bn_act_net", "default"), ("bn_act_net", "decomposed"), ("levit_like", "decomposed"),
              ("dcgan_generator", "default"), ("quant_conv_transpose_bn", "default"),
              ("block_called_twice", "default"), ("bn_shared_by_two_convs", "decomposed"),
              ("mmcv_fuse_conv_bn_model", "default"), ("resnetv2_like", "default"), ("dbb_net", "default"),
              ("scalar_ops_between", "decomposed"), ("linear_bn1d_one_channel", "default")]


@pytest.mark.parametrize(("arch", "ir"), ARCH_CASES, ids=[f"{a}-{i}" for a, i in ARCH_CASES])
def test_look_alikes_fold_no_worse_than_the_module_fold(arch, ir):
    from examples import archs

    model = randomize_bn(getattr(archs, arch)(), seed=3)
    x = torch.randn(*model.input_shape)
    program = export(model, x, ir=ir)
    folded, report = bntool.fold(program)
    module_folded, _ = bntool.fold(model, example_inputs=(x,))
    module_left = bn_nodes(torch.export.export(module_folded, (x,)))
    assert bn_nodes(folded) <= module_left
    assert bn_nodes(folded) == len(report.skipped) and all(s.reason for s in report.skipped)
    assert report.passed
    torch.testing.assert_close(folded.module()(x), model(x), atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(roundtrip(folded).module()(x), model(x), atol=5e-5, rtol=1e-4)


def _fold_on(device: str, ir: str) -> None:
    model = randomize_bn(Seq(nn.Conv2d(4, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 1),
                             nn.BatchNorm2d(6, affine=False))).to(device)
    x = torch.randn(2, 4, 8, 8, device=device)
    program = export(model, x, ir=ir)
    folded, report = bntool.fold(program)
    assert report.passed and bn_nodes(folded) == 0
    assert all(t.device.type == device for t in folded.state_dict.values())
    assert_valid_and_equal(program, folded, x)


@pytest.mark.cuda
@pytest.mark.parametrize("ir", IRS)
def test_a_program_exported_on_cuda_folds_there(ir):
    _fold_on("cuda", ir)


def test_a_program_folds_where_its_tensors_are():
    _fold_on("cpu", "default")


def test_a_bn_without_running_statistics_is_left_with_its_reason():
    x = torch.randn(4, 3, 8, 8)
    model = randomize_bn(Seq(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1),
                             nn.BatchNorm2d(4, track_running_stats=False)))
    program = torch.export.export(model, (x,))
    folded, report = bntool.fold(program)
    assert [p.bn for p in report.done] == ["1"] and report.skipped[0].bn == "3"
    assert "track_running_stats=False" in report.skipped[0].reason
    assert_valid_and_equal(program, folded, x)


def test_a_channel_keeping_reshape_folds_with_a_dynamic_batch():
    z = torch.randn(4, 5)
    program = export(ScalarsAndReshape(), z, dynamic_shapes=({0: Dim("batch", min=2, max=64)},))
    folded, report = bntool.fold(program)
    assert bn_nodes(folded) == 0 and report.passed
    other = torch.randn(7, 5)
    torch.testing.assert_close(roundtrip(folded).module()(other), program.module()(other), atol=2e-5, rtol=1e-4)
