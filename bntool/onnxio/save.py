"""A folded ``ModelProto`` written through the one output writer, proven as a file before it is moved into place.

The file is written into a staging folder beside the output (weights as
external data, ``NAME.onnx.data``, when the input kept them so or the model
is over protobuf's 2 GB), checked there with ``onnx.checker`` (full check),
loaded and run by the caller's ``prove`` (onnxruntime against the verified
result), and only then committed (``commit.commit``: no replace without
``force``, never over an input).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import onnx

from ..errors import VerificationError, first_line
from ..io.outputs import staging_folder
from .commit import commit, external_data_name

#: protobuf's limit on one serialized message
PROTOBUF_LIMIT = 2 ** 31 - 1


def save_onnx(model: Any, out: str | os.PathLike, *, force: bool, external: bool,
              prove: Callable[[Path], None], inputs: Iterable = ()) -> tuple[Path, list[str]]:
    """Write ``model`` to ``out`` (checked and proven first); returns the path and notes from the commit."""
    out = Path(out)
    payload = None if external else _serialized(model)  # (serialized once: ByteSize would serialize it too)
    external = external or payload is None or len(payload) > PROTOBUF_LIMIT - (64 << 20)
    payload = None if external else payload
    with staging_folder(out) as stage:
        tmp = stage / out.name
        if external:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)  # (saving as external data rewrites the tensors of the model it is given)
            onnx.save_model(copy, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=external_data_name(out), size_threshold=0)
            del copy
        else:
            with open(tmp, "wb") as handle:  # (what onnx.save_model writes for a model with no external data)
                handle.write(payload)
            del payload
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise VerificationError(f"the written file fails onnx.checker: {first_line(exc, 200)}; nothing was "
                                    "written") from exc
        prove(tmp)
        notes = commit(stage, tmp, out, force)
    return out, notes


def _serialized(model: Any) -> bytes | None:
    """``model``'s bytes, or None when it must be written with external data: over protobuf's 2 GB, or with
    tensors still marked external (``onnx.save_model`` writes those out)."""
    from onnx import external_data_helper

    if any(external_data_helper.uses_external_data(t) for t in external_data_helper._get_all_tensors(model)):
        return None
    try:
        return model.SerializeToString()
    except ValueError:  # (over 2 GB)
        return None
