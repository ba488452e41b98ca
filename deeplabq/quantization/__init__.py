"""8-bit quantization of DeepLab: QAT model (tfmot), range calibration, BN freezing, integer TFLite export.

Goal: a TFLite file that LiteRT's XNNPACK delegate runs as ONE integer partition -- every tensor between
the uint8 input and the output is int8, no QUANTIZE/DEQUANTIZE inside. What stands in the way in the float
model of ``deeplabq.model``, and what is done about it (in a weight-preserving clone,
:func:`prepare_for_int8`, used by QAT and PTQ alike):

* ``Rescaling('normalize')`` lowers to MUL + ADD. QAT can only fake-quantize the layer's output (the ADD),
  so the MUL's output has no range and the converter leaves a float island around it. It is split into
  two Rescaling layers (``x * s``, then ``+ o``), each with its own output range: int8 MUL + ADD.
* The image-pooling ``AveragePooling2D`` over the whole map lowers to AVERAGE_POOL_2D, which XNNPACK
  delegates in float only: in int8 it runs on the TFLite kernel and cuts the graph into two XNNPACK
  partitions. ``GlobalAveragePooling2D(keepdims=True)`` is the same average and lowers to MEAN, which
  XNNPACK runs in int8.
* An int8 CONCATENATION needs every input on the output's scale, or the converter inserts requantizing
  ops. The layers feeding a concat (directly, or through resizes and dropout, which keep their input's
  scale) therefore get no fake quantization of their own: the concat's output range covers them all.

Layers the default 8-bit registry does not know get explicit QuantizeConfigs, as the TF Model Garden QAT
project does (official/projects/qat/vision/quantization/configs.py): ``ResizeBilinear`` and ``Dropout``
get a no-op config (an interpolation cannot leave its input's range, and TFLite's int8 RESIZE_BILINEAR has
one scale for input and output). DepthwiseConv2D kernels get a truly per-channel quantizer (see
:class:`DepthwiseKernelQuantizer`). Conv2D/DepthwiseConv2D + BatchNormalization (+ ReLU/ReLU6) keep
tfmot's default transforms: no fake quant between conv, BN and ReLU, so the converter folds BN into the
conv and fuses the ReLU.

The package, by concern (a module imports only modules named before it): :mod:`.qat` (QuantizeConfigs,
quantizers, :func:`prepare_for_int8`, :func:`quantize_model`), :mod:`.inspection` (TFLite flatbuffers and
their XNNPACK delegation), :mod:`.calibration` (activation ranges, batch norm), :mod:`.conversion` (TFLite
files, the QuantizationDebugger) and :mod:`.deploy_graph` (rewrites of the integer file's graph). Every public
name is re-exported here; private helpers stay in their module.
"""

from deeplabq.quantization.calibration import (
    PIXEL_RANGE,
    calibrate_activation_ranges,
    freeze_batch_norm,
    reestimate_batch_norm,
)
from deeplabq.quantization.conversion import (
    float_tflite,
    int8_layer_errors,
    layer_of_tensor,
    ptq_int8_tflite,
    qat_to_tflite,
    tflite_converter,
)
from deeplabq.quantization.deploy_graph import optimize_int8
from deeplabq.quantization.inspection import (
    op_histogram,
    read_metadata,
    run_tflite,
    tensor_types,
    undelegated_ops,
    weight_scales,
    xnnpack_partitions,
)
from deeplabq.quantization.qat import (
    RANGE_EMA_DECAY,
    DepthwiseConvQuantizeConfig,
    DepthwiseKernelQuantizer,
    NoOpQuantizeConfig,
    OutputQuantizeConfig,
    RangeFollowingQuantizer,
    custom_objects,
    follow_activation_ranges,
    prepare_for_int8,
    quantize_model,
    quantize_scope,
    set_range_updates,
)

__all__ = [
    "optimize_int8",
    "read_metadata",
    "PIXEL_RANGE",
    "RANGE_EMA_DECAY",
    "DepthwiseConvQuantizeConfig",
    "DepthwiseKernelQuantizer",
    "NoOpQuantizeConfig",
    "OutputQuantizeConfig",
    "RangeFollowingQuantizer",
    "calibrate_activation_ranges",
    "custom_objects",
    "float_tflite",
    "follow_activation_ranges",
    "freeze_batch_norm",
    "int8_layer_errors",
    "layer_of_tensor",
    "op_histogram",
    "prepare_for_int8",
    "ptq_int8_tflite",
    "qat_to_tflite",
    "quantize_model",
    "quantize_scope",
    "reestimate_batch_norm",
    "run_tflite",
    "set_range_updates",
    "tensor_types",
    "tflite_converter",
    "undelegated_ops",
    "weight_scales",
    "xnnpack_partitions",
]
