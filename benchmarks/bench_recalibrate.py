"""Throughput and exactness of ``bntool.recalibrate`` against its floor and ``swa_utils.update_bn``.

    python benchmarks/bench_recalibrate.py [--device auto|cpu|cuda] [--repeats 3] [--threads N]

For a ResNet-50 and a MobileNetV2 from ``examples/models.py`` (BN statistics
randomised), on the same list of batches:

- floor: a plain ``torch.no_grad()`` forward over the batches with only the BN
  layers in training mode (what any recalibration must at least cost);
- bntool: ``bntool.recalibrate(model, batches)``, everything included (state
  snapshot, the bit-identity check, the float64 merge);
- update_bn: ``torch.optim.swa_utils.update_bn(batches, model)``.

Times are the minimum over ``--repeats`` runs, interleaved; wall-clock and
process CPU time are both shown (CPU time is the steadier one on a shared
machine; with ``--threads 1`` it does not count threads waiting on each other). Exactness is the
largest relative difference from a float64 two-pass oracle over the same BN
inputs: ``|mean - mean*| / sqrt(var*)`` and ``|var - var*| / var*`` over all
channels of all layers. The inputs are smaller than ImageNet's on the CPU so
the whole run takes about two minutes on two cores; the settings are printed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bntool import recalibration  # noqa: E402
from bntool.recalibration import recalibrate  # noqa: E402
from bntool.verify import resolve_device  # noqa: E402

from _progress import start, step  # noqa: E402
from examples.models import mobilenet_v2, randomize_bn_, resnet50  # noqa: E402

CPU_SETTINGS = {"resnet50": (112, 16, 8), "mobilenet_v2": (112, 32, 12)}  # image size, batch size, batches
GPU_SETTINGS = {"resnet50": (224, 64, 30), "mobilenet_v2": (224, 128, 30)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bns(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def floor_pass(model: nn.Module, batches: list[torch.Tensor]) -> None:
    model.eval()
    for _, bn in bns(model):
        bn.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)


def oracle(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Float64 two-pass mean and unbiased variance of every BN input, BN-only train mode."""
    model = copy.deepcopy(model)
    layers = bns(model)
    sums = {n: [0, 0.0] for n, _ in layers}
    phase = {"mean": None}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0].detach().double().transpose(0, 1).reshape(args[0].shape[1], -1)
            if phase["mean"] is None:
                sums[name][0] += x.shape[1]
                sums[name][1] = sums[name][1] + x.sum(dim=1)
            else:
                sums[name].append((x - phase["mean"][name][:, None]).square().sum(dim=1))
        return hook

    handles = [bn.register_forward_pre_hook(hook_for(n)) for n, bn in layers]
    floor_pass(model, batches)
    phase["mean"] = {n: sums[n][1] / sums[n][0] for n in sums}
    floor_pass(model, batches)
    for h in handles:
        h.remove()
    return {n: (phase["mean"][n], sum(sums[n][2:]) / (sums[n][0] - 1)) for n in sums}


def max_rel_diff(model: nn.Module, reference: dict) -> float:
    worst = 0.0
    for name, bn in bns(model):
        mean, var = reference[name]
        rm, rv = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
        mean, var = mean.cpu(), var.cpu()
        worst = max(worst, ((rm - mean).abs() / var.sqrt()).max().item(), ((rv - var).abs() / var).max().item())
    return worst


def bench(name: str, factory, device: torch.device, settings: tuple[int, int, int], repeats: int) -> None:
    size, batch_size, num_batches = settings
    model = randomize_bn_(factory(), seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, 3, size, size, generator=gen) * 1.5 + 0.3).to(device)
               for _ in range(num_batches)]
    print(f"\n{name}: input {batch_size}x3x{size}x{size}, {num_batches} batches, {len(bns(model))} BN layers, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    floor_pass(copy.deepcopy(model), batches[:2])  # warm-up (allocator, kernels)

    def timed(fn) -> tuple[float, float]:
        candidate = copy.deepcopy(model)
        gc.collect()
        sync(device)
        start, cpu = time.perf_counter(), time.process_time()
        fn(candidate)
        sync(device)
        return time.perf_counter() - start, time.process_time() - cpu

    runs = {
        "floor": lambda m: floor_pass(m, batches),
        "bntool": lambda m: recalibrate(m, batches),
        "update_bn": lambda m: torch.optim.swa_utils.update_bn(batches, m, device=device),
    }
    times = {key: float("inf") for key in runs}
    cpu_times = dict(times)
    for repeat in range(repeats):
        for key, fn in runs.items():
            step(f"{name}: run {repeat + 1} of {repeats}, {key}")
            wall, cpu = timed(fn)
            times[key], cpu_times[key] = min(times[key], wall), min(cpu_times[key], cpu)
    step(f"{name}: float64 oracle and accuracy")
    reference = oracle(model, batches)
    ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
    report = recalibrate(ours, batches)
    torch.optim.swa_utils.update_bn(batches, theirs, device=device)
    names = [n for n, _ in bns(model)]
    start = time.perf_counter()
    recalibration._Snapshot(model, names).changed(model)
    fixed = time.perf_counter() - start
    floor, cpu_floor = times["floor"], cpu_times["floor"]
    print("             wall (min)  ratio   | process CPU time (min)  ratio")
    for key in runs:
        print(f"  {key:<10} {times[key]:8.3f} s  {times[key] / floor:6.3f}  | {cpu_times[key]:8.3f} s  "
              f"{cpu_times[key] / cpu_floor:6.3f}")
    print(f"  ratios: bntool/floor {times['bntool'] / floor:.3f}, update_bn/floor {times['update_bn'] / floor:.3f} "
          f"(wall); bntool includes {fixed * 1e3:.0f} ms fixed cost (state snapshot + bit-identity check)")
    print(f"  max rel diff vs float64 oracle: bntool {max_rel_diff(ours, reference):.2e}   "
          f"update_bn {max_rel_diff(theirs, reference):.2e}")
    print(f"  report: mean of batch variances vs population variance, largest gap "
          f"{report.mean_of_batch_vars_vs_population:.2e}; non-BN state unchanged: {report.unchanged_non_bn}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    start()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    settings = GPU_SETTINGS if device.type == "cuda" else CPU_SETTINGS
    print(f"torch {torch.__version__}; times are the minimum of {args.repeats} interleaved runs; "
          "ratios are against the floor (no_grad forward, BN layers in train mode)")
    bench("resnet50", resnet50, device, settings["resnet50"], args.repeats)
    bench("mobilenet_v2", mobilenet_v2, device, settings["mobilenet_v2"], args.repeats)


if __name__ == "__main__":
    main()
