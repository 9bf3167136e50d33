"""Reading and writing checkpoints, safely and atomically.

Reading: ``.safetensors`` needs no code; ``.pt/.pth/.bin/.ckpt`` go through
``torch.load(weights_only=True)``, and a file that would need arbitrary
unpickling is refused unless ``allow_pickle=True``. Training checkpoints nest
their state dict (``{"epoch": 3, "state_dict": {...}}``) and prefix its keys
(``module.`` under DataParallel/DDP, ``_orig_mod.`` under torch.compile); both
are resolved against the model the weights are meant for.

Writing: a temporary file in the destination folder, checked by the caller,
then moved into place without replacing anything that appeared meanwhile
(``outputs.atomic_write``). The metadata carries bntool's recipe, so that
``bntool.load(path, model=MyNet())`` rebuilds the same structure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._version import __version__
from . import tensorfile
from .errors import CheckpointMismatchError, InputError, UnsafeFileError, shorten
from .inputs import require_regular_file
from .outputs import atomic_write, check_output_path
from .recipe import replay

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


@dataclass(frozen=True)
class Resolved:
    """The state dict chosen for a model, with what was done to find it."""

    state_dict: dict[str, torch.Tensor]
    key: str | None
    stripped_prefix: str | None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- reading


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
        with safe_open(str(path), framework="pt") as f:
            raw_meta = f.metadata() or {}
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


def torch_load(path: Path, *, weights_only: bool = True) -> Any:
    """``torch.load`` to the CPU, memory-mapping the tensors of a zip-format file (no copy of the file in memory)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pickle-protocol notes are not the user's concern
        if zipfile.is_zipfile(path):
            try:
                return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
            except (RuntimeError, OSError) as exc:  # a file system without mmap: read it instead
                if "mmap" not in str(exc).lower():
                    raise
        return torch.load(path, map_location="cpu", weights_only=weights_only)


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


def torch_reason(exc: BaseException) -> str:
    """torch.load's reason without its advice about torch.load's own arguments."""
    text = str(exc).strip()
    if isinstance(exc, EOFError) or "Ran out of input" in text:
        return "the file ends early (cut short while being written or copied?)"
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    if found:
        return f"it is not a valid PyTorch file (its pickle is unreadable: {shorten(found.group(1).strip(), 120)})"
    if not isinstance(exc, (RuntimeError, OSError, ValueError, pickle.UnpicklingError)):
        return f"it is not a valid PyTorch file (its pickle is unreadable: {type(exc).__name__} {shorten(text, 80)})"
    if "invalid load key" in text or "could not find" in text.lower() or "failed finding central directory" in text:
        return f"it is not a PyTorch file ({shorten(_first_line(exc), 120)})"
    return shorten(_first_line(exc), 200)


def _allowed_globals() -> set[str]:
    """What torch's weights-only unpickler accepts (its own list plus any the user registered)."""
    allowed: set[str] = set()
    try:
        from torch import _weights_only_unpickler as unpickler

        allowed |= set(unpickler._get_allowed_globals())
        allowed |= set(unpickler._get_user_allowed_globals())
    except Exception:  # another torch: fall back to the classes every tensor file needs
        allowed |= {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
                    "torch.FloatStorage", "torch.storage.UntypedStorage", "torch.Size", "torch.device"}
    return allowed | {g.replace("builtins.", "__builtin__.") for g in allowed if g.startswith("builtins.")}


def unsafe_globals(path: Path) -> list[str]:
    """The Python objects a pickle would import that a weights-only load does not allow.

    Read with pickletools from a stream (nothing is executed, the file is not
    read whole: a legacy file stops at the pickle's end). An empty list means
    the file is not a valid pickle, or needs nothing unsafe.
    """
    import pickletools

    try:
        with contextlib.ExitStack() as stack:
            if zipfile.is_zipfile(path):
                archive = stack.enter_context(zipfile.ZipFile(path))
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return []
                stream = stack.enter_context(archive.open(name))  # the pickle alone, streamed
            else:
                stream = stack.enter_context(open(path, "rb"))
            found, strings = [], []
            for opcode, arg, _ in pickletools.genops(stream):
                if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(arg)
                elif opcode.name == "GLOBAL":
                    found.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # not a pickle we can parse: not unsafe, just unreadable
        return []
    allowed = _allowed_globals()
    return list(dict.fromkeys(g for g in found if g not in allowed))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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


# ----------------------------------------------------------------------------- matching a model


