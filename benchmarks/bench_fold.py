"""Fold benchmark: bntool's fold beside torch.fx's fuse, the whole CLI run, and eval latency.

    python benchmarks/bench_fold.py [--repeats 5] [--batch 1]

For a ResNet-50-sized and a MobileNetV2-sized network from examples/models.py
(BN statistics randomized), it prints:

* fold (plan + apply on a copy) vs ``torch.fx.experimental.optimization.fuse``
  on the same model in the same process, and how many BNs each folded;
* the whole ``bntool fold`` command on a saved checkpoint (load, fold,
  verify in float64 layer by layer, write, reload, verify again);
* eval latency of the original and the folded model.

Timings are medians over ``--repeats`` runs, on whatever this machine is.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bntool.folding import apply_plan, plan_fold  # noqa: E402
from bntool.norms import is_batchnorm  # noqa: E402
from examples import models as zoo  # noqa: E402

from _progress import start, step  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def count_bn(module: nn.Module) -> int:
    return sum(is_batchnorm(m) for m in module.modules())


def bench(name: str, model: nn.Module, batch: int, repeats: int) -> dict:
    zoo.randomize_bn_(model, seed=0)
    model.eval()
    x = torch.randn(batch, 3, 224, 224)
    total_bn = count_bn(model)

    def ours():
        return apply_plan(copy.deepcopy(model), plan_fold(model, (x,)))

    step(f"{name}: bntool fold vs fx fuse, {repeats} interleaved runs")
    folded = ours()
    fused = fx_optimization.fuse(model)
    ours_s, fx_s = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine
        ours_s.append(median_seconds(ours, 1))
        fx_s.append(median_seconds(lambda: fx_optimization.fuse(model), 1))
    row = {
        "model": name,
        "bn": total_bn,
        "bntool_fold_s": statistics.median(ours_s),
        "fx_fuse_s": statistics.median(fx_s),
        "bntool_folded": total_bn - count_bn(folded),
        "fx_folded": total_bn - count_bn(fused),
    }
    step(f"{name}: eval latency, original and folded")
    with torch.no_grad():
        for _ in range(2):
            model(x), folded(x)
        row["eval_original_ms"] = 1e3 * median_seconds(lambda: model(x), repeats)
        row["eval_folded_ms"] = 1e3 * median_seconds(lambda: folded(x), repeats)

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / f"{name}.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
        factory = "resnet50" if name.startswith("resnet") else "mobilenet_v2"
        cmd = [sys.executable, "-m", "bntool", "fold", str(ckpt), "--model", f"{ROOT / 'examples' / 'models.py'}:{factory}",
               "--input-shape", f"{batch},3,224,224", "--out", str(Path(tmp) / "folded.safetensors"), "--force",
               "--device", "cpu"]
        step(f"{name}: the whole `bntool fold` command")
        began = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        row["cli_s"] = time.perf_counter() - began
    return row


def coverage() -> list[tuple[str, int, int, str]]:
    """How many BNs each tool folds on the smaller example models (fx fuse raises on untraceable ones)."""
    from bntool.folding import fold

    rows = []
    for label, model in [
        ("lenet (conv + linear)", zoo.lenet()),
        ("convtranspose_net(dims=2, groups=4)", zoo.convtranspose_net(dims=2, groups=4)),
        ("convtranspose_net(dims=3)", zoo.convtranspose_net(dims=3)),
        ("untraceable_net (data-dependent branch)", zoo.untraceable_net()),
    ]:
        step(f"coverage: {label}")
        zoo.randomize_bn_(model, seed=0)
        model.eval()
        total = count_bn(model)
        try:
            fx_folded = total - count_bn(fx_optimization.fuse(model))
            fx_text = str(fx_folded)
        except Exception as exc:  # fx cannot trace it
            fx_text = f"0 ({type(exc).__name__})"
        _, report = fold(model)
        rows.append((label, total, len(report.plan.pairs), fx_text))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    start()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, median of {args.repeats}")
    rows = [bench("resnet50", zoo.resnet50(), args.batch, args.repeats),
            bench("mobilenet_v2", zoo.mobilenet_v2(), args.batch, args.repeats)]
    print()
    print("| model | BN layers | bntool fold (plan+apply) | fx fuse | folded: bntool / fx | "
          "`bntool fold` CLI, end to end | eval original | eval folded |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bn']} | {r['bntool_fold_s'] * 1e3:.0f} ms | {r['fx_fuse_s'] * 1e3:.0f} ms | "
              f"{r['bntool_folded']} / {r['fx_folded']} | {r['cli_s']:.1f} s | {r['eval_original_ms']:.1f} ms | "
              f"{r['eval_folded_ms']:.1f} ms |")
    print()
    print("| model | BN layers | folded by bntool | folded by fx fuse |")
    print("|---|---|---|---|")
    for label, total, ours, fx_text in coverage():
        print(f"| {label} | {total} | {ours} | {fx_text} |")


if __name__ == "__main__":
    main()
