"""Rewrites of an integer TFLite file's graph that make it faster on LiteRT without retraining, chosen from the
per-op profile (``deeplabq.profiling``, README "Where int8 time goes"):

* :func:`fold_input_normalization` -- the uint8 pixels go straight into the first convolution. The converter
  leaves ``QUANTIZE (uint8 -> int8) -> MUL (x / 127.5) -> ADD (-1)`` ahead of it; the MUL and ADD are removed
  and their affine map is written into the input's quantization instead (scale 1/127.5, zero point 128, as
  research/deeplab's quantize.md exports with mean = std = 128). The QUANTIZE that stays is a pure zero-point
  shift (q = pixel - 128). The app still feeds raw 0..255 pixels; the file says so in its metadata
  (``deeplabq_input: raw_pixels``), since the input's quantization now describes the normalized image.
* :func:`float_tail` -- the end of the graph, ``RESIZE_BILINEAR`` of the logits to the full image and
  ``ARG_MAX``, runs on float logits: a ``DEQUANTIZE`` of the small logits map goes in front of the resize.
  Where the resize upsamples 8x or more (DeepLabv3), neither op gains from int8 on XNNPACK/TFLite (int8 resize
  is slower than float, and TFLite's int8 ARG_MAX was up to 2x its float time); a v3+ decoder's logits (4x)
  keep their int8 tail. The label map is the same up to the resize's int8 rounding, which it no longer has.

* :func:`input_quantize_in_xnnpack` -- the input's uint8 -> int8 QUANTIZE (which XNNPACK leaves to TFLite's
  single-threaded kernel) becomes DEQUANTIZE + QUANTIZE over the same scale, exactly the same values, in XNNPACK.

All work on ``schema.ModelT`` (LiteRT's flatbuffer object API) and refuse, by returning False, any graph that
is not the pattern they know; :func:`optimize_int8` applies the ones asked for and packs the file again.
"""

from __future__ import annotations

import json
import math

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

from deeplabq.quantization.inspection import METADATA_NAME, _enum_names

_OPS = _enum_names(schema.BuiltinOperator)
_ALIGNMENT = 16  # the converter's own alignment of weight buffers


class _Graph:
    """The main subgraph of a ModelT, with op names and tensor producers/consumers."""

    def __init__(self, model) -> None:
        self.model = model
        self.graph = model.subgraphs[0]
        codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
        self.op_names = [_OPS[codes[op.opcodeIndex]] for op in self.graph.operators]

    def producer(self, tensor: int):
        for op, name in zip(self.graph.operators, self.op_names, strict=True):
            if tensor in list(op.outputs):
                return op, name
        return None, None

    def consumers(self, tensor: int) -> list:
        return [(op, name) for op, name in zip(self.graph.operators, self.op_names, strict=True)
                if tensor in list(op.inputs)]

    def tensor(self, index: int):
        return self.graph.tensors[index]

    def constant(self, index: int) -> np.ndarray | None:
        """Real value of a constant tensor (dequantized), None if the tensor is not constant."""
        tensor = self.tensor(index)
        data = self.model.buffers[tensor.buffer].data if tensor.buffer > 0 else None
        if data is None or len(data) == 0:
            return None
        dtype = {schema.TensorType.INT8: np.int8, schema.TensorType.UINT8: np.uint8,
                 schema.TensorType.FLOAT32: np.float32, schema.TensorType.INT32: np.int32}[tensor.type]
        values = np.frombuffer(np.asarray(data, np.uint8).tobytes(), dtype).astype(np.float64)
        q = tensor.quantization
        if q is not None and q.scale is not None and len(q.scale):
            values = (values - np.asarray(q.zeroPoint, np.float64)) * np.asarray(q.scale, np.float64)
        return values

    def remove(self, *ops) -> None:
        keep = [(op, name) for op, name in zip(self.graph.operators, self.op_names, strict=True)
                if not any(op is gone for gone in ops)]
        self.graph.operators = [op for op, _ in keep]
        self.op_names = [name for _, name in keep]

    def input_quantize(self):
        """(graph input, the QUANTIZE that is its only consumer) for a uint8 input, else (input, None)."""
        (image,) = self.graph.inputs
        consumers = self.consumers(image)
        if self.tensor(image).type != schema.TensorType.UINT8 or len(consumers) != 1 \
                or consumers[0][1] != "QUANTIZE":
            return image, None
        return image, consumers[0][0]

    def dequantize_before(self, op, tensor: int) -> int:
        """A float32 copy of quantized ``tensor`` (a DEQUANTIZE inserted just before ``op``); its index."""
        real = schema.TensorT()
        real.shape = list(self.tensor(tensor).shape)
        real.type = schema.TensorType.FLOAT32
        real.name = self.tensor(tensor).name + b"/dequantized"
        self.model.buffers.append(schema.BufferT())
        real.buffer = len(self.model.buffers) - 1
        self.graph.tensors.append(real)
        dequantize = schema.OperatorT()
        dequantize.opcodeIndex = self.opcode(schema.BuiltinOperator.DEQUANTIZE, version=2)
        dequantize.inputs, dequantize.outputs = [tensor], [len(self.graph.tensors) - 1]
        position = next(i for i, other in enumerate(self.graph.operators) if other is op)
        self.graph.operators.insert(position, dequantize)
        self.op_names.insert(position, "DEQUANTIZE")
        return dequantize.outputs[0]

    def opcode(self, builtin: int, version: int = 1) -> int:
        for index, code in enumerate(self.model.operatorCodes):
            if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
                return index
        code = schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), version
        self.model.operatorCodes.append(code)
        return len(self.model.operatorCodes) - 1