def resolve(loaded: Loaded, model: nn.Module | None, *, strip_prefix: bool = True) -> Resolved:
    """Choose the state dict that fits ``model`` and strip wrapper prefixes.

    Without a model, the first candidate is taken with ``module.`` /
    ``_orig_mod.`` removed. With one (whose structure already has the file's
    recipe replayed, as ``load_state`` does), every candidate is tried; exactly
    one must fit, else the error names the candidates and ``--key``.
    """
    expected = set(model.state_dict().keys()) if model is not None else None
    fits: list[Resolved] = []
    for cand in loaded.candidates:
        state, prefix = (_strip(cand.state_dict, expected) if strip_prefix else (cand.state_dict, None))
        if expected is None or set(state) == expected:
            fits.append(Resolved(state, cand.key, prefix))
    if expected is None:
        return fits[0]
    if len(fits) == 1:
        return fits[0]
    if len(fits) > 1:
        keys = ", ".join(f"`{r.key}`" for r in fits)
        raise InputError(
            f"`{loaded.path}` holds {len(fits)} state dicts that fit the model ({keys}); pass `key=\"...\"` to choose one"
        )
    best = loaded.candidates[0]
    state, prefix = _strip(best.state_dict, expected) if strip_prefix else (best.state_dict, None)
    raise _mismatch(loaded.path, model, state, expected, prefix, strip_prefix)


def _strip(state: dict[str, torch.Tensor], expected: set[str] | None) -> tuple[dict[str, torch.Tensor], str | None]:
    """Remove wrapper prefixes (``module.``, ``_orig_mod.``, or one shared prefix that makes the keys fit)."""
    removed = ""
    changed = True
    while changed:
        changed = False
        if expected is not None and set(state) == expected:
            break
        for prefix in WRAPPER_PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                removed += prefix
                changed = True
    if expected is not None and set(state) != expected and state:
        first = next(iter(state)).split(".", 1)[0] + "."
        if all(k.startswith(first) for k in state):
            stripped = {k[len(first):]: v for k, v in state.items()}
            if set(stripped) == expected:
                state, removed = stripped, removed + first
    return state, removed or None


def _mismatch(path, model, state, expected, prefix, strip_prefix) -> CheckpointMismatchError:
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)

    def short(keys: list[str]) -> str:
        shown = ", ".join(f"`{k}`" for k in keys[:3])
        return shown + (", ..." if len(keys) > 3 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing ({short(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({short(unexpected)})")
    hint = "check the model it is loaded into (`model_args`), or pass `key=\"...\"` to pick another state dict"
    if not strip_prefix and any(k.startswith(WRAPPER_PREFIXES) for k in unexpected):
        hint = "the checkpoint looks wrapped (DataParallel / torch.compile); drop `strip_prefix=False`"
    return CheckpointMismatchError(
        f"cannot load `{path}` into `{type(model).__name__}`: {' and '.join(parts)}; {hint}"
    )


def load_state(model: nn.Module, loaded: Loaded, *, strip_prefix: bool = True) -> Resolved:
    """Replay the file's recipe on ``model`` (in place), then load its weights strictly.

    Returns which state dict of the file was loaded and what prefix was removed.
    """
    replay(model, loaded.recipe)
    resolved = resolve(loaded, model, strip_prefix=strip_prefix)
    own = model.state_dict()
    wrong = [
        f"`{k}` is {tuple(v.shape)} in the file but {tuple(own[k].shape)} in the model"
        for k, v in resolved.state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if wrong:
        more = f" (and {len(wrong) - 2} more)" if len(wrong) > 2 else ""
        raise CheckpointMismatchError(
            f"cannot load `{loaded.path}` into `{type(model).__name__}`: {'; '.join(wrong[:2])}{more}; "
            "check the model's sizes (`model_args`: widths, number of classes)"
        )
    model.load_state_dict(resolved.state_dict, strict=True)
    return resolved


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The bntool metadata (recipe, source...) of a file bntool wrote, without loading its tensors."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        raw = tensorfile.read_header(path)[1].get("__metadata__", {}).get(META_KEY)
        return json.loads(raw) if raw else {}
    obj = torch_load(path)
    meta = obj.get(META_KEY) if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


# ----------------------------------------------------------------------------- writing


def metadata_for(recipe: list[dict[str, Any]], source: Loaded | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"bntool_version": __version__, "recipe": recipe}
    if source is not None:
        meta["source"] = {"file": source.path.name, "sha256": source.sha256}
        if "source" in source.metadata:
            meta["origin"] = source.metadata.get("origin", source.metadata["source"])
    return meta


atomic_path = atomic_write  # the earlier name


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
    raise InputError(f"--out `{out}` has extension `{out.suffix}`; use .safetensors (recommended) or .pt")


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
