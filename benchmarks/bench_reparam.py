"""Branch-merge benchmark: bntool's fold (with its branch merge) beside each model's own reparameterize.

    python benchmarks/bench_reparam.py [--repeats 15] [--size 224] [--models repvgg_a0,...]

For the training-form look-alikes of examples/reparam.py at full width (BN
statistics, affine parameters and layer scales randomized), it prints per net:

* the BN layers, and the convolutions and tensor adds that run in one eval
  forward (counted at the aten level), after ``bntool.fold`` and after the
  model's own ``reparameterize`` / ``fuse`` (timm's ``reparameterize_model``);
  the three families with no such method show ``-``;
* the max abs error of each against the original run in float64, beside the
  tolerance bntool derived for its output;
* eval latency (the best of ``--repeats``: the least disturbed run on a shared
  machine) of the original, bntool's result and the model's own, interleaved;
* the time of ``bntool.fold`` itself (merge, fold, both verified).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _progress import start, step

import bntool
from bntool.norms import is_batchnorm
from examples import models as zoo
from examples import reparam

FAMILY = (32, 64, 64, 128, 128, 256, 256)
NETS = {
    "RepVGG-A0": lambda size: reparam.repvgg_a0(widths=(48, 96, 192, 1280), num_classes=1000, image_size=size),
    "MobileOne-S0": lambda size: reparam.mobileone_s0(widths=(48, 128, 256, 1024), num_classes=1000,
                                                      image_size=size),
    "FastViT-T8": lambda size: reparam.fastvit_t8(embed_dims=(48, 96, 192, 384), num_classes=1000, image_size=size),
    "FastViT-T8 + RepCPE": lambda size: reparam.fastvit_t8(embed_dims=(48, 96, 192, 384), pos_emb=True,
                                                           num_classes=1000, image_size=size),
    "RepViT-M1": lambda size: reparam.repvit_m1(embed_dims=(48, 96, 192, 384), num_classes=1000, image_size=size),
    "ACNet blocks": lambda size: _sized(reparam.acnet_net(FAMILY), size),
    "YOLOv6 RepVGGBlocks": lambda size: _sized(reparam.yolov6_net(FAMILY), size),
    "DBB-style blocks": lambda size: _sized(reparam.dbb_style_net(FAMILY), size),
}
OWN = {"ACNet blocks": False, "YOLOv6 RepVGGBlocks": False, "DBB-style blocks": False}


def _sized(model: nn.Module, size: int) -> nn.Module:
    model.input_shape = (1, 3, size, size)
    return model


class KernelCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._overloadpacket.__name__
        if name in ("add", "add_") and all(isinstance(a, torch.Tensor) and a.dim() > 1 for a in args[:2]):
            self.ops["tensor add"] += 1
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def counts(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    with torch.no_grad(), KernelCount() as count:
        model(x)
    return sum(is_batchnorm(m) for m in model.modules()), count.ops["convolution"], count.ops["tensor add"]


def randomized(model: nn.Module) -> nn.Module:
    zoo.randomize_bn_(model, seed=0)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, reparam.LayerScale2d):
            m.gamma.data.copy_(torch.randn(m.gamma.shape, generator=g) * 0.5)
    return model.eval()


def bench(name: str, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    model = randomized(NETS[name](size))
    x = torch.randn(1, 3, size, size)
    step(f"{name}: bntool fold (merge + fold, verified)")
    began = time.perf_counter()
    ours, report = bntool.fold(model, (x,))
    fold_s = time.perf_counter() - began
    own = reparam.reparameterize_model(model).eval() if OWN.get(name, True) else None
    with torch.no_grad():
        want = model.double()(x.double())
        model.float()
        err_ours = float((ours(x).double() - want).abs().max())
        err_own = float((own(x).double() - want).abs().max()) if own is not None else None
    step(f"{name}: latency, {repeats} interleaved runs")
    runs: dict[str, list[float]] = {"original": [], "bntool": [], "own": []}
    with torch.no_grad():
        for _ in range(repeats):
            for key, m in (("original", model), ("bntool", ours), ("own", own)):
                if m is None:
                    continue
                began = time.perf_counter()
                m(x)
                runs[key].append(time.perf_counter() - began)
    return {
        "name": name, "original": counts(model, x), "bntool": counts(ours, x),
        "own": counts(own, x) if own is not None else None, "err_bntool": err_ours, "err_own": err_own,
        "tolerance": report.merge.comparison.outputs[-1].tolerance if report.merge.comparison else None,
        "merged": len(report.merge.merges), "not_merged": len(report.merge.skipped) + len(report.merge.rejected),
        "ms": {k: min(v) * 1e3 if v else None for k, v in runs.items()}, "fold_s": fold_s,
    }


def _c(c) -> str:
    return "-" if c is None else f"{c[0]} / {c[1]} / {c[2]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--models", default=",".join(NETS), help="comma-separated subset of: " + ", ".join(NETS))
    args = parser.parse_args()
    start()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, 1x3x{args.size}x{args.size}, best of {args.repeats}")
    rows = [bench(name, args.size, args.repeats) for name in args.models.split(",")]
    print()
    print("| net | BN / conv / add: original | after bntool | after own method | blocks merged (left) | "
          "max error: bntool / own (tolerance) | eval: original / bntool / own | bntool fold |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        own_err = "-" if r["err_own"] is None else f"{r['err_own']:.2g}"
        own_ms = "-" if r["ms"]["own"] is None else f"{r['ms']['own']:.1f}"
        print(f"| {r['name']} | {_c(r['original'])} | {_c(r['bntool'])} | {_c(r['own'])} | {r['merged']} "
              f"({r['not_merged']}) | {r['err_bntool']:.2g} / {own_err} ({r['tolerance']:.2g}) | "
              f"{r['ms']['original']:.1f} / {r['ms']['bntool']:.1f} / {own_ms} ms | {r['fold_s']:.1f} s |")


if __name__ == "__main__":
    main()
