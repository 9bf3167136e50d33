"""bntool.recalibrate: exact population statistics, BN-only train mode, state restored, distributed.

The oracle is always an independent float64 computation over the concatenated
data: for a BN fed straight from the model input (or a conv of it) the plain
mean / unbiased variance of that input over the whole data set; for deeper BNs
the float64 concatenation of what the BN actually received (captured by a test
hook). Batches are uneven (short last batch) and their means differ, so an
EMA, an equal-weight average of batch means, or an average of batch variances
all land far outside the 1e-6 tolerance.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from bntool.errors import InputError, VerificationError
from bntool.norms import is_batchnorm
from bntool.persist import REPLAYERS
from bntool.recalibration.recalibrate import recalibrate
from bntool.recalibration.report import RecalibrationReport
from bntool.recalibration.state import replay
from bntool.recalibration.stats import ChannelStats, reduce_calls
from bntool.recipe import replay as replay_recipe
from examples.models import dropout_net, randomize_bn_, resnet_small
from tests.conftest import finish, python_env, start, stop

ROOT = Path(__file__).resolve().parents[1]

RTOL = 1e-6


def uneven_batches(shape_tail: tuple[int, ...], sizes=(7, 16, 3, 16, 5), seed: int = 0) -> list[torch.Tensor]:
    """Batches of different sizes whose means differ (offset 2 + batch index), scale 1.5."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((n, *shape_tail), generator=gen) * 1.5 + 2.0 + 0.7 * i for i, n in enumerate(sizes)]


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean and unbiased variance per channel (dim 1) over every other dim."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(dim=1), flat.var(dim=1)


def assert_stats(bn: _BatchNorm, mean: torch.Tensor, var: torch.Tensor) -> None:
    """1e-6 relative: the variance to itself, the mean to its channel's standard deviation."""
    got_mean, got_var = bn.running_mean.double(), bn.running_var.double()
    torch.testing.assert_close(got_var, var, rtol=RTOL, atol=0.0)
    assert ((got_mean - mean).abs() <= RTOL * (mean.abs() + var.sqrt())).all(), (got_mean - mean).abs().max()


class Capture:
    """Records (float64) every input each BN (frozen ones too) receives, per call, positional or ``input=``."""

    def __init__(self, model: nn.Module):
        self.inputs: dict[str, list[torch.Tensor]] = {}
        self.handles = [
            m.register_forward_pre_hook(self._hook(name), with_kwargs=True)
            for name, m in model.named_modules()
            if is_batchnorm(m)
        ]

    def _hook(self, name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            self.inputs.setdefault(name, []).append(x.detach().double().clone())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()

    def oracle(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        flat = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in self.inputs[name]], dim=1)
        return flat.mean(dim=1), flat.var(dim=1)


