"""Throughput and exactness of ``bntool.recalibrate`` against its floor and ``swa_utils.update_bn``, fairly.

    python benchmarks/bench_recalibrate.py [--device auto|cpu|cuda] [--repeats 3] [--threads N]
        [--models resnet50,mobilenet_v2] [--image-size S --batch-size B --batches K] [--data-on device|host]
        [--json results.json]

For a ResNet-50 and a MobileNetV2 from ``examples/models.py`` (BN statistics
randomised), on the same list of batches, three contenders:

- floor: a plain ``torch.no_grad()`` forward over the batches with only the BN
  layers in training mode (what any recalibration must at least cost);
- bntool: ``bntool.recalibrate(model, batches)``, everything included (state
  snapshot, the bit-identity check, the float64 merges, the final transfer);
- update_bn: ``torch.optim.swa_utils.update_bn(batches, model)``.

Fairness: every row runs all three at one precision setting. On a GPU there
are two rows per model: TF32 off (exact float32; bntool's default) and TF32
on (cuDNN convolutions and cuBLAS matmuls; ``recalibrate(allow_tf32=True)``);
on the CPU TF32 does not exist and there is one row. The data is placed the
same way for everyone: all batches on the device beforehand (``--data-on
device``, the default) or all on the host, copied by each contender
(``--data-on host``). Times are the minimum over ``--repeats`` runs,
interleaved, after a warm-up at the row's precision (cuDNN picks its
algorithms per setting); wall-clock (synchronised) and process CPU time.

Exactness is the largest relative difference from one float64 oracle, computed
with TF32 off: the two-pass float64 mean and unbiased variance of what every BN
received in a TF32-off pass, ``|mean - mean*| / sqrt(var*)`` and ``|var -
var*| / var*`` over all channels of all layers. In a TF32-on row both
contenders differ from it by TF32's own rounding; ``update_bn`` also by
averaging per-batch variances (it misses the spread between batch means).
Progress goes to stderr as it goes, results to stdout; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _progress import start, step  # noqa: E402

from bntool.recalibration.recalibrate import recalibrate  # noqa: E402
from bntool.runtime.running import resolve_device, tf32  # noqa: E402
from bntool.verify import bits as statediff  # noqa: E402
from examples.models import mobilenet_v2, randomize_bn_, resnet50  # noqa: E402

FACTORIES = {"resnet50": resnet50, "mobilenet_v2": mobilenet_v2}
CPU_SETTINGS = {"resnet50": (112, 16, 8), "mobilenet_v2": (112, 32, 12)}  # image size, batch size, batches
GPU_SETTINGS = {"resnet50": (224, 64, 10), "mobilenet_v2": (224, 128, 10)}


def say(text: str) -> None:
    print(text, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bns(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]


def floor_pass(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> None:
    model.eval()
    for _, bn in bns(model):
        bn.train()
    with torch.no_grad():
        for batch in batches:
            model(batch.to(device, non_blocking=True))


def oracle(model: nn.Module, batches: list[torch.Tensor], device: torch.device) -> dict[str, tuple]:
    """Float64 two-pass mean and unbiased variance of every BN input, BN-only train mode, TF32 off."""
    model = copy.deepcopy(model)
    layers = bns(model)
    sums = {n: [0, 0.0] for n, _ in layers}
    phase: dict[str, dict | None] = {"mean": None}

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
    with tf32(False):
        floor_pass(model, batches, device)
        phase["mean"] = {n: sums[n][1] / sums[n][0] for n in sums}
        floor_pass(model, batches, device)
    for h in handles:
        h.remove()
    return {n: (phase["mean"][n].cpu(), (sum(sums[n][2:]) / (sums[n][0] - 1)).cpu()) for n in sums}


def max_rel_diff(model: nn.Module, reference: dict) -> float:
    worst = 0.0
    for name, bn in bns(model):
        mean, var = reference[name]
        rm, rv = bn.running_mean.double().cpu(), bn.running_var.double().cpu()
        worst = max(worst, ((rm - mean).abs() / var.sqrt()).max().item(), ((rv - var).abs() / var).max().item())
    return worst


def timed(model: nn.Module, fn, device: torch.device) -> tuple[float, float]:
    candidate = copy.deepcopy(model)
    gc.collect()
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    fn(candidate)
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def bench_row(model: nn.Module, batches: list[torch.Tensor], device: torch.device, allow_tf32: bool,
              repeats: int, reference: dict) -> dict:
    """floor, bntool and update_bn at one precision setting: best times, ratios, exactness."""
    runs = {
        "floor": lambda m: floor_pass(m, batches, device),
        "bntool": lambda m: recalibrate(m, batches, allow_tf32=allow_tf32),
        "update_bn": lambda m: torch.optim.swa_utils.update_bn(batches, m, device=device),
    }
    wall = {key: float("inf") for key in runs}
    cpu = dict(wall)
    with tf32(allow_tf32):
        floor_pass(copy.deepcopy(model), batches[:2], device)  # warm-up: cuDNN algorithms for this setting
        for repeat in range(repeats):
            for key, fn in runs.items():
                w, c = timed(model, fn, device)
                wall[key], cpu[key] = min(wall[key], w), min(cpu[key], c)
            step(f"    repeat {repeat + 1}/{repeats}: " + ", ".join(f"{k} {wall[k]:.3f}s" for k in runs))
        ours, theirs = copy.deepcopy(model), copy.deepcopy(model)
        report = recalibrate(ours, batches, allow_tf32=allow_tf32)
        torch.optim.swa_utils.update_bn(batches, theirs, device=device)
    start = time.perf_counter()
    statediff.Snapshot(model, [f"{n}.{k}" for n, _ in bns(model) for k in ("running_mean", "running_var")]).changed(model)
    sync(device)
    fixed = time.perf_counter() - start
    return {
        "tf32": allow_tf32,
        "wall_s": wall, "cpu_s": cpu,
        "ratio_wall": {k: wall[k] / wall["floor"] for k in runs},
        "ratio_cpu": {k: cpu[k] / cpu["floor"] for k in runs},
        "max_rel_diff_vs_float64_oracle": {"bntool": max_rel_diff(ours, reference),
                                           "update_bn": max_rel_diff(theirs, reference)},
        "state_check_s": fixed,
        "batch_var_gap": report.mean_of_batch_vars_vs_population,
        "unchanged_non_bn": report.unchanged_non_bn,
    }


def bench(name: str, device: torch.device, settings: tuple[int, int, int], repeats: int, data_on: str) -> dict:
    size, batch_size, num_batches = settings
    model = randomize_bn_(FACTORIES[name](), seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    home = device if data_on == "device" else torch.device("cpu")
    batches = [(torch.randn(batch_size, 3, size, size, generator=gen) * 1.5 + 0.3).to(home)
               for _ in range(num_batches)]
    say(f"\n{name}: input {batch_size}x3x{size}x{size}, {num_batches} batches on the {data_on}, {len(bns(model))} BN "
        f"layers, device {device}, torch threads {torch.get_num_threads()}")
    step(f"{name}: float64 oracle (TF32 off)")
    reference = oracle(model, batches, device)
    settings_tf32 = (False, True) if device.type == "cuda" else (False,)
    rows = []
    for allow in settings_tf32:
        label = ("TF32 on" if allow else "TF32 off") if device.type == "cuda" else "float32"
        step(f"{name}: row {label}")
        row = bench_row(model, batches, device, allow, repeats, reference)
        row["label"] = label
        rows.append(row)
    say(f"  {'precision':<10} {'contender':<10} {'wall (min)':>11} {'ratio':>7} | {'CPU time':>9} {'ratio':>7} | "
        "max rel diff vs float64 oracle")
    for row in rows:
        for key in ("floor", "bntool", "update_bn"):
            diff = row["max_rel_diff_vs_float64_oracle"].get(key)
            say(f"  {row['label']:<10} {key:<10} {row['wall_s'][key]:9.3f} s {row['ratio_wall'][key]:7.3f} | "
                f"{row['cpu_s'][key]:7.3f} s {row['ratio_cpu'][key]:7.3f} | " + ("" if diff is None else f"{diff:.2e}"))
    say(f"  state check (snapshot + bit-identity), included in bntool: {rows[0]['state_check_s'] * 1e3:.1f} ms; "
        f"averaging batch variances would be off by up to {rows[0]['batch_var_gap']:.2e}")
    return {"model": name, "image_size": size, "batch_size": batch_size, "batches": num_batches,
            "bn_layers": len(bns(model)), "data_on": data_on, "rows": rows}


def environment(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    else:
        info.update(cpu=platform.processor() or platform.machine())
    return info


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--models", default="resnet50,mobilenet_v2")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--data-on", choices=("device", "host"), default="device")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    start()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    defaults = GPU_SETTINGS if device.type == "cuda" else CPU_SETTINGS
    env = environment(device)
    say(f"torch {env['torch']} on {env.get('gpu', env.get('cpu'))}; times are the minimum of {args.repeats} "
        "interleaved runs; ratios are against the floor at the same precision setting")
    results = {"environment": env, "models": []}
    for name in [m for m in args.models.split(",") if m]:
        size, batch_size, batches = defaults[name]
        settings = (args.image_size or size, args.batch_size or batch_size, args.batches or batches)
        results["models"].append(bench(name, device, settings, args.repeats, args.data_on))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
