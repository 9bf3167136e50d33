"""The finiteness scan reads each tensor once per command, and still sees every change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bntool.errors import InputError
from bntool.verify import validity
from bntool.verify.validity import require_valid
from examples.models import randomize_bn_


def _model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1)), 0)


def _scans(monkeypatch) -> list[int]:
    seen: list[int] = []
    real = validity.all_finite
    monkeypatch.setattr(validity, "all_finite", lambda t: seen.append(t.numel()) or real(t))
    return seen


def test_a_second_scan_reads_only_new_or_changed_tensors(monkeypatch):
    # catches: the repeated scan of every tensor (the work this removes)
    model = _model()
    seen = _scans(monkeypatch)
    require_valid(model)
    assert len(seen) == 8  # every floating tensor once
    seen.clear()
    require_valid(model)
    assert seen == []
    model[2].weight = nn.Parameter(torch.randn(2, 4, 1, 1))  # a new tensor (what fold gives a conv)
    require_valid(model)
    assert seen == [8]


@pytest.mark.parametrize("change", ["in place", "through .data", "a new .data"])
def test_a_tensor_changed_after_a_clean_scan_is_scanned_again(change):
    # catches: a remembered verdict that outlives the values it was about
    model = _model()
    require_valid(model)
    with torch.no_grad():
        if change == "in place":
            model[0].weight[0, 0, 0, 0] = float("nan")
        elif change == "through .data":
            model[0].weight.data = model[0].weight.data.clone().fill_(float("nan"))
        else:
            model[0].weight.data = torch.full_like(model[0].weight, float("inf"))
    with pytest.raises(InputError, match="`0.weight` holds"):
        require_valid(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_one_reduction_sees_every_nan_and_inf_and_an_overflowing_sum_is_not_taken_for_one(dtype):
    # catches: a finite-sum shortcut that misses inf + -inf (NaN), or calls large finite values infinite
    big = torch.finfo(dtype).max
    values = torch.full((64,), big / 2, dtype=dtype)
    assert validity.all_finite(values)  # the sum overflows in the dtype, the values are finite
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = values.clone()
        broken[7] = bad
        assert not validity.all_finite(broken)
    pair = values.clone()
    pair[1], pair[2] = float("inf"), -float("inf")
    assert not validity.all_finite(pair)


def test_negative_variance_is_checked_even_for_a_tensor_seen_under_another_name():
    model = _model()
    shared = torch.full((4,), -1.0)
    model.register_buffer("offset", shared)  # not a variance: negative values are fine
    require_valid(model)
    model[1].running_var = shared  # the same tensor, now a variance
    with pytest.raises(InputError, match="negative"):
        require_valid(model)