def with_input_bn(kind: str) -> tuple[nn.Module, list[torch.Tensor], callable]:
    """A model whose first BN sees the model input (or a conv of it); returns its float64 input function."""
    if kind == "bn1d_2d":
        model = nn.Sequential(nn.BatchNorm1d(6), nn.Linear(6, 4), nn.BatchNorm1d(4))
        return model, uneven_batches((6,)), lambda x: x
    if kind == "bn1d_3d":
        model = nn.Sequential(nn.BatchNorm1d(5), nn.Conv1d(5, 4, 3), nn.BatchNorm1d(4))
        return model, uneven_batches((5, 9)), lambda x: x
    if kind == "bn2d":
        model = nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        return model, uneven_batches((3, 6, 5)), lambda x: x
    if kind == "bn3d":
        model = nn.Sequential(nn.BatchNorm3d(2), nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3))
        return model, uneven_batches((2, 4, 3, 5)), lambda x: x
    if kind == "conv_bn2d":
        conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        model = nn.Sequential(conv, nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
        conv64 = copy.deepcopy(conv).double()
        return model, uneven_batches((3, 10, 12)), lambda x: conv64(x.double()).detach()
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["bn1d_2d", "bn1d_3d", "bn2d", "bn3d", "conv_bn2d"])
def test_first_bn_matches_float64_statistics_of_its_input(kind):
    # catches: EMA / momentum updates, equal weighting of uneven batches, averaging batch variances,
    # biased variance, counting N instead of N*H*W values
    torch.manual_seed(0)
    model, batches, first_input = with_input_bn(kind)
    randomize_bn_(model, seed=1)
    report = recalibrate(model, batches, merge_every=2)  # groups of 2 calls, Chan-merged
    mean, var = channel_stats(torch.cat([first_input(b) for b in batches]))
    name = next(n for n, m in model.named_modules() if isinstance(m, _BatchNorm))
    assert_stats(dict(model.named_modules())[name], mean, var)
    layer = next(layer for layer in report.layers if layer.name == name)
    assert layer.count == sum(first_input(b).numel() // first_input(b).shape[1] for b in batches)
    assert layer.calls == len(batches) and report.num_batches == len(batches)
    assert report.num_samples == sum(len(b) for b in batches)
    assert layer.method == "readback"


def test_channel_stats_merge_and_grouped_calls_are_exact():
    # catches: a wrong Chan cross term, equal weighting, biased variance
    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 3, 4, generator=gen) * (1 + i) + 3 * i for i, n in enumerate((2, 9, 5, 31, 3))]
    mean, var = channel_stats(torch.cat(chunks))
    merged = ChannelStats(3)
    for chunk in chunks:
        merged.merge(ChannelStats.of(chunk))
    torch.testing.assert_close(merged.result()[0], mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(merged.result()[1], var, rtol=1e-12, atol=0)
    per_call = [channel_stats(c) for c in chunks]
    counts = [c.numel() // 3 for c in chunks]
    count, group_mean, m2 = reduce_calls(counts, [m for m, _ in per_call], [v for _, v in per_call])
    assert count == sum(counts)
    torch.testing.assert_close(group_mean, mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(m2 / (count - 1), var, rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        ChannelStats(3).result()


@pytest.mark.parametrize("kind", ["bn1d_3d", "conv_bn2d"])
def test_every_bn_matches_its_captured_inputs(kind):
    # deeper BNs: the oracle is the concatenation of what each BN received during the pass
    torch.manual_seed(0)
    model, batches, _ = with_input_bn(kind)
    randomize_bn_(model, seed=2)
    capture = Capture(model)
    recalibrate(model, batches)
    capture.remove()
    for name, bn in model.named_modules():
        if isinstance(bn, _BatchNorm):
            assert_stats(bn, *capture.oracle(name))
            assert int(bn.num_batches_tracked) == len(batches)


def test_resnet_all_layers_exact_and_batch_variance_gap_reported():
    torch.manual_seed(0)
    model = randomize_bn_(resnet_small(), seed=3)
    batches = uneven_batches((3, 16, 16), sizes=(6, 9, 4))
    capture = Capture(model)
    report = recalibrate(model, batches)
    capture.remove()
    gaps = []
    for name, bn in model.named_modules():
        if isinstance(bn, _BatchNorm):
            mean, var = capture.oracle(name)
            assert_stats(bn, mean, var)
            batch_vars = torch.stack([channel_stats(x)[1] for x in capture.inputs[name]]).mean(dim=0)
            gap = ((batch_vars - var).abs() / var).max().item()
            layer = next(layer for layer in report.layers if layer.name == name)
            assert layer.batch_var_gap == pytest.approx(gap, rel=1e-4)
            gaps.append(gap)
    # the population variance differs measurably from the mean of batch variances, and the report says so
    assert report.mean_of_batch_vars_vs_population == pytest.approx(max(gaps), rel=1e-4)
    assert report.mean_of_batch_vars_vs_population > 0.05


def test_dropout_stays_in_eval_and_every_flag_and_momentum_is_restored():
    torch.manual_seed(0)
    model = randomize_bn_(dropout_net(), seed=4)
    model.train()
    model[3].eval()  # a mixed starting state must come back exactly
    model[1].momentum, model[5].momentum = None, 0.3
    flags_before = [(n, m.training) for n, m in model.named_modules()]
    seen: dict[str, set[bool]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Dropout, _BatchNorm, nn.Conv2d, nn.Linear)):
            module.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, set()).add(m.training))
    outputs = []
    model.register_forward_hook(lambda m, a, out: outputs.append(out.clone()))
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    batches = uneven_batches((3, 16, 16), sizes=(4, 4))
    recalibrate(model, batches + batches)  # the same batch twice must give the same output
    assert seen["3"] == {False} and seen["7"] == {False}  # dropout in eval during the pass
    assert seen["1"] == {True} and seen["5"] == {True}  # BN in train
    assert seen["0"] == {False}
    torch.testing.assert_close(outputs[0], outputs[2], rtol=0, atol=0)  # deterministic: no dropout
    assert [(n, m.training) for n, m in model.named_modules()] == flags_before
    assert model[1].momentum is None and model[5].momentum == 0.3
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == hooks


def writes_outside_bn_statistics(model: nn.Module) -> nn.Module:
    """Hooks that write a conv weight and a BN weight through ``.data`` (bypassing version counters)."""

    def corrupt(module, args):  # returns None: the input stays the input
        module.weight.data[0].mul_(1.0001)

    def nudge(module, args, output):
        module.weight.data.add_(1e-3)

    model.layer1[0].conv1.register_forward_pre_hook(corrupt)
    model.bn1.register_forward_hook(nudge)
    return model


def test_only_bn_buffers_change_and_the_check_can_fail():
    torch.manual_seed(0)
    model = randomize_bn_(resnet_small(), seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = recalibrate(model, uneven_batches((3, 16, 16), sizes=(5, 3)))
    after = model.state_dict()
    for key, value in before.items():
        is_bn_buffer = key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        assert torch.equal(value, after[key]) != is_bn_buffer, key
    assert report.unchanged_non_bn and report.passed and report.changed_non_bn == ()

    # negative: something writes a conv weight (through .data, bypassing version counters) and a BN weight
    model2 = writes_outside_bn_statistics(randomize_bn_(resnet_small(), seed=5))
    with pytest.raises(VerificationError) as info:  # the library's own check raises, carrying the report
        recalibrate(model2, uneven_batches((3, 16, 16), sizes=(5, 3)))
    report2 = info.value.report
    assert not report2.unchanged_non_bn and not report2.passed
    assert set(report2.changed_non_bn) == {"layer1.0.conv1.weight", "bn1.weight"}
    assert "`layer1.0.conv1.weight`" in str(info.value)
    report3 = recalibrate(writes_outside_bn_statistics(randomize_bn_(resnet_small(), seed=5)),
                          uneven_batches((3, 16, 16), sizes=(5, 3)), verify=False)
    assert not report3.passed  # verify=False returns the report instead


def test_track_running_stats_false_is_converted_and_replayed():
    torch.manual_seed(0)

    def build():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                             nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2))

    model = build()
    randomize_bn_(model, seed=6)
    batches = uneven_batches((3, 8, 8))
    capture = Capture(model)
    report = recalibrate(model, batches)
    capture.remove()
    bn = model[1]
    assert bn.track_running_stats and bn.running_mean is not None
    assert_stats(bn, *capture.oracle("1"))
    assert report.converted == ("1",)
    layer = report.layers[0]
    assert layer.converted and layer.var_change is None and layer.mean_change is None
    step = report.recipe_step()
    assert step == {"op": "recalibrate", "layers": ["1", "4"], "tracking_enabled": ["1"],
                    "num_batches": 5, "num_samples": sum(len(b) for b in batches)}
    fresh = build()
    replay(fresh, step)  # the module function
    fresh2 = build()
    assert REPLAYERS["recalibrate"] is replay, "bntool.persist's replay table holds recalibrate's replay"
    replay_recipe(fresh2, [json.loads(json.dumps(step))], REPLAYERS)  # through the replay table
    for target in (fresh, fresh2):
        target.load_state_dict(model.state_dict(), strict=True)
        x = batches[0]
        torch.testing.assert_close(target.eval()(x), model.eval()(x), rtol=0, atol=0)
    with pytest.raises(InputError, match="not a BatchNorm layer"):
        replay(build(), {"op": "recalibrate", "tracking_enabled": ["0"]})


