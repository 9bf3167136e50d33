"""Prove a GPU machine in one go: the cuda tests, the GPU benchmarks and the whole suite, in under five minutes.

    python benchmarks/gpu_check.py --out-dir DIR [--device cuda|cpu] [--budget 285] [--workers N] [--suite|--no-suite]

Installs nothing and needs no network: torch with CUDA, typer, rich,
safetensors, onnx, onnxruntime, pytest (and pytest-xdist for the whole suite
in parallel), after ``pip install --no-deps --no-build-isolation -e .``.

The steps, each in its own process, each under ``timeout -s INT`` with a limit
taken from what is left of ``--budget`` seconds (so pytest prints its summary
even when cut short):

1. env: torch, CUDA, cuDNN, the GPU, onnxruntime's providers;
2. cuda-tests: ``pytest -m cuda`` (every command, API and CLI, on the GPU);
3. recalibrate: ``bench_recalibrate.py``, ResNet-50 and MobileNetV2 at 224,
   floor / bntool / update_bn at TF32 off and at TF32 on;
4. bn-precision: how exact BatchNorm's own batch statistics are (what
   recalibration reads back) against float64, with cuDNN on and off, for
   inputs whose mean is 0, 4 and 30 standard deviations from 0;
5. fold: ResNet-50, batch 2 at 224, fold + verification on the GPU, first
   call and warm;
6. export: ResNet-50 to ONNX with verification, and which onnxruntime provider ran;
7. suite: the whole test suite (``-n N`` with pytest-xdist), ``--durations``.

Each step's output goes to ``DIR/<step>.log`` and its figures to
``DIR/<step>.json``; one summary is printed at the end and written to
``DIR/summary.txt`` and ``DIR/summary.json``. Exit 0 when no step failed.

``--device cpu`` checks this script's own plumbing on a machine without a GPU:
the cuda tests run on the CPU (``BNTOOL_TEST_DEVICE=cpu``; what only a GPU has
stays skipped), the benchmarks at toy sizes, and the whole suite only with
``--suite``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve()

#: step -> the most seconds it may take on a GPU (the suite gets whatever is left at the end)
CAPS = {"env": 30, "cuda-tests": 110, "recalibrate": 70, "bn-precision": 20, "fold": 30, "export": 45}
STEPS = (*CAPS, "suite")


# ----------------------------------------------------------------------------- the steps, run in child processes


def step_env(device: str) -> dict:
    import torch

    info: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "device": device,
                            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import onnxruntime as ort

        info.update(onnxruntime=ort.__version__, ort_providers=ort.get_available_providers())
    except ImportError:
        info["onnxruntime"] = None
    info["xdist"] = importlib.util.find_spec("xdist") is not None
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("torch.cuda.is_available() is False: no CUDA GPU here; pass --device cpu for a smoke run")
        info.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count(), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                    capability=".".join(map(str, torch.cuda.get_device_capability(0))))
    return info


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_bn_precision(device: str) -> dict:
    """BatchNorm's own batch mean / unbiased variance (momentum 1) against a float64 two-pass oracle."""
    import torch
    from torch import nn

    dev = torch.device(device)
    big = dev.type == "cuda"
    shape = (64, 64, 56, 56) if big else (8, 16, 14, 14)
    backends = [("cudnn", True), ("native", False)] if big else [("cpu", True)]
    rows = []
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(shape, generator=gen)
    for offset in (0.0, 4.0, 30.0):  # the channel mean, in standard deviations
        x = (noise * 0.5 + offset * 0.5).to(dev)
        x64 = x.double().transpose(0, 1).reshape(shape[1], -1)
        mean64, var64 = x64.mean(dim=1), x64.var(dim=1)
        for backend, enabled in backends:
            bn = nn.BatchNorm2d(shape[1], momentum=1.0).to(dev).train()
            with torch.no_grad(), torch.backends.cudnn.flags(enabled=enabled):
                bn.running_mean.zero_()
                bn.running_var.zero_()
                bn(x)
            mean_err = ((bn.running_mean.double() - mean64).abs() / var64.sqrt()).max().item()
            var_err = ((bn.running_var.double() - var64).abs() / var64).max().item()
            rows.append({"mean_over_std": offset, "backend": backend, "mean_rel_err": mean_err, "var_rel_err": var_err})
    return {"shape": list(shape), "rows": rows}


