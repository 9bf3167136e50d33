"""The test run's warning policy (pyproject's ``filterwarnings``): a 0.2 spelling of bntool's API fails the test
that uses it unless the test asserts its ``FutureWarning``; other libraries' warnings stay warnings."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import bntool
import bntool.inspection
from bntool import deprecation
from tests.conftest import randomize_bn


def _net() -> nn.Module:
    return randomize_bn(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), seed=1)


X = torch.randn(1, 1, 5, 5)


def test_each_old_spelling_fails_a_test_that_does_not_expect_it(tmp_path):
    # Each kind of message bntool's deprecations write (deprecation.positional, .renamed, .plumbing, the freeze
    # selection by position, the old `bntool.inspection.plot`) raises before any work is done.
    calls = {
        "positional": lambda: bntool.fold(_net(), X),
        "renamed": lambda: bntool.recalibrate(_net(), [X], only=["1"]),
        "plumbing": lambda: bntool.save(_net(), tmp_path / "a.safetensors", check=print),
        "freeze by position": lambda: bntool.freeze(_net(), "1"),
        "old name": lambda: bntool.inspection.plot,
    }
    for what, call in calls.items():
        with pytest.raises(FutureWarning, match="in the next release"):
            call()
            pytest.fail(f"{what}: the old spelling ran without failing the test")
    assert list(tmp_path.iterdir()) == []
    with pytest.warns(FutureWarning, match="by position is deprecated"):  # what a test of an old spelling does
        bntool.fold(_net(), X)


def test_the_message_of_every_deprecation_helper_is_made_an_error():
    cases = [lambda: deprecation.positional("x", 1, None, "op"),
             lambda: deprecation.renamed("old", 1, "new", None, "op"),
             lambda: deprecation.plumbing({"probe": 1}, ("probe",), "op", "use something else")]
    for call in cases:
        with pytest.raises(FutureWarning):
            call()


def test_other_libraries_warnings_stay_warnings():
    # torch's own FutureWarning (as `torch.nn.utils.weight_norm` writes it) and a DeprecationWarning, attributed to
    # torch, are shown, not raised; no registry, so each is shown whatever ran before.
    with warnings.catch_warnings(record=True) as seen:
        for message, category in [
            ("`torch.nn.utils.weight_norm` is deprecated in favor of `torch.nn.utils.parametrizations.weight_norm`.",
             FutureWarning),
            ("You are using the legacy TorchScript-based ONNX export.", DeprecationWarning),
            ("this will change in a future release", FutureWarning),
        ]:
            warnings.warn_explicit(message, category, "torch/nn/utils/weight_norm.py", 144,
                                   module="torch.nn.utils.weight_norm")
    assert [w.category for w in seen] == [FutureWarning, DeprecationWarning, FutureWarning]