def test_include_and_exclude_select_layers_and_leave_the_rest_in_eval():
    torch.manual_seed(0)
    model = randomize_bn_(resnet_small(), seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    training = []
    model.layer1[0].bn2.register_forward_pre_hook(lambda m, a: training.append(m.training))
    report = recalibrate(model, uneven_batches((3, 16, 16), sizes=(4, 3)), include=["layer1"], exclude=["*.bn2"])
    assert [layer.name for layer in report.layers] == ["layer1.0.bn1", "layer1.1.bn1"]
    assert training and not any(training)  # an excluded BN normalises with its stored statistics
    after = model.state_dict()
    for key in before:
        changed = not torch.equal(before[key], after[key])
        assert changed == (key.startswith(("layer1.0.bn1.running", "layer1.1.bn1.running", "layer1.0.bn1.num",
                                           "layer1.1.bn1.num"))), key
    reasons = {s.name: s.reason for s in report.skipped}
    assert "excluded by the exclude pattern `*.bn2`" in reasons["layer1.0.bn2"]
    assert "not selected by the include patterns" in reasons["bn1"]
    with pytest.raises(InputError, match=r"include pattern `layer9\*` matches no BatchNorm layer.*`bn1`"):
        recalibrate(model, [torch.randn(2, 3, 8, 8)], include=["layer9*"])


class SharedAndUnused(nn.Module):
    """One BN called twice per forward, and one BN never called."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.shared = nn.BatchNorm2d(4)
        self.unused = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.shared(self.conv2(torch.relu(self.shared(self.conv1(x)))))


def test_shared_bn_counts_every_call_and_unused_bn_is_reported_and_unchanged():
    torch.manual_seed(0)
    model = randomize_bn_(SharedAndUnused(), seed=8)
    unused_before = {k: v.clone() for k, v in model.unused.state_dict().items()}
    batches = uneven_batches((3, 6, 6))
    capture = Capture(model)
    report = recalibrate(model, batches)
    capture.remove()
    assert len(capture.inputs["shared"]) == 2 * len(batches)
    assert_stats(model.shared, *capture.oracle("shared"))  # over both calls of every batch
    (layer,) = report.layers
    assert layer.name == "shared" and layer.calls == 2 * len(batches)
    assert layer.count == sum(len(b) for b in batches) * 36 * 2
    assert int(model.shared.num_batches_tracked) == 2 * len(batches)
    (skip,) = report.skipped
    assert skip.name == "unused" and "never called" in skip.reason
    for key, value in model.unused.state_dict().items():
        assert torch.equal(value, unused_before[key])


def test_failure_midway_restores_everything():
    torch.manual_seed(0)
    model = randomize_bn_(resnet_small(), seed=9)
    model.bn1.momentum = None
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 5, 16, 16)]
    with pytest.raises(InputError, match=r"batch 2 \(input shape \(4, 5, 16, 16\)\)"):
        recalibrate(model, batches)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.bn1.momentum is None and model.layer1[0].bn1.momentum == 0.1
    assert all(m.training for m in model.modules())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_half_precision_input_uses_float64_path_and_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    randomize_bn_(model, seed=10)
    batches = uneven_batches((3, 8, 8))

    def forward(m, batch):  # mixed precision: bf16 activations, float32 BN parameters and buffers
        return m[1](m[0](batch).to(torch.bfloat16))

    capture = Capture(model)
    report = recalibrate(model, batches, forward=forward)
    capture.remove()
    assert report.layers[0].method == "float64"
    assert_stats(model[1], *capture.oracle("1"))


def test_verification_batches_report_before_and_after_and_callback_and_json():
    torch.manual_seed(0)
    model = randomize_bn_(resnet_small(), seed=11)
    batches = uneven_batches((3, 16, 16), sizes=(8, 8, 8, 8), seed=1)
    held_out = uneven_batches((3, 16, 16), sizes=(8, 8), seed=2)
    for b in batches + held_out:  # same distribution for calibration and verification
        b.sub_(b.mean()).mul_(1.0).add_(1.0)
    progress = []
    report = recalibrate(model, iter(batches), num_batches=3, verify_batches=held_out, callback=progress.append)
    assert progress == [1, 2, 3] and report.num_batches == 3 and report.verify_batches == 2
    for layer in report.layers:
        assert layer.verify_after.mean_error < 0.5 * layer.verify_before.mean_error
        assert layer.verify_after.mean_error < 0.2 and layer.verify_after.var_error < 0.3
    data = json.loads(json.dumps(report.to_dict()))
    assert data["passed"] is True and data["num_batches"] == 3
    assert data["layers"][0]["verify_before"]["mean_error"] > 0
    assert isinstance(report, RecalibrationReport)


def test_bad_arguments_are_input_errors():
    model = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(InputError, match="no BatchNorm layers"):
        recalibrate(model, [torch.randn(2, 3)])
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(InputError, match="no batches"):
        recalibrate(model, [])
    with pytest.raises(InputError, match="positive number of batches"):
        recalibrate(model, [torch.randn(2, 3)], num_batches=0)
    with pytest.raises(InputError, match="merge_every=0"):
        recalibrate(model, [torch.randn(2, 3)], merge_every=0)


# ----------------------------------------------------------------------------- edge cases


def test_empty_batches_are_skipped_counted_and_leave_the_statistics_exact():
    # catches: an empty call merged as (count 0, the previous call's variance), i.e. M2 -= var: running_var low
    torch.manual_seed(0)
    model = randomize_bn_(resnet_small(), seed=13)
    real = uneven_batches((3, 16, 16), sizes=(5, 7, 4, 6))
    empty = torch.empty(0, 3, 16, 16)
    batches = [empty, real[0], real[1], empty, real[2], real[3], empty]
    capture = Capture(model)
    report = recalibrate(model, batches, merge_every=2)  # empties fall on both sides of a merge
    capture.remove()
    for name, bn in model.named_modules():
        if isinstance(bn, _BatchNorm):
            assert_stats(bn, *capture.oracle(name))
            assert int(bn.num_batches_tracked) == len(real)
    assert report.num_batches == 7 and report.empty_batches == 3 and report.num_samples == 22
    assert all(layer.calls == 4 and layer.empty_calls == 3 for layer in report.layers)
    assert report.to_dict()["empty_batches"] == 3
    with pytest.raises(InputError, match="all 2 batches are empty"):
        recalibrate(randomize_bn_(resnet_small(), seed=13), [empty, empty])


class KeywordBN(nn.Module):
    """Calls its BNs by keyword, as some model code does: ``self.bn(input=x)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 5))
        self.bn_head = nn.BatchNorm1d(5)

    def forward(self, x):
        return self.bn_head(input=self.head(torch.relu(self.bn(input=self.conv(x)))))