def step_fold(device: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import bntool
    from examples.models import randomize_bn_, resnet50, resnet_small

    dev = torch.device(device)
    big = dev.type == "cuda"
    model = randomize_bn_(resnet50() if big else resnet_small(), seed=0).eval()
    x = torch.randn(2, 3, 224, 224) if big else torch.randn(2, 3, 32, 32)
    results = {}
    for where, m in (("model on the CPU, verified on the device", model),
                     ("model on the device", copy.deepcopy(model).to(dev))):
        times = []
        for _ in range(4):
            _sync(dev)
            start = time.perf_counter()
            _, report = bntool.fold(m, example_inputs=(x,), device=dev)
            _sync(dev)
            times.append(time.perf_counter() - start)
        c = report.comparison
        results[where] = {"first_s": times[0], "warm_median_s": statistics.median(times[1:]), "passed": c.passed,
                          "device": c.device, "max_rel_error": c.max_rel_error, "folded": len(report.plan.pairs)}
    return {"model": "resnet50" if big else "resnet_small", "input": list(x.shape), "runs": results}


def step_export(device: str, out_dir: Path) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import bntool
    from examples.models import randomize_bn_, resnet50, resnet_small

    big = torch.device(device).type == "cuda"
    model = randomize_bn_(resnet50() if big else resnet_small(), seed=0).eval()
    x = torch.randn(1, 3, 224, 224) if big else torch.randn(1, 3, 32, 32)
    path = out_dir / "export-check.onnx"
    if path.exists():
        path.unlink()
    start = time.perf_counter()
    report = bntool.export_onnx(model, path, example_inputs=(x,), device=device)
    total = time.perf_counter() - start
    data = report.to_dict()
    path.unlink(missing_ok=True)
    return {"model": "resnet50" if big else "resnet_small", "input": list(x.shape), "total_s": total,
            "export_s": data["export_seconds"], "provider": data["provider"], "passed": data["passed"],
            "verification_device": data["verification"][0]["device"] if data["verification"] else None,
            "bn_left": data["bn_left"]}


# ----------------------------------------------------------------------------- the driver


class Runner:
    def __init__(self, out_dir: Path, budget: float):
        self.out_dir, self.deadline = out_dir, time.monotonic() + budget
        self.results: list[dict] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], cap: float, env: dict | None = None, minimum: float = 10) -> dict:
        limit = int(min(cap, self.left() - 5))
        log = self.out_dir / f"{name}.log"
        entry: dict[str, Any] = {"step": name, "limit_s": limit, "log": str(log)}
        if limit < minimum:
            entry.update(status="skipped", reason=f"only {max(self.left(), 0):.0f} s of the budget left")
            print(f"[{name}] skipped: {entry['reason']}", flush=True)
            self.results.append(entry)
            return entry
        print(f"[{name}] running (limit {limit} s): {' '.join(cmd[-6:])}", flush=True)
        start = time.monotonic()
        with open(log, "w") as handle:
            try:
                proc = subprocess.run(["timeout", "-s", "INT", "-k", "15", str(limit), *cmd], cwd=ROOT, stdout=handle,
                                      stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, timeout=limit + 40)
                code = proc.returncode
            except subprocess.TimeoutExpired:
                code = 124
        entry.update(seconds=round(time.monotonic() - start, 1), exit_code=code,
                     status="passed" if code == 0 else "timed out" if code in (124, 137) else "failed")
        print(f"[{name}] {entry['status']} in {entry['seconds']} s", flush=True)
        self.results.append(entry)
        return entry


