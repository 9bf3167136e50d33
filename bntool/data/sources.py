"""Batches for recalibration: a tensor file, an image folder, or a Python factory.

``load_batches(source, ...)`` turns what the user passed to ``--data`` into an
iterable of batches:

- a tensor file (``.pt``/``.pth``, ``.safetensors``, ``.npy``, ``.npz``) holding
  inputs stacked along the first dimension, cut into ``batch_size`` batches
  (the last one may be shorter);
- a folder of images, read with PIL, resized to ``image_size`` and normalised
  with ``mean`` / ``std`` (one value per channel: 1 value reads grey, 3 RGB);
- ``package.module:factory`` or ``path/file.py:factory``, called with the
  ``data_args`` keyword arguments, returning any iterable of batches (a
  DataLoader) or one stacked tensor.

What one batch holds and how a source is split between ranks is ``batches``'s.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError, shorten, user_exit
from ..io.inputs import reason, require_regular_file
from ..io.modelspec import parse_kwargs, resolve_callable
from ..io.torchfile import torch_load, torch_reason, unsafe_globals
from .batches import model_input

TENSOR_SUFFIXES = (".pt", ".pth", ".safetensors", ".npy", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class TensorBatches:
    """Consecutive ``batch_size`` slices of one stacked tensor; the last batch may be shorter."""

    def __init__(self, tensor: torch.Tensor, batch_size: int, name: str = "the tensor"):
        if batch_size < 1:
            raise InputError(f"`batch_size` {batch_size}: pass a positive number of samples per batch")
        if tensor.dim() == 0 or tensor.shape[0] == 0:
            raise InputError(f"{name} holds no samples (shape {tuple(tensor.shape)}); pass inputs stacked along dim 0")
        self.tensor, self.batch_size = tensor, batch_size

    def __len__(self) -> int:
        return math.ceil(self.tensor.shape[0] / self.batch_size)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tensor[index * self.batch_size : (index + 1) * self.batch_size]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))


class ImageFolderBatches:
    """Images of a folder (recursively, sorted by path) as normalised float32 ``(N, C, H, W)`` batches."""

    def __init__(self, paths: Sequence[Path], batch_size: int, image_size: tuple[int, int] | None,
                 mean: Sequence[float] | None, std: Sequence[float] | None):
        if batch_size < 1:
            raise InputError(f"`batch_size` {batch_size}: pass a positive number of images per batch")
        channels = len(mean) if mean else len(std) if std else 3
        if channels not in (1, 3) or (mean and std and len(mean) != len(std)):
            raise InputError(
                f"`mean` / `std` need 1 value (grey) or 3 values (RGB) each, got {list(mean or [])} / {list(std or [])}"
            )
        self.paths, self.batch_size, self.image_size = list(paths), batch_size, image_size
        self.mode = "L" if channels == 1 else "RGB"
        self.mean = torch.tensor(mean if mean else [0.0] * channels, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std if std else [1.0] * channels, dtype=torch.float32)[:, None, None]
        if (self.std == 0).any():
            raise InputError(f"`std` {list(std)} contains 0; pass positive standard deviations")

    def __len__(self) -> int:
        return math.ceil(len(self.paths) / self.batch_size)

    def _read(self, path: Path) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        try:
            with Image.open(path) as image:
                image = image.convert(self.mode)
                if self.image_size is not None:
                    image = image.resize((self.image_size[1], self.image_size[0]), Image.BILINEAR)
                array = np.asarray(image, dtype=np.float32) / 255.0
        except OSError as exc:
            raise InputError(f"cannot read image `{path}`: {exc}; remove it or convert it to PNG/JPEG") from None
        tensor = torch.from_numpy(array.copy())
        tensor = tensor[None] if tensor.dim() == 2 else tensor.permute(2, 0, 1)
        return (tensor - self.mean) / self.std

    def __getitem__(self, index: int) -> torch.Tensor:
        chunk = self.paths[index * self.batch_size : (index + 1) * self.batch_size]
        images = [self._read(p) for p in chunk]
        sizes = {tuple(t.shape[1:]) for t in images}
        if len(sizes) > 1:
            raise InputError(
                f"images in the folder have different sizes ({', '.join('x'.join(map(str, s)) for s in sorted(sizes))}); "
                "pass `image_size`, e.g. 224"
            )
        return torch.stack(images)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))


def load_batches(
    source: str | Path,
    *,
    batch_size: int = 32,
    image_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    data_args: str | Mapping[str, Any] | None = None,
    input_key: str | None = None,
) -> Iterable[Any]:
    """What ``--data SOURCE`` names, as an iterable of batches (see the module docstring)."""
    path = Path(source).expanduser()
    if path.is_dir():
        paths = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise InputError(
                f"data `{source}`: the folder holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                "pass a folder of images, a tensor file or a module:factory"
            )
        return ImageFolderBatches(paths, batch_size, _image_size(image_size), mean, std)
    if path.exists() or path.is_symlink():
        require_regular_file(path, "`source`")  # not a FIFO or a device, not empty: before opening it
        return TensorBatches(_read_tensor_file(path, input_key), batch_size, f"data `{source}`")
    if ":" in str(source):
        factory = resolve_callable(str(source), flag="`source`")
        kwargs = parse_kwargs(data_args, "`data_args`") if isinstance(data_args, (str, type(None))) else dict(data_args)
        try:
            batches = factory(**kwargs)
        except TypeError as exc:
            raise InputError(f"data `{source}` rejected its arguments: {exc}; check `data_args`") from None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # an exception, or sys.exit() in the factory
            raise InputError(f"data `{source}` {user_exit(exc)} instead of returning batches") from None
        if isinstance(batches, torch.Tensor):
            return TensorBatches(batches, batch_size, f"data `{source}`")
        if not isinstance(batches, Iterable):
            raise InputError(
                f"data `{source}` returned a {type(batches).__name__}, not an iterable of batches; "
                "return a DataLoader, a list of batches or one stacked tensor"
            )
        return batches
    raise InputError(
        f"data `{source}`: no such file or folder; pass a tensor file ({', '.join(TENSOR_SUFFIXES)}), "
        "a folder of images, or package.module:factory / path/file.py:factory"
    )


def _image_size(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    dims = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    if len(dims) == 1:
        dims = dims * 2
    if len(dims) != 2 or min(dims) < 1:
        raise InputError(f"`image_size` {size}: pass one positive size (224) or height,width (224,320)")
    return dims


def _read_tensor_file(path: Path, input_key: str | None) -> torch.Tensor:
    suffix = path.suffix.lower()
    where = f"data `{path}`"
    if suffix in (".pt", ".pth"):
        try:
            content = torch_load(path)
        except pickle.UnpicklingError as exc:
            unsafe = unsafe_globals(path)
            if not unsafe:
                raise InputError(f"cannot read {where} as a PyTorch file: {torch_reason(exc)}") from None
            what = ", ".join(f"`{g}`" for g in unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
            raise InputError(f"{where} holds objects other than tensors ({what}); loading them could run code, so it "
                             "is not loaded; save the inputs with torch.save(tensor) or as .safetensors") from None
        except Exception as exc:  # a corrupt file can make the unpickler fail in any way
            raise InputError(f"cannot read {where} as a PyTorch file: {torch_reason(exc)}") from None
    elif suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            content = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise InputError(f"cannot read {where} as safetensors: {shorten(reason(exc), 200)}") from None
    elif suffix in (".npy", ".npz"):
        import numpy as np

        try:
            loaded = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"cannot read {where} as a numeric array: {shorten(reason(exc), 200)}") from None
        content = {k: torch.from_numpy(loaded[k]) for k in loaded.files} if suffix == ".npz" else torch.from_numpy(loaded)
    else:
        raise InputError(f"{where}: unknown file type `{suffix}`; pass one of {', '.join(TENSOR_SUFFIXES)}, "
                         "a folder of images, or package.module:factory")
    tensor = model_input(content, input_key, where=where)
    return tensor