def _quantization(scale: float, zero_point: int):
    q = schema.QuantizationParametersT()
    q.scale, q.zeroPoint = [float(scale)], [int(zero_point)]
    return q


def _scalar_params(tensor) -> tuple[float, int]:
    q = tensor.quantization
    return float(q.scale[0]), int(q.zeroPoint[0])


def fold_input_normalization(model) -> bool:
    """uint8 input -> QUANTIZE -> MUL(const m) -> ADD(const o) -> ...: drop the MUL and ADD (see module doc)."""
    g = _Graph(model)
    image, quantize = g.input_quantize()
    if quantize is None:
        return False
    shifted = quantize.outputs[0]
    after = g.consumers(shifted)
    if len(after) != 1 or after[0][1] != "MUL":
        return False
    mul, _ = after[0]
    scale = [g.constant(t) for t in mul.inputs if t != shifted]
    scaled = mul.outputs[0]
    after = g.consumers(scaled)
    if len(scale) != 1 or scale[0] is None or scale[0].size != 1 or len(after) != 1 or after[0][1] != "ADD":
        return False
    add, _ = after[0]
    offset = [g.constant(t) for t in add.inputs if t != scaled]
    if len(offset) != 1 or offset[0] is None or offset[0].size != 1:
        return False
    if any(op.builtinOptions is not None and getattr(op.builtinOptions, "fusedActivationFunction", 0)
           for op in (mul, add)):
        return False
    normalized = add.outputs[0]
    if normalized in list(g.graph.outputs) or g.tensor(shifted).type != schema.TensorType.INT8:
        return False
    m, o = float(scale[0][0]), float(offset[0][0])  # normalized = m * pixel + o = m * (pixel - zero point)
    if m <= 0:
        return False
    # x / 127.5 - 1 puts the zero point at 127.5: take 128 (quantize.md's mean), not 127 by a rounding error.
    zero_point = math.floor(-o / m + 0.5 + 1e-3)
    if not 0 <= zero_point <= 255:
        return False
    # QUANTIZE maps pixel p (real m * (p - zp)) to (p - zp) + (zp - 128) = p - 128: int8, real value normalized.
    g.tensor(image).quantization = _quantization(m, zero_point)
    g.tensor(shifted).quantization = _quantization(m, zero_point - 128)
    for op, _ in g.consumers(normalized):
        op.inputs = [shifted if t == normalized else t for t in op.inputs]
    g.remove(mul, add)
    _set_metadata(model, {"input": "raw_pixels"})
    return True


def input_quantize_in_xnnpack(model) -> bool:
    """uint8 input -> QUANTIZE (uint8 -> int8): the same map as DEQUANTIZE (uint8 -> float) then QUANTIZE (float ->
    int8), two ops XNNPACK runs on every thread, where its delegate leaves a uint8 -> int8 QUANTIZE to TFLite's own
    single-threaded kernel. Exact: both quantizations share one scale, so q - 128 comes back for every pixel."""
    g = _Graph(model)
    image, quantize = g.input_quantize()
    if quantize is None:
        return False
    if g.tensor(quantize.outputs[0]).type != schema.TensorType.INT8:
        return False
    quantize.inputs = [g.dequantize_before(quantize, image)]
    return True


