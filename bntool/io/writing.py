"""Writing checkpoints: the weights and bntool's metadata, tensor by tensor, atomically.

``save`` writes to a temporary file beside the destination, runs the
caller's check on it (``persist.save`` reloads and compares it), then moves
it into place without replacing anything that appeared meanwhile
(``outputs.atomic_write``). The metadata carries the recipe and the source's
name and hash, so that ``bntool.load(path, model=MyNet())`` rebuilds the same
structure.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..errors import InputError, named
from . import tensorfile
from .checkpoint import META_KEY, TORCH_SUFFIXES, Loaded
from .outputs import atomic_write, check_output_path


def metadata_for(recipe: list[dict[str, Any]], source: Loaded | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"bntool_version": __version__, "recipe": recipe}
    if source is not None:
        meta["source"] = {"file": source.path.name, "sha256": source.sha256}
        if "source" in source.metadata:
            meta["origin"] = source.metadata.get("origin", source.metadata["source"])
    return meta


def write_state(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, Any], fmt: str) -> None:
    """Write ``state`` with bntool ``metadata`` to ``path`` as ``safetensors`` or ``pt``, tensor by tensor.

    safetensors is streamed from the tensors themselves (no copy of the
    model); a ``.pt`` file is ``torch.save`` of the state dict, which writes
    each storage as it goes.
    """
    tensors = {k: v.detach() for k, v in state.items()}
    if fmt == "safetensors":
        tensorfile.write(path, tensors, {META_KEY: json.dumps(metadata), "format": "pt"})
        return
    with open(path, "wb") as f:  # through a Python file, so that a failed write keeps its OS error
        torch.save({"state_dict": {k: v.cpu() for k, v in tensors.items()}, META_KEY: metadata}, f)
        f.flush()
        os.fsync(f.fileno())


def output_format(out: Path) -> str:
    suffix = out.suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "pt"
    raise InputError(f"{named('`out`')} `{out}` has extension `{out.suffix}`; use .safetensors (recommended) or .pt")


def save(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    recipe: list[dict[str, Any]],
    source: Loaded | None = None,
    force: bool = False,
    check: Callable[[Path], None] | None = None,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write ``model``'s weights and ``recipe`` atomically.

    ``check(tmp_path)`` runs on the written temporary file before it is renamed
    into place (bntool reloads it into a fresh model and compares again); if it
    raises, nothing is left behind. ``out`` is never ``source``'s file or one
    of ``protect``; without ``force`` nothing existing is replaced, even a file
    that appears while the model is written.
    """
    inputs = [*((source.path,) if source else ()), *(Path(p) for p in protect)]
    out = check_output_path(out, force=force, inputs=inputs)
    fmt = output_format(out)
    with atomic_write(out, force=force, inputs=inputs) as tmp:
        write_state(tmp, model.state_dict(), metadata_for(recipe, source), fmt)
        if check is not None:
            check(tmp)
    return out
