"""What every subcommand does around its surgery: load the model, pick inputs, write verified output.

Imported inside command functions (it imports torch).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.machinery
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from .. import persist
from ..errors import InputError
from ..io import (
    checkpoint,  # persist: the ops' recipe replays
    matching,
    modelspec,
    onmeta,
    outputs,
    writing,
)
from ..report import set_recipe
from ..runtime.shapes import make_inputs, parse_shape
from ..verify.compare import Comparison, OutputComparison
from ..verify.validity import require_valid
from . import console
from .app import state


@dataclass
class Source:
    """A model built from ``--model`` with a checkpoint's weights, and how to build it again."""

    model: nn.Module
    loaded: checkpoint.Loaded
    resolved: matching.Resolved
    spec: str | None
    build_fresh: Callable[[], nn.Module]

    def describe(self) -> dict[str, Any]:
        return {
            "input": str(self.loaded.path),
            "model": self.spec,
            "key": self.resolved.key,
            "stripped_prefix": self.resolved.stripped_prefix,
            "recipe_in": self.loaded.recipe,
        }


def load_source(
    path: Path,
    *,
    model_spec: str | None,
    model_args: str | None,
    key: str | None,
    allow_pickle: bool,
    strip_prefix: bool,
    valid: str = "all",
) -> Source:
    """Read ``path`` safely and load it into the model ``--model`` builds (or the pickled model itself).

    ``valid`` says which tensors must be finite (and BN variances non-negative):
    ``all``, ``weights`` (BN statistics may be broken: recalibrate replaces
    them) or ``none`` (inspect reports them instead).
    """
    kwargs = modelspec.parse_kwargs(model_args)
    loaded = checkpoint.read(path, key=key, allow_pickle=allow_pickle)
    if model_spec is not None:
        def build_fresh() -> nn.Module:
            return modelspec.build(model_spec, kwargs)
    elif loaded.module is not None:
        skeleton = copy.deepcopy(loaded.module)

        def build_fresh() -> nn.Module:
            return copy.deepcopy(skeleton)
    else:
        raise InputError(
            f"`{path}` holds weights only; pass --model with the code that builds the network, "
            "e.g. --model mypkg.models:resnet50 or --model path/to/models.py:resnet50"
        )
    if model_spec is not None:  # on the meta device, the file's tensors assigned, where the factory allows
        model, resolved, normally = onmeta.build_loaded(build_fresh, loaded, replayers=persist.REPLAYERS,
                                                        strip_prefix=strip_prefix)
        if normally is not None and state["verbose"]:
            console.line(f"Built --model `{model_spec}` with its own weights before loading the file's: {normally}.")
    else:
        model = build_fresh()
        resolved = matching.load_state(model, loaded, replayers=persist.REPLAYERS, strip_prefix=strip_prefix)
    set_recipe(model, loaded.recipe)
    loaded, resolved = loaded.without_tensors(), dataclasses.replace(resolved, state_dict={})  # freed once loaded
    model.eval()
    if valid != "none":
        require_valid(model, statistics=valid == "all", what=f"`{path}`")
    return Source(model, loaded, resolved, model_spec, build_fresh)


def verification_inputs(model: nn.Module, shapes: list[str] | None, seed: int) -> tuple[torch.Tensor, ...]:
    return make_inputs(model, [parse_shape(s) for s in shapes] if shapes else None, seed=seed)


def output_path(checkpoint_path: Path, out: Path | None, suffix: str, *, force: bool, dry_run: bool,
                model: str | None = None, data: str | None = None) -> Path:
    """``--out``, or ``best.pth`` -> ``best.<suffix>.safetensors`` beside the input; refused early if unusable.

    Checked before any work (an existing file without ``--force``, one of the
    command's inputs, a folder that cannot be written, an unknown extension),
    so nobody waits for a verification only to be told the output cannot be written.
    """
    out = out or checkpoint_path.with_name(f"{checkpoint_path.stem}.{suffix}.safetensors")
    if not dry_run:
        writing.output_format(out)
        outputs.check_output_path(out, force=force, inputs=input_files(checkpoint_path, model=model, data=data))
    return out


def input_files(checkpoint_path: Path, *, model: str | None = None, data: str | None = None) -> list[tuple[Path, str]]:
    """Every file a command reads, labelled for messages: the checkpoint, the --model file, the --data source."""
    files = [(checkpoint_path, "the input checkpoint")]
    if model and (found := _spec_file(model)):
        files.append((found, "the --model file"))
    if data:
        path = Path(data).expanduser()
        if path.is_dir():
            files.append((path, "the --data folder"))
        elif path.exists():
            files.append((path, "the --data file"))
        elif found := _spec_file(data):
            files.append((found, "the --data factory file"))
    return files


