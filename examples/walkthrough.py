"""bntool on real data, in a few minutes on a laptop CPU: train, inspect, fold, recalibrate, freeze, export.

Usage::

    python examples/walkthrough.py [--out-dir DIR]

The data set is scikit-learn's bundled handwritten digits (1797 grey 8x8
images, no download). The steps:

1. train LeNet with BatchNorm (adapted to 8x8 inputs) and save the checkpoint
   as a DataParallel training script would: ``{"epoch", "state_dict"
   ("module." keys), "optimizer"}``;
2. ``bntool inspect`` it;
3. ``bntool fold`` it: same test accuracy without a single BN;
4. wash the images out (lower contrast, higher brightness): accuracy drops;
   ``bntool recalibrate`` on the *unlabelled* shifted images (AdaBN) brings it back;
5. ``bntool freeze`` it, fine-tune with batch size 2: statistics unchanged,
   accuracy kept (and what happens to an unfrozen copy);
6. ``bntool export`` to ONNX: onnxruntime's accuracy equals PyTorch's.

Every step runs the real command line (``bntool.cli.main``, in this process)
and prints its figure; ``main()`` returns them (``tests/test_walkthrough.py``
checks each claim). Files go to ``--out-dir`` (default: a temporary folder).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

SEED = 0
#: The shift of step 4: x -> CONTRAST * x + BRIGHTNESS on images in [0, 1] (a washed-out scan).
CONTRAST, BRIGHTNESS = 0.4, 0.5
MODEL_SPEC = f"{Path(__file__).resolve()}:digits_lenet"


def digits_lenet(num_classes: int = 10) -> nn.Sequential:
    """LeNet with BatchNorm (d2l.ai's shape: conv-BN-sigmoid-pool x2, then 3 linear layers, BN between) for 8x8 digits."""
    net = nn.Sequential(
        nn.Conv2d(1, 6, kernel_size=3, padding=1), nn.BatchNorm2d(6), nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=3), nn.BatchNorm2d(16), nn.Sigmoid(), nn.Flatten(),
        nn.Linear(16 * 2 * 2, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
        nn.Linear(84, num_classes),
    )
    net.input_shape = (2, 1, 8, 8)  # batch 2: BatchNorm1d cannot train on one sample
    return net


# ----------------------------------------------------------------------------- data and training


def load_digits() -> dict[str, torch.Tensor]:
    """The 8x8 digits in [0, 1], split 70 / 30 (stratified, fixed seed)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    digits = sklearn_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    train, test = train_test_split(range(len(y)), test_size=0.3, random_state=SEED, stratify=digits.target)
    return {"train_x": x[train], "train_y": y[train], "test_x": x[test], "test_y": y[test]}


def shift(x: torch.Tensor) -> torch.Tensor:
    return CONTRAST * x + BRIGHTNESS


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(x).argmax(1)
    model.train(was_training)
    return out


def accuracy(predictions: torch.Tensor, y: torch.Tensor) -> float:
    """Percent correct, rounded to 0.01 points."""
    return round(100.0 * (predictions == y).float().mean().item(), 2)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, batch_size: int, lr: float,
          optimizer: torch.optim.Optimizer | None = None, steps: int | None = None) -> torch.optim.Optimizer:
    """Plain minibatch training in train mode; ``steps`` stops early."""
    gen = torch.Generator().manual_seed(SEED)
    optimizer = optimizer or torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    done = 0
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x) - batch_size + 1, batch_size):
            batch = order[start:start + batch_size]
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if steps is not None and done >= steps:
                return optimizer
    return optimizer


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in
            ("running_mean", "running_var")}


def max_change(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    return max((after[k].double() - v.double()).abs().max().item() for k, v in before.items())


# ----------------------------------------------------------------------------- running bntool


class Runner:
    """Runs ``bntool ARGS --json`` through ``bntool.cli.main`` and returns the parsed report."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def show(self, arg: str) -> str:
        """Shorter paths in what is printed: the output folder as ``$OUT``, this file relative to the cwd."""
        here = str(Path(__file__).resolve())
        arg = arg.replace(here, os.path.relpath(here)).replace(str(self.out_dir), "__OUT__")
        return shlex.quote(arg).replace("__OUT__", "$OUT")

    def __call__(self, *args: str | Path) -> dict[str, Any]:
        from bntool.cli import main as bntool_main

        argv = [str(a) for a in args] + ["--json"]
        print("  $ bntool " + " ".join(self.show(a) for a in argv[:-1]))
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                bntool_main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 0
        if code != 0:
            raise RuntimeError(f"bntool {' '.join(argv)} exited {code}: {stderr.getvalue().strip()}")
        return json.loads(stdout.getvalue())


# ----------------------------------------------------------------------------- the walkthrough


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=None, help="where the files go (default: a temporary folder)")
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        out = args.out_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bntool-walkthrough-")))
        out.mkdir(parents=True, exist_ok=True)
        return walkthrough(out.resolve())