def test_bn_called_with_a_keyword_input_is_exact():
    # catches: hooks that read args[0] only (IndexError), or that skip keyword calls (statistics unchanged)
    torch.manual_seed(0)
    model = randomize_bn_(KeywordBN(), seed=14)
    batches = uneven_batches((3, 8, 8))
    capture = Capture(model)
    report = recalibrate(model, batches, verify_batches=uneven_batches((3, 8, 8), sizes=(6, 6), seed=3))
    capture.remove()
    for name in ("bn", "bn_head"):  # every call was seen: the pass, then 2 held-out batches before and after
        assert len(capture.inputs[name]) == len(batches) + 4
        capture.inputs[name] = capture.inputs[name][: len(batches)]
    assert_stats(model.bn, *capture.oracle("bn"))
    assert_stats(model.bn_head, *capture.oracle("bn_head"))
    assert [layer.calls for layer in report.layers] == [5, 5]
    assert all(layer.verify_after is not None for layer in report.layers)


def test_a_frozen_model_is_recalibrated_exactly_and_stays_frozen():
    # catches: frozen BNs skipped (statistics unchanged), normalising with their stored statistics during the
    # pass (every later BN then sees other inputs than in the unfrozen recalibration), or swapped back to BN
    import bntool
    from bntool.freezing.check import check_frozen
    from bntool.frozen import FrozenBatchNorm2d

    torch.manual_seed(0)
    frozen, _ = bntool.freeze(randomize_bn_(resnet_small(), seed=15))
    unfrozen, _ = bntool.unfreeze(copy.deepcopy(frozen))
    before = copy.deepcopy(frozen)
    batches = uneven_batches((3, 16, 16), sizes=(6, 9, 4))
    capture = Capture(frozen)
    report = recalibrate(frozen, batches)
    capture.remove()
    recalibrate(unfrozen, batches)
    assert type(frozen.bn1) is FrozenBatchNorm2d and all(layer.frozen for layer in report.layers)
    assert len(report.layers) == sum(is_batchnorm(m) for m in frozen.modules())
    for key, value in unfrozen.state_dict().items():
        assert torch.equal(frozen.state_dict()[key], value), key  # exactly what the unfrozen form gets
    for name, module in frozen.named_modules():
        if is_batchnorm(module):
            assert_stats(module, *capture.oracle(name))
    assert report.unchanged_non_bn and report.recipe_step()["tracking_enabled"] == []
    assert not torch.equal(frozen.bn1.running_var, before.bn1.running_var)
    x = uneven_batches((3, 16, 16), sizes=(4,), seed=5)[0]
    check = check_frozen(unfrozen, frozen, [x], device="cpu")  # still frozen: train mode == eval mode
    assert check.passed, check.failure_message()


