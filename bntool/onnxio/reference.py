"""Running an ONNX graph: in onnxruntime (its own dtype), and in float64 by ``onnx.reference`` (what ``wide``
falls back to for the nodes, or the graphs, its torch ops do not cover).

onnxruntime has no float64 kernel for Conv and many other ops, so the
float64 run is ``onnx.reference`` on a float64 copy of the graph
(``as_float64``: every floating initializer, constant, input, output and cast
target made float64), with Conv and ConvTranspose computed by torch in
float64 (the reference's own are pure Python loops; Conv through
``runtime.float64.convolution``, exact without torch's slow float64
kernels). ``with_outputs`` exposes intermediate values as extra graph
outputs, for a layer-by-layer comparison; the copy is for running only,
never written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper
from onnx.reference.op_run import OpRun
from onnx.reference.ops import op_conv, op_conv_transpose, op_loop, op_max_pool

from ..errors import InputError, first_line
from ..runtime.float64 import convolution
from .check import iter_nodes

FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16)


def with_outputs(model: Any, names: Sequence[str], types: Mapping[str, int]) -> bytes:
    """``model`` (a ModelProto, or its serialized bytes) serialized with the values ``names`` as extra graph
    outputs (element types from ``types``).

    Serialized protobuf messages merge when concatenated (repeated fields
    append), so the extra outputs are a small message appended to the
    model's bytes: the weights are neither copied nor serialized again.
    """
    payload = model if isinstance(model, bytes) else model.SerializeToString()
    extra = onnx.ModelProto()
    for name in dict.fromkeys(names):
        extra.graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    return payload + extra.SerializeToString()


def session(model: Any, threads: int = 0) -> Any:
    """An onnxruntime CPU session on ``model`` (graph optimizations off: the graph runs as written)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    payload = model.SerializeToString() if hasattr(model, "SerializeToString") else \
        model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])


def run_ort(model: Any, feeds: Mapping[str, np.ndarray], threads: int = 0) -> dict[str, np.ndarray]:
    sess = session(model, threads)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds))))


# ----------------------------------------------------------------------------- float64


def as_float64(model: Any) -> Any:
    """A copy of ``model`` computing in float64: floating initializers, constants, I/O types and casts."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph

    graphs = [graph]  # (and every If / Loop / Scan body: their weights, inputs and outputs too)
    graphs += [g for node in iter_nodes(copy) for a in node.attribute
               for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]
    for each in graphs:
        for tensor in each.initializer:
            _widen(tensor)
        for info in [*each.input, *each.output, *each.value_info]:
            if info.type.tensor_type.elem_type in FLOATS:
                info.type.tensor_type.elem_type = TensorProto.DOUBLE
    for node in iter_nodes(copy):
        widen_node(node)
    return copy


def widen_node(node: Any) -> None:
    """``node`` made to compute in float64, in place: its tensor attributes and its cast targets (its subgraphs'
    nodes are widened apart)."""
    for attribute in node.attribute:
        if attribute.HasField("t"):
            _widen(attribute.t)
        if node.op_type == "Cast" and attribute.name == "to" and attribute.i in FLOATS:
            attribute.i = TensorProto.DOUBLE


def _widen(tensor: Any) -> None:
    if tensor.data_type in FLOATS and tensor.data_location != TensorProto.EXTERNAL:
        wide = numpy_helper.to_array(tensor).astype(np.float64)
        for field in ("raw_data", "float_data", "int32_data", "double_data"):
            tensor.ClearField(field)
        tensor.data_type = TensorProto.DOUBLE
        tensor.raw_data = wide.tobytes()


def run_float64(model: Any, feeds: Mapping[str, np.ndarray], extra: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """``model`` run in float64 by ``onnx.reference`` (``as_float64``), every output (and the values ``extra``)
    by name."""
    from onnx.reference import ReferenceEvaluator

    wide = as_float64(model)
    if extra:
        have = {o.name for o in wide.graph.output}
        wide.graph.output.extend(onnx.helper.make_tensor_value_info(n, TensorProto.DOUBLE, None)
                                 for n in dict.fromkeys(extra) if n not in have)
    inputs = {k: (v.astype(np.float64) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16" else v)
              for k, v in feeds.items()}
    try:
        evaluator = ReferenceEvaluator(wide, new_ops=NEW_OPS)
        results = evaluator.run(None, inputs)
    except Exception as exc:  # noqa: BLE001 - an op the reference does not implement, or a graph it cannot run
        raise InputError(f"cannot run the graph in float64 to derive the tolerance ({first_line(exc, 160)}); "
                         "pass `atol` / `rtol` to compare with a fixed tolerance instead") from None
    return dict(zip([o.name for o in wide.graph.output], results))


def _pads(x: np.ndarray, w_spatial: Sequence[int], auto_pad: str, dilations, pads, strides) -> list[int] | None:
    """Explicit begin/end pads per spatial axis, or None for a padding mode left to onnx's own kernel."""
    n = len(w_spatial)
    if auto_pad in (None, "", "NOTSET"):
        return list(pads) if pads is not None else [0] * (2 * n)
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return None


