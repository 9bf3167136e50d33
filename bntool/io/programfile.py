"""``.pt2`` files (``torch.export.save``): read without running code from them, written atomically and checked.

What ``torch.export.load`` (torch 2.13) unpickles, read from its source
(``torch/export/pt2_archive/_package.py``, ``torch/_export/serde``): the
graph is JSON, and plain tensors are raw bytes, but

* a weight or constant whose config says ``use_pickle`` (a tensor
  subclass) goes through ``torch.load(weights_only=False)``;
* a constant stored as a TorchBind object (``_pickle_load_obj``) or an
  opaque object (``pickle.loads``) is unpickled;
* the example inputs go through ``torch.load(weights_only=True)``, and on
  any failure again with ``weights_only=False``;
* an archive of the older format (``serialized_*.pt``) is unpickled the same way;
* the graph's call targets are looked up by name under ``torch``,
  ``operator`` and ``math``, so a crafted graph could name any function
  reachable from ``torch`` (``torch.os.system``), which would run when the
  program runs.

``read_program`` opens the archive itself first and refuses each of those
(unless ``allow_pickle``), checks the example inputs with a weights-only
load of its own (so torch's fallback never runs), then loads, and refuses a
graph that calls anything but torch operators. ``write_program`` saves
through the one output writer, and loads the staged file back (the same
safe way) and has the caller check it before the rename.
"""

from __future__ import annotations

import io
import json
import math
import operator
import os
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.export import ExportedProgram

from ..errors import InputError, UnsafeFileError, VerificationError, first_line
from ..verify.bits import same_bits
from .inputs import require_regular_file
from .outputs import atomic_write

ALLOW = "pass `allow_pickle=True` only if you trust the file"


def is_program_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a ``.pt2`` file (by its suffix: what the user says it is)."""
    return str(path).lower().endswith(".pt2")


def read_program(path: str | os.PathLike, *, allow_pickle: bool = False) -> ExportedProgram:
    """The program in ``path``, loaded without running code from the file (see the module docstring)."""
    path = Path(path)
    require_regular_file(path, "the program")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise InputError(f"`{path}` is cut short or damaged (a zip archive without its directory); write it "
                                 "again with `torch.export.save`")
        raise InputError(f"`{path}` is not a torch.export program: it is not a zip archive (a .pt2 from "
                         "`torch.export.save` is expected)")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            damaged = archive.testzip()
            if damaged is not None:
                raise InputError(f"`{path}` is damaged: `{damaged}` in it does not match its checksum")
            _check_archive(path, archive, names, allow_pickle)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as exc:
        raise InputError(f"`{path}` is cut short or damaged ({first_line(exc, 120)}); write it again with "
                         "`torch.export.save`") from exc
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
    except Exception as exc:
        raise InputError(f"torch {torch.__version__.split('+')[0]} cannot load the program in `{path}` "
                         f"({type(exc).__name__}: {first_line(exc, 160)}); it may come from another torch version: "
                         "export it again with this one") from exc
    _check_calls(path, program)
    return program


def _check_archive(path: Path, archive: zipfile.ZipFile, names: list[str], allow_pickle: bool) -> None:
    models = [n for n in names if "/models/" in f"/{n}" and n.endswith(".json")]
    if not models:
        if any(n.endswith("serialized_exported_program.json") for n in names):
            if allow_pickle:
                return
            raise UnsafeFileError(f"`{path}` is a program in torch's older archive format, whose weights are "
                                  f"unpickled (which can run code from the file); save it again with this torch's "
                                  f"`torch.export.save`, or {ALLOW}")
        raise InputError(f"`{path}` is not a torch.export program: the archive holds no `models/*.json` (an "
                         "AOTInductor package or another zip is not a program)")
    root = models[0][: models[0].index("models/")]
    if allow_pickle:
        return
    for name in names:
        if not name.startswith(root + "data/") or not name.endswith("_config.json"):
            if name.startswith(root + "data/weights/") and name.endswith(".pt"):
                raise UnsafeFileError(f"`{path}` stores its weights in a pickle (`{name}`); unpickling can run code "
                                      f"from the file; {ALLOW}")
            continue
        config = json.loads(archive.read(name)).get("config", {})
        for fqn, meta in config.items():
            stored = str(meta.get("path_name", ""))
            if meta.get("use_pickle") or stored.startswith(("custom_obj", "opaque_obj")):
                raise UnsafeFileError(f"`{path}` stores `{fqn}` as a pickled object (a tensor subclass or a script "
                                      f"object); unpickling it can run code from the file; {ALLOW}")
    for name in names:
        if name.startswith(root + "data/sample_inputs/"):
            data = archive.read(name)
            if not data:
                continue
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception as exc:
                raise UnsafeFileError(f"`{path}` stores example inputs that only an unrestricted unpickler reads "
                                      f"({first_line(exc, 100)}); {ALLOW}") from exc


#: what a program's graph may call besides torch operators: Python's arithmetic on sizes
_PLAIN = (operator, math)


def _check_calls(path: Path, program: ExportedProgram) -> None:
    """Refuse a graph that calls a function that is not a torch operator (it would run when the program runs)."""
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        for node in graph.nodes if graph is not None else ():
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            target = node.target
            if node.op == "call_function" and _is_operator(target):
                continue
            if node.op == "call_module" and isinstance(getattr(module, str(target), None), torch.fx.GraphModule):
                continue
            shown = getattr(target, "__qualname__", None) or str(target)
            raise UnsafeFileError(f"the program in `{path}` calls `{shown}`, which is not a torch operator; bntool "
                                  "runs only graphs of torch operators")


def _is_operator(target: object) -> bool:
    if isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator)):
        return True
    if any(getattr(m, getattr(target, "__name__", ""), None) is target for m in _PLAIN):
        return True
    name = getattr(target, "__name__", "")
    return name.startswith("sym_") and getattr(torch, name, None) is target


def write_program(program: ExportedProgram, out: str | os.PathLike, *, force: bool = False,
                  inputs: Iterable = (), check: Callable[[ExportedProgram], None] | None = None) -> Path:
    """Save ``program`` to ``out`` atomically; before the rename the file is loaded back (safely) and must hold
    the same graph and bit-identical tensors, and pass ``check`` (say, the same outputs on the same inputs)."""
    out = Path(out)
    if not is_program_file(out):
        raise InputError(f"the output `{out.name}` of a program must end in .pt2; choose a name ending in .pt2")
    with atomic_write(out, force=force, inputs=inputs) as staged:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.export.save(program, str(staged))
        loaded = read_program(staged)
        _same_program(program, loaded)
        if check is not None:
            check(loaded)
    return out


def _same_program(program: ExportedProgram, loaded: ExportedProgram) -> None:
    if str(loaded.graph_signature) != str(program.graph_signature):
        raise VerificationError("the written program's signature differs from the verified one; nothing was written")
    for name, table, other in (("state dict", program.state_dict, loaded.state_dict),
                               ("constants", program.constants, loaded.constants)):
        for key, tensor in table.items():
            if isinstance(tensor, torch.Tensor) and (key not in other or not same_bits(tensor, other[key])):
                raise VerificationError(f"the written program's `{key}` ({name}) differs from the verified one; "
                                        "nothing was written")
