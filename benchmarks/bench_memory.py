"""Peak memory of every ``bntool`` command, as a multiple of the checkpoint's size.

    python benchmarks/bench_memory.py [--nets tiny,resnet50,wide] [--commands fold,export,...] [--device cpu|cuda]
                                      [--batch-size 16] [--work DIR]

Each command runs in its own process, as a user runs it (``bntool.cli.main``
with ``--json``, the output a new file), and is measured from outside:
its peak resident memory is ``ru_maxrss`` of that one process (``os.wait4``
in a small process that forks it, so that nothing of the caller's size is
counted).
The figure reported is the peak above what ``python -c "import torch"``
takes (measured the same way), divided by the checkpoint's size: how many
checkpoints' worth of memory the command holds at its worst. For
``recalibrate`` the ``--data`` tensor file, which is loaded whole, is taken
off too. Where the same run measured ``tiny``, each command's fixed cost
(its imports and machinery: what it costs on LeNet) is also taken off, in a
column of its own: ``export``'s is the ONNX toolchain's, about two ResNet-50s. With ``--device cuda`` the commands verify on the GPU, the baseline
is ``import torch`` plus a CUDA context with cuDNN loaded, and
``torch.cuda.max_memory_allocated`` is reported as a multiple of the model's
size (``inspect`` runs on the CPU either way).

Networks (checkpoints written as safetensors once, BN statistics randomised):

- ``tiny``: ``examples/models.py:lenet`` (0.2 MB): what each command costs whatever the model
  (its imports and machinery), reported in MB;
- ``resnet50``: ``examples/models.py:resnet50`` (102 MB), ``--input-shape 1,3,224,224``,
  ``recalibrate --data`` on 64 images of 3x224x224 (38.5 MB);
- ``wide``: ``examples/models.py:wide_resnet`` (a ResNet-18 304 channels wide, 1017 MB),
  ``--input-shape 1,3,16,16``, so that activations stay a few MB next to the weights;
  ``recalibrate --data`` on 64 inputs of 3x16x16.

Commands, in this order: ``fold``, ``freeze``, ``unfreeze`` (of freeze's output),
``recalibrate --data --batch-size 16`` (the batch size issue 23 sets its target at), ``export``, ``inspect``. Progress goes to
stderr as it runs; a markdown table is printed at the end. ResNet-50 takes
about a minute and the wide network about three on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _progress import start, step  # noqa: E402

MODELS = ROOT / "examples" / "models.py"
COMMANDS = ("fold", "freeze", "unfreeze", "recalibrate", "export", "inspect")


@dataclass(frozen=True)
class Net:
    factory: str
    input_shape: str
    data_shape: tuple[int, ...]
    fixed: bool = False  # so small that its figures are each command's fixed cost, not a multiple


NETS = {
    "tiny": Net("lenet", "2,1,28,28", (64, 1, 28, 28), fixed=True),
    "resnet50": Net("resnet50", "1,3,224,224", (64, 3, 224, 224)),
    "wide": Net("wide_resnet", "1,3,16,16", (64, 3, 16, 16)),
}
MB = 1e6

MAKE = """
import sys, torch
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[1])
from examples import models
torch.manual_seed(0)
model = models.randomize_bn_(getattr(models, sys.argv[2])())
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[3])
torch.save(torch.randn(*map(int, sys.argv[5].split(","))), sys.argv[4])
"""

#: ``bntool ARGS``, with the CUDA peak written to $BNTOOL_BENCH_CUDA at exit (torch is imported by the command)
RUN = """
import atexit, os, sys

def cuda_peak():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = max(torch.cuda.max_memory_allocated(d) for d in range(torch.cuda.device_count()))
        with open(os.environ["BNTOOL_BENCH_CUDA"], "w") as f:
            f.write(str(peak))

