"""Moving a proven ONNX file into place beside other .onnx files that may share its external data.

Nothing existing is replaced without ``force``; a weights file another .onnx
file of the folder refers to is never replaced nor removed. Which files an
.onnx file refers to is read with ``scanning.scan``: its structure, never
its weights, whatever its size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import outputs
from ..io.inputs import mentions
from .check import initializers_and_attributes
from .scanning import scan
from .stream import ScanError


def external_data_name(out: Path) -> str:
    """The one external-data file name bntool gives an ONNX file (both exporters use it)."""
    return f"{out.name}.data"


def commit(stage: Path, tmp: Path, out: Path, force: bool) -> list[str]:
    """Move the external-data file, then the .onnx file, from ``stage`` into ``out``'s folder; returns notes.

    Nothing existing is replaced without ``force``. With it, an external-data
    file that another .onnx file of the folder refers to is neither replaced
    nor removed; the replaced file's own external data (``NAME.onnx.data``,
    the only name bntool gives) is removed when nothing else refers to it.
    Any other file the replaced .onnx file named is left as it is.
    """
    extra = [p for p in sorted(stage.iterdir()) if p != tmp]
    ours = external_data_name(out)
    old_refs = _external_data_files(out) if force and out.exists() else set()
    for p in extra:
        dst = out.parent / p.name
        users = _other_users(dst, out) if force and os.path.lexists(dst) else []
        if users:
            raise InputError(f"`{dst}` (the weights of the .onnx file) is also used by {_list(users)}; replacing it "
                             "would break that file; choose another output path or pass `external_data=False`")
    outputs.commit_all([*((p, out.parent / p.name) for p in extra), (tmp, out)], force=force)
    notes = []
    written = {p.name for p in extra}
    stale = out.parent / ours
    if ours in old_refs and ours not in written and os.path.lexists(stale):
        users = _other_users(stale, out)
        if users:
            notes.append(f"kept `{stale}`, the replaced file's weights: {_list(users)} still use it")
        else:
            stale.unlink()
    others = sorted(old_refs - {ours} - written)
    if others:
        notes.append(f"the replaced file also named {_list(others)} as external data; bntool did not write "
                     "them for this output, so they were left as they are")
    return notes


def _other_users(data: Path, out: Path) -> list[str]:
    """The .onnx files beside ``out`` (``out`` itself excluded) that refer to ``data``'s name."""
    users = []
    for candidate in sorted(out.parent.glob("*.onnx")):
        if candidate.name != out.name and _refers_to(candidate, data.name):
            users.append(candidate.name)
    return users


def _refers_to(candidate: Path, name: str) -> bool:
    """Whether ``candidate`` names ``name`` as external data; a file that is not ONNX, if it mentions the name."""
    try:
        return name in _locations(scan(candidate).model)
    except (ScanError, OSError):
        return mentions(candidate, name)


def _list(names: Sequence[str]) -> str:
    return ", ".join(f"`{n}`" for n in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _external_data_files(path: Path) -> set[str]:
    """Names of the external-data files an existing .onnx file refers to (in its own folder only).

    Read with ``scanning.scan``: the file's structure, never its weights, whatever its size.
    """
    try:
        found = scan(path)
    except (ScanError, OSError):  # not an ONNX file we can read: nothing of ours to clean up
        return set()
    return {location for location in _locations(found.model) if Path(location).name == location}


def _locations(model: Any) -> set[str]:
    """The external-data locations the tensors of ``model`` (a ModelProto) name."""
    import onnx

    return {entry.value for tensor in initializers_and_attributes(model)
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data if entry.key == "location" and entry.value}
