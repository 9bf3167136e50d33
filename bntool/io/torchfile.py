"""``torch.load`` without running code from the file, and what to say when a file cannot be read that way.

``torch_load`` reads to the CPU, memory-mapping a zip-format file's tensors;
``unsafe_globals`` names the Python objects a pickle would import that a
weights-only load refuses (read with pickletools, nothing executed);
``torch_reason`` says why torch.load failed without its advice about its own
arguments. Checkpoints (``checkpoint``) and data files (``data``) both read
through here.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..errors import first_line, shorten


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
        return f"it is not a PyTorch file ({first_line(exc, 120)})"
    return first_line(exc, 200)


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
