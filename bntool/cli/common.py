"""What every subcommand does around its surgery: load the model, pick inputs, write verified output.

Imported inside command functions (it imports torch).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.machinery
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from .. import persist
from ..errors import InputError, VerificationError
from ..io import (
    checkpoint,  # persist: the ops' recipe replays
    matching,
    modelspec,
    onmeta,
    outputs,
    writing,
)
from ..report import set_recipe
from ..runtime.running import resolve_device
from ..runtime.shapes import make_inputs, parse_shape
from ..verify.validity import require_valid
from . import console
from .app import state
from .sourcehash import hash_meanwhile
from .tables import comparison_rows, render_comparison, worst, worst_summary  # noqa: F401 (their old home)


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


@dataclass(frozen=True)
class Loading:
    """The flags that say how to read the checkpoint into a model (every command has them)."""

    checkpoint: Path
    model: str | None
    model_args: str | None
    key: str | None
    allow_pickle: bool
    strip_prefix: bool

    def load(self, valid: str = "all") -> Source:
        return load_source(self.checkpoint, model_spec=self.model, model_args=self.model_args, key=self.key,
                           allow_pickle=self.allow_pickle, strip_prefix=self.strip_prefix, valid=valid)


@dataclass
class Operation:
    """One command's operation for ``run_operation``: its flags, its call of the API, its rendering.

    ``operate(source, inputs, target)`` returns ``(model to write or None, report)``; ``render(result, report)``
    shows the result. The hooks default to what fold, freeze and unfreeze need: ``inputs(source, target)`` (the
    verification inputs from --input-shape / the model's declared shape), ``output()`` (the output path beside
    the input, checked before any work), ``prepare(target)`` (a device of this process, e.g. under torchrun),
    ``lead`` and ``fields(source, target)`` (more JSON fields, before and after the output's), ``check(report)``
    (raise if there is nothing to write). ``writes``: False when the operation writes its own file (export);
    ``rank``: only rank 0 renders and writes; ``failed``: the message of a failed verification, given the error.
    """

    command: str
    loading: Loading
    operate: Callable[[Source, Any, torch.device], tuple[nn.Module | None, Any]]
    render: Callable[[dict, Any], None]
    as_json: bool = False
    device: str = "auto"
    out: Path | None = None
    suffix: str = ""
    force: bool = False
    dry_run: bool = False
    input_shape: list[str] | None = None
    seed: int = 0
    data: str | None = None
    valid: str = "all"
    writes: bool = True
    inputs: Callable[[Source, torch.device], Any] | None = None
    output: Callable[[], Path] | None = None
    prepare: Callable[[torch.device], torch.device] | None = None
    lead: dict[str, Any] = dataclasses.field(default_factory=dict)
    fields: Callable[[Source, torch.device], dict[str, Any]] | None = None
    check: Callable[[Any], None] | None = None
    failed: Callable[[VerificationError], VerificationError] | None = None
    rank: int = 0


def run_operation(op: Operation) -> dict[str, Any]:
    """``_run_operation``, with what exists once the output is checked (the imports: torch's ~170k objects) kept
    out of the garbage collector's walks until it returns: each collection of the command (the operations' own
    ``gc.collect()``, and the automatic ones) then walks only what the command made, ~1 ms instead of 0.15-0.3 s.
    (A process that froze objects itself keeps them as it froze them.)"""
    ours = gc.get_freeze_count() == 0
    try:
        return _run_operation(op, ours)
    finally:
        if ours:
            gc.unfreeze()  # (in a process that goes on, as under tests, older garbage is collectable again)


def _run_operation(op: Operation, freeze: bool = False) -> dict[str, Any]:
    """The body every writing command shares; returns the JSON result it rendered.

    Humans read stderr when --json owns stdout; the output path is checked
    before any work; then the device, the model, the inputs and the
    operation. A failed verification renders the report (with --json too)
    and raises; otherwise the result is written verified (unless a dry run or
    the operation wrote its own file) and rendered.
    """
    console.use_stderr_for_humans(op.as_json)
    out = op.output() if op.output is not None else output_path(
        op.loading.checkpoint, op.out, op.suffix, force=op.force, dry_run=op.dry_run, model=op.loading.model,
        data=op.data)
    target = resolve_device(op.device)
    if op.prepare is not None:
        target = op.prepare(target)
    if freeze:  # (what exists now is the imports: the model is loaded next)
        gc.freeze()
    gc.set_threshold(*state.get("gc_threshold", gc.get_threshold()))  # full collections again (``cli.main``)
    source = op.loading.load(op.valid)
    hashing = hash_meanwhile(source) if op.writes and op.rank == 0 and not op.dry_run else None
    inputs = op.inputs(source, target) if op.inputs is not None else verification_inputs(
        source.model, op.input_shape, op.seed)
    result: dict[str, Any] = {"command": op.command, **source.describe(), **op.lead}
    if op.writes:
        result.update(output=None, written=False, dry_run=op.dry_run)
    if op.fields is not None:
        result.update(op.fields(source, target))
    lead = op.rank == 0
    try:
        model, report = op.operate(source, inputs, target)
    except VerificationError as exc:
        if exc.report is not None:
            result.update(exc.report.to_dict())
            if lead:
                op.render(result, exc.report)
        if op.failed is not None:
            raise op.failed(exc) from None
        raise
    if op.check is not None:
        op.check(report)
    result.update(report.to_dict())
    source.model = None  # the original is not needed any more: its memory goes before the write
    if op.writes and lead and not op.dry_run:
        if hashing is not None:
            hashing.join()  # (the hash is cached on ``source.loaded``; a failed one is computed again, and raises, here)
        try:
            written = write_verified(source, model, out, force=op.force)
        except VerificationError:
            op.render(result, report)
            raise
        result.update(output=str(written), written=True)
    if lead:
        op.render(result, report)
    return result


@contextmanager
def shown_on_failure(result: dict[str, Any], render: Callable[[dict[str, Any], Any], None]) -> Iterator[None]:
    """Run the block; a ``VerificationError`` that carries a report is rendered first (its ``to_dict()`` in
    ``result``), then raised: a failed check shows what failed, with --json too."""
    try:
        yield
    except VerificationError as exc:
        if exc.report is not None:
            result.update(exc.report.to_dict())
            render(result, exc.report)
        raise


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
    return persist.write(result, out, source=source.loaded, force=force, build=source.build_fresh, protect=protect)


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
