"""NaN, inf and negative variances: never verified, refused as input, reported by inspect, replaced by recalibrate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import bntool
from bntool.errors import InputError, VerificationError
from bntool.verify.compare import _compare_one, compare
from bntool.verify.validity import problems, require_valid
from examples import models as zoo
from tests.conftest import assert_one_line_error, bntool_temporaries, folder_state, randomize_bn

ROOT = Path(__file__).resolve().parents[1]
LENET = f"{ROOT / 'examples' / 'models.py'}:lenet"


def _lenet(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(zoo.lenet(), seed=4)
    with torch.no_grad():
        for key, (index, value) in changes.items():
            model.state_dict()[key].view(-1)[index] = value
    return model


# ----------------------------------------------------------------------------- verification


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("rule", [{}, {"atol": 1e30, "rtol": 1e30}], ids=["derived", "huge-tolerance"])
def test_non_finite_outputs_never_pass_whatever_the_tolerance(bad, rule):
    """NaN at the same places on both sides used to compare as equal and pass."""
    out = torch.randn(4, 10)
    out[1, 3] = bad
    ref = out.double() if not rule else None
    result = _compare_one("output", out, out.clone(), ref, rule.get("atol"), rule.get("rtol"))
    assert not result.passed
    assert "in the candidate" in result.nonfinite and "in the original" in result.nonfinite


def test_non_finite_only_in_the_candidate_fails_with_its_own_message():
    model = _lenet()
    broken = _lenet(**{"10.running_var": (0, float("nan"))})
    comparison = compare(model, broken, (torch.randn(2, 1, 28, 28),), device="cpu")
    assert not comparison.passed
    message = comparison.failure_message("the candidate")
    assert "non-finite values" in message and "never verified" in message and "in the candidate" in message


def test_fold_of_a_model_with_nan_statistics_is_never_verified():
    with pytest.raises(VerificationError, match="non-finite"):
        bntool.fold(_lenet(**{"1.running_var": (0, float("nan"))}), example_inputs=(torch.randn(2, 1, 28, 28),),
                    device="cpu")


def test_export_of_a_model_with_nan_statistics_writes_nothing(tmp_path):
    """The issue's case: an all-NaN ONNX file reported as 'Verified at batch size(s) 2'."""
    model = _lenet(**{"5.running_var": (1, float("nan"))})
    with pytest.raises(VerificationError, match="non-finite"):
        bntool.export_onnx(model, tmp_path / "m.onnx", example_inputs=(torch.randn(2, 1, 28, 28),), fold=False,
                           device="cpu")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- what counts as invalid


def test_problems_names_each_bad_tensor():
    model = _lenet(**{"1.running_var": (2, -0.5), "0.weight": (3, float("inf")), "12.bias": (0, float("nan"))})
    found = {(b.name, b.problem, b.count, b.statistic) for b in problems(model)}
    assert found == {("1.running_var", "negative", 1, True), ("0.weight", "inf", 1, False),
                     ("12.bias", "NaN", 1, False)}
    assert {(b.name, b.problem) for b in problems(model.state_dict())} == {(n, p) for n, p, _, _ in found}


def test_an_infinite_mask_buffer_is_legitimate_but_nan_never_is():
    model = _lenet()
    model.register_buffer("mask", torch.full((4, 4), -float("inf")).triu(1))
    require_valid(model)  # an attention-style mask: allowed
    model.mask[0, 0] = float("nan")
    with pytest.raises(InputError, match="`mask` holds 1 NaN"):
        require_valid(model)


def test_broken_statistics_are_allowed_where_they_will_be_replaced():
    model = _lenet(**{"1.running_mean": (0, float("nan"))})
    require_valid(model, statistics=False)
    with pytest.raises(InputError, match="bntool recalibrate"):
        require_valid(model)
    with pytest.raises(InputError, match="earlier checkpoint"):
        require_valid(_lenet(**{"1.weight": (0, float("nan"))}), statistics=False)


# ----------------------------------------------------------------------------- recalibrate


