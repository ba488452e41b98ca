"""deeplabq.quantization: QAT model, range calibration, BN freezing, integer TFLite files and their inspection.

Real tiny models (65x65, depth multiplier 0.5, DeepLabv3 and v3+), no mocks. A randomly initialised
DeepLab is chaotic -- +-0.5 pixel-value noise alone flips ~20% of its argmax -- so no int8 model can
agree with it. Agreement tests therefore use a "tame" model (see ``tame_deeplab``): random weights, BN
statistics measured on the images, BN before each ReLU shifted so the ReLUs mostly pass, and logits along
the main directions of the head features, so classes are decided by signal rather than by noise.
"""

import deeplabq  # noqa: F401, I001  (before TensorFlow)

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

from ai_edge_litert import schema_py_generated as schema

from deeplabq import quantization as Q
from deeplabq.quantization import deploy_graph, inspection, qat
from deeplabq.model import DeepLabSpec, build_deeplab

V3 = DeepLabSpec(num_classes=5, crop_size=(65, 65), depth_multiplier=0.5, output_stride=16)
V3_PLUS = DeepLabSpec(
    num_classes=5, crop_size=(65, 65), depth_multiplier=0.5, output_stride=16, decoder_output_stride=4
)
# Ops that never belong in an integer graph traced with native dilated convolutions.
FORBIDDEN_OPS = {"SPACE_TO_BATCH_ND", "BATCH_TO_SPACE_ND", "DEQUANTIZE", "AVERAGE_POOL_2D"}


def images(count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(rng.uniform(0, 255, (count, 65, 65, 3))).astype(np.float32)


def tame_deeplab(spec: DeepLabSpec, calibration: np.ndarray) -> keras.Model:
    """Random-weight DeepLab whose predictions are stable under quantization noise (see module doc)."""
    keras.utils.set_random_seed(0)
    model = build_deeplab(spec)
    Q.reestimate_batch_norm(model, calibration)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization) and isinstance(
            layer._outbound_nodes[0].outbound_layer, keras.layers.ReLU
        ):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([np.ones_like(gamma), np.full_like(beta, 1.5), mean, variance])
    Q.reestimate_batch_norm(model, calibration)
    logits = model.get_layer("logits_semantic")
    features = keras.Model(model.input, logits.input)(calibration, training=False).numpy()
    features = features.reshape(-1, features.shape[-1])
    center = features.mean(axis=0)
    _, singular, directions = np.linalg.svd(features - center, full_matrices=False)
    kernel = directions[: spec.num_classes].T / singular[: spec.num_classes] * np.sqrt(len(features))
    logits.set_weights([kernel[None, None].astype(np.float32), (-center @ kernel).astype(np.float32)])
    return model


def _quantized(spec: DeepLabSpec):
    """(float model, calibrated QAT model, its calibrated ranges, its uint8 -> labels TFLite file)."""
    float_model = tame_deeplab(spec, images(8, seed=1))
    qat_model = Q.quantize_model(float_model)
    ranges = Q.calibrate_activation_ranges(qat_model, [images(4, seed=2), images(4, seed=3)])
    return float_model, qat_model, ranges, Q.qat_to_tflite(qat_model)


@pytest.fixture(scope="module")
def quantized_v3():
    return _quantized(V3)


@pytest.fixture(scope="module")
def quantized_v3plus():
    return _quantized(V3_PLUS)


@pytest.fixture(params=["v3", "v3plus"])
def quantized(request):
    return request.getfixturevalue(f"quantized_{request.param}")


def test_prepare_for_int8_keeps_the_float_outputs():
    model = build_deeplab(V3)
    prepared = Q.prepare_for_int8(model)
    scale, offset = prepared.get_layer("normalize_scale"), prepared.get_layer("normalize")
    assert (scale.scale, scale.offset, offset.scale, offset.offset) == (1 / 127.5, 0.0, 1.0, -1.0)
    assert isinstance(prepared.get_layer("image_pooling_avg"), keras.layers.GlobalAveragePooling2D)
    x = images(2, seed=0)
    np.testing.assert_allclose(prepared(x, training=False), model(x, training=False), rtol=1e-5, atol=1e-5)
    assert len(prepared.layers) == len(model.layers) + 1
    assert len(Q.prepare_for_int8(prepared).layers) == len(prepared.layers)  # idempotent