class MixedDtypes(nn.Module):
    """A float32 BN, then a float64 one: two pools of slots, merged back into one report."""

    def __init__(self):
        super().__init__()
        self.bn32, self.fc, self.bn64 = nn.BatchNorm1d(5), nn.Linear(5, 3), nn.BatchNorm1d(3).double()

    def forward(self, x):
        return self.bn64(self.fc(self.bn32(x)).double())


def test_layers_with_other_buffer_dtypes_are_exact_and_reported_in_order():
    torch.manual_seed(0)
    model = randomize_bn_(MixedDtypes(), seed=19)
    batches = uneven_batches((5,), sizes=(7, 4, 9))
    capture = Capture(model)
    report = recalibrate(model, batches, merge_every=2)
    capture.remove()
    assert [layer.name for layer in report.layers] == ["bn32", "bn64"]
    assert model.bn64.running_var.dtype == torch.float64
    assert_stats(model.bn32, *capture.oracle("bn32"))
    assert_stats(model.bn64, *capture.oracle("bn64"))


def _set_tf32_flags(values: dict[str, str]) -> None:
    owners = {"cuda.matmul": torch.backends.cuda.matmul, "cudnn.conv": torch.backends.cudnn.conv,
              "cudnn.rnn": torch.backends.cudnn.rnn}
    for key, value in values.items():
        owners[key.split(".fp32_precision")[0]].fp32_precision = value