@pytest.fixture
def calibration(tmp_path) -> Path:
    torch.save(torch.randn(32, 1, 28, 28), tmp_path / "calib.pt")
    return tmp_path / "calib.pt"


def test_recalibrate_replaces_nan_statistics(cli, tmp_path, calibration):
    torch.save(_lenet(**{"1.running_var": (0, float("nan")), "5.running_mean": (2, float("inf"))}).state_dict(),
               tmp_path / "ck.pt")
    out = tmp_path / "r.safetensors"
    result = cli("recalibrate", tmp_path / "ck.pt", "--model", LENET, "--data", calibration, "--out", out)
    assert result.code == 0, result.err
    assert all(torch.isfinite(t).all() for t in load_file(out).values())


def test_recalibrate_never_writes_statistics_it_left_broken(cli, tmp_path, calibration):
    """The last BN (nothing downstream sees its NaN during the pass), excluded: its NaN would be written."""
    torch.save(_lenet(**{"13.running_var": (0, float("nan"))}).state_dict(), tmp_path / "ck.pt")
    before = folder_state(tmp_path)
    result = cli("recalibrate", tmp_path / "ck.pt", "--model", LENET, "--data", calibration,
                 "--exclude", "13", "--out", tmp_path / "r.safetensors")
    assert_one_line_error(result, "the result", "`13.running_var`", "NaN")
    assert folder_state(tmp_path) == before and bntool_temporaries(tmp_path) == []


# ----------------------------------------------------------------------------- inspect reports them


@pytest.mark.parametrize("with_model", [True, False], ids=["model", "weights-only"])
def test_inspect_reports_negative_variance_and_infinite_weights_as_findings(cli, tmp_path, with_model):
    model = _lenet(**{"5.running_var": (4, -0.25), "9.weight": (11, float("inf"))})
    torch.save(model.state_dict(), tmp_path / "ck.pt")
    args = ["--model", LENET] if with_model else []
    result = cli("inspect", tmp_path / "ck.pt", *args, "--json")
    assert result.code == 0, result.err
    findings = {f["kind"]: f for f in json.loads(result.out)["findings"]}
    assert findings["negative_variance"]["layers"] == ["5"] and findings["negative_variance"]["severity"] == "error"
    assert "channel 4" in findings["negative_variance"]["message"]
    assert "dead_channels" not in findings  # a negative variance is not a dead channel
    assert findings["nonfinite_weights"]["layers"] == ["9"] and "`9.weight` (1 inf" in findings["nonfinite_weights"]["message"]


# ----------------------------------------------------------------------------- running out of memory


def test_an_allocation_failure_in_the_model_is_one_line(cli, tmp_path):
    torch.save(_lenet().state_dict(), tmp_path / "ck.pt")
    (tmp_path / "net.py").write_text(
        "import torch\nfrom examples.models import lenet\n\n\nclass Net(torch.nn.Sequential):\n"
        "    def forward(self, x):\n"
        "        raise RuntimeError('[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can\\'t allocate "
        "memory: you tried to allocate 87778448000 bytes. Error code 12 (Cannot allocate memory)')\n\n\n"
        "def net():\n    m = lenet()\n    n = Net(*m)\n    n.input_shape = m.input_shape\n    return n\n")
    result = cli("fold", tmp_path / "ck.pt", "--model", f"{tmp_path / 'net.py'}:net", "--out", tmp_path / "f.pt")
    assert_one_line_error(result, "ran out of memory", "smaller --input-shape")


def test_an_out_of_memory_error_anywhere_is_one_line(cli, tmp_path, monkeypatch):
    import bntool.folding.fold as folding

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    torch.save(_lenet().state_dict(), tmp_path / "ck.pt")
    monkeypatch.setattr(folding, "fold", out_of_memory)
    result = cli("fold", tmp_path / "ck.pt", "--model", LENET, "--out", tmp_path / "f.pt")
    assert_one_line_error(result, "ran out of memory on the GPU", "--device cpu", "nothing was written")