def test_qat_model_folds_batch_norm_and_quantizes_depthwise_per_channel(quantized):
    _, qat_model, _, _ = quantized
    for wrapper in qat_model.layers:
        layer = getattr(wrapper, "layer", None)
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            consumer = wrapper._outbound_nodes[0].outbound_layer
            if isinstance(consumer.layer, keras.layers.BatchNormalization):
                # tfmot's Conv+BN(+ReLU) transform: no fake quant between conv, BN (and ReLU).
                activation = getattr(layer.activation, "activation", layer.activation)  # QuantizeAwareActivation
                assert type(activation).__name__ == "NoOpActivation", layer.name
                assert not consumer.quantize_config.get_weights_and_quantizers(consumer.layer)
        if type(layer) is keras.layers.DepthwiseConv2D:
            kernel_min = next(v for v in wrapper.non_trainable_weights if v.name.endswith("depthwise_kernel_min:0"))
            assert kernel_min.shape == (layer.depthwise_kernel.shape[2],), layer.name


def test_calibrated_ranges_replace_the_default_ones(quantized):
    _, qat_model, ranges, _ = quantized
    assert len(ranges) > 50
    assert all((low, high) != (-6.0, 6.0) and low <= 0.0 < high for low, high in ranges.values())
    input_range = next(r for name, r in ranges.items() if name.startswith("quantize_layer"))
    assert input_range == (0.0, 255.0)
    variables = {v.name: v.numpy() for v in qat_model.non_trainable_weights}
    assert not any(np.all(value == 6.0) for name, value in variables.items() if name.endswith("_max:0"))


def test_activation_ranges_follow_training_batches_with_a_warm_up(quantized_v3):
    """A training step moves an activation range by 1 - decay toward the batch range, decay warming up to 0.999."""
    _, qat_model, _, _ = quantized_v3
    kinds = {type(q).__name__ for _, _, q in qat._activation_quantizer_slots(qat_model)}
    assert kinds == {"RangeFollowingQuantizer", "AllValuesQuantizer"}  # the input keeps its pixel range
    assert not any("range_updates" in v.name for v in qat_model.weights)  # checkpoints keep tfmot's variables
    saved = qat_model.get_weights()
    # The first range after the fixed input range: the same batch range in both calls below.
    wrapper = qat_model.get_layer("quant_normalize_scale")
    high = next(v for v in wrapper.weights if v.name.endswith("output_max:0"))
    darker = images(2, seed=7) * 0.5  # a batch range far from the calibrated one
    moves = {}
    try:
        for updates in (0, 10**6):
            qat_model.set_weights(saved)
            Q.set_range_updates(qat_model, updates)
            before = float(high.numpy())
            qat_model(darker, training=True)
            moves[updates] = float(high.numpy()) - before
    finally:
        qat_model.set_weights(saved)
    # decay (1 + 0) / (10 + 0) = 0.1: 90% of the way at once; after 10**6 updates tfmot's 0.999: 0.1%.
    assert moves[0] < 0 and moves[0] / moves[10**6] == pytest.approx(0.9 / 0.001, rel=0.01)


def test_qat_tflite_is_one_integer_xnnpack_partition(quantized):
    _, _, _, tflite = quantized
    ops = Q.op_histogram(tflite)
    assert not FORBIDDEN_OPS & set(ops), ops
    assert ops["QUANTIZE"] == 1 and ops["ARG_MAX"] == 1 and ops["MEAN"] == 1 and ops["MUL"] == 1
    types = Q.tensor_types(tflite)
    assert types[0][0] == "QUANTIZE"  # uint8 pixels -> int8, at the input only
    assert types[-1][:1] == ("ARG_MAX",) and types[-1][2] == "INT32"
    float_islands = [t for t in types[:-1] if t[2] != "INT8"]
    assert not float_islands
    assert Q.xnnpack_partitions(tflite, num_threads=1) == 1
    assert Q.xnnpack_partitions(tflite, num_threads=2) == 1
    assert Q.undelegated_ops(tflite) == ["QUANTIZE", "ARG_MAX"]
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite)
    (inp,) = interpreter.get_input_details()
    assert inp["dtype"] == np.uint8 and inp["quantization"] == (1.0, 0)  # raw pixels


