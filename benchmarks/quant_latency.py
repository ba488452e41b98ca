"""Float vs int8 DeepLab on LiteRT (XNNPACK): latency, XNNPACK partitions, file size, train step cost.

    .venv/bin/python benchmarks/quant_latency.py                      # all four models, 20 runs
    .venv/bin/python benchmarks/quant_latency.py --models v3_dm05_257_os16 --runs 30 --naive --io

Every file of one model is measured in the same process, interleaved run by run (float, int8, float,
int8, ...), so background load hits all of them alike and ratios compare like with like. Latency is the
median of ``--runs`` invokes after ``--warmup``, per thread count. Weights are random (latency does not
depend on them); BN statistics and fake-quant ranges are calibrated on random 0..255 images, so the
activation scales are realistic.

Rows: ``float`` = float32 TFLite of the model as built (float 0..255 in), ``int8 converter`` = calibrated QAT
model through :func:`deeplabq.quantization.qat_to_tflite` (uint8 in), ``int8`` = that file with the deploy-graph
rewrites deeplabq exports by default (:func:`deeplabq.quantization.optimize_int8`: input normalization folded
into the uint8 input, resize and ArgMax in float); all output the int32 label map (ArgMax in the graph).
``--naive`` adds the exports the culprits were found with: the converter's PTQ of the unmodified float model,
and tfmot's default QAT with output-only configs for the layers it does not know.
``--io`` compares output and input variants on the first model. ``--gemm`` measures XNNPACK's int8 and
float32 throughput on one large 1x1 convolution (the ceiling for any int8 speed-up on this CPU).
"""

import deeplabq  # noqa: I001  (before TensorFlow)
import argparse
import os
import platform
import statistics
import time

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from op_profile import side_by_side  # noqa: I001  (benchmarks/ is the script's folder)

from deeplabq import profiling
from deeplabq import quantization as Q
from deeplabq.quantization import conversion
from deeplabq.evaluation import interleaved_latency
from deeplabq.model import DeepLabSpec, ResizeBilinear, build_deeplab
from deeplabq.tracking import cpu_features

MODELS = {
    "v3_dm05_camvid": DeepLabSpec(num_classes=11, crop_size=(193, 257), depth_multiplier=0.5, output_stride=16),
    "v3_dm05_257_os16": DeepLabSpec(num_classes=21, crop_size=(257, 257), depth_multiplier=0.5, output_stride=16),
    "v3_dm05_257_os8": DeepLabSpec(num_classes=21, crop_size=(257, 257), depth_multiplier=0.5, output_stride=8),
    "v3_dm10_513_os16": DeepLabSpec(num_classes=21, crop_size=(513, 513), depth_multiplier=1.0, output_stride=16),
    "v3plus_dm10_512": DeepLabSpec(
        num_classes=32, crop_size=(512, 512), depth_multiplier=1.0, output_stride=16, decoder_output_stride=4
    ),
}


def random_images(count: int, size, seed: int) -> np.ndarray:
    return np.round(np.random.default_rng(seed).uniform(0, 255, (count, *size, 3))).astype(np.float32)


def naive_qat_tflite(float_model: keras.Model, batches) -> bytes:
    """tfmot's default 8-bit QAT of the unmodified model; unknown layers get output-only configs (what a
    first attempt does: Rescaling and ResizeBilinear quantize their outputs, AveragePooling2D stays)."""

    def annotate(layer):
        new = layer.__class__.from_config(layer.get_config())
        known = isinstance(new, (keras.layers.Rescaling, ResizeBilinear))
        return tfmot.quantization.keras.quantize_annotate_layer(new, Q.OutputQuantizeConfig() if known else None)

    with Q.quantize_scope():
        annotated = keras.models.clone_model(float_model, clone_function=annotate)
        annotated.set_weights(float_model.get_weights())
        qat = tfmot.quantization.keras.quantize_apply(annotated)
    Q.calibrate_activation_ranges(qat, batches)
    return Q.qat_to_tflite(qat)