def _spec_file(spec: str) -> Path | None:
    """The .py file of ``path/file.py:factory`` or ``package.module:factory``, found without importing anything."""
    target, sep, _ = spec.rpartition(":")
    if not sep or not target:
        return None
    if target.endswith(".py") or os.sep in target:
        return Path(target).expanduser()
    paths = [os.getcwd(), *sys.path]
    found = None
    for part in target.split("."):
        try:
            found = importlib.machinery.PathFinder.find_spec(part, paths)
        except (ImportError, ValueError):
            return None
        if found is None:
            return None
        paths = list(found.submodule_search_locations or [])
    return Path(found.origin) if found is not None and found.has_location and found.origin else None


def write_verified(source: Source, result: nn.Module, out: Path, *, force: bool) -> Path:
    """Write ``result`` (with the recipe it carries) atomically, verified by ``bntool.save``.

    Before the rename the written file is checked: every tensor bit-identical
    to ``result``'s, the recipe the one ``result`` carries, and the recipe,
    replayed on a freshly built model, giving the same layers and tensors.
    """
    require_valid(result, what="the result")  # never write NaN / inf (say, statistics a recalibration did not reach)
    protect = [p for p, _ in input_files(source.loaded.path, model=source.spec)]
    return persist.save(result, out, source=source.loaded, force=force, build=source.build_fresh, protect=protect)


def worst(outputs) -> OutputComparison | None:
    """The output closest to (or furthest past) its tolerance: the one a summary line names."""
    outputs = list(outputs)
    if not outputs:
        return None
    return max(outputs, key=lambda o: (not o.passed, o.max_abs_error / max(o.tolerance, 1e-300)))


def comparison_rows(comparison: Comparison) -> list[list[Any]]:
    """One row per model output; the layer-by-layer probes summarised in one row (the worst layer's)."""
    rows = []
    outputs = [o for o in comparison.outputs if not o.name.startswith("layer `")]
    layers = [o for o in comparison.outputs if o.name.startswith("layer `")]
    if layers:
        w = worst(layers)
        failed = sum(not o.passed for o in layers)
        status = "ok" if not failed else f"{failed} FAILED"
        rows.append([f"{len(layers)} layers (worst {w.name[6:]})", "", f"{w.max_abs_error:.3g}",
                     f"{w.max_rel_error:.3g}", f"{w.tolerance:.3g}", "", status])
    for o in outputs:
        agree = f"{o.argmax_agreement:.1%}" if o.argmax_agreement is not None else ""
        status = "ok" if o.passed else "FAILED (NaN/inf)" if o.nonfinite else "FAILED"
        rows.append([o.name, "x".join(map(str, o.shape)), f"{o.max_abs_error:.3g}", f"{o.max_rel_error:.3g}",
                     f"{o.tolerance:.3g}", agree, status])
    return rows


def worst_summary(comparison: Comparison) -> str:
    """The worst row of the table, in the table's own numbers: ``worst `output`: max abs error ... of tolerance ...``."""
    w = worst(comparison.outputs)
    if w is None:
        return "no outputs compared"
    share = w.max_abs_error / w.tolerance if w.tolerance > 0 else 0.0
    return (f"worst {w.name}: max abs error {w.max_abs_error:.3g}, {share:.0%} of its tolerance "
            f"{w.tolerance:.3g}; max rel error {w.max_rel_error:.3g}")


def render_comparison(comparison: Comparison, title: str) -> None:
    console.table(
        f"{title} ({comparison.device}, tolerance {comparison.rule})",
        ["output", "shape", "max abs err", "max rel err", "tolerance", "argmax agree", ""],
        comparison_rows(comparison),
    )


def parse_numbers(text: str | None, flag: str, kind: type) -> list | None:
    """``"0.485,0.456"`` -> ``[0.485, 0.456]`` (``kind`` int or float); ``None`` stays ``None``."""
    if not text:
        return None
    try:
        return [kind(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        example = "1,16" if kind is int else "0.485,0.456,0.406"
        raise InputError(f"{flag} `{text}` is not a list of {kind.__name__} values; pass e.g. {flag} {example}") from None


def image_options(image_size: str | None, mean: str | None, std: str | None) -> dict[str, Any]:
    """``--image-size`` / ``--mean`` / ``--std`` as the keyword arguments of ``bntool.data.sources.load_batches``."""
    size = parse_numbers(image_size, "--image-size", float)
    if size is not None and (not size or len(size) > 2 or any(v != int(v) or v < 1 for v in size)):
        raise InputError(f"--image-size `{image_size}`: pass one positive size (224) or height,width (224,320)")
    return {
        "image_size": [int(v) for v in size] if size is not None else None,
        "mean": parse_numbers(mean, "--mean", float),
        "std": parse_numbers(std, "--std", float),
    }
