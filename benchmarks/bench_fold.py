"""Fold benchmark: bntool's fold beside torch.fx's fuse, what still runs afterwards, and eval latency.

    python benchmarks/bench_fold.py [--repeats 11] [--batch 1] [--threads 2]

For ResNet-50 and MobileNetV2 (plain BatchNorm2d, examples/models.py) and
EfficientNet-B0 / MobileNetV2 built from timm's BatchNormAct2d (BN + drop +
activation in one module, examples/archs.py), BN statistics randomized, it
prints:

* the fold itself (dataflow, plan, and the surgery on a copy: ``bntool.fold``
  with ``verify=False``) beside ``torch.fx.experimental.optimization.fuse`` on
  the same model in the same process, interleaved, and how many BNs each folded;
* the normalizations that still run in one eval forward (batch-norm and
  rsqrt kernels, counted at the aten level), before and after, and the eval
  latency of both models;
* the whole ``bntool fold`` command on a saved checkpoint (load, fold, verify
  against float64 layer by layer, write, check the written file);
* which BNs each tool folds on the example and look-alike architectures.

Timings are medians over ``--repeats`` runs, on whatever this machine is.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.fx.experimental.optimization as fx_optimization
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _progress import start, step  # noqa: E402

import bntool  # noqa: E402
from bntool.norms import is_batchnorm  # noqa: E402
from examples import archs  # noqa: E402
from examples import models as zoo  # noqa: E402

#: aten kernels that normalize with running statistics (one per BN call); frozen BNs that compute
#: ``x * w * rsqrt(var + eps) + ...`` themselves (torchvision's, timm's) run one ``rsqrt`` per call
NORM_KERNELS = ("native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
                "cudnn_batch_norm", "miopen_batch_norm", "batch_norm", "rsqrt")


class KernelCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func._overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def batch_norm_kernels(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), KernelCount() as count:
        model(x)
    return sum(count.ops[k] for k in NORM_KERNELS)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def count_bn(module: nn.Module) -> int:
    return sum(is_batchnorm(m) for m in module.modules())


MODELS = {
    "resnet50": ("examples/models.py:resnet50", "{}", lambda: zoo.resnet50()),
    "mobilenet_v2": ("examples/models.py:mobilenet_v2", "{}", lambda: zoo.mobilenet_v2()),
    "efficientnet_b0 (BatchNormAct2d)": (
        "examples/archs.py:efficientnet_like", '{"width": 1.0, "depth": 1.0, "image_size": 224, "num_classes": 1000}',
        lambda: archs.efficientnet_like(width=1.0, depth=1.0, image_size=224, num_classes=1000)),
    "mobilenetv2 (BatchNormAct2d)": (
        "examples/archs.py:mobilenetv2_like", '{"width": 1.0, "depth": 1.0, "image_size": 224, "num_classes": 1000}',
        lambda: archs.mobilenetv2_like(width=1.0, depth=1.0, image_size=224, num_classes=1000)),
}


def bench(name: str, batch: int, repeats: int) -> dict:
    spec, spec_args, build = MODELS[name]
    model = build()
    zoo.randomize_bn_(model, seed=0)
    model.eval()
    x = torch.randn(batch, 3, 224, 224)
    total_bn = count_bn(model)

    def ours():
        return bntool.fold(model, example_inputs=(x,), verify=False)[0]

    step(f"{name}: bntool fold vs fx fuse, {repeats} interleaved runs")
    folded = ours()
    fused = fx_optimization.fuse(model)
    ours_s, fx_s = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine
        ours_s.append(median_seconds(ours, 1))
        fx_s.append(median_seconds(lambda: fx_optimization.fuse(model), 1))
    row = {
        "model": name, "bn": total_bn,
        "bntool_fold_s": statistics.median(ours_s), "fx_fuse_s": statistics.median(fx_s),
        "bntool_folded": total_bn - count_bn(folded), "fx_folded": total_bn - count_bn(fused),
        "kernels_original": batch_norm_kernels(model, x), "kernels_folded": batch_norm_kernels(folded, x),
        "kernels_fx": batch_norm_kernels(fused, x),
    }
    step(f"{name}: eval latency, original and folded")
    with torch.no_grad():
        for _ in range(2):
            model(x), folded(x)
        original, after = [], []
        for _ in range(repeats):
            original.append(median_seconds(lambda: model(x), 1))
            after.append(median_seconds(lambda: folded(x), 1))
        row["eval_original_ms"] = 1e3 * statistics.median(original)
        row["eval_folded_ms"] = 1e3 * statistics.median(after)

    step(f"{name}: the whole `bntool fold` command beside `import torch`")
    times = command_times(model, spec, spec_args, f"{batch},3,224,224", ("fold",), max(3, repeats // 4))
    row["cli_s"], row["cli_ratio"] = times["fold"]["wall"], times["fold"]["wall"] / times["import torch"]["wall"]
    return row


def _run(cmd: list[str], pycache: Path) -> dict[str, float]:
    """One child process: wall seconds, user and system CPU seconds, peak RSS in MB (a forked child's peak starts
    at this process's own size: below it, the figure says nothing; ``bench_memory.py`` measures memory).
    Bytecode is cached under ``pycache`` (an installed bntool has its .pyc files, as torch has: a checkout run
    with PYTHONDONTWRITEBYTECODE would compile bntool's sources at every run)."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**env, "PYTHONPATH": str(ROOT), "PYTHONPYCACHEPREFIX": str(pycache)})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - began
    if status != 0:
        raise RuntimeError(f"{cmd[3:6]} failed: {proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return {"wall": wall, "user": usage.ru_utime, "sys": usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024}


def command_times(model: nn.Module, spec: str, spec_args: str, shape: str, commands: tuple[str, ...],
                  repeats: int, mmap_threshold: int | None = None) -> dict[str, dict[str, float]]:
    """``python -c "import torch"`` and each ``bntool`` command on a checkpoint of ``model``, run in turn
    ``repeats`` times (paired: every round runs each once), each figure the median of its runs, after one
    round that is not counted (it fills the bytecode cache and the page cache). ``mmap_threshold`` replaces the
    CLI's glibc mmap threshold for the run."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, ckpt)
        main = "import sys, bntool.cli as c"
        if mmap_threshold is not None:
            main += f"; c.MMAP_THRESHOLD = {mmap_threshold}"
        main += "; c.main(sys.argv[1:])"
        runs = {"import torch": [sys.executable, "-c", "import torch"]}
        for command in commands:
            out = Path(tmp) / (f"out.{command}." + ("onnx" if command == "export" else "safetensors"))
            runs[command] = [sys.executable, "-c", main, command, str(ckpt), "--model", str(ROOT / spec),
                             "--model-args", spec_args, "--input-shape", shape, "--out", str(out), "--force",
                             "--device", "cpu"] + (["--strict"] if command == "fold" else [])
        seen: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        pycache = Path(tmp) / "pycache"
        for counted in [False] + [True] * repeats:
            for name, cmd in runs.items():
                result = _run(cmd, pycache)
                if counted:
                    seen[name].append(result)
    return {name: {key: statistics.median(r[key] for r in results) for key in results[0]}
            for name, results in seen.items()}


def cli_table(repeats: int, thresholds: tuple[int | None, ...]) -> None:
    """ResNet-50 at batch 1: ``bntool fold``, ``freeze``, ``export`` against ``import torch``, in the same run."""
    spec, spec_args, build = MODELS["resnet50"]
    model = zoo.randomize_bn_(build(), seed=0).eval()
    print()
    print("| glibc mmap threshold | command | wall | × `import torch` | user | system | CPU × `import torch` | "
          "peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    for threshold in thresholds:
        step(f"commands, mmap threshold {threshold or 'as the CLI sets it'}")
        times = command_times(model, spec, spec_args, "1,3,224,224", ("fold", "freeze", "export"), repeats, threshold)
        base = times["import torch"]
        label = "CLI's own" if threshold is None else f"{threshold >> 20} MB"
        for name, t in times.items():
            cpu = (t["user"] + t["sys"]) / (base["user"] + base["sys"])
            print(f"| {label} | {name} | {t['wall']:.2f} s | {t['wall'] / base['wall']:.2f}× | {t['user']:.2f} s | "
                  f"{t['sys']:.2f} s | {cpu:.2f}× | {t['rss_mb']:.0f} MB |")
    print(f"(load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores)")


COVERAGE = [
    ("lenet (conv + linear)", lambda: zoo.lenet()),
    ("convtranspose_net(dims=2, groups=4)", lambda: zoo.convtranspose_net(dims=2, groups=4)),
    ("untraceable_net (data-dependent branch)", lambda: zoo.untraceable_net()),
    ("EfficientNet, BatchNormAct2d (timm)", lambda: archs.efficientnet_like(depth=0.25)),
    ("RegNetY, BatchNormAct2d + SE (timm)", lambda: archs.regnet_like()),
    ("ResNetV2 pre-activation (timm)", lambda: archs.resnetv2_like()),
    ("DenseNet (torchvision)", lambda: archs.densenet_like()),
    ("DPN dual path (timm)", lambda: archs.dpn_like()),
    ("RepVGG (timm)", lambda: archs.repvgg_like()),
    ("LeViT (timm)", lambda: archs.levit_like()),
    ("ResNet, FrozenBatchNorm2d (torchvision)", lambda: archs.torchvision_frozen_resnet()),
    ("ResNet, Conv2d(norm=FrozenBN) (detectron2)", lambda: archs.detectron2_frozen_resnet()),
    ("BN -> conv -> BN (mmcv fuse_conv_bn test)", lambda: archs.mmcv_fuse_conv_bn_model()),
    ("YOLOv8 detection (ultralytics)", lambda: archs.yolov8_like()),
    ("DCGAN generator (PyTorch-GAN)", lambda: archs.dcgan_generator()),
    ("DCGAN discriminator (PyTorch-GAN)", lambda: archs.dcgan_discriminator()),
]


def coverage() -> list[tuple[str, int, int, str]]:
    """Normalizations one eval forward runs: before, after bntool, after fx fuse (which raises on models it
    cannot trace). Counted by running them, since fx inlines a BN subclass's forward and leaves no BN module."""
    rows = []
    for label, build in COVERAGE:
        step(f"coverage: {label}")
        model = build()
        zoo.randomize_bn_(model, seed=0)
        model.eval()
        x = torch.randn(model.input_shape)
        before = batch_norm_kernels(model, x)
        try:
            fx_text = str(batch_norm_kernels(fx_optimization.fuse(model), x))
        except Exception as exc:  # fx cannot trace it
            fx_text = f"{before} ({type(exc).__name__})"
        folded, _ = bntool.fold(model, example_inputs=(x,), strict=True)
        rows.append((label, before, batch_norm_kernels(folded, x), fx_text))
    return rows


#: the architectures of examples/archs.py: (label, factory, small input shape (None: the one the model declares),
#: full-resolution input shape (None: the model takes one size only))
REFERENCE_ARCHS = [
    ("EfficientNet-B0 (BatchNormAct2d)", lambda: archs.efficientnet_like(
        width=1.0, depth=1.0, image_size=224, num_classes=1000), (1, 3, 96, 96), (1, 3, 224, 224)),
    ("MobileNetV2 (BatchNormAct2d)", lambda: archs.mobilenetv2_like(
        width=1.0, depth=1.0, image_size=224, num_classes=1000), (1, 3, 96, 96), (1, 3, 224, 224)),
    ("EfficientNet, timm frozen BNs", lambda: archs.timm_frozen_efficientnet(), None, (1, 3, 224, 224)),
    ("RegNetY (timm)", lambda: archs.regnet_like(), None, (1, 3, 224, 224)),
    ("ResNetV2 pre-activation (timm)", lambda: archs.resnetv2_like(), None, (1, 3, 224, 224)),
    ("DenseNet (torchvision)", lambda: archs.densenet_like(), None, (1, 3, 224, 224)),
    ("DPN (timm)", lambda: archs.dpn_like(), None, (1, 3, 224, 224)),
    ("RepVGG (timm)", lambda: archs.repvgg_like(), None, (1, 3, 224, 224)),
    ("MobileOne (timm)", lambda: archs.mobileone_like(), None, (1, 3, 224, 224)),
    ("LeViT (timm)", lambda: archs.levit_like(), None, None),  # attention over a fixed number of positions
    ("ResNet, FrozenBatchNorm2d (torchvision)", lambda: archs.torchvision_frozen_resnet(), None, (1, 3, 224, 224)),
    ("ResNet, FrozenBN (detectron2)", lambda: archs.detectron2_frozen_resnet(), None, (1, 3, 224, 224)),
    ("YOLOv8 (ultralytics)", lambda: archs.yolov8_like(), None, (1, 3, 320, 320)),
    ("DCGAN discriminator (PyTorch-GAN)", lambda: archs.dcgan_discriminator(), None, None),  # a fixed image size
]


def cpu_seconds(fn) -> float:
    began = time.process_time()
    fn()
    return time.process_time() - began


def reference_cost(repeats: int) -> list[tuple[str, str, float, float, float]]:
    """The float64 reference (``run_on`` in float64: lent layer by layer, what every verified command runs) beside
    one float32 forward, at the model's declared (small) shape and at full resolution: medians of paired runs,
    in CPU time of this process (a busy machine's waits do not count; with --threads 1 it is the work itself),
    and the median of the pairs' ratios (each pair saw the same machine: the figure a drifting load moves least)."""
    from bntool.runtime.running import run_model, run_on

    rows = []
    cpu = torch.device("cpu")
    for label, build, small, full in REFERENCE_ARCHS:
        model = zoo.randomize_bn_(build(), seed=0).eval()
        for resolution, shape in (("small", small or tuple(model.input_shape)), ("full", full)):
            if shape is None:
                continue
            step(f"float64 reference: {label}, {resolution} {shape}")
            x = torch.randn(shape)
            run_model(model, [x]), run_on(model, [x], cpu, torch.float64)  # warm-up
            low, high = [], []
            for _ in range(repeats):  # paired: both see the same machine
                low.append(cpu_seconds(lambda model=model, x=x: run_model(model, [x])))
                high.append(cpu_seconds(lambda model=model, x=x: run_on(model, [x], cpu, torch.float64)))
            rows.append((label, "x".join(map(str, shape)), statistics.median(low), statistics.median(high),
                         statistics.median(h / lo for lo, h in zip(low, high))))
    return rows


def conv_kind(module: nn.Module) -> str | None:
    """Which float64 kernel family a conv module's call falls in (None: not a conv)."""
    if not isinstance(module, nn.Conv2d):
        return None
    if module.groups > 1 and module.groups == module.in_channels:
        return "depthwise"
    return "1x1" if module.kernel_size == (1, 1) and module.groups == 1 else "dense kxk"


def timed_by_kind(model: nn.Module, spent: Counter[str]) -> list:
    """Hooks that add each conv module's call, in CPU seconds, to ``spent`` under its kind."""
    began: list[float] = []

    def enter(module, args):
        began.append(time.process_time())

    def leave(module, args, output):
        kind = conv_kind(module)
        if kind == "depthwise":
            kind += " up to 56x56" if args[0][0, 0].numel() <= 3136 else " over 56x56"
        spent[kind] += time.process_time() - began.pop()

    return [h for m in model.modules() if conv_kind(m)
            for h in (m.register_forward_pre_hook(enter, prepend=True), m.register_forward_hook(leave))]


#: the architectures whose float64 reference is broken down by kind of layer
BREAKDOWN = ("EfficientNet-B0 (BatchNormAct2d)", "MobileNetV2 (BatchNormAct2d)", "ResNet, FrozenBN (detectron2)")


def reference_breakdown(repeats: int) -> list[tuple[str, str, float, float]]:
    """Where the float64 reference's time goes at full resolution, by kind of layer: CPU time inside the conv
    modules' calls (by kind, depthwise split at 56x56 maps), and the rest (norms, activations, pooling, the
    lending of each layer's tensors), float32 forward beside float64 reference, medians of paired runs."""
    from bntool.runtime.running import run_model, run_on

    rows = []
    cpu = torch.device("cpu")
    for label, build, _, full in [arch for arch in REFERENCE_ARCHS if arch[0] in BREAKDOWN]:
        model = zoo.randomize_bn_(build(), seed=0).eval()
        x = torch.randn(full)
        spent: Counter[str] = Counter()
        handles = timed_by_kind(model, spent)
        step(f"float64 reference by layer kind: {label}")
        seen: dict[str, dict[str, list[float]]] = {"float32": {}, "float64": {}}
        for index in range(repeats + 1):  # the first round warms up
            for name, run in (("float32", lambda model=model, x=x: run_model(model, [x])),
                              ("float64", lambda model=model, x=x: run_on(model, [x], cpu, torch.float64))):
                spent.clear()
                total = cpu_seconds(run)
                if index:
                    for kind, seconds in [*spent.items(), ("the rest", total - sum(spent.values())),
                                          ("total", total)]:
                        seen[name].setdefault(kind, []).append(seconds)
        for handle in handles:
            handle.remove()
        for kind in seen["float32"]:
            rows.append((label, kind, statistics.median(seen["float32"][kind]),
                         statistics.median(seen["float64"][kind])))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    parser.add_argument("--only", choices=("fold", "reference", "cli"), default=None,
                        help="run one section: the fold table, the float64 reference's cost, or the commands' times")
    parser.add_argument("--mmap-thresholds", default="",
                        help="with the commands' times: also run them with these glibc mmap thresholds, in MB "
                             "(e.g. 1,128), to compare with the CLI's own")
    args = parser.parse_args()
    start()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, batch {args.batch}, median of {args.repeats}")
    if args.only in (None, "fold"):
        rows = [bench(name, args.batch, args.repeats) for name in args.models.split(",")]
        print()
        print("| model | BN layers | bntool fold | fx fuse | bntool / fx | folded: bntool / fx | "
              "normalizations per forward: original → bntool (fx) | eval original → folded | "
              "`bntool fold` CLI (× `import torch`) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['bn']} | {r['bntool_fold_s'] * 1e3:.0f} ms | {r['fx_fuse_s'] * 1e3:.0f} ms | "
                  f"{r['bntool_fold_s'] / r['fx_fuse_s']:.2f}× | {r['bntool_folded']} / {r['fx_folded']} | "
                  f"{r['kernels_original']} → {r['kernels_folded']} ({r['kernels_fx']}) | "
                  f"{r['eval_original_ms']:.1f} → {r['eval_folded_ms']:.1f} ms | "
                  f"{r['cli_s']:.1f} s ({r['cli_ratio']:.2f}×) |")
        print()
        print("| architecture | normalizations per forward | after bntool fold | after fx fuse |")
        print("|---|---|---|---|")
        for label, before, ours, fx_text in coverage():
            print(f"| {label} | {before} | {ours} | {fx_text} |")
    if args.only in (None, "reference"):
        print()
        print("| architecture | input | float32 forward (CPU) | float64 reference (CPU) | ratio (paired) | ≤ 3× |")
        print("|---|---|---|---|---|---|")
        for label, shape, low, high, ratio in reference_cost(args.repeats):
            print(f"| {label} | {shape} | {low * 1e3:.1f} ms | {high * 1e3:.1f} ms | {ratio:.2f}× | "
                  f"{'yes' if ratio <= 3 else 'no'} |")
        print()
        print("| architecture (full resolution) | layers | float32 forward (CPU) | float64 reference (CPU) | ratio |")
        print("|---|---|---|---|---|")
        for label, kind, low, high in reference_breakdown(args.repeats):
            print(f"| {label} | {kind} | {low * 1e3:.1f} ms | {high * 1e3:.1f} ms | {high / low:.1f}× |")
    if args.only in (None, "cli"):
        extra = tuple(int(mb) << 20 for mb in args.mmap_thresholds.split(",") if mb)
        cli_table(max(3, args.repeats // 4), (None, *extra))

if __name__ == "__main__":
    main()