def test_int8_tflite_agrees_with_its_qat_model(quantized):
    float_model, qat_model, _, tflite = quantized
    x = images(4, seed=4)
    labels = Q.run_tflite(tflite, x)
    qat_labels = np.argmax(qat_model(x, training=False), axis=-1)
    float_labels = np.argmax(float_model(x, training=False), axis=-1)
    assert labels.shape == (4, 65, 65) and labels.dtype == np.int32
    assert len(np.unique(qat_labels)) >= 3  # not a degenerate model
    assert np.mean(labels == qat_labels) > 0.9
    assert np.mean(labels == float_labels) > 0.85


def test_float32_and_int8_inputs_and_logits_output(quantized_v3):
    _, qat_model, _, _ = quantized_v3
    x = images(2, seed=5)
    float_io = Q.qat_to_tflite(qat_model, input_type="float32", output="logits")
    assert Q.xnnpack_partitions(float_io) == 1 and Q.undelegated_ops(float_io) == []  # Q/DQ in XNNPACK
    assert Q.op_histogram(float_io)["DEQUANTIZE"] == 1  # the float logits, at the output
    int8_io = Q.qat_to_tflite(qat_model, input_type="int8", output="logits")
    assert "QUANTIZE" not in Q.op_histogram(int8_io) and Q.undelegated_ops(int8_io) == []
    int8_logits = Q.run_tflite(int8_io, x - 128.0)
    assert int8_logits.dtype == np.int8 and int8_logits.shape == (2, 65, 65, 5)
    float_logits = Q.run_tflite(float_io, x)
    qat_logits = qat_model(x, training=False).numpy()
    assert np.mean(np.argmax(float_logits, -1) == np.argmax(qat_logits, -1)) > 0.9
    assert np.mean(np.argmax(int8_logits, -1) == np.argmax(float_logits, -1)) > 0.97


def _train_step(model, x, y):
    optimizer = keras.optimizers.SGD(0.1)
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x, training=True))
    variables = model.trainable_variables
    optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))


def _unfreeze(model):
    """Undo freeze_batch_norm on the shared fixture model (BN flag, wrapper's trainable list)."""
    for wrapper in model.layers:
        layer = getattr(wrapper, "layer", None)
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True
            if not any(weight is layer.gamma for weight in wrapper._trainable_weights):
                wrapper._trainable_weights[:0] = [layer.gamma, layer.beta]


@pytest.mark.parametrize("freeze_scale_offset", [False, True])
def test_freeze_batch_norm_stops_moving_statistics(quantized_v3plus, freeze_scale_offset):
    _, qat_model, _, _ = quantized_v3plus
    saved = qat_model.get_weights()
    layers = [getattr(wrapper, "layer", None) for wrapper in qat_model.layers]
    batch_norms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    x, y = images(2, seed=6), np.random.default_rng(6).integers(0, 5, (2, 65, 65))

    def state():
        names = ("gamma", "moving_mean", "moving_variance")
        return [{name: getattr(bn, name).numpy() for name in names} for bn in batch_norms]

    try:
        before = state()
        _train_step(qat_model, x, y)  # not frozen: the statistics move
        assert any(not np.allclose(b["moving_mean"], a["moving_mean"]) for b, a in zip(before, state(), strict=True))
        assert Q.freeze_batch_norm(qat_model, freeze_scale_offset=freeze_scale_offset) == len(batch_norms)
        assert not any(bn.trainable for bn in batch_norms)
        before = state()
        _train_step(qat_model, x, y)
        after = state()
        for b, a in zip(before, after, strict=True):
            np.testing.assert_array_equal(b["moving_mean"], a["moving_mean"])
            np.testing.assert_array_equal(b["moving_variance"], a["moving_variance"])
        gammas_moved = any(not np.array_equal(b["gamma"], a["gamma"]) for b, a in zip(before, after, strict=True))
        assert gammas_moved is not freeze_scale_offset
    finally:
        _unfreeze(qat_model)
        qat_model.set_weights(saved)


