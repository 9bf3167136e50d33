"""``bntool.load`` and ``bntool.save``: models in and out of files, with their recipe, and the write verified.

``load`` reads any checkpoint safely (``bntool.io.checkpoint``), replays the
recipe stored in a bntool file on the model it is given, loads the weights
strictly, and leaves the recipe on the model (``report.recipe_of``); every
operation adds its step to the recipe of the model it returns.

``save`` writes a model with that recipe to a temporary file beside the
destination and checks the temporary file before it is renamed into place:
every tensor of the file is bit-identical to the model's (read back one at a
time), the stored recipe is the model's, and, when ``build`` says how the
model was built, the recipe replayed on a freshly built model (on the meta
device: no memory for weights) gives the same layers with the same
hyper-parameters and the same tensor names, shapes and dtypes. Nothing that
fails the check is left behind, and nothing existing is replaced unless
``force``.

This module imports the operations and builds the table of their recipe
replays (``REPLAYERS``), which it passes to whatever replays a recipe;
nothing below it names the operations.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from . import recipe
from .converting import convert as converting
from .deprecation import plumbing
from .errors import VerificationError, require_module
from .folding import apply as fold_apply
from .folding import merge_apply
from .freezing import freeze as freezing
from .io import checkpoint, matching, tensorfile, torchfile, writing
from .recalibration import state as recalibration_state
from .report import recipe_of, set_recipe
from .verify.bits import same_bits

#: op name -> ``replay(model, step)``: the structural change of each operation's recipe step
REPLAYERS: dict[str, recipe.Replayer] = {
    "fold": fold_apply.replay,
    "merge": merge_apply.replay,
    "freeze": freezing.replay,
    "unfreeze": freezing.replay,
    "recalibrate": recalibration_state.replay,
    "convert": converting.replay,
}

def load(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    key: str | None = None,
    allow_pickle: bool = False,
    strip_prefix: bool = True,
) -> nn.Module:
    """Load a checkpoint (bntool output or any training checkpoint) into ``model``.

    The recipe stored by bntool (folds, frozen layers...) is replayed on
    ``model`` first, so ``bntool.load("folded.safetensors", model=resnet50())``
    returns the folded model. ``model`` is changed in place and returned, and
    carries the recipe, so that saving it after more surgery records every step.
    """
    require_module(model)
    loaded = checkpoint.read(path, key=key, allow_pickle=allow_pickle)
    matching.load_state(model, loaded, replayers=REPLAYERS, strip_prefix=strip_prefix)
    set_recipe(model, loaded.recipe)
    return model


def save(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    recipe: list[dict[str, Any]] | None = None,
    force: bool = False,
    build: Callable[[], nn.Module] | None = None,
    verify: bool = True,
    protect: Iterable[str | os.PathLike] = (),
    **internal: Any,
) -> Path:
    """Write ``model`` and its recipe (default: the one it carries) atomically, verified.

    ``build`` (a callable returning a freshly built model of the same
    architecture, e.g. ``MyNet``) lets the check rebuild the structure from
    the recipe too. With ``verify=False`` the written file is not checked. A
    failed check raises ``VerificationError`` and nothing is written.
    ``out`` is never one of ``protect``. (``source`` and ``check``, bntool's
    own plumbing, are accepted for one release with a ``FutureWarning``.)
    """
    plumbing(internal, ("source", "check"), "save", "`bntool.persist.write` takes it")
    return write(model, out, recipe=recipe, force=force, build=build, verify=verify, protect=protect, **internal)


def write(
    model: nn.Module,
    out: str | os.PathLike,
    *,
    recipe: list[dict[str, Any]] | None = None,
    source: checkpoint.Loaded | None = None,
    force: bool = False,
    build: Callable[[], nn.Module] | None = None,
    verify: bool = True,
    check: Callable[[Path], None] | None = None,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """``save``, also recording the file the model was read from (``source``: its name and hash go into the
    metadata, and it is never the output) and running ``check(tmp_path)`` of the caller's before the rename."""
    require_module(model)
    steps = recipe_of(model) if recipe is None else list(recipe)

    def verified(tmp: Path) -> None:
        if verify:
            check_written(tmp, model, steps, build=build, what=f"the file written for `{out}`")
        if check is not None:
            check(tmp)

    return writing.save(model, out, recipe=steps, source=source, force=force, check=verified, protect=protect)


