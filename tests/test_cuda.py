"""Every command on a CUDA GPU, through the API and the CLI (marker ``cuda``: skipped, with the reason, without one).

The other test files are device-agnostic: where ``--device auto`` picks the GPU
they run there too. These tests ask for the GPU explicitly and check what only
a GPU run can get wrong: a model that lives on the GPU, a CPU checkpoint
verified with ``--device cuda``, TF32 (on by default for cuDNN convolutions)
kept out of verification and exact statistics, half precision, NCCL under
torchrun, host synchronisations in the recalibration pass, onnxruntime's CUDA
provider.

``BNTOOL_TEST_DEVICE=cpu python -m pytest -m cuda`` runs the same tests on the
CPU (what only a GPU has, NCCL and the synchronisation check, stays skipped):
how ``benchmarks/gpu_check.py --device cpu`` checks its own plumbing.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._python_dispatch import TorchDispatchMode

import bntool
from bntool.errors import VerificationError
from bntool.freezing.check import check_frozen
from bntool.frozen import FrozenBatchNorm2d
from bntool.recalibration.recalibrate import recalibrate
from bntool.runtime.running import tf32, tf32_state
from examples import models as zoo
from tests.conftest import randomize_bn, torchrun
from tests.test_recalibrate import Capture, assert_stats, uneven_batches

pytestmark = pytest.mark.cuda

DEVICE = os.environ.get("BNTOOL_TEST_DEVICE", "cuda")
ON_GPU = torch.device(DEVICE).type == "cuda"
needs_gpu = pytest.mark.skipif(not (ON_GPU and torch.cuda.is_available()),
                               reason="needs a real CUDA GPU (NCCL, synchronisation checks)")
ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models.py"
LENET = f"{MODELS}:lenet"
RESNET = f"{MODELS}:resnet_small"


def on_device(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize_bn(model, seed=seed).to(DEVICE)


def images(n: int = 4, size: int = 32, seed: int = 0, device: str = DEVICE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, size, size, generator=gen) * 1.5 + 0.5).to(device)


def float64_eval_output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's eval output computed in float64 on the CPU: an oracle no TF32 or kernel choice touches."""
    m64 = copy.deepcopy(model).cpu().double().eval()
    with torch.no_grad():
        return m64(x.cpu().double())


def bns(model: nn.Module) -> int:
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


def set_tf32(values: dict[str, str]) -> None:
    for key, value in values.items():
        owner = {"cuda.matmul": torch.backends.cuda.matmul, "cudnn.conv": torch.backends.cudnn.conv,
                 "cudnn.rnn": torch.backends.cudnn.rnn}[key.split(".fp32_precision")[0]]
        owner.fp32_precision = value


@pytest.fixture
def caller_tf32():
    """TF32 switched on by the caller (as PyTorch does for cuDNN convolutions by default); put back afterwards."""
    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("this torch has only the legacy allow_tf32 switches")
    saved = tf32_state()
    set_tf32({"cuda.matmul": "tf32", "cudnn.conv": "tf32", "cudnn.rnn": "tf32"})
    yield tf32_state()
    set_tf32(saved)


@pytest.fixture
def lenet_file(tmp_path):
    """A CPU state dict of LeNet with random BN state, and the model."""
    torch.manual_seed(0)
    model = randomize_bn(zoo.lenet(), seed=3)
    path = tmp_path / "lenet.pt"
    torch.save(model.state_dict(), path)
    return path, model


# ----------------------------------------------------------------------------- fold


def test_fold_a_model_on_the_gpu_verifies_there_and_stays_there():
    model = on_device(zoo.resnet_small(), seed=1)
    x = images()
    folded, report = bntool.fold(model, (x,), device=DEVICE)
    assert report.comparison.passed and report.comparison.device == str(torch.device(DEVICE))
    assert bns(folded) == 0 and bns(model) == 11  # the given model is not changed
    assert {p.device.type for p in folded.parameters()} == {torch.device(DEVICE).type}
    with torch.no_grad(), tf32(False):
        got = folded.eval()(x).double().cpu()
    torch.testing.assert_close(got, float64_eval_output(model, x), rtol=1e-4, atol=1e-5)