def walkthrough(out: Path) -> dict[str, Any]:
    import bntool

    started = time.perf_counter()
    torch.manual_seed(SEED)
    bntool_cli = Runner(out)
    data = load_digits()
    test_x, test_y = data["test_x"], data["test_y"]
    figures: dict[str, Any] = {}

    print(f"1. Train LeNet-with-BatchNorm on scikit-learn's 8x8 digits "
          f"({len(data['train_x'])} training, {len(test_x)} test images)")
    model = digits_lenet()
    optimizer = train(model, data["train_x"], data["train_y"], epochs=15, batch_size=64, lr=2e-2)
    model.eval()
    original_predictions = predict(model, test_x)
    figures["test_accuracy"] = accuracy(original_predictions, test_y)
    checkpoint = out / "digits.pth"
    torch.save({"epoch": 15, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict()}, checkpoint)
    print(f"   test accuracy {figures['test_accuracy']:.2f}%; saved {bntool_cli.show(str(checkpoint))} "
          "({epoch, state_dict with 'module.' keys, optimizer}, as under DataParallel)")

    print("\n2. Inspect the BatchNorm layers")
    report = bntool_cli("inspect", checkpoint, "--model", MODEL_SPEC, "--plot", out / "inspect.png")
    layers = report["layers"]
    for row in layers:
        var = row["running_var"]
        fold = f"folds into `{row['fold_into']}`" if row["foldable"] else f"not foldable: {row['fold_reason']}"
        print(f"   `{row['name']}` {row['type']}({row['num_features']}), fed by `{row['fed_by']}`, "
              f"running_var {var['min']:.3g}..{var['max']:.3g}, {fold}")
    figures["inspect"] = {"layers": len(layers), "foldable": sum(bool(r["foldable"]) for r in layers),
                          "findings": [f["kind"] for f in report["findings"]]}
    print(f"   {len(layers)} BatchNorm layers, {figures['inspect']['foldable']} foldable, findings: "
          f"{', '.join(figures['inspect']['findings']) or 'none'}")

    print("\n3. Fold every BatchNorm into the layer before it")
    folded_path = out / "digits.folded.safetensors"
    report = bntool_cli("fold", checkpoint, "--model", MODEL_SPEC, "--out", folded_path)
    folded = bntool.load(folded_path, model=digits_lenet()).eval()
    figures["folded_layers"] = len(report["folded"])
    figures["bn_left_after_fold"] = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    figures["folded_accuracy"] = accuracy(predict(folded, test_x), test_y)
    print(f"   folded {figures['folded_layers']} BNs ({figures['bn_left_after_fold']} left); test accuracy "
          f"{figures['folded_accuracy']:.2f}% (was {figures['test_accuracy']:.2f}%)")

    print(f"\n4. Shift the data (contrast x{CONTRAST}, brightness +{BRIGHTNESS}) and recalibrate on it (AdaBN)")
    shifted_test = shift(test_x)
    figures["shifted_accuracy"] = accuracy(predict(model, shifted_test), test_y)
    unlabelled = out / "shifted_unlabelled.pt"
    torch.save(shift(data["train_x"]), unlabelled)  # images only: recalibration needs no labels
    recalibrated_path = out / "digits.recalibrated.safetensors"
    bntool_cli("recalibrate", checkpoint, "--model", MODEL_SPEC, "--data", unlabelled, "--batch-size", "64",
               "--out", recalibrated_path)
    recalibrated = bntool.load(recalibrated_path, model=digits_lenet()).eval()
    figures["recalibrated_accuracy"] = accuracy(predict(recalibrated, shifted_test), test_y)
    print(f"   on shifted test images: {figures['shifted_accuracy']:.2f}% before, "
          f"{figures['recalibrated_accuracy']:.2f}% after recalibrating on {len(data['train_x'])} unlabelled "
          "shifted images")

    print("\n5. Freeze the BatchNorms, then fine-tune with batch size 2")
    frozen_path = out / "digits.frozen.safetensors"
    bntool_cli("freeze", checkpoint, "--model", MODEL_SPEC, "--out", frozen_path)
    figures.update(_fine_tune_both(bntool.load(frozen_path, model=digits_lenet()), copy.deepcopy(model), data))
    print(f"   after 100 steps of batch 2 (was {figures['test_accuracy']:.2f}%):")
    print(f"   frozen:   running statistics moved by at most {figures['frozen_statistics_change']:.3g}, "
          f"test accuracy {figures['frozen_finetuned_accuracy']:.2f}%")
    print(f"   unfrozen: running statistics moved by up to {figures['unfrozen_statistics_change']:.3g}, "
          f"test accuracy {figures['unfrozen_finetuned_accuracy']:.2f}% (the same steps on a plain copy)")

    print("\n6. Export to ONNX (folded) and run it in onnxruntime")
    onnx_path = out / "digits.onnx"
    bntool_cli("export", checkpoint, "--model", MODEL_SPEC, "--out", onnx_path, "--dynamic-batch")
    onnx_predictions = _onnxruntime_predict(onnx_path, test_x)
    figures["onnx_accuracy"] = accuracy(onnx_predictions, test_y)
    figures["onnx_agreement"] = accuracy(onnx_predictions, original_predictions)
    print(f"   onnxruntime test accuracy {figures['onnx_accuracy']:.2f}% (PyTorch {figures['test_accuracy']:.2f}%); "
          f"same prediction on {figures['onnx_agreement']:.2f}% of test images")

    figures["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\nDone in {figures['seconds']:.0f} s; files in {out}")
    return figures


def _fine_tune_both(frozen: nn.Module, unfrozen: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """100 SGD steps with batch size 2 on the training set, on the frozen model and on a plain copy."""
    figures = {}
    for name, model in (("frozen", frozen), ("unfrozen", unfrozen)):
        before = bn_state(model)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        train(model, data["train_x"], data["train_y"], epochs=1, batch_size=2, lr=0.01, optimizer=optimizer,
              steps=100)
        figures[f"{name}_statistics_change"] = max_change(before, bn_state(model))
        figures[f"{name}_finetuned_accuracy"] = accuracy(predict(model, data["test_x"]), data["test_y"])
    return figures


def _onnxruntime_predict(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 2
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(logits).argmax(1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository's bntool, if not installed
    main()