def test_ptq_per_channel_and_per_tensor():
    model = tame_deeplab(V3, images(8, seed=1))
    calibration = list(images(4, seed=2))
    per_channel = Q.ptq_int8_tflite(model, calibration, per_channel=True)
    per_tensor = Q.ptq_int8_tflite(model, calibration, per_channel=False)
    assert len(per_tensor) <= len(per_channel)
    assert set(Q.weight_scales(per_tensor).values()) == {1}
    assert max(Q.weight_scales(per_channel).values()) > 1
    for tflite in (per_channel, per_tensor):
        assert not FORBIDDEN_OPS & set(Q.op_histogram(tflite))
        assert Q.xnnpack_partitions(tflite) == 1 and Q.undelegated_ops(tflite) == ["QUANTIZE", "ARG_MAX"]
    x = images(2, seed=4)
    float_labels = np.argmax(model(x, training=False), axis=-1)
    assert np.mean(Q.run_tflite(per_channel, x) == float_labels) > 0.85


def test_layer_error_report_and_layers_kept_in_float():
    model = tame_deeplab(V3, images(8, seed=1))
    calibration = list(images(4, seed=2))
    rows = Q.int8_layer_errors(model, calibration, calibration[:2])
    errors = [row["rmse/scale"] for row in rows]
    assert errors == sorted(errors, reverse=True) and all(np.isfinite(errors))
    # Every int8 op is in the report, named by its Keras layer; rounding alone gives ~0.29 steps of error.
    layers = {row["layer"] for row in rows}
    assert {"Conv1", "normalize_scale", "block_16_project", "aspp0", "logits_semantic"} <= layers
    assert 0.1 < float(np.median(errors)) < 1.0

    kept = Q.ptq_int8_tflite(model, calibration, float_layers=["Conv1", "aspp0"])
    produced = {name: dtype for _, name, dtype in Q.tensor_types(kept)}
    conv1 = [name for name in produced if "/Conv1/" in name]
    assert conv1 and all(produced[name] == "FLOAT32" for name in conv1)
    assert Q.op_histogram(kept)["DEQUANTIZE"] >= 2  # into each float island
    assert {d["dtype"] for d in inspection._interpreter(kept, 1).get_input_details()} == {np.uint8}
    labels = Q.run_tflite(kept, images(2, seed=4))
    assert np.mean(labels == np.argmax(model(images(2, seed=4), training=False), axis=-1)) > 0.85
    with pytest.raises(ValueError, match=r"export.int8_float_layers: no op of layer\(s\) \['Conv9'\]"):
        Q.ptq_int8_tflite(model, calibration, float_layers=["Conv9"])


def test_float_tflite_and_inspection_helpers():
    model = build_deeplab(V3)
    tflite = Q.float_tflite(model)
    ops = Q.op_histogram(tflite)
    # The float graph keeps AVERAGE_POOL_2D and MUL+ADD: XNNPACK runs both in float.
    assert ops["AVERAGE_POOL_2D"] == 1 and "SPACE_TO_BATCH_ND" not in ops
    assert Q.xnnpack_partitions(tflite) == 1 and Q.undelegated_ops(tflite) == ["ARG_MAX"]
    with pytest.raises(ValueError, match="output must be one of"):
        Q.float_tflite(model, output="probabilities")