def test_a_cpu_checkpoint_verified_with_device_cuda(cli, lenet_file, tmp_path):
    path, model = lenet_file
    out = tmp_path / "folded.safetensors"
    result = cli("fold", path, "--model", LENET, "--device", DEVICE, "--out", out, "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["verification"]["device"] == str(torch.device(DEVICE)) and report["verification"]["passed"]
    folded = bntool.load(out, model=zoo.lenet()).eval()  # written from the CPU model: loads on the CPU
    assert bns(folded) == 0
    x = torch.randn(5, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).double(), float64_eval_output(model, x), rtol=1e-4, atol=1e-5)
    human = cli("fold", path, "--model", LENET, "--device", DEVICE, "--dry-run")
    assert f"Verified on {torch.device(DEVICE)}:" in human.out


def test_tf32_switched_on_by_the_caller_is_off_during_verification_and_restored(caller_tf32):
    # catches: verification under the caller's TF32 (on Ampere and later a conv is then ~1e-3 off, and the
    # tolerance derived from such a run would hide a bad fold), and a setting left changed
    model = on_device(zoo.resnet_small(), seed=2)
    seen = []
    model.conv1.register_forward_pre_hook(lambda m, a: seen.append(tf32_state()))
    _, report = bntool.fold(model, (images(seed=1),), device=DEVICE)
    assert len(seen) >= 3  # the original, the folded model and the float64 reference ran
    assert all(set(state.values()) == {"ieee"} for state in seen), seen
    assert tf32_state() == caller_tf32
    assert report.comparison.passed and report.comparison.max_rel_error < 1e-5  # full float32, not TF32


@pytest.mark.parametrize("layer", [1, 6])
def test_a_one_channel_corruption_is_caught_on_cuda(monkeypatch, layer):
    # a fold 0.1% wrong in one output channel: strict, the fold fails on the GPU; otherwise that fold is taken out
    from tests.fold_models import corrupt_nth_fold

    model = on_device(zoo.resnet_small(), seed=3)
    x = images(seed=2)
    expected = bntool.plan_fold(model, (x,))
    corrupt_nth_fold(monkeypatch, layer)
    with pytest.raises(VerificationError) as info:
        bntool.fold(model, (x,), device=DEVICE, strict=True)
    assert f"does not match the original on {torch.device(DEVICE)}" in str(info.value)
    assert not info.value.report.comparison.passed
    monkeypatch.undo()
    corrupt_nth_fold(monkeypatch, layer)  # afresh, for the default fold: the blamed fold is taken out
    folded, report = bntool.fold(model, (x,), device=DEVICE)
    assert [s.bn for s in report.rejected] == [expected.pairs[layer - 1].bn]
    assert report.comparison.passed and report.comparison.device == str(torch.device(DEVICE))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_models_fold_and_verify_on_cuda(dtype):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.BatchNorm2d(6))
    model = randomize_bn(model, seed=4).to(DEVICE, dtype)
    x = images(2, 12, seed=3).to(dtype)
    folded, report = bntool.fold(model, (x,), device=DEVICE)
    assert report.comparison.passed and report.comparison.device == str(torch.device(DEVICE))
    assert folded[0].weight.dtype == dtype and folded[0].weight.device.type == torch.device(DEVICE).type
    bn = model[1]  # the weight is multiplied in float32 and rounded once to the dtype, on the GPU as on the CPU
    k = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
    assert torch.equal(folded[0].weight, (model[0].weight.float() * k.float().view(-1, 1, 1, 1)).to(dtype))


# ----------------------------------------------------------------------------- recalibrate


def test_recalibrate_on_cuda_is_exact_against_a_float64_oracle():
    # the oracle is the float64 concatenation of what each BN received; catches EMA, equal weighting,
    # averaged batch variances, a merge that loses calls, and TF32 in the pass (convs ~1e-3 off)
    model = on_device(zoo.resnet_small(), seed=5)
    batches = uneven_batches((3, 16, 16), sizes=(6, 9, 4, 7))  # on the CPU: moved by bntool
    capture = Capture(model)
    report = recalibrate(model, batches, merge_every=3)
    capture.remove()
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm):
            assert module.running_var.device.type == torch.device(DEVICE).type
            assert_stats(module, *(t.to(module.running_var.device) for t in capture.oracle(name)))
    assert report.unchanged_non_bn and {layer.method for layer in report.layers} == {"readback"}
    assert all(layer.calls == 4 for layer in report.layers)


