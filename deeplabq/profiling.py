"""Per-op latency of a TFLite file on LiteRT, as the file will run in an app (XNNPACK, N threads).

LiteRT's op profiler is not reachable from Python, so each op is timed on its own: for every operator of the
main subgraph, a one-op model is cut out of the flatbuffer (the op, its tensors, its weights), loaded with
LiteRT's default XNNPACK delegate and invoked on the values its inputs hold when the whole file runs on one
image. All one-op models are invoked
round-robin in one process, so background load hits them alike, and the cost of an empty invoke (measured on a
one-op model of 1 element) is subtracted. The whole file is timed in the same rounds, so the table says how
much of the file's latency its ops account for (``sum / whole``; XNNPACK runs a file as one fused plan, so the
sum is an estimate, close when the big ops dominate).

Each row names the Keras layer the op came from (from the converter's tensor names), its median time, its
share of the sum, its multiply-accumulates and whether XNNPACK took it (``delegated``: ops it leaves, such as
ARG_MAX, run on TFLite's own kernels; so do ops XNNPACK takes but cannot run alone). An op whose inputs are all
constants (the weight DEQUANTIZE of a float16 file) runs once when the file loads and counts 0 ms.
"""

from __future__ import annotations

import copy
import csv
import warnings
from dataclasses import asdict, dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from deeplabq.console import native_output
from deeplabq.evaluation import input_tensor, interleaved_invoke_ms
from deeplabq.quantization.inspection import _delegation, _enum_names, read_metadata

_OP_NAMES = _enum_names(schema.BuiltinOperator)
_NUMPY_TYPES = {
    schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16, schema.TensorType.INT32: np.int32,
    schema.TensorType.UINT8: np.uint8, schema.TensorType.INT8: np.int8, schema.TensorType.INT16: np.int16,
    schema.TensorType.INT64: np.int64, schema.TensorType.BOOL: np.bool_,
}


@dataclass(frozen=True)
class OpTime:
    index: int         # position in the main subgraph
    op: str            # builtin op name, e.g. CONV_2D
    layer: str         # Keras layer the op came from, e.g. block_1_expand
    ms: float          # median time of the op alone, empty-invoke cost subtracted
    share: float       # ms / sum of every op's ms
    macs: int          # multiply-accumulates (convolutions and fully-connected layers; 0 for the others)
    delegated: bool    # XNNPACK took the op (False: TFLite's builtin kernel runs it)
    output_type: str   # type of its output tensor (INT8, FLOAT32, ...)


@dataclass(frozen=True)
class OpProfile:
    ops: list[OpTime]
    whole_ms: float    # median invoke time of the whole file, in the same rounds
    invoke_ms: float   # cost of an empty invoke (subtracted from every op)
    threads: int

    @property
    def sum_ms(self) -> float:
        return sum(op.ms for op in self.ops)

    def by(self, key: str) -> dict[str, float]:
        """Milliseconds summed by ``key`` ("op" or "layer"), largest first."""
        totals: dict[str, float] = {}
        for op in self.ops:
            totals[getattr(op, key)] = totals.get(getattr(op, key), 0.0) + op.ms
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def write_csv(self, path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(self.ops[0])))
            writer.writeheader()
            writer.writerows(asdict(op) for op in self.ops)


def layer_name(tensor_name: str, op: str) -> str:
    """``deeplab/quant_block_1_expand_relu/Relu6;deeplab/...`` -> ``block_1_expand_relu``; ``Identity`` -> op."""
    parts = tensor_name.split(";")[0].split("/")
    if len(parts) < 2:
        return op.lower()
    name = parts[1]
    return name[len("quant_"):] if name.startswith("quant_") else name


def _macs(op: str, graph, operator) -> int:
    out = graph.tensors[operator.outputs[0]].shape
    if op == "CONV_2D":  # kernel (Cout, kh, kw, Cin)
        _, kh, kw, cin = graph.tensors[operator.inputs[1]].shape
        return int(np.prod(out)) * int(kh * kw * cin)
    if op == "DEPTHWISE_CONV_2D":  # kernel (1, kh, kw, C)
        _, kh, kw, _ = graph.tensors[operator.inputs[1]].shape
        return int(np.prod(out)) * int(kh * kw)
    if op == "FULLY_CONNECTED":
        return int(np.prod(out)) * int(graph.tensors[operator.inputs[1]].shape[-1])
    return 0


def _has_data(model, tensor) -> bool:
    data = model.buffers[tensor.buffer].data if tensor.buffer > 0 else None
    return data is not None and len(data) > 0


