"""Program fold benchmark: ``bntool.fold`` of torch.export programs beside the passes that install with torch.

    python benchmarks/bench_pt2_fold.py [--image-size 224] [--irs default,decomposed] [--threads 2]

For the examples' ResNet-50 and MobileNetV2 (plain BatchNorm2d,
examples/models.py) and an EfficientNet-B0 built from timm's BatchNormAct2d
(examples/archs.py), BN statistics randomized, exported with
``torch.export.export`` (and ``run_decompositions()`` for the decomposed IR),
it prints, per network, IR and tool:

* BN nodes before and after (aten batch-norm ops in the graph);
* the max abs error of the result against the original module in float32;
* the time of the fold (bntool: plan, new program, and verification of
  ``module()`` against the float64 run at every output and folded layer;
  also without verification).

Compared, on the same program: ``torch.fx.experimental.optimization.fuse`` on
``ExportedProgram.module()`` (it matches ``nn.Conv2d`` / ``nn.BatchNorm2d``
modules, which a program's graph no longer has), and torchao's pt2e
``_fuse_conv_bn_`` on ``module()`` when torchao imports (it needs no other
torch: ``pip install --no-deps torchao``); torch 2.13 no longer ships
``torch.ao.quantization.pt2e``. A tool that fails says so in its row.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.fx.experimental.optimization as fx_optimization

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _progress import start, step  # noqa: E402

import bntool  # noqa: E402
from bntool.graph.program import BN_OPS, TRAINING_BN_OPS  # noqa: E402
from examples import archs  # noqa: E402
from examples import models as zoo  # noqa: E402

warnings.filterwarnings("ignore")


def bn_nodes(graph: torch.fx.Graph) -> int:
    return sum(n.op == "call_function" and (n.target in BN_OPS or n.target in TRAINING_BN_OPS) for n in graph.nodes)


def error(module, model, x) -> float:
    with torch.no_grad():
        return float((module(x) - model(x)).abs().max())


def nets(size: int):
    yield "ResNet-50", lambda: zoo.resnet50()
    yield "MobileNetV2", lambda: zoo.mobilenet_v2()
    yield "EfficientNet-B0 (BatchNormAct2d)", lambda: archs.efficientnet_like(width=1.0, depth=1.0, image_size=size,
                                                                               num_classes=1000)


def torchao_fuse():
    try:
        from torchao.quantization.pt2e.utils import _fuse_conv_bn_
    except Exception as exc:  # noqa: BLE001 - not installed, or built for another torch
        return None, f"torchao not importable ({type(exc).__name__})"
    return _fuse_conv_bn_, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--irs", default="default,decomposed")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    start()
    torch.set_num_threads(args.threads)
    ao_fuse, ao_missing = torchao_fuse()
    if ao_missing:
        print(f"# torchao: skipped, {ao_missing}")
    print(f"# torch {torch.__version__}, {args.threads} thread(s), input 1x3x{args.image_size}x{args.image_size}")
    print("| network | IR | tool | BN nodes before | after | max abs error | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for name, build in nets(args.image_size):
        torch.manual_seed(0)
        model = zoo.randomize_bn_(build()).eval()
        x = torch.randn(1, 3, args.image_size, args.image_size)
        check = torch.randn(1, 3, args.image_size, args.image_size)  # (the program was exported at batch 1)
        step(f"{name}: torch.export")
        exported = torch.export.export(model, (x,))
        for ir in args.irs.split(","):
            program = exported if ir == "default" else exported.run_decompositions()
            before = bn_nodes(program.graph)

            def row(tool: str, after, err, seconds, note: str = "", name=name, ir=ir, before=before) -> None:
                shown = f"{err:.2e}" if isinstance(err, float) else err
                print(f"| {name} | {ir} | {tool} | {before} | {after} | {shown} | {seconds:.2f}{note} |")

            step(f"{name} ({ir}): bntool.fold, verified")
            t0 = time.perf_counter()
            folded, report = bntool.fold(program)
            seconds = time.perf_counter() - t0
            row("bntool.fold (verified)", bn_nodes(folded.graph), error(folded.module(), model, check), seconds)
            step(f"{name} ({ir}): bntool.fold, verify=False")
            t0 = time.perf_counter()
            unverified, _ = bntool.fold(program, verify=False)
            row("bntool.fold (verify=False)", bn_nodes(unverified.graph), error(unverified.module(), model, check),
                time.perf_counter() - t0)

            step(f"{name} ({ir}): torch.fx fuse on module()")
            t0 = time.perf_counter()
            try:
                fused = fx_optimization.fuse(program.module(), inplace=False)
                row("torch.fx fuse(module())", bn_nodes(fused.graph), error(fused, model, check),
                    time.perf_counter() - t0)
            except Exception as exc:  # noqa: BLE001 - reported as the tool's result
                row("torch.fx fuse(module())", "fails", f"{type(exc).__name__}", time.perf_counter() - t0)
            if ao_fuse is not None:
                step(f"{name} ({ir}): torchao _fuse_conv_bn_ on module()")
                module = copy.deepcopy(program.module())
                t0 = time.perf_counter()
                try:
                    ao_fuse(module)
                    row("torchao pt2e _fuse_conv_bn_", bn_nodes(module.graph), error(module, model, check),
                        time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001 - reported as the tool's result
                    row("torchao pt2e _fuse_conv_bn_", "fails", f"{type(exc).__name__}", time.perf_counter() - t0)
            if not report.passed:
                print(f"# {name} ({ir}): bntool verification FAILED")


if __name__ == "__main__":
    main()