def test_tf32_is_off_during_the_pass_unless_allowed_and_the_callers_setting_comes_back():
    # catches: a pass under the caller's TF32 setting (inexact convolutions on a GPU), a setting not restored
    from bntool.runtime.running import tf32_state

    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("this torch has only the legacy allow_tf32 switches")
    model = randomize_bn_(resnet_small(), seed=16)
    seen = []
    model.conv1.register_forward_pre_hook(lambda m, a: seen.append(tf32_state()))
    saved = tf32_state()
    try:
        _set_tf32_flags({"cuda.matmul": "tf32", "cudnn.conv": "ieee", "cudnn.rnn": "tf32"})  # the caller's mix
        caller = tf32_state()
        recalibrate(model, uneven_batches((3, 16, 16), sizes=(4, 4)))
        assert len(seen) == 2 and all(set(state.values()) == {"ieee"} for state in seen)
        assert tf32_state() == caller
        seen.clear()
        recalibrate(model, uneven_batches((3, 16, 16), sizes=(4, 4)), allow_tf32=True)
        assert len(seen) == 2 and all(set(state.values()) == {"tf32"} for state in seen)
        assert tf32_state() == caller
    finally:
        _set_tf32_flags(saved)


def test_the_hot_path_issues_no_tensor_work_per_bn_call(monkeypatch):
    # catches: copies, casts, item()/bool() (host synchronisations on a GPU) or allocations in the per-call hook,
    # and a state check that compares tensor by tensor (one synchronisation each)
    from torch.utils._python_dispatch import TorchDispatchMode

    from bntool.recalibration import collect

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.inside, self.in_hook, self.all = False, [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            (self.in_hook if self.inside else self.all).append(str(func))
            return func(*args, **(kwargs or {}))

    ops = Ops()
    real = collect.Collector.__call__

    def watched(self, module, args, kwargs):
        ops.inside = True
        try:
            return real(self, module, args, kwargs)
        finally:
            ops.inside = False

    monkeypatch.setattr(collect.Collector, "__call__", watched)
    model = randomize_bn_(resnet_small(), seed=17)
    batches = uneven_batches((3, 16, 16), sizes=(4, 5, 3, 4))
    with ops:
        report = recalibrate(model, batches)
    calls = sum(layer.calls for layer in report.layers)
    assert calls == 4 * len(report.layers)
    assert ops.in_hook and set(ops.in_hook) <= {"aten.select.int", "aten.slice.Tensor"}  # views: no kernel


def test_the_gpu_state_check_compares_once_and_still_names_what_changed(monkeypatch):
    # the GPU path (one copy, one comparison: one synchronisation), forced on the CPU; catches a check that
    # compares tensor by tensor on a GPU, and a batched check that cannot say which tensor changed
    from torch.utils._python_dispatch import TorchDispatchMode

    from bntool.verify import bits as statediff

    class Equals(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Equals.count += func is torch.ops.aten.equal.default
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(statediff, "COMPARE_IN_PLACE", ())
    model = randomize_bn_(resnet_small(), seed=18)
    with Equals():
        report = recalibrate(model, uneven_batches((3, 16, 16), sizes=(4, 3)))
    assert report.unchanged_non_bn and Equals.count == 1
    report = recalibrate(writes_outside_bn_statistics(model), uneven_batches((3, 16, 16), sizes=(4, 3)), verify=False)
    assert set(report.changed_non_bn) == {"layer1.0.conv1.weight", "bn1.weight"}


# ----------------------------------------------------------------------------- two processes


def run_two_ranks(tmp_path: Path, *extra: str) -> list[tuple[int, str]]:
    """Start both ranks of tests/_dist_worker.py on a gloo group; (exit code, output) of each."""
    procs = [start([sys.executable, ROOT / "tests" / "_dist_worker.py", rank, 2, tmp_path / "init",
                    tmp_path / f"rank{rank}.pt", *extra], env=python_env(OMP_NUM_THREADS="1"), merge_output=True)
             for rank in range(2)]
    try:
        return [(done.returncode, done.stdout) for done in (finish(proc, timeout=120) for proc in procs)]
    finally:
        for proc in procs:  # never leave a rank waiting for its peer
            stop(proc)


def test_a_failing_rank_stops_the_other_instead_of_hanging(tmp_path):
    (code0, out0), (code1, out1) = run_two_ranks(tmp_path, "fail")
    assert code1 == 3 and "rank 1: InputError: batch 1 (input shape (2, 5, 12, 12)) does not fit" in out1
    assert code0 == 3 and "rank 0: RankFailure: rank(s) 1 failed" in out0


def test_two_gloo_processes_match_one_process(tmp_path):
    spec = importlib.util.spec_from_file_location("bntool_dist_worker", ROOT / "tests" / "_dist_worker.py")
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    build_model, make_batches = worker.build_model, worker.make_batches

    batches = make_batches()
    single = build_model()
    recalibrate(single, batches)
    for code, out in run_two_ranks(tmp_path):
        assert code == 0, out
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    assert results[0]["batches_seen"] == 3 and results[1]["batches_seen"] == 2  # uneven shares
    for key, value in single.state_dict().items():
        a, b = results[0]["state"][key], results[1]["state"][key]
        assert torch.equal(a, b), key  # every rank ends with identical statistics
        if value.is_floating_point():
            torch.testing.assert_close(a, value, rtol=RTOL, atol=RTOL * value.abs().max().item())
        else:
            assert torch.equal(a, value), key
    assert results[0]["report"]["num_batches"] == 5 and results[0]["report"]["world_size"] == 2
    assert results[0]["report"] == results[1]["report"]


def test_a_tensor_passed_as_the_batches_is_refused_in_one_line():
    """Iterating a tensor gives single samples; bntool says what to pass instead of failing inside the model."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=r"`batches` is one tensor \(shape \(8, 3, 6, 6\)\).*`\[x\]` for one batch"):
        recalibrate(model, torch.randn(8, 3, 6, 6))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("batch", [torch.randn(3, 6, 6), torch.randn(4, 3, 6)])
def test_a_batch_the_model_rejects_with_a_value_or_index_error_is_an_input_error(batch):
    """A BN's ``expected 4D input`` (ValueError) is the data's shape too, not a crash."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(InputError, match=r"batch 0 \(input shape .*\) does not fit the model"):
        recalibrate(model, [batch])


class NeedsProcessGroupBN(nn.BatchNorm2d):
    """A synchronised BN (apex's, or a custom one) that cannot run its training-mode forward on one process."""

    def forward(self, x):
        if self.training:
            raise RuntimeError("Default process group has not been initialized, please make sure to call "
                               "init_process_group.")
        return super().forward(x)


def test_a_bn_that_cannot_train_here_is_named_as_the_cause_not_the_data():
    # catches: the data blamed ("does not fit the model ... pass data of that shape") for a batch that fits
    torch.manual_seed(0)
    model = randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 3), NeedsProcessGroupBN(4), nn.ReLU()), 0)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=r"batch 0: the model runs it with its BatchNorm layers in eval mode, but "
                                         r"not in train mode.*Default process group.*torchrun.*`exclude`"):
        recalibrate(model, [torch.randn(4, 3, 6, 6)])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model[1].training


def test_a_bn_held_at_two_places_gets_the_statistics_of_both_calls_and_passes_the_check():
    """The same block sits twice in a Sequential: its BN's buffers have two names in the state dict, and the
    bit-for-bit check of everything else must not count the second name as "changed"."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    model = nn.Sequential(nn.Conv2d(3, 4, 1), block, nn.ReLU(), block)
    batches = [torch.randn(5, 3, 6, 6) for _ in range(3)]
    seen = []
    twin = copy.deepcopy(model).eval()  # the pass: the BN normalizes with each batch's statistics (train mode)
    twin[1][1].train()
    twin[1][1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().double()))
    with torch.no_grad():
        for b in batches:
            twin(b)
    assert len(seen) == 2 * len(batches)
    values = torch.cat([t.transpose(0, 1).reshape(4, -1) for t in seen], 1)
    recalibrate(model, batches)  # (a check that counted the second name as changed would raise here)
    torch.testing.assert_close(block[1].running_mean.double(), values.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(block[1].running_var.double(), values.var(1, unbiased=True), rtol=1e-6, atol=1e-6)
