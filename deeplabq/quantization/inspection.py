"""Flatbuffer inspection of TFLite files: the op histogram, output tensor types and weight scales read through
LiteRT's flatbuffer schema, deeplabq's own metadata (:func:`read_metadata`), what LiteRT's default XNNPACK
delegate makes of a file (:func:`xnnpack_partitions`, :func:`undelegated_ops`), and :func:`run_tflite`, which
runs a single-image file on LiteRT.
"""

from __future__ import annotations

import json

import numpy as np
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter as LiteRTInterpreter

METADATA_NAME = "deeplabq"  # a JSON metadata entry deeplabq writes into files it rewrites (deploy_graph)


def _enum_names(enum_class) -> dict[int, str]:
    return {value: name for name, value in vars(enum_class).items() if not name.startswith("_")}


def _graph(tflite_bytes: bytes):
    """(model object, main subgraph, builtin op name of each operator)."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(tflite_bytes), 0)
    op_names = _enum_names(schema.BuiltinOperator)
    codes = [max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes]
    graph = model.subgraphs[0]
    return model, graph, [op_names[codes[op.opcodeIndex]] for op in graph.operators]


def op_histogram(tflite_bytes: bytes) -> dict[str, int]:
    """``{builtin op name: count}`` of the main subgraph, e.g. ``{"CONV_2D": 38, ...}``."""
    counts: dict[str, int] = {}
    for name in _graph(tflite_bytes)[2]:
        counts[name] = counts.get(name, 0) + 1
    return counts


def tensor_types(tflite_bytes: bytes) -> list[tuple[str, str, str]]:
    """``(op name, output tensor name, dtype name)`` for every tensor an operator produces, in graph order."""
    type_names = _enum_names(schema.TensorType)
    _, graph, op_names = _graph(tflite_bytes)
    return [
        (op_name, graph.tensors[index].name.decode(), type_names[graph.tensors[index].type])
        for op, op_name in zip(graph.operators, op_names, strict=True)
        for index in op.outputs
    ]


def weight_scales(tflite_bytes: bytes) -> dict[str, int]:
    """``{weight tensor name: number of quantization scales}`` for every CONV_2D/DEPTHWISE_CONV_2D kernel."""
    _, graph, op_names = _graph(tflite_bytes)
    counts = {}
    for op, op_name in zip(graph.operators, op_names, strict=True):
        if op_name in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            kernel = graph.tensors[op.inputs[1]]
            scales = kernel.quantization.scale if kernel.quantization is not None else None
            counts[kernel.name.decode()] = 0 if scales is None else len(scales)
    return counts


def read_metadata(tflite_bytes: bytes) -> dict:
    """The ``deeplabq`` metadata of a TFLite file ({} if it has none), e.g. ``{"input": "raw_pixels"}``: the
    uint8 input takes raw 0..255 pixels whatever its quantization says. Reads only the flatbuffer's index."""
    model = schema.Model.GetRootAs(tflite_bytes, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode() == METADATA_NAME:
            return json.loads(model.Buffers(entry.Buffer()).DataAsNumpy().tobytes())
    return {}


def _interpreter(tflite_bytes: bytes, num_threads: int):
    interpreter = LiteRTInterpreter(model_content=tflite_bytes, num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


def _delegation(interpreter) -> tuple[int, list[str]]:
    """(number of XNNPACK partitions, names of the ops that stay on TFLite's own kernels).

    After ``allocate_tensors`` the interpreter lists the model's nodes, then one DELEGATE node per
    XNNPACK partition. A partition's original nodes are found by walking back from its DELEGATE node's
    output tensors to its input tensors; original nodes reached by no walk run outside XNNPACK."""
    native = interpreter._interpreter
    names = [native.NodeName(i) for i in range(native.NumNodes())]
    producer = {}
    for node, name in enumerate(names):
        if name != "DELEGATE":
            producer.update({int(tensor): node for tensor in native.NodeOutputs(node)})
    delegated = set()
    for node, name in enumerate(names):
        if name != "DELEGATE":
            continue
        boundary = {int(tensor) for tensor in native.NodeInputs(node)}
        pending = [int(tensor) for tensor in native.NodeOutputs(node)]
        while pending:
            tensor = pending.pop()
            if tensor in boundary or tensor not in producer or producer[tensor] in delegated:
                continue
            delegated.add(producer[tensor])
            pending.extend(int(t) for t in native.NodeInputs(producer[tensor]))
    undelegated = [name for node, name in enumerate(names) if name != "DELEGATE" and node not in delegated]
    return names.count("DELEGATE"), undelegated


def xnnpack_partitions(tflite_bytes: bytes, num_threads: int = 1) -> int:
    """Number of XNNPACK partitions (DELEGATE nodes) LiteRT's default delegate cuts the model into."""
    return _delegation(_interpreter(tflite_bytes, num_threads))[0]


def undelegated_ops(tflite_bytes: bytes, num_threads: int = 1) -> list[str]:
    """Ops (in graph order) that XNNPACK did not take: they run on TFLite's builtin kernels."""
    return _delegation(_interpreter(tflite_bytes, num_threads))[1]


def run_tflite(tflite_bytes: bytes, images, num_threads: int = 1) -> np.ndarray:
    """Outputs of a single-image TFLite model for each of ``images`` (N,H,W,3 in 0..255), stacked.

    Quantized outputs are returned as stored (int8 logits: see ``get_output_details()['quantization']``)."""
    interpreter = _interpreter(tflite_bytes, num_threads)
    (inp,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
    results = []
    for image in np.asarray(images, np.float32):
        if inp["dtype"] == np.uint8:
            image = np.clip(np.round(image), 0, 255)
        interpreter.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0])
    return np.stack(results)