atexit.register(cuda_peak)
from bntool.cli import main
main(sys.argv[1:])
"""

TORCH = "import torch"
TORCH_CUDA = ("import torch; x = torch.ones(1, 1, 8, 8, device='cuda'); "
              "torch.nn.functional.conv2d(x, torch.ones(1, 1, 3, 3, device='cuda')); torch.cuda.synchronize()")


@dataclass(frozen=True)
class Run:
    peak: int  # bytes, ru_maxrss of the child
    seconds: float
    code: int
    cuda: int | None  # bytes, torch.cuda.max_memory_allocated
    error: str


#: forks and runs argv[2:], and writes that child's peak RSS (KiB) and exit code to argv[1]. A child's ``ru_maxrss``
#: starts at the resident size of the process it was forked from, so the measured command is forked from this small
#: process, never from the caller (a test runner holding torch, say).
SPAWN = """
import json, os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss": usage.ru_maxrss, "code": os.waitstatus_to_exitcode(status)}, f)
"""


def measure(argv: list[str]) -> Run:
    """Run ``argv`` (a program path first) as a child; its own peak resident memory, time, exit code, CUDA peak."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        env = {**os.environ, "BNTOOL_BENCH_CUDA": str(folder / "cuda"), "PYTHONPATH": str(ROOT)}
        with open(folder / "out", "wb") as out, open(folder / "err", "wb") as err:
            began = time.perf_counter()
            subprocess.run([sys.executable, "-c", SPAWN, str(folder / "usage"), *argv], stdout=out, stderr=err,
                           env=env, cwd=ROOT, check=True)
            seconds = time.perf_counter() - began
        usage = json.loads((folder / "usage").read_text())
        lines = [line for line in (folder / "err").read_text(errors="replace").splitlines() if line.strip()]
        cuda = int((folder / "cuda").read_text()) if (folder / "cuda").exists() else None
    return Run(usage["maxrss"] * 1024, seconds, usage["code"], cuda, lines[-1] if lines else "")


def baseline(code: str, repeats: int = 3) -> int:
    """Median peak of ``python -c code``."""
    return int(statistics.median(measure([sys.executable, "-c", code]).peak for _ in range(repeats)))


def make(name: str, work: Path) -> tuple[Path, Path]:
    """The network's checkpoint and calibration data (written once, kept in ``work``)."""
    net = NETS[name]
    checkpoint, data = work / f"{name}.safetensors", work / f"{name}-calib.pt"
    if not (checkpoint.exists() and data.exists()):
        step(f"{name}: writing the checkpoint and calibration data")
        subprocess.run([sys.executable, "-c", MAKE, str(ROOT), net.factory, str(checkpoint), str(data),
                        ",".join(map(str, net.data_shape))], check=True)
    return checkpoint, data