def junit_counts(path: Path) -> dict:
    """tests / failures / errors / skipped and the five slowest tests, from pytest's junit XML."""
    if not path.exists():
        return {}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    cases = [(float(c.get("time", 0)), f"{c.get('classname')}::{c.get('name')}") for s in suites for c in s.iter("testcase")]
    bad = [f"{c.get('classname')}::{c.get('name')}" for s in suites for c in s.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["slowest"] = [f"{t:.1f}s {name}" for t, name in sorted(cases, reverse=True)[:5]]
    counts["not_passed"] = bad
    return counts


def pytest_tail(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()] if log.exists() else []
    summary = [line for line in lines if re.search(r"\d+ (passed|failed|error|skipped)|no tests ran|Interrupted", line)]
    return (summary or lines or ["(no output)"])[-1].strip("= ")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, required=True)
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (a smoke run of this script)")
    parser.add_argument("--budget", type=float, default=285.0, help="seconds for everything (default 285)")
    parser.add_argument("--workers", type=int, default=None, help="pytest-xdist workers for the whole suite")
    parser.add_argument("--suite", action=argparse.BooleanOptionalAction, default=None,
                        help="run the whole suite last (default: on a GPU only)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"which steps, in order (default: {','.join(STEPS)})")
    parser.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    if args.step:
        steps = {"env": lambda: step_env(args.device), "bn-precision": lambda: step_bn_precision(args.device),
                 "fold": lambda: step_fold(args.device), "export": lambda: step_export(args.device, args.out_dir)}
        data = steps[args.step]()
        (args.out_dir / f"{args.step}.json").write_text(json.dumps(data, indent=2))
        print(json.dumps(data, indent=2))
        return 0
    if shutil.which("timeout") is None:
        raise SystemExit("needs the `timeout` command (GNU coreutils)")
    gpu = args.device.startswith("cuda")
    run = Runner(args.out_dir, args.budget)
    py = sys.executable
    me = [py, str(HERE), "--out-dir", str(args.out_dir), "--device", args.device, "--step"]
    test_env = {} if gpu else {"BNTOOL_TEST_DEVICE": "cpu"}
    pytest = [py, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs"]
    wanted = [step for step in args.steps.split(",") if step]
    unknown = sorted(set(wanted) - set(STEPS))
    if unknown:
        raise SystemExit(f"unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    sizes = [] if gpu else ["--image-size", "32", "--batch-size", "4", "--batches", "2", "--repeats", "1"]
    commands = {
        "cuda-tests": [*pytest, "-m", "cuda", "--durations=8", f"--junitxml={args.out_dir / 'cuda-tests.xml'}"],
        "recalibrate": [py, str(ROOT / "benchmarks" / "bench_recalibrate.py"), "--device", args.device,
                        "--repeats", "3", *sizes, "--json", str(args.out_dir / "recalibrate.json")],
    }
    for step in wanted:
        if step != "suite":
            run.run(step, commands.get(step, [*me, step]), CAPS[step], env=test_env if step == "cuda-tests" else None)
        elif args.suite if args.suite is not None else gpu:
            workers = args.workers or max(1, min(8, (os.cpu_count() or 2) // 2))
            parallel = ["-n", str(workers)] if importlib.util.find_spec("xdist") else []
            run.run("suite", [*pytest, *parallel, "--durations=10", f"--junitxml={args.out_dir / 'suite.xml'}"],
                    run.left(), minimum=30)
        else:
            run.results.append({"step": "suite", "status": "skipped", "reason": "not asked for (--suite)"})
    summary = summarize(run.results, args.out_dir)
    print("\n" + summary, flush=True)
    (args.out_dir / "summary.txt").write_text(summary + "\n")
    return 0 if all(r["status"] in ("passed", "skipped") for r in run.results) else 1


# ----------------------------------------------------------------------------- the summary


def _load(out_dir: Path, name: str) -> dict:
    path = out_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def summarize(results: list[dict], out_dir: Path) -> str:
    figures = {name: _load(out_dir, name) for name in ("env", "recalibrate", "bn-precision", "fold", "export")}
    tests = {name: junit_counts(out_dir / f"{name}.xml") for name in ("cuda-tests", "suite")}
    env = figures["env"]
    lines = ["GPU check summary", "=" * 17]
    if env:
        lines.append(f"machine: {env.get('gpu', 'no GPU (smoke run on the CPU)')}, torch {env.get('torch')}, CUDA "
                     f"{env.get('cuda')}, cuDNN {env.get('cudnn')}, onnxruntime {env.get('onnxruntime')} "
                     f"({', '.join(env.get('ort_providers', []))}), {env.get('cpu_count')} CPUs")
    lines.append("")
    for r in results:
        extra = r.get("reason", "")
        if r["step"] in tests and tests[r["step"]]:
            t = tests[r["step"]]
            extra = (f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped"
                     + (f"; not passed: {', '.join(t['not_passed'][:6])}" if t["not_passed"] else ""))
        elif r["step"] in tests and "log" in r:
            extra = pytest_tail(Path(r["log"]))
        seconds = f"{r['seconds']:6.1f} s" if "seconds" in r else " " * 8
        lines.append(f"  {r['step']:<13} {r['status']:<10} {seconds}  {extra}")
    for name in ("cuda-tests", "suite"):
        if tests[name].get("slowest"):
            lines.append(f"  slowest in {name}: " + "; ".join(tests[name]["slowest"][:3]))
    recal = figures["recalibrate"]
    if recal:
        lines += ["", "recalibration (time ratio to the floor at the same precision; max rel diff vs float64 oracle):"]
        for m in recal["models"]:
            for row in m["rows"]:
                ratio, diff = row["ratio_wall"], row["max_rel_diff_vs_float64_oracle"]
                lines.append(f"  {m['model']:<13} {m['batch_size']}x{m['image_size']} x{m['batches']} "
                             f"{row['label']:<9} floor {row['wall_s']['floor']:.3f} s | bntool {ratio['bntool']:.3f}x "
                             f"(diff {diff['bntool']:.1e}) | update_bn {ratio['update_bn']:.3f}x "
                             f"(diff {diff['update_bn']:.1e})")
    precision = figures["bn-precision"]
    if precision:
        lines += ["", "BatchNorm's own batch statistics vs float64 (what recalibration reads back):"]
        for row in precision["rows"]:
            lines.append(f"  mean/std {row['mean_over_std']:>4}: {row['backend']:<6} mean {row['mean_rel_err']:.1e}, "
                         f"var {row['var_rel_err']:.1e}")
    fold = figures["fold"]
    if fold:
        lines += ["", f"fold + verification, {fold['model']} {'x'.join(map(str, fold['input']))}:"]
        for where, run in fold["runs"].items():
            lines.append(f"  {where}: first {run['first_s']:.2f} s, warm {run['warm_median_s']:.2f} s, "
                         f"{run['folded']} folded, passed {run['passed']} on {run['device']} "
                         f"(max rel error {run['max_rel_error']:.1e})")
    export = figures["export"]
    if export:
        lines += ["", f"export {export['model']}: {export['total_s']:.1f} s in all ({export['export_s']:.1f} s "
                      f"torch.onnx.export), passed {export['passed']}, onnxruntime {export['provider']} vs PyTorch on "
                      f"{export['verification_device']}, {export['bn_left']} BN left"]
    (out_dir / "summary.json").write_text(json.dumps({"steps": results, "tests": tests, **figures}, indent=2))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
