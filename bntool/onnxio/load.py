"""An .onnx file read as a ``ModelProto``, its external data checked before any of it is read.

Every tensor stored as external data names a ``location``: it must be a
plain relative path inside the model's folder (no ``..``, no absolute path,
no link that leads outside it), name a regular file, and that file must hold
``offset + length`` bytes (the tensor's own size when ``length`` is absent).
Each check runs before a byte of external data is read (onnx's own
path-traversal issues). A file that is not ONNX, cut short, or with missing
external data is one ``InputError``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from ..errors import InputError, first_line
from ..io.inputs import require_regular_file

#: ONNX data type -> bytes per element (the types a weight may have; 4-bit and string types are sized apart)
ELEMENT_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 14: 8, 15: 16, 16: 2,
                 17: 1, 18: 1, 19: 1, 20: 1}


def read_onnx(path: str | os.PathLike, what: str = "the ONNX file") -> tuple[Any, bool]:
    """The model in ``path`` with its external data loaded, after every location and size was checked; and whether
    it had external data."""
    import onnx
    from onnx import external_data_helper

    path = Path(path)
    require_regular_file(path, what)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf's DecodeError and its relatives
        raise InputError(f"{what} `{path}` is not a readable ONNX model ({first_line(exc, 120)}); it may be cut "
                         "short or another kind of file; pass a complete .onnx file") from None
    if not model.HasField("graph") or model.ir_version <= 0 or not model.opset_import:
        raise InputError(f"{what} `{path}` is not an ONNX model (no graph, IR version or opset in it); pass an "
                         ".onnx file")
    external = [t for t in external_data_helper._get_all_tensors(model)
                if external_data_helper.uses_external_data(t)]
    for tensor in external:
        check_external(tensor, path)
    if external:
        try:
            external_data_helper.load_external_data_for_model(model, str(path.parent))
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"cannot read the external data of `{path}`: {first_line(exc, 160)}") from None
    return model, bool(external)


def onnx_model(model_or_path: Any, op: str) -> tuple[Any, bool]:
    """``model_or_path`` as a ``ModelProto`` (a path read by ``read_onnx``, a ``ModelProto`` as it is) and whether
    it had external data; anything else is an ``InputError`` naming ``op``."""
    import onnx

    if isinstance(model_or_path, (str, os.PathLike)):
        return read_onnx(model_or_path)
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, False
    raise InputError(f"{op} takes an onnx.ModelProto or a path, got a {type(model_or_path).__name__}")


def check_external(tensor: Any, model_path: Path) -> None:
    """Refuse an external-data entry that leaves the model's folder, is missing, or is shorter than it claims."""
    info = {e.key: e.value for e in tensor.external_data}
    location = info.get("location", "")
    folder = model_path.parent.resolve()
    where = f"tensor `{tensor.name}` of `{model_path}`"
    if not location or os.path.isabs(location) or ".." in Path(location).parts or location.startswith(("/", "\\")):
        raise InputError(f"{where} names external data `{location}` outside the model's folder; bntool reads "
                         "external data only from files beside the model; move the data there")
    target = folder / location
    resolved = target.resolve()
    if folder not in resolved.parents:
        raise InputError(f"{where} names external data `{location}`, which leads outside the model's folder "
                         f"(to `{resolved}`); bntool reads external data only from files beside the model")
    if not target.exists():
        raise InputError(f"{where} names external data `{location}`, which does not exist; copy it beside the "
                         "model")
    require_regular_file(target, "the external data file", allow_empty=True)
    try:
        offset = int(info.get("offset", 0) or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise InputError(f"{where} has an external-data offset or length that is not a number") from None
    size = ELEMENT_BYTES.get(tensor.data_type)
    need = math.prod(tensor.dims) * size if size is not None else None
    if length is not None and need is not None and length != need:
        raise InputError(f"{where} claims {length} bytes of external data, but its shape and type need {need}; "
                         "the model file is corrupt")
    length = length if length is not None else need
    have = target.stat().st_size
    if offset < 0 or (length is not None and offset + length > have):
        raise InputError(f"{where} needs bytes {offset}..{offset + (length or 0)} of `{location}`, which holds "
                         f"{have}; the external data file is cut short or belongs to another model")