# ----------------------------------------------------------------------------- the check of a written file


def check_written(path: Path, model: nn.Module, steps: list[dict[str, Any]], *,
                  build: Callable[[], nn.Module] | None = None, what: str = "the written file") -> None:
    """Raise ``VerificationError`` unless the file at ``path`` holds exactly ``model`` and ``steps``."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    stored, different = _differences(path, state)
    if stored != steps:
        raise VerificationError(f"{what} records another recipe than the model's")
    if different:
        shown = ", ".join(f"`{k}`" for k in different[:3]) + (", ..." if len(different) > 3 else "")
        raise VerificationError(f"{what} differs from the verified model in {shown}")
    if build is not None:
        _check_structure(model, state, steps, build, what)


def _differences(path: Path, state: dict[str, torch.Tensor]) -> tuple[list[dict[str, Any]], list[str]]:
    """The recipe stored in the file, and the names whose tensors differ from ``state`` (read one at a time)."""
    loaded_meta = checkpoint.read_metadata(path)
    if writing.output_format(path) == "safetensors":
        return list(loaded_meta.get("recipe", [])), tensorfile.differences(path, state)
    stored = torchfile.torch_load(path)["state_dict"]  # memory-mapped: read as compared
    different = sorted(set(stored) ^ set(state))
    different += [k for k in state if k in stored and not same_bits(stored[k], state[k])]
    return list(loaded_meta.get("recipe", [])), different


def _check_structure(model: nn.Module, state: dict[str, torch.Tensor], steps: list[dict[str, Any]],
                     build: Callable[[], nn.Module], what: str) -> None:
    fresh = build_light(build)
    recipe.replay(fresh, steps, REPLAYERS)
    kinds, fresh_kinds = layer_kinds(model), layer_kinds(fresh)
    if kinds != fresh_kinds:
        names = sorted(n for n in kinds.keys() | fresh_kinds.keys() if kinds.get(n) != fresh_kinds.get(n))
        raise VerificationError(f"{what}, rebuilt from its recipe, has other layers than the verified model: "
                                f"{', '.join(f'`{n}`' for n in names[:3])}")
    fresh_state = fresh.state_dict()
    wrong = [k for k in state.keys() | fresh_state.keys()
             if k not in state or k not in fresh_state
             or (tuple(state[k].shape), state[k].dtype) != (tuple(fresh_state[k].shape), fresh_state[k].dtype)]
    if wrong:
        raise VerificationError(f"{what}, rebuilt from its recipe, does not hold the verified model's tensors: "
                                f"{', '.join(f'`{k}`' for k in sorted(wrong)[:3])}")


def build_light(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` on the meta device (structure, no memory for weights); on the CPU if the factory needs data."""
    try:
        with torch.device("meta"):
            return build()
    except Exception:  # noqa: BLE001 - a factory that computes from tensor values at build time
        return build()


def layer_kinds(model: nn.Module) -> dict[str, Any]:
    """Each layer's kind: its class (by module and qualified name) and hyper-parameters.

    By name, because some classes are made per instance: an fx GraphModule's
    (whose code is compared instead) and ``torch.nn.utils.parametrize``'s
    ``ParametrizedConv2d`` and the like (whose parametrizations are layers of
    their own, compared too).
    """
    kinds = {}
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, torch.fx.GraphModule):
            kinds[name] = (cls.__name__, module.code)
        else:
            kinds[name] = (cls.__module__, cls.__qualname__, module.extra_repr())
    return kinds

