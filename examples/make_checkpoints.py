"""Write example checkpoints with real (non-default) BatchNorm statistics.

Usage::

    python examples/make_checkpoints.py [--out-dir examples/out]

Files written (deterministic, a few seconds on CPU):

* ``lenet.pth``          DDP-style ``{"epoch", "state_dict" ("module." keys), "optimizer"}``
* ``lenet.safetensors``  plain LeNet state dict
* ``resnet_small.pth``   ``{"model" ("_orig_mod." keys, as torch.compile saves), "epoch"}``
* ``calib.pt``           LeNet calibration inputs, float tensor (256, 1, 28, 28)
* ``calib_resnet.pt``    resnet_small calibration inputs, float tensor (256, 3, 32, 32)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from examples.models import lenet, resnet_small  # noqa: E402

SEED = 0
NUM_CLASSES = 10


class SyntheticImages:
    """Class-conditional Gaussian images: a fixed prototype per class plus noise."""

    def __init__(self, shape: tuple[int, ...], num_classes: int = NUM_CLASSES, seed: int = SEED):
        gen = torch.Generator().manual_seed(seed)
        self.prototypes = torch.randn((num_classes, *shape), generator=gen)
        self.num_classes = num_classes

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        labels = torch.randint(self.num_classes, (n,), generator=gen)
        images = self.prototypes[labels] + torch.randn((n, *self.prototypes.shape[1:]), generator=gen)
        # Shift/scale so BN sees statistics far from the defaults (mean 0, var 1).
        return 0.5 + 2.0 * images, labels


def train(model: nn.Module, data: SyntheticImages, steps: int, batch_size: int = 32,
          lr: float = 0.05) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A plain supervised training loop; returns the model (eval mode) and its optimizer."""
    gen = torch.Generator().manual_seed(SEED + 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        images, labels = data.sample(batch_size, gen)
        loss = loss_fn(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), optimizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=Path("examples/out"),
                        help="output folder (default: examples/out)")
    args = parser.parse_args(argv)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)

    def wrote(name: str, what: str) -> None:
        print(f"wrote {out / name}: {what}")

    # LeNet, saved like a DistributedDataParallel training script would.
    lenet_data = SyntheticImages((1, 28, 28))
    model, optimizer = train(lenet(NUM_CLASSES), lenet_data, steps=40)
    state = model.state_dict()
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()},
                "optimizer": optimizer.state_dict()}, out / "lenet.pth")
    wrote("lenet.pth", "DDP-style {epoch, state_dict ('module.' keys), optimizer}")
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "lenet.safetensors"))
    wrote("lenet.safetensors", "plain lenet state dict")

    # Small ResNet, saved like a torch.compile'd model's state dict.
    resnet_data = SyntheticImages((3, 32, 32))
    model, _ = train(resnet_small(NUM_CLASSES), resnet_data, steps=15)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                "epoch": 5}, out / "resnet_small.pth")
    wrote("resnet_small.pth", "{model ('_orig_mod.' keys), epoch}")

    # Calibration inputs drawn from the training distributions.
    gen = torch.Generator().manual_seed(SEED + 2)
    torch.save(lenet_data.sample(256, gen)[0], out / "calib.pt")
    wrote("calib.pt", "lenet calibration inputs (256, 1, 28, 28)")
    torch.save(resnet_data.sample(256, gen)[0], out / "calib_resnet.pt")
    wrote("calib_resnet.pt", "resnet_small calibration inputs (256, 3, 32, 32)")


if __name__ == "__main__":
    main()