def command_line(command: str, name: str, checkpoint: Path, data: Path, work: Path, device: str,
                 batch_size: int) -> tuple[list[str], Path | None]:
    """``bntool`` arguments of ``command`` on network ``name``, and the file it writes."""
    net = NETS[name]
    model = ["--model", f"{MODELS}:{net.factory}"]
    shape = ["--input-shape", net.input_shape]
    dev = ["--device", device]
    out = work / f"{name}.{command}" if command != "export" else work / f"{name}.onnx"
    if command == "fold":
        return ["fold", str(checkpoint), *model, *shape, *dev, "--out", f"{out}.safetensors"], Path(f"{out}.safetensors")
    if command == "freeze":
        return ["freeze", str(checkpoint), *model, *shape, *dev, "--out", f"{out}.safetensors"], Path(f"{out}.safetensors")
    if command == "unfreeze":
        frozen = work / f"{name}.freeze.safetensors"
        return ["unfreeze", str(frozen), *model, *shape, *dev, "--out", f"{out}.safetensors"], Path(f"{out}.safetensors")
    if command == "recalibrate":
        return (["recalibrate", str(checkpoint), *model, "--data", str(data), "--batch-size", str(batch_size), *dev,
                 "--out", f"{out}.safetensors"], Path(f"{out}.safetensors"))
    if command == "export":
        return ["export", str(checkpoint), *model, *shape, *dev, "--out", str(out)], out
    return ["inspect", str(checkpoint), *model, *shape], None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default=",".join(NETS), help="comma-separated: " + ", ".join(NETS))
    parser.add_argument("--commands", default=",".join(COMMANDS), help="comma-separated: " + ", ".join(COMMANDS))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the commands verify")
    parser.add_argument("--batch-size", type=int, default=16, help="recalibrate's --batch-size")
    parser.add_argument("--work", type=Path, help="folder for the checkpoints (kept, reused); default: a temporary one")
    args = parser.parse_args(argv)
    start()
    nets = [n for n in args.nets.split(",") if n]
    commands = [c for c in COMMANDS if c in args.commands.split(",")]
    unknown = set(nets) - set(NETS) | set(args.commands.split(",")) - set(COMMANDS)
    if unknown:
        parser.error(f"unknown network or command: {', '.join(sorted(unknown))}")
    if "unfreeze" in commands and "freeze" not in commands:
        commands.insert(commands.index("unfreeze"), "freeze")  # unfreeze reads freeze's output
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        step("baseline: python -c 'import torch'")
        base = baseline(TORCH)
        cuda_base = None
        if args.device == "cuda":
            step("baseline: import torch, a CUDA context and cuDNN")
            cuda_base = baseline(TORCH_CUDA)
        rows = []
        for name in nets:
            checkpoint, data = make(name, work)
            size = checkpoint.stat().st_size
            for command in commands:
                argv, out = command_line(command, name, checkpoint, data, work, args.device, args.batch_size)
                if out is not None:  # a new file, as a user's first run writes (no --force)
                    out.unlink(missing_ok=True)
                    Path(f"{out}.data").unlink(missing_ok=True)
                step(f"{name}: bntool {argv[0]}")
                run = measure([sys.executable, "-c", RUN, *argv, "--json"])
                floor = cuda_base if cuda_base is not None and command != "inspect" else base
                held = data.stat().st_size if command == "recalibrate" else 0
                rows.append(Row(name, size, command, run, run.peak - floor - held, held))
                print(rows[-1].line())
    print(f"\nPeak resident memory above `python -c \"import torch\"` ({base / MB:.0f} MB"
          + (f"; {cuda_base / MB:.0f} MB with a CUDA context, the baseline of the GPU runs" if cuda_base else "")
          + f"), {sys.platform}, {os.cpu_count()} CPU cores, --device {args.device}:\n")
    fixed = {row.command: row.above for row in rows if NETS[row.net].fixed}  # each command's cost on LeNet
    header = ["network", "checkpoint", "command", "seconds", "peak RSS", "above baseline", "x checkpoint",
              "x checkpoint above the fixed cost"]
    if args.device == "cuda":
        header.append("CUDA max allocated")
    table = [row.cells(args.device == "cuda", fixed.get(row.command)) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for cells in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |")


@dataclass(frozen=True)
class Row:
    net: str
    size: int  # bytes of the checkpoint
    command: str
    run: Run
    above: int  # bytes above the baseline, less the data a recalibration loads
    held: int  # bytes of that data

    @property
    def times(self) -> float:
        return self.above / self.size

    def line(self) -> str:
        fixed = NETS[self.net].fixed
        cuda = f", CUDA peak {self.run.cuda / MB:.0f} MB" if self.run.cuda is not None else ""
        failed = f"; EXIT {self.run.code}: {self.run.error}" if self.run.code else ""
        share = "" if fixed else f" = {self.times:.2f}x the checkpoint"
        return (f"{self.net} {self.command}: {self.run.seconds:.1f} s, peak {self.run.peak / MB:.0f} MB, "
                f"{self.above / MB:.0f} MB above the baseline{share}{cuda}{failed}")

    def cells(self, cuda: bool, fixed_cost: int | None = None) -> list[str]:
        """The table's cells; ``fixed_cost``: what the command costs on LeNet, taken off in a column of its own."""
        fixed = NETS[self.net].fixed
        data = f" (less {_mb(self.held)} of data)" if self.held else ""
        times = "fixed cost" if fixed else f"**{self.times:.2f}x**"
        if self.run.code:
            times += f" (exit {self.run.code})"
        apart = "-" if fixed or fixed_cost is None else f"{(self.above - fixed_cost) / self.size:.2f}x"
        cells = [self.net, _mb(self.size), f"`{self.command}`{data}", f"{self.run.seconds:.1f}", _mb(self.run.peak),
                 _mb(self.above), times, apart]
        if cuda:
            cells.append("-" if self.run.cuda is None else
                         _mb(self.run.cuda) + ("" if fixed else f" = {self.run.cuda / self.size:.2f}x"))
        return cells


def _mb(n: float) -> str:
    return f"{n / MB:.1f} MB" if n < 10 * MB else f"{n / MB:.0f} MB"

if __name__ == "__main__":
    main()
