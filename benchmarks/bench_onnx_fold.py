"""BatchNorm folding inside ONNX files: bntool vs the peers, on raw exports (both exporters, optimization off).

For each network (ResNet-50, MobileNetV2, an EfficientNet-style net from
``examples``; BN statistics and affine parameters randomized) and each
exporter, every tool folds the same file; the table gives, per tool, the
BatchNormalization nodes left, whether the written file passes
``onnx.checker`` (full check) and loads in onnxruntime, the largest error
against the original (onnxruntime, same random input), and the time. bntool's
time includes its verification (a float64 reference run and onnxruntime runs
of both graphs); the peers do not verify. A peer that is not installed is
skipped and named.

Times are paired: in one process, each file is folded once by every tool (a
warm-up, which also gives the table's other columns), then ``--repeats``
rounds run every tool once each, in an order that rotates from round to
round; the time is each tool's median. The second table sets bntool's time
against the fastest peer's, and against the fastest peer's that leaves no BN.
Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_onnx_fold.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _progress

from bntool.folding.onnx_fold import fold_onnx
from bntool.onnxio.reference import run_ort, session
from examples import archs, models


def export(net, shape, dynamo: bool):
    net = models.randomize_bn_(net, seed=0).eval()
    x = torch.randn(*shape)
    if dynamo:
        return torch.onnx.export(net, (x,), dynamo=True, optimize=False, verbose=False).model_proto
    buffer = io.BytesIO()
    torch.onnx.export(net, (x,), buffer, dynamo=False, do_constant_folding=False)
    return onnx.load_from_string(buffer.getvalue())


def bntool_fold(m):
    folded, _ = fold_onnx(m)
    return folded


def onnxoptimizer_fold(m):
    import onnxoptimizer

    return onnxoptimizer.optimize(m, ["fuse_bn_into_conv"])


def onnxslim_fold(m):
    import onnxslim

    return onnxslim.slim(m)


def onnxscript_fold(m):
    from onnxscript import optimizer

    copy = onnx.ModelProto()
    copy.CopyFrom(m)
    return optimizer.optimize(copy)


TOOLS = {"bntool": bntool_fold, "onnxoptimizer": onnxoptimizer_fold, "onnxslim": onnxslim_fold,
         "onnxscript": onnxscript_fold}


def valid(m) -> bool:
    try:
        onnx.checker.check_model(m, full_check=True)
        session(m)
        return True
    except Exception:  # noqa: BLE001 - any failure: not a valid file
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small inputs and no ResNet-50 (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per file after the warm-up")
    args = parser.parse_args()
    _progress.start()
    size = 64 if args.quick else 224
    nets = {
        "resnet50": lambda: models.resnet50(num_classes=1000),
        "mobilenetv2": lambda: models.mobilenet_v2(num_classes=1000),
        "efficientnet-like": lambda: archs.efficientnet_like(width=1.0, depth=1.0, num_classes=1000,
                                                             image_size=size),
    }
    if args.quick:
        nets.pop("resnet50")
    print(f"load average at the start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}; "
          f"torch threads: {torch.get_num_threads()}")
    print("| file | tool | BN before | BN left | valid | max error | median time (s) |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for net_name, factory in nets.items():
        for dynamo in (False, True):
            label = f"{net_name} ({'dynamo' if dynamo else 'legacy'})"
            _progress.step(f"exporting {label}")
            original = export(factory(), (1, 3, size, size), dynamo)
            before = sum(n.op_type == "BatchNormalization" for n in original.graph.node)
            x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
            feeds = {original.graph.input[0].name: x}
            expected = run_ort(original, feeds)
            rows, times = {}, {}
            for tool, fn in TOOLS.items():  # the warm-up: what each tool leaves
                _progress.step(f"{tool} on {label}")
                try:
                    out = fn(original)
                except ImportError:
                    rows[tool] = f"| {label} | {tool} | {before} | (not installed) | | |"
                    continue
                except Exception as exc:  # noqa: BLE001 - a peer that fails on the file
                    rows[tool] = f"| {label} | {tool} | {before} | failed: {type(exc).__name__} | | |"
                    continue
                left = sum(n.op_type == "BatchNormalization" for n in out.graph.node)
                ok = valid(out)
                error = float("nan")
                if ok:
                    got = run_ort(out, feeds)
                    error = max(float(np.abs(got[k].astype(np.float64) - v.astype(np.float64)).max())
                                for k, v in expected.items() if k in got)
                rows[tool] = f"| {label} | {tool} | {before} | {left} | {'yes' if ok else 'NO'} | {error:.2e} |"
                times[tool] = (left, [])
                del out
            ran = list(times)
            for round_ in range(args.repeats):
                _progress.step(f"round {round_ + 1} of {args.repeats} on {label}")
                for tool in ran[round_ % len(ran):] + ran[:round_ % len(ran)]:
                    start = time.perf_counter()
                    TOOLS[tool](original)
                    times[tool][1].append(time.perf_counter() - start)
            for tool, row in rows.items():
                median = f" {statistics.median(times[tool][1]):.2f} |" if tool in times and times[tool][1] else " |"
                print(row + median)
            summary.append((label, {tool: (left, statistics.median(t)) for tool, (left, t) in times.items() if t}))
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print("| file | bntool (s) | fastest peer (s) | bntool / it | fastest peer leaving no BN (s) | bntool / it |")
    print("|---|---|---|---|---|---|")
    for label, results in summary:
        if "bntool" not in results:
            continue
        mine = results["bntool"][1]
        peers = {t: r for t, r in results.items() if t != "bntool"}
        fastest = min(peers.items(), key=lambda item: item[1][1], default=None)
        folding = min(((t, r) for t, r in peers.items() if r[0] == 0), key=lambda item: item[1][1], default=None)
        cells = [f"{r[1]:.2f} ({t}) | {mine / r[1]:.1f}x" if r else "none |" for t, r in
                 (fastest or (None, None), folding or (None, None))]
        print(f"| {label} | {mine:.2f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