def test_deploy_graph_rewrites_keep_the_labels_and_one_partition(quantized):
    """fold_input_normalization + float_tail: MUL/ADD gone, a DEQUANTIZE before the final resize, still one
    XNNPACK partition, and the labels of the QAT file on LiteRT (raw pixels in, as before)."""
    _, qat_model, _, tflite = quantized
    rewritten, applied = Q.optimize_int8(tflite, tail_min_upsampling=1)  # v3+ too (by default it keeps int8)
    assert applied == ["fold_input_normalization", "input_quantize_in_xnnpack", "float_tail"]
    before, after = Q.op_histogram(tflite), Q.op_histogram(rewritten)
    assert "MUL" not in after and after["ADD"] == before["ADD"] - 1 and after["DEQUANTIZE"] == 2
    types = dict((name, dtype) for _, name, dtype in Q.tensor_types(rewritten))
    assert types["deeplab/quant_logits_resize/ResizeBilinear"] == "FLOAT32"
    # the input's uint8 -> int8 QUANTIZE became DEQUANTIZE + QUANTIZE, which XNNPACK takes
    assert Q.xnnpack_partitions(rewritten) == 1 and Q.undelegated_ops(rewritten) == ["ARG_MAX"]
    assert Q.read_metadata(rewritten) == {"input": "raw_pixels"} and Q.read_metadata(tflite) == {}
    from ai_edge_litert.interpreter import Interpreter

    (inp,) = Interpreter(model_content=rewritten).get_input_details()
    assert inp["dtype"] == np.uint8 and inp["quantization"] == (pytest.approx(1 / 127.5), 128)
    x = images(4, seed=4)
    labels, original = Q.run_tflite(rewritten, x), Q.run_tflite(tflite, x)
    qat_labels = np.argmax(qat_model(x, training=False), axis=-1)
    assert np.mean(labels == original) > 0.95
    assert np.mean(labels == qat_labels) >= np.mean(original == qat_labels) - 0.01
    from deeplabq.evaluation import TFLiteSegmenter

    segmenter = TFLiteSegmenter(rewritten)  # feeds raw pixels to a folded input (its metadata says so)
    assert segmenter.raw_pixels and np.array_equal(segmenter.predict(x[0]), labels[0])


def test_the_float_tail_is_for_logits_upsampled_8x_or_more(quantized_v3, quantized_v3plus):
    """DeepLabv3 (logits 3x3 -> 33x33 here) gets the float tail; a v3+ decoder's logits (9x9 -> 33x33) keep
    their int8 resize and ArgMax, which measured faster there (README "Where int8 time goes")."""
    assert Q.optimize_int8(quantized_v3[3])[1] == ["fold_input_normalization", "input_quantize_in_xnnpack",
                                                   "float_tail"]
    assert Q.optimize_int8(quantized_v3plus[3])[1] == ["fold_input_normalization", "input_quantize_in_xnnpack"]


def test_the_input_quantize_moved_into_xnnpack_gives_the_same_labels(quantized_v3plus):
    """DEQUANTIZE + QUANTIZE over one scale is the uint8 -> int8 shift exactly: the labels do not move."""
    model = schema.ModelT.InitFromPackedBuf(bytearray(quantized_v3plus[3]), 0)
    assert deploy_graph.fold_input_normalization(model)
    folded = deploy_graph.pack(model)
    assert deploy_graph.input_quantize_in_xnnpack(model) and not deploy_graph.input_quantize_in_xnnpack(model)
    moved = deploy_graph.pack(model)
    x = images(4, seed=5)
    np.testing.assert_array_equal(Q.run_tflite(moved, x), Q.run_tflite(folded, x))
    assert Q.undelegated_ops(folded) == ["QUANTIZE", "ARG_MAX"] and Q.undelegated_ops(moved) == ["ARG_MAX"]


def test_deploy_graph_rewrites_leave_other_graphs_alone(quantized_v3):
    float_model, qat_model, _, _ = quantized_v3
    float_file = Q.float_tflite(float_model)
    assert Q.optimize_int8(float_file) == (float_file, [])
    logits = Q.qat_to_tflite(qat_model, output="logits")  # no ArgMax: the int8 logits stay the output
    assert Q.optimize_int8(logits)[1] == ["fold_input_normalization", "input_quantize_in_xnnpack"]
    float_input = Q.qat_to_tflite(qat_model, input_type="float32")  # XNNPACK quantizes float pixels itself
    assert Q.optimize_int8(float_input)[1] == ["float_tail"]