def test_recalibrate_bfloat16_activations_on_cuda_use_float64_and_are_exact():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).to(DEVICE)
    randomize_bn(model, seed=6)

    def forward(m, batch):  # mixed precision: bf16 activations, float32 BN parameters and buffers
        return m[1](m[0](batch.to(DEVICE)).to(torch.bfloat16))

    capture = Capture(model)
    report = recalibrate(model, uneven_batches((3, 8, 8)), forward=forward)
    capture.remove()
    assert report.layers[0].method == "float64"
    assert_stats(model[1], *(t.to(model[1].running_var.device) for t in capture.oracle("1")))


@needs_gpu
def test_the_recalibration_pass_never_waits_for_the_gpu(monkeypatch):
    # catches .item() / bool(tensor) / torch.tensor(list, device=cuda) / blocking copies in the per-call hook
    # or in the merges (merge_every=2: merges happen during the pass)
    from bntool.recalibration import recalibrate as recalibration

    real = recalibration._pass

    def strict(*args, **kwargs):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    class Equals(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Equals.count += func is torch.ops.aten.equal.default
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(recalibration, "_pass", strict)
    model = on_device(zoo.resnet_small(), seed=7)
    batches = [b.to(DEVICE) for b in uneven_batches((3, 16, 16), sizes=(6, 9, 4, 7, 5))]
    with Equals():
        report = recalibrate(model, batches, merge_every=2)
    assert all(layer.calls == 5 for layer in report.layers) and report.unchanged_non_bn
    assert Equals.count == 1  # after the pass: every parameter and buffer checked with one comparison


def test_recalibrate_cli_on_cuda_with_and_without_tf32(cli, tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(zoo.resnet_small(), seed=8)
    ckpt, data = tmp_path / "r.pt", tmp_path / "calib.pt"
    torch.save(model.state_dict(), ckpt)
    torch.save(torch.cat(uneven_batches((3, 16, 16), sizes=(8, 8, 8, 6))), data)
    reports = {}
    for flags in ((), ("--allow-tf32",)):
        out = tmp_path / f"out{len(flags)}.safetensors"
        result = cli("recalibrate", ckpt, "--model", RESNET, "--data", data, "--batch-size", 8, "--device", DEVICE,
                     "--out", out, "--json", *flags)
        assert result.code == 0, result.err
        reports[flags] = json.loads(result.out)
    exact, tf32_report = reports[()], reports[("--allow-tf32",)]
    assert exact["device"] == str(torch.device(DEVICE)) and exact["tf32"] is False and exact["passed"]
    assert tf32_report["tf32"] is ON_GPU and tf32_report["passed"]  # TF32 exists only on a GPU
    loaded = bntool.load(tmp_path / "out0.safetensors", model=zoo.resnet_small())
    expected = copy.deepcopy(model)
    recalibrate(expected, uneven_batches((3, 16, 16), sizes=(8, 8, 8, 6)))  # the same batches, on the CPU
    for key, value in expected.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-6, atol=1e-6 * value.abs().max().item())


@needs_gpu
def test_torchrun_one_process_with_nccl(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(zoo.resnet_small(), seed=9)
    ckpt, data, out = tmp_path / "r.pt", tmp_path / "calib.pt", tmp_path / "nccl.safetensors"
    torch.save(model.state_dict(), ckpt)
    torch.save(torch.cat(uneven_batches((3, 16, 16), sizes=(8, 8, 5))), data)
    proc = torchrun("recalibrate", ckpt, "--model", RESNET, "--data", data, "--batch-size", 8, "--device", "cuda",
                    "--out", out, "--json", nproc=1, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["backend"] == "nccl" and report["world_size"] == 1 and report["device"] == "cuda:0"
    assert report["num_batches"] == 3 and report["num_samples"] == 21 and report["passed"]
    expected = copy.deepcopy(model)
    recalibrate(expected, uneven_batches((3, 16, 16), sizes=(8, 8, 5)))
    loaded = bntool.load(out, model=zoo.resnet_small()).state_dict()
    for key, value in expected.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(loaded[key], value, rtol=1e-6, atol=1e-6 * value.abs().max().item())


@needs_gpu
def test_torchrun_with_more_processes_than_gpus_is_refused_clearly(tmp_path):
    torch.manual_seed(0)
    ckpt, data = tmp_path / "r.pt", tmp_path / "calib.pt"
    torch.save(randomize_bn(zoo.resnet_small(), seed=10).state_dict(), ckpt)
    torch.save(torch.randn(16, 3, 16, 16), data)
    gpus = torch.cuda.device_count()
    proc = torchrun("recalibrate", ckpt, "--model", RESNET, "--data", data, "--device", "cuda",
                    "--out", tmp_path / "o.safetensors", nproc=gpus + 1, cwd=tmp_path, timeout=180)
    assert proc.returncode != 0
    assert f"torchrun started {gpus + 1} processes on this machine but {gpus} CUDA GPU(s) are visible" in proc.stderr
    assert f"--nproc-per-node {gpus}" in proc.stderr and "--device cpu" in proc.stderr
    assert not (tmp_path / "o.safetensors").exists()


# ----------------------------------------------------------------------------- freeze / unfreeze


def test_freeze_on_cuda_frozen_in_train_equals_eval():
    model = on_device(zoo.resnet_small(), seed=11)
    frozen, report = bntool.freeze(model)
    assert type(frozen.bn1) is FrozenBatchNorm2d and frozen.bn1.running_var.device.type == torch.device(DEVICE).type
    check = check_frozen(model, frozen, [images(seed=4)], device=DEVICE)
    assert check.passed and check.statistics_moved == (), check.failure_message()
    assert check.comparison.device == str(torch.device(DEVICE)) and len(check.frozen_layers) == len(report.frozen)


def test_freeze_and_unfreeze_cli_on_cuda_round_trip(cli, lenet_file, tmp_path):
    path, model = lenet_file
    frozen, unfrozen = tmp_path / "f.safetensors", tmp_path / "u.safetensors"
    result = cli("freeze", path, "--model", LENET, "--device", DEVICE, "--out", frozen, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["verification"]["device"] == str(torch.device(DEVICE))
    result = cli("unfreeze", frozen, "--model", LENET, "--device", DEVICE, "--out", unfrozen, "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["verification"]["device"] == str(torch.device(DEVICE))
    state = bntool.load(unfrozen, model=zoo.lenet()).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key


# ----------------------------------------------------------------------------- export and inspect


def test_export_on_cuda_uses_the_cuda_provider_when_present_and_says_which(cli, lenet_file, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path, _ = lenet_file
    cuda_provider = ON_GPU and "CUDAExecutionProvider" in ort.get_available_providers()
    expected = "CUDAExecutionProvider" if cuda_provider else "CPUExecutionProvider"
    result = cli("export", path, "--model", LENET, "--device", DEVICE, "--out", tmp_path / "l.onnx", "--json",
                 "--dynamic-batch")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["provider"] == expected and report["passed"] and report["bn_left"] == 0
    assert {v["device"] for v in report["verification"]} == {str(torch.device(DEVICE))}
    human = cli("export", path, "--model", LENET, "--device", DEVICE, "--out", tmp_path / "h.onnx")
    assert human.code == 0 and f"onnxruntime ({expected}" in human.out


def test_inspect_a_model_on_the_gpu_and_a_checkpoint_saved_from_it(cli, tmp_path):
    model = on_device(zoo.resnet_small(), seed=12)
    report = bntool.inspect(model, (images(2, seed=5),))
    assert len(report.rows) == 11 and all(row.foldable for row in report.rows)
    untraceable = on_device(zoo.untraceable_net(), seed=13)  # its dataflow comes from a recorded forward pass
    recorded = bntool.inspect(untraceable)
    assert recorded.dataflow_method == "recorded" and recorded.rows
    path = tmp_path / "gpu.pt"
    torch.save(model.state_dict(), path)  # CUDA tensors in the file
    result = cli("inspect", path, "--model", RESNET, "--json")
    assert result.code == 0, result.err
    rows = json.loads(result.out)["layers"]
    assert len(rows) == 11 and all(row["foldable"] for row in rows)