class Conv(op_conv.Conv):
    """onnx's Conv in float64 through torch (same semantics; onnx's own kernel for SAME_* padding)."""

    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, pads=None,
             strides=None):
        n = W.ndim - 2
        explicit = _pads(X, W.shape[2:], auto_pad, dilations, pads, strides)
        if explicit is None or n not in (1, 2, 3):
            return op_conv.Conv._run(self, X, W, B, auto_pad, dilations, group, kernel_shape, pads, strides)
        x = torch.from_numpy(np.array(X, dtype=np.float64))
        pad = [p for i in reversed(range(n)) for p in (explicit[i], explicit[i + n])]
        x = torch.nn.functional.pad(x, pad)
        y = convolution(x, torch.from_numpy(np.array(W, dtype=np.float64)),  # exact float64, without the slow path
                        torch.from_numpy(np.asarray(B, dtype=np.float64)) if B is not None else None,
                        stride=list(strides or [1] * n), dilation=list(dilations or [1] * n), groups=int(group or 1))
        return (y.numpy().astype(X.dtype),)


class ConvTranspose(op_conv_transpose.ConvTranspose):
    """onnx's ConvTranspose in float64 through torch (onnx's own kernel for auto_pad / output_shape)."""

    op_domain = ""

    def _run(self, X, W, B=None, auto_pad=None, dilations=None, group=None, kernel_shape=None, output_padding=None,
             output_shape=None, pads=None, strides=None):
        n = W.ndim - 2
        if auto_pad not in (None, "", "NOTSET") or output_shape is not None or n not in (1, 2, 3):
            return op_conv_transpose.ConvTranspose._run(self, X, W, B, auto_pad, dilations, group, kernel_shape,
                                                        output_padding, output_shape, pads, strides)
        pads = list(pads) if pads is not None else [0] * (2 * n)
        if pads[:n] != pads[n:]:
            return op_conv_transpose.ConvTranspose._run(self, X, W, B, auto_pad, dilations, group, kernel_shape,
                                                        output_padding, output_shape, pads, strides)
        fn = (torch.nn.functional.conv_transpose1d, torch.nn.functional.conv_transpose2d,
              torch.nn.functional.conv_transpose3d)[n - 1]
        y = fn(torch.from_numpy(np.array(X, dtype=np.float64)),
               torch.from_numpy(np.array(W, dtype=np.float64)),
               torch.from_numpy(np.asarray(B, dtype=np.float64)) if B is not None else None,
               stride=list(strides or [1] * n), padding=pads[:n], output_padding=list(output_padding or [0] * n),
               groups=int(group or 1), dilation=list(dilations or [1] * n))
        return (y.numpy().astype(X.dtype),)


class BatchNormalization(OpRun):
    """BatchNormalization of every opset in float64 (onnx's reference mishandles versions before 9)."""

    op_domain = ""

    def _run(self, X, scale, B, mean, var, epsilon=None, momentum=None, spatial=None, training_mode=None,
             is_test=None, consumed_inputs=None):
        eps = 1e-5 if epsilon is None else epsilon
        shape = (1, -1) + (1,) * (X.ndim - 2)
        if training_mode or is_test == 0:
            axes = (0, *range(2, X.ndim))
            mean, var = X.mean(axis=axes), X.var(axis=axes)
        y = (X - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + B.reshape(shape)
        return (y.astype(X.dtype),)


class MaxPool(op_max_pool.MaxPool):
    """onnx's MaxPool through torch for the plain case (one output, explicit pads, no ceil mode)."""

    op_domain = ""

    def _run(self, X, auto_pad=None, ceil_mode=None, dilations=None, kernel_shape=None, pads=None,
             storage_order=None, strides=None):
        n = len(kernel_shape)
        pads = list(pads) if pads is not None else [0] * (2 * n)
        plain = (auto_pad in (None, "", "NOTSET") and not ceil_mode and n in (1, 2, 3) and len(self.output) == 1
                 and pads[:n] == pads[n:] and all(2 * p <= k for p, k in zip(pads[:n], kernel_shape)))
        if not plain:
            return op_max_pool.MaxPool._run(self, X, auto_pad=auto_pad, ceil_mode=ceil_mode, dilations=dilations,
                                  kernel_shape=kernel_shape, pads=pads, storage_order=storage_order, strides=strides)
        fn = (torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d, torch.nn.functional.max_pool3d)[n - 1]
        y = fn(torch.from_numpy(np.array(X, dtype=np.float64)), list(kernel_shape), stride=list(strides or [1] * n),
               padding=pads[:n], dilation=list(dilations or [1] * n))
        return (y.numpy().astype(X.dtype),)


class Loop(op_loop.Loop):
    """onnx's Loop, its scan outputs stacked on a new first axis as ONNX and onnxruntime do (the reference joins
    them on their own first axis), and empty when no trip ran (where the reference fails)."""

    op_domain = ""

    def _run(self, M, cond, *args, context=None, body=None, attributes=None, bindings=None):
        trips, scans, run_body = [], self.K, self._run_body

        def record(inputs, **kwargs):
            outputs = run_body(inputs, **kwargs)
            trips.append(outputs[len(outputs) - scans:])
            return outputs

        self._run_body, self.K = record, 0  # (the reference then gathers no scan output: placeholders)
        try:
            res = op_loop.Loop._run(self, M, cond, *args, context=context, body=body, attributes=attributes,
                                    bindings=bindings)
        finally:
            self._run_body, self.K = run_body, scans
        if not scans:
            return res
        stacked = [np.stack([t[k] for t in trips]) if trips else np.empty((0,)) for k in range(scans)]
        return (*res[:len(res) - scans], *stacked)


#: the float64 kernels ``onnx.reference`` runs in place of its own
NEW_OPS = [Conv, ConvTranspose, BatchNormalization, MaxPool, Loop]