def one_op_model(model, index: int, constants: dict[int, np.ndarray] | None = None) -> bytes:
    """A flatbuffer with only operator ``index`` of ``model`` (a ``schema.ModelT``): its tensors, renumbered,
    and the buffers of its constant inputs; every other input becomes a model input. ``constants`` gives the
    values of inputs that are computed from constants alone (a float16 file's dequantized weights), which
    become constant buffers too, as XNNPACK makes them when it loads the whole file."""
    constants = constants or {}
    graph = model.subgraphs[0]
    operator = graph.operators[index]
    used = [t for t in list(operator.inputs) + list(operator.outputs) if t >= 0]
    used += [t for t in (operator.intermediates if operator.intermediates is not None else []) if t >= 0]
    used = list(dict.fromkeys(used))
    renumber = {old: new for new, old in enumerate(used)}
    buffers = [schema.BufferT()]
    tensors = []
    for old in used:
        tensor = copy.copy(graph.tensors[old])
        if _has_data(model, tensor):
            buffers.append(model.buffers[tensor.buffer])
            tensor.buffer = len(buffers) - 1
        elif old in constants and old in operator.inputs:
            buffer = schema.BufferT()
            buffer.data = np.frombuffer(np.ascontiguousarray(constants[old]).tobytes(), np.uint8).copy()
            buffers.append(buffer)
            tensor.buffer = len(buffers) - 1
        else:
            buffers.append(schema.BufferT())
            tensor.buffer = len(buffers) - 1
        tensors.append(tensor)
    op = copy.copy(operator)
    op.inputs = [renumber[t] if t >= 0 else -1 for t in operator.inputs]
    op.outputs = [renumber[t] for t in operator.outputs]
    if operator.intermediates is not None:
        op.intermediates = [renumber[t] for t in operator.intermediates if t >= 0]
    sub = schema.SubGraphT()
    sub.tensors, sub.operators = tensors, [op]
    sub.inputs = [renumber[t] for t in operator.inputs
                  if t >= 0 and not _has_data(model, graph.tensors[t]) and t not in constants]
    sub.outputs = list(op.outputs)
    sub.name = b"main"
    one = schema.ModelT()
    one.version, one.operatorCodes, one.subgraphs, one.buffers = model.version, model.operatorCodes, [sub], buffers
    one.description = b"deeplabq op profile"
    builder = flatbuffers.Builder(1024)
    builder.Finish(one.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tiny_model() -> bytes:
    """One ADD of two 1-element float tensors: its invoke time is the cost of calling invoke()."""
    tensors = []
    for name in (b"a", b"b", b"out"):
        tensor = schema.TensorT()
        tensor.shape, tensor.type, tensor.name, tensor.buffer = [1], schema.TensorType.FLOAT32, name, 0
        tensors.append(tensor)
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = schema.BuiltinOperator.ADD
    op = schema.OperatorT()
    op.opcodeIndex, op.inputs, op.outputs = 0, [0, 1], [2]
    sub = schema.SubGraphT()
    sub.tensors, sub.operators, sub.inputs, sub.outputs = tensors, [op], [0, 1], [2]
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [code], [sub], [schema.BufferT()]
    builder = flatbuffers.Builder(256)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _loaded(tflite: bytes, threads: int, inputs: list[np.ndarray] | None = None, rng=None, *,
            xnnpack: bool = True):
    """An allocated interpreter with its inputs set: ``inputs`` in order, else random values of each type;
    ``xnnpack=False``: on TFLite's own kernels only."""
    resolver = {} if xnnpack else {"experimental_op_resolver_type": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    with native_output():
        interpreter = Interpreter(model_content=tflite, num_threads=threads, **resolver)
        interpreter.allocate_tensors()
    for position, detail in enumerate(interpreter.get_input_details()):
        dtype = detail["dtype"]
        if inputs is not None:
            values = inputs[position]
        elif np.issubdtype(dtype, np.integer):
            info = np.iinfo(dtype)
            values = rng.integers(max(info.min, -128), min(info.max, 255) + 1, detail["shape"])
        else:
            values = rng.uniform(0, 255, detail["shape"])
        interpreter.set_tensor(detail["index"], np.asarray(values).astype(dtype))
    return interpreter


def _activations(tflite: bytes, image: np.ndarray | None, rng) -> dict[int, np.ndarray]:
    """Every tensor of one real invoke of the whole file (on ``image``, else a random image): the one-op models
    run on the values they see in the file, since some kernels (ARG_MAX) take data-dependent branches."""
    with native_output(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*experimental_preserve_all_tensors")  # "for debugging only"
        interpreter = Interpreter(model_content=tflite, experimental_preserve_all_tensors=True)
        interpreter.allocate_tensors()
    (detail,) = interpreter.get_input_details()
    if image is None:
        image = rng.integers(0, 256, detail["shape"])
    raw_pixels = read_metadata(tflite).get("input") == "raw_pixels"  # a folded input takes pixels as they are
    batch = np.asarray(image, np.float32).reshape(detail["shape"])
    interpreter.set_tensor(detail["index"], input_tensor(batch, detail, raw_pixels=raw_pixels))
    interpreter.invoke()
    values = {}
    for tensor in interpreter.get_tensor_details():
        try:
            values[tensor["index"]] = interpreter.get_tensor(tensor["index"])
        except ValueError:  # tensors without data (e.g. scratch) cannot be read
            pass
    return values


def profile_ops(tflite: bytes, *, threads: int = 2, runs: int = 30, warmup: int = 3, seed: int = 0,
                image: np.ndarray | None = None) -> OpProfile:
    """Per-op latency of ``tflite`` (see the module docstring): ``runs`` rounds over every op and the whole file.
    Each op runs on the inputs it sees when the whole file runs on ``image`` (0..255, the file's input size;
    default: random pixels)."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite), 0)
    graph = model.subgraphs[0]
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    type_names = _enum_names(schema.TensorType)
    rng = np.random.default_rng(seed)
    activations = _activations(tflite, image, rng)
    rows, interpreters, constants = [], {}, {}
    for index, operator in enumerate(graph.operators):
        op = _OP_NAMES[codes[operator.opcodeIndex]]
        output = graph.tensors[operator.outputs[0]]
        variable = [t for t in operator.inputs if t >= 0 and not _has_data(model, graph.tensors[t])
                    and t not in constants]
        if not variable:  # constants only (a float16 file's weight DEQUANTIZE): computed once, when the file loads
            rows.append((index, op, layer_name(output.name.decode(), op), 0, False, type_names[output.type]))
            constants.update({t: activations[t] for t in operator.outputs if t in activations})
            continue
        one_op, inputs = one_op_model(model, index, constants), [activations[t] for t in variable]
        interpreter = _loaded(one_op, threads, inputs)
        delegated = _delegation(interpreter)[0] > 0
        try:
            with native_output():
                interpreter.invoke()
        except RuntimeError:  # XNNPACK takes the op but cannot run it alone (seen: dynamic-range convolutions)
            interpreter, delegated = _loaded(one_op, threads, inputs, xnnpack=False), False
        interpreters[index] = interpreter
        rows.append((index, op, layer_name(output.name.decode(), op), _macs(op, graph, operator), delegated,
                     type_names[output.type]))
    interpreters["whole"] = _loaded(tflite, threads, rng=rng)
    interpreters["invoke"] = _loaded(_tiny_model(), threads, rng=rng)
    median = interleaved_invoke_ms(interpreters, warmup=warmup, runs=runs)
    invoke_ms = median["invoke"]
    op_ms = {index: max(median[index] - invoke_ms, 0.0) if index in median else 0.0 for index, *_ in rows}
    total = sum(op_ms.values()) or 1.0
    ops = [OpTime(index, op, layer, op_ms[index], op_ms[index] / total, macs, delegated, out_type)
           for index, op, layer, macs, delegated, out_type in rows]
    return OpProfile(ops=ops, whole_ms=median["whole"], invoke_ms=invoke_ms, threads=threads)


def format_profile(profile: OpProfile, *, top: int = 15) -> str:
    """The op-type summary and the ``top`` slowest ops as a plain-text table."""
    lines = [f"whole file {profile.whole_ms:.3f} ms, sum of ops {profile.sum_ms:.3f} ms "
             f"({profile.sum_ms / profile.whole_ms:.2f} of whole), {profile.threads} threads, "
             f"empty invoke {profile.invoke_ms * 1000:.1f} us subtracted",
             "by op type: " + ", ".join(f"{op} {ms:.3f}" for op, ms in profile.by("op").items()),
             f"{'op':>4} {'type':18s} {'layer':32s} {'ms':>7} {'share':>6} {'GMAC/s':>7} xnnpack"]
    for op in sorted(profile.ops, key=lambda o: -o.ms)[:top]:
        rate = f"{op.macs / op.ms / 1e6:7.0f}" if op.macs and op.ms > 0 else f"{'':7}"
        lines.append(f"{op.index:4d} {op.op:18s} {op.layer[:32]:32s} {op.ms:7.3f} {op.share:6.1%} {rate} "
                     f"{'yes' if op.delegated else 'NO'}")
    return "\n".join(lines)