# The float tail pays where the logits map is small and the resize large (upsampling 8x and more: DeepLabv3 at
# output stride 8 and 16); a v3+ decoder's logits, 4x below the image, resize and ArgMax faster in int8 (measured:
# README "Where int8 time goes").
MIN_FLOAT_TAIL_UPSAMPLING = 8


def float_tail(model, min_upsampling: float = MIN_FLOAT_TAIL_UPSAMPLING) -> bool:
    """int8 logits -> RESIZE_BILINEAR -> ARG_MAX (graph output): resize and ArgMax in float (see module doc), when
    the resize upsamples by ``min_upsampling`` or more."""
    g = _Graph(model)
    (labels,) = g.graph.outputs
    argmax, name = g.producer(labels)
    if name != "ARG_MAX":
        return False
    resized = argmax.inputs[0]
    resize, name = g.producer(resized)
    if name != "RESIZE_BILINEAR" or len(g.consumers(resized)) != 1:
        return False
    logits = resize.inputs[0]
    if g.tensor(logits).type != schema.TensorType.INT8 or g.tensor(resized).type != schema.TensorType.INT8:
        return False
    if g.tensor(resized).shape[1] < min_upsampling * g.tensor(logits).shape[1]:
        return False
    resize.inputs = [g.dequantize_before(resize, logits)] + list(resize.inputs[1:])
    g.tensor(resized).type = schema.TensorType.FLOAT32
    g.tensor(resized).quantization = None
    return True


def _set_metadata(model, values: dict) -> None:
    """Merge ``values`` into the file's ``deeplabq`` metadata entry (JSON)."""
    metadata = list(model.metadata or [])
    current = {}
    for entry in metadata:
        if entry.name.decode() == METADATA_NAME:
            current = json.loads(np.asarray(model.buffers[entry.buffer].data, np.uint8).tobytes())
            metadata.remove(entry)
            break
    current.update(values)
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(json.dumps(current, sort_keys=True).encode(), np.uint8).copy()
    model.buffers.append(buffer)
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_NAME.encode(), len(model.buffers) - 1
    model.metadata = [*metadata, entry]


class _AlignedBuffer(schema.BufferT):
    """A buffer whose data starts on a 16-byte boundary, as the converter writes them (the object API's own
    Pack aligns bytes to 1)."""

    def Pack(self, builder):  # noqa: N802 (the flatbuffers API's name)
        payload = np.asarray(self.data, np.uint8).tobytes()
        builder.StartVector(1, len(payload), _ALIGNMENT)
        builder.head = builder.head - len(payload)
        builder.Bytes[builder.head:builder.head + len(payload)] = payload
        builder.vectorNumElems = len(payload)
        data = builder.EndVector()
        schema.BufferStart(builder)
        schema.BufferAddData(builder, data)
        return schema.BufferEnd(builder)


def pack(model) -> bytes:
    """The flatbuffer of ``model`` (a ``schema.ModelT``) with every weight buffer 16-byte aligned."""
    for index, buffer in enumerate(model.buffers):
        if buffer.data is not None and len(buffer.data) > 0 and not isinstance(buffer, _AlignedBuffer):
            aligned = _AlignedBuffer()
            aligned.data = buffer.data
            model.buffers[index] = aligned
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def optimize_int8(tflite: bytes, *, fold_input: bool = True, tail_in_float: bool = True,
                  tail_min_upsampling: float = MIN_FLOAT_TAIL_UPSAMPLING) -> tuple[bytes, list[str]]:
    """``tflite`` with the rewrites asked for applied where the graph has their pattern, and their names."""
    if not (fold_input or tail_in_float):
        return tflite, []
    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite), 0)
    applied = []
    if fold_input and fold_input_normalization(model):
        applied.append("fold_input_normalization")
    if fold_input and input_quantize_in_xnnpack(model):
        applied.append("input_quantize_in_xnnpack")
    if tail_in_float and float_tail(model, tail_min_upsampling):
        applied.append("float_tail")
    return (pack(model), applied) if applied else (tflite, [])
