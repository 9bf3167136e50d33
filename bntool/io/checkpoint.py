"""Reading checkpoints, safely: what a file holds, before it meets a model.

``.safetensors`` needs no code; ``.pt/.pth/.bin/.ckpt`` go through
``torch.load(weights_only=True)`` (``torchfile``), and a file that would need
arbitrary unpickling is refused unless ``allow_pickle=True``. Training
checkpoints nest their state dict (``{"epoch": 3, "state_dict": {...}}``):
``read`` finds every candidate; ``matching`` picks the one that fits a model
and strips wrapper prefixes. bntool's own files carry metadata (the recipe,
the source) under ``META_KEY``, written by ``writing``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError, UnsafeFileError
from . import tensorfile
from .inputs import require_regular_file
from .torchfile import torch_load, torch_reason, unsafe_globals

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *TORCH_SUFFIXES)
#: Keys under which training scripts store the model's state dict, most likely first.
STATE_DICT_KEYS = (
    "state_dict", "model_state_dict", "model", "module", "net", "network", "weights",
    "state_dict_ema", "model_ema", "ema_state_dict", "ema",
)
#: Prefixes added by wrappers: DataParallel/DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
META_KEY = "bntool"


@dataclass(frozen=True)
class Candidate:
    """One state dict found in a file: where it sits (``key``) and its tensors."""

    key: str | None
    state_dict: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Loaded:
    """What a checkpoint file holds, before it meets a model."""

    path: Path
    candidates: tuple[Candidate, ...]
    metadata: dict[str, Any] = field(default_factory=dict)
    module: nn.Module | None = None  # a whole pickled model (only with allow_pickle)

    @property
    def recipe(self) -> list[dict[str, Any]]:
        return list(self.metadata.get("recipe", []))

    @functools.cached_property
    def sha256(self) -> str:
        """The file's sha256, computed the first time it is asked for (outputs record their source's)."""
        return sha256(self.path)

    def without_tensors(self) -> Loaded:
        """The same file's description without the tensors read from it (so they can be freed once loaded)."""
        slim = dataclasses.replace(self, candidates=())
        if "sha256" in self.__dict__:
            slim.__dict__["sha256"] = self.__dict__["sha256"]
        return slim


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read(path: str | os.PathLike, *, key: str | None = None, allow_pickle: bool = False) -> Loaded:
    """Read a checkpoint file without running code from it (unless ``allow_pickle``)."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"`{path}` is a folder; pass a checkpoint file ({', '.join(WEIGHT_SUFFIXES)})")
    require_regular_file(path, "the checkpoint")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        obj, metadata = _read_safetensors(path)
    elif suffix in TORCH_SUFFIXES:
        obj = _read_torch(path, allow_pickle)
        metadata = obj.pop(META_KEY, {}) if isinstance(obj, dict) and isinstance(obj.get(META_KEY), dict) else {}
    else:
        raise InputError(
            f"`{path}` has an unknown extension `{path.suffix}`; bntool reads {', '.join(WEIGHT_SUFFIXES)}"
        )
    module = obj if isinstance(obj, nn.Module) else None
    if module is not None:
        obj = module.state_dict()
    candidates = tuple(_find_state_dicts(obj))
    if key is not None:
        candidates = tuple(c for c in candidates if c.key == key)
        if not candidates:
            found = ", ".join(f"`{c.key}`" for c in _find_state_dicts(obj) if c.key) or "none"
            raise InputError(f"`{path}` has no state dict under `key=\"{key}\"`; state dicts found under: {found}")
    if not candidates:
        raise InputError(
            f"`{path}` holds no state dict (no mapping of names to tensors); "
            f"top-level keys: {_describe_keys(obj)}"
        )
    return Loaded(path=path, candidates=candidates, metadata=metadata, module=module)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:  # (validates the header: offsets, sizes, dtypes)
            raw_meta = f.metadata() or {}
            names = set(f.keys())
        try:
            tensors = tensorfile.read_mapped(path)  # memory-mapped: no copy of the file in memory
        except (KeyError, ValueError, TypeError, RuntimeError, OSError):
            tensors = None
        if tensors is None or set(tensors) != names:  # a dtype or layout bntool does not map: read it whole
            tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"cannot read `{path}` as safetensors: {exc}") from None
    metadata = {}
    if META_KEY in raw_meta:
        try:
            metadata = json.loads(raw_meta[META_KEY])
        except json.JSONDecodeError:
            raise InputError(f"`{path}` has unreadable bntool metadata; re-create it with bntool") from None
    return tensors, metadata


def _read_torch(path: Path, allow_pickle: bool) -> Any:
    try:
        return torch_load(path, weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        unsafe = [] if allow_pickle else unsafe_globals(path)
        if not unsafe:
            raise InputError(f"cannot read `{path}` as a PyTorch file: {torch_reason(exc)}") from None
        shown = ", ".join(f"`{g}`" for g in unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
        raise UnsafeFileError(
            f"`{path}` contains pickled Python objects ({shown}); loading it would run code "
            "from the file, which can do anything. Re-save its state_dict, or pass `allow_pickle=True` "
            "if you trust where it came from"
        ) from None
    except Exception as exc:  # a corrupt file can make the unpickler fail in any way (KeyError, struct.error...)
        raise InputError(f"cannot read `{path}` as a PyTorch file: {torch_reason(exc)}") from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and bool(obj)
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _find_state_dicts(obj: Any, prefix: str | None = None, depth: int = 0) -> Iterator[Candidate]:
    if _is_state_dict(obj):
        yield Candidate(prefix, dict(obj))
        return
    if not isinstance(obj, dict) or depth > 3:
        return
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    nested = [k for k, v in obj.items() if isinstance(k, str) and isinstance(v, dict)]
    for k in sorted(nested, key=lambda k: (STATE_DICT_KEYS.index(k) if k in STATE_DICT_KEYS else 99, k)):
        yield from _find_state_dicts(obj[k], k if prefix is None else f"{prefix}.{k}", depth + 1)
    if tensors and len(tensors) >= len(obj) // 2:  # a state dict with a few non-tensor extras
        yield Candidate(prefix, tensors)


def _describe_keys(obj: Any) -> str:
    if isinstance(obj, dict):
        keys = [str(k) for k in obj][:8]
        return ", ".join(f"`{k}`" for k in keys) or "(empty)"
    return f"a {type(obj).__name__}"


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The bntool metadata (recipe, source...) of a file bntool wrote, without loading its tensors."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        raw = tensorfile.read_header(path)[1].get("__metadata__", {}).get(META_KEY)
        return json.loads(raw) if raw else {}
    obj = torch_load(path)
    meta = obj.get(META_KEY) if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}
