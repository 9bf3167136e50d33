"""What every subcommand does around its surgery: load the model, pick inputs, write verified output.

Imported inside command functions (it imports torch).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from .. import checkpoint, console, modelspec
from ..errors import InputError, VerificationError
from ..verify import Comparison, make_inputs, model_device, parse_shape, run_model


@dataclass
class Source:
    """A model built from ``--model`` with a checkpoint's weights, and how to build it again."""

    model: nn.Module
    loaded: checkpoint.Loaded
    resolved: checkpoint.Resolved
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
) -> Source:
    """Read ``path`` safely and load it into the model ``--model`` builds (or the pickled model itself)."""
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
    model = build_fresh()
    resolved = checkpoint.load_state(model, loaded, strip_prefix=strip_prefix)
    model.eval()
    return Source(model, loaded, resolved, model_spec, build_fresh)


def verification_inputs(model: nn.Module, shapes: list[str] | None, seed: int) -> tuple[torch.Tensor, ...]:
    return make_inputs(model, [parse_shape(s) for s in shapes] if shapes else None, seed=seed)


def output_path(checkpoint_path: Path, out: Path | None, suffix: str, *, force: bool, dry_run: bool) -> Path:
    """``--out``, or ``best.pth`` -> ``best.<suffix>.safetensors`` beside the input; refused early if unusable.

    Checked before any work (an existing file without ``--force``, the input
    itself, a missing folder, an unknown extension), so nobody waits for a
    verification only to be told the output cannot be written.
    """
    out = out or checkpoint_path.with_name(f"{checkpoint_path.stem}.{suffix}.safetensors")
    if not dry_run:
        checkpoint.check_output_path(out, force=force, inputs=(checkpoint_path,))
        checkpoint.output_format(out)
    return out


def write_verified(
    source: Source,
    result: nn.Module,
    out: Path,
    step: dict[str, Any],
    *,
    force: bool,
    inputs,
) -> Path:
    """Write ``result`` atomically, with the recipe carried forward and ``step`` added.

    Before the rename, the written file is loaded into a freshly built model
    (the recipe replayed), which must be identical to ``result``: the same
    module types under the same names, bit-identical tensors, and the same
    eval-mode outputs on ``inputs``. So the file holds exactly what was verified.
    """

    def check(tmp: Path) -> None:
        fresh = checkpoint.load(tmp, source.build_fresh())
        assert_identical(result, fresh, inputs, what=f"the model reloaded from `{out}`")

    return checkpoint.save(result, out, recipe=[*source.loaded.recipe, step], source=source.loaded, force=force, check=check)


def _kind(module: nn.Module) -> Any:
    """What a module is: its type, or for an fx GraphModule (a class per instance) its class name and code."""
    if isinstance(module, torch.fx.GraphModule):
        return type(module).__name__, module.code
    return type(module)


def assert_identical(expected: nn.Module, got: nn.Module, inputs, *, what: str) -> None:
    types = {n: _kind(m) for n, m in expected.named_modules()}
    got_types = {n: _kind(m) for n, m in got.named_modules()}
    if types != got_types:
        diff = sorted(n for n in types.keys() | got_types.keys() if types.get(n) != got_types.get(n))
        raise VerificationError(f"{what} has other layers than the verified model: {', '.join(diff[:3])}")
    state, got_state = expected.state_dict(), got.state_dict()
    changed = [k for k in state if not torch.equal(state[k].cpu(), got_state[k].cpu())]
    if changed:
        raise VerificationError(f"{what} differs from the verified model in {', '.join(changed[:3])}")
    got.to(model_device(expected))
    outputs = run_model(expected, inputs)
    got_outputs = run_model(got, inputs)
    if not all(torch.equal(a, b) for (_, a), (_, b) in zip(outputs, got_outputs)):
        raise VerificationError(f"{what} computes other outputs than the verified model")


def comparison_rows(comparison: Comparison) -> list[list[Any]]:
    """One row per model output; the layer-by-layer probes summarised in one row."""
    rows = []
    outputs = [o for o in comparison.outputs if not o.name.startswith("layer `")]
    layers = [o for o in comparison.outputs if o.name.startswith("layer `")]
    if layers:
        worst = max(layers, key=lambda o: (not o.passed, o.max_abs_error / max(o.tolerance, 1e-300)))
        failed = sum(not o.passed for o in layers)
        status = "ok" if not failed else f"{failed} FAILED"
        rows.append([f"{len(layers)} layers (worst {worst.name[6:]})", "", f"{worst.max_abs_error:.3g}",
                     f"{worst.max_rel_error:.3g}", f"{worst.tolerance:.3g}", "", status])
    for o in outputs:
        agree = f"{o.argmax_agreement:.1%}" if o.argmax_agreement is not None else ""
        rows.append([o.name, "x".join(map(str, o.shape)), f"{o.max_abs_error:.3g}", f"{o.max_rel_error:.3g}",
                     f"{o.tolerance:.3g}", agree, "ok" if o.passed else "FAILED"])
    return rows


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
    """``--image-size`` / ``--mean`` / ``--std`` as the keyword arguments of ``bntool.data.load_batches``."""
    size = parse_numbers(image_size, "--image-size", float)
    if size is not None and (not size or len(size) > 2 or any(v != int(v) or v < 1 for v in size)):
        raise InputError(f"--image-size `{image_size}`: pass one positive size (224) or height,width (224,320)")
    return {
        "image_size": [int(v) for v in size] if size is not None else None,
        "mean": parse_numbers(mean, "--mean", float),
        "std": parse_numbers(std, "--std", float),
    }
