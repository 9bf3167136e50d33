"""Cost and payoff of ``bntool export`` on the examples' ResNet-50, folded and unfolded.

    python benchmarks/bench_export.py [--image-size 224] [--repeats 10] [--threads N]

For ``examples.models.resnet50`` (BN statistics randomised), exported twice
with ``bntool.export_onnx`` and a dynamic batch: folded (the default) and with
``fold=False``. Reported per variant:

- export s: the ``torch.onnx.export`` call alone (``report.export_seconds``),
  after a warm-up export of a small model (the exporter's one-time start-up);
- total s: the whole ``export_onnx`` call: fold and its verification, export,
  ``onnx.checker``, training-mode proof, onnxruntime verification at batch 1;
- size MB and BN nodes: the written file;
- latency at batch 1 and 16, the best of ``--repeats`` interleaved runs after a warm-up:
  PyTorch eager (``torch.inference_mode``, the folded model for the folded
  variant), onnxruntime as deployed (``ORT_ENABLE_ALL``), and onnxruntime with
  graph optimizations off (how bntool verifies: the file exactly as written).

PyTorch and onnxruntime run on the CPU with the same number of threads.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _progress import start, step  # noqa: E402

from bntool import export_onnx, fold  # noqa: E402
from bntool.onnxio.ort import OrtRunner  # noqa: E402
from examples.models import mlp_bn, randomize_bn_, resnet50  # noqa: E402


def timed_ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    start()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = randomize_bn_(resnet50()).eval()
    example = torch.randn(1, 3, args.image_size, args.image_size)
    batches = {b: torch.randn(b, 3, args.image_size, args.image_size) for b in (1, 16)}
    step("folding ResNet-50 for the eager baseline")
    folded_model, _ = fold(model, example_inputs=(example,), device="cpu")
    step("warm-up export of a small model")
    with tempfile.TemporaryDirectory() as folder:  # the exporter's one-time start-up is not the export's cost
        export_onnx(mlp_bn().eval(), Path(folder) / "warm-up.onnx", example_inputs=(torch.randn(2, 32),),
                    device="cpu")
    print(f"ResNet-50 (examples.models.resnet50), input 3x{args.image_size}x{args.image_size}, "
          f"torch {torch.__version__}, {args.threads} CPU threads, best of {args.repeats} interleaved runs\n")
    header = ["variant", "export s", "total s", "size MB", "BN nodes", "batch", "PyTorch eager ms",
              "ORT ms (ENABLE_ALL)", "ORT ms (opts off)"]
    variants = (("folded", True, folded_model), ("unfolded", False, model))
    reports, totals, runs = {}, {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, do_fold, eager in variants:
            path = Path(folder) / f"{name}.onnx"
            step(f"exporting the {name} ResNet-50 (fold, export, checker, onnxruntime check)")
            began = time.perf_counter()
            reports[name] = export_onnx(model, path, example_inputs=(example,), fold=do_fold, dynamic_batch=True,
                                        verify_batch_sizes=[1], device="cpu")
            totals[name] = time.perf_counter() - began
            runners = {opt: OrtRunner(path, torch.device("cpu"), optimize=opt, threads=args.threads)
                       for opt in (True, False)}
            runs[name] = {"eager": lambda x, m=eager: m(x), "ort": lambda x, r=runners[True]: r([x]),
                          "ort_off": lambda x, r=runners[False]: r([x])}
        times: dict = {}
        with torch.inference_mode():
            for repeat in range(args.repeats + 1):  # interleaved; the first round is the warm-up
                step(f"latency round {repeat} of {args.repeats}" + (" (warm-up)" if not repeat else ""))
                for b, x in batches.items():
                    for name, fns in runs.items():
                        for kind, fn in fns.items():
                            ms = timed_ms(lambda: fn(x))
                            if repeat:
                                times.setdefault((name, b, kind), []).append(ms)
    rows = []
    for name, _, _ in variants:
        r = reports[name]
        for b in batches:
            first = b == 1
            rows.append([
                name if first else "", f"{r.export_seconds:.1f}" if first else "",
                f"{totals[name]:.1f}" if first else "",
                f"{r.facts.size_bytes / 2**20:.1f}" if first else "", str(r.bn_left) if first else "", str(b),
                *(f"{min(times[(name, b, kind)]):.1f}" for kind in ("eager", "ort", "ort_off")),
            ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


if __name__ == "__main__":
    main()