def train_step_ms(model: keras.Model, images: np.ndarray, runs: int = 6) -> float:
    """Median time of a compiled SGD train step (forward, backward, update) on ``images``."""
    optimizer = keras.optimizers.SGD(1e-3, momentum=0.9)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    labels = np.random.default_rng(0).integers(0, model.output_shape[-1], images.shape[:3])

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        variables = model.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    for _ in range(2):
        step(images, labels).numpy()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        step(images, labels).numpy()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def describe(name: str, tflite: bytes) -> str:
    ops = Q.op_histogram(tflite)
    notable = {op: n for op, n in ops.items() if op not in ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD")}
    return (
        f"    {name:14s} {len(tflite) / 1e6:6.2f} MB  partitions {Q.xnnpack_partitions(tflite)}  "
        f"not in XNNPACK {Q.undelegated_ops(tflite)}  ops {notable}"
    )


def benchmark_model(name: str, spec: DeepLabSpec, args) -> list[dict]:
    print(f"\n== {name}: {spec}", flush=True)
    keras.utils.set_random_seed(0)
    model = build_deeplab(spec)
    calibration = random_images(4, spec.crop_size, seed=1)
    Q.reestimate_batch_norm(model, calibration[:2])
    started = time.perf_counter()
    files = {"float": Q.float_tflite(model)}
    qat = Q.quantize_model(model)
    Q.calibrate_activation_ranges(qat, [calibration[i : i + 1] for i in range(len(calibration))])
    files["int8 converter"] = Q.qat_to_tflite(qat)
    files["int8"] = Q.optimize_int8(files["int8 converter"])[0]  # what deeplabq ships: deploy_graph's rewrites
    if args.naive:
        files["int8 naive PTQ"] = naive_ptq(model, calibration)
        files["int8 naive QAT"] = naive_qat_tflite(model, [calibration[i : i + 1] for i in range(len(calibration))])
    print(f"    converted in {time.perf_counter() - started:.0f} s", flush=True)
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        for file_name, tflite in files.items():
            with open(os.path.join(args.save, f"{name}_{file_name.replace(' ', '_')}.tflite"), "wb") as f:
                f.write(tflite)
    for file_name, tflite in files.items():
        print(describe(file_name, tflite), flush=True)
    rows = []
    for threads in args.threads:
        latency = interleaved_latency(files, threads, runs=args.runs, warmup=args.warmup)
        for file_name in files:
            rows.append(
                {
                    "model": name,
                    "file": file_name,
                    "threads": threads,
                    "ms": latency[file_name],
                    "ratio": latency[file_name] / latency["float"],
                    "partitions": Q.xnnpack_partitions(files[file_name], threads),
                    "MB": len(files[file_name]) / 1e6,
                    "size_ratio": len(files[file_name]) / len(files["float"]),
                }
            )
    if args.profile:
        for threads in args.threads:
            profiles = {file_name: profiling.profile_ops(tflite, threads=threads, runs=args.runs)
                        for file_name, tflite in files.items()}
            print(f"\n    per-op profile, {threads} thread(s), ms by op type:\n{side_by_side(profiles)}", flush=True)
    if args.io and name == args.models[0]:
        io_variants(model, qat, args)
    return rows


def naive_ptq(model: keras.Model, calibration: np.ndarray) -> bytes:
    """The converter's full-integer PTQ of the float model exactly as built (no prepare_for_int8)."""
    converter = Q.tflite_converter(model, "labels")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    return conversion._convert(converter)


def io_variants(model: keras.Model, qat: keras.Model, args) -> None:
    """Output (labels int32 / labels uint8 via CAST / logits) and input (uint8 / int8 / float32) variants."""
    files = {
        "float labels": Q.float_tflite(model),
        "float logits": Q.float_tflite(model, output="logits"),
        "u8 -> labels": Q.qat_to_tflite(qat),
        "u8 -> logits": Q.qat_to_tflite(qat, output="logits"),
        "i8 -> labels": Q.qat_to_tflite(qat, input_type="int8"),
        "f32 -> labels": Q.qat_to_tflite(qat, input_type="float32"),
    }
    converter = tf.lite.TFLiteConverter.from_concrete_functions([uint8_labels_function(qat)], qat)
    converter.experimental_lower_to_saved_model = False
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.uint8
    files["u8 -> labels u8"] = conversion._convert(converter)
    print("\n  I/O variants (same QAT model):")
    for name, tflite in files.items():
        print(describe(name, tflite))
    for threads in args.threads:
        latency = interleaved_latency(files, threads, runs=args.runs, warmup=args.warmup)
        print(f"    {threads} thread(s): " + ", ".join(f"{k} {v:.2f} ms" for k, v in latency.items()))


def uint8_labels_function(model: keras.Model):
    from deeplabq.model import native_dilated_convolutions

    height, width, _ = model.input_shape[1:]

    def serve(images):
        return tf.cast(tf.argmax(model(images, training=False), axis=-1, output_type=tf.int32), tf.uint8)

    with native_dilated_convolutions():
        return tf.function(serve).get_concrete_function(tf.TensorSpec((1, height, width, 3), tf.float32))


def gemm_ceiling(args) -> None:
    """XNNPACK int8 vs float32 throughput on a 1x1 conv 65x65x256 -> 256 (277 MMAC), 1 thread."""
    shape = (1, 65, 65, 256)
    inputs = keras.Input(shape[1:], batch_size=1)
    model = keras.Model(inputs, keras.layers.Conv2D(256, 1)(inputs))
    function = tf.function(lambda x: model(x)).get_concrete_function(tf.TensorSpec(shape, tf.float32))
    files = {}
    for kind in ("float32", "int8"):
        converter = tf.lite.TFLiteConverter.from_concrete_functions([function], model)
        converter.experimental_lower_to_saved_model = False
        if kind == "int8":
            samples = np.random.default_rng(0).normal(size=(2, *shape)).astype(np.float32)
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda samples=samples: ([sample] for sample in samples)
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = converter.inference_output_type = tf.int8
        files[kind] = converter.convert()
    latency = interleaved_latency(files, 1, runs=max(args.runs, 20), warmup=args.warmup)
    macs = 65 * 65 * 256 * 256
    print(
        "\n== XNNPACK 1x1 conv 65x65x256->256, 1 thread: "
        + ", ".join(f"{k} {v:.2f} ms ({macs / v / 1e6:.1f} GMAC/s)" for k, v in latency.items())
    )


def print_table(rows: list[dict]) -> None:
    print("\n| model | file | threads | latency ms | x float | XNNPACK partitions | size MB | x float size |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['model']} | {row['file']} | {row['threads']} | {row['ms']:.2f} | {row['ratio']:.2f} | "
            f"{row['partitions']} | {row['MB']:.2f} | {row['size_ratio']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--naive", action="store_true", help="also measure the naive int8 exports")
    parser.add_argument("--io", action="store_true", help="input/output variants on the first model")
    parser.add_argument("--gemm", action="store_true", help="int8 vs float32 GEMM throughput of XNNPACK")
    parser.add_argument("--train-step", action="store_true", help="fake-quant vs float train step, 257, batch 2")
    parser.add_argument("--profile", action="store_true", help="also each file's per-op profile (op_profile.py)")
    parser.add_argument("--save", metavar="DIR", help="write every TFLite file measured to DIR")
    args = parser.parse_args()
    print(
        f"{platform.machine()}, CPU features {cpu_features()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}, TF {tf.__version__}, deeplabq {deeplabq.__version__}, "
        f"runs {args.runs}, warmup {args.warmup}"
    )

    rows = []
    for name in args.models:
        rows.extend(benchmark_model(name, MODELS[name], args))
    if args.gemm:
        gemm_ceiling(args)
    if args.train_step:
        spec = MODELS["v3_dm05_257_os16"]
        model = build_deeplab(spec)
        batch = random_images(2, spec.crop_size, seed=3)
        qat = Q.quantize_model(model)
        Q.calibrate_activation_ranges(qat, [batch])
        float_ms, qat_ms = train_step_ms(model, batch), train_step_ms(qat, batch)
        print(
            f"\n== train step, {spec.crop_size} batch 2: float {float_ms:.0f} ms, fake-quant {qat_ms:.0f} ms "
            f"({qat_ms / float_ms:.2f}x)"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    print_table(rows)


if __name__ == "__main__":
    main()
