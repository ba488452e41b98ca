"""deeplabq.evaluation: the confusion matrix and its metrics, the deploy/* metrics, and LiteRT evaluation and
timing of a real tiny TFLite file (conftest.tiny_float_tflite) on synthetic scenes."""

import numpy as np
import pytest

from deeplabq import data as data_lib
from deeplabq import evaluation
from deeplabq import quantization as Q
from deeplabq.config import EvalSpec
from deeplabq.evaluation import ConfusionMatrix, TFLiteError, TFLiteSegmenter

from .conftest import TINY, TINY_DATASET, compose_config, tiny_images


def hand_made() -> ConfusionMatrix:
    """(label, prediction) pairs (0,0) (0,1) (1,1) (2,2) (2,0) (1,1) (1,2); one ignored pixel; 7 is clipped to 2."""
    confusion = ConfusionMatrix(num_classes=3, ignore_label=255)
    confusion.update(np.array([[0, 0, 1, 255], [2, 2, 1, 1]]), np.array([[0, 1, 1, 0], [2, 0, 1, 7]]))
    return confusion


def test_confusion_matrix_counts_valid_pixels_only():
    np.testing.assert_array_equal(hand_made().matrix, [[1, 1, 0], [0, 2, 1], [1, 0, 1]])


def test_iou_miou_and_pixel_accuracy_of_a_hand_made_example():
    confusion = hand_made()
    np.testing.assert_allclose(confusion.per_class_iou(), [1 / 3, 2 / 4, 1 / 3])
    assert confusion.miou() == pytest.approx(7 / 18)
    assert confusion.pixel_accuracy() == pytest.approx(4 / 7)


def test_metrics_are_percent_with_prefix_and_class_names():
    assert hand_made().metrics(["sky", "road", "car"], prefix="int8/") == pytest.approx({
        "int8/miou": 100 * 7 / 18, "int8/pixel_accuracy": 100 * 4 / 7,
        "int8/iou/sky": 100 / 3, "int8/iou/road": 50.0, "int8/iou/car": 100 / 3})


def test_unseen_class_and_in_range_ignore_label_do_not_count():
    confusion = ConfusionMatrix(num_classes=4, ignore_label=0)  # ADE20K: class 0 is never a target
    confusion.update(np.array([0, 0, 1, 1, 2]), np.array([1, 2, 1, 1, 1]))
    iou = confusion.per_class_iou()
    assert np.isnan(iou[0]) and np.isnan(iou[3])  # ignored; neither labelled nor predicted
    assert iou[1:3] == pytest.approx([2 / 3, 0.0])
    assert confusion.miou() == pytest.approx(1 / 3)
    assert confusion.pixel_accuracy() == pytest.approx(2 / 3)
    assert set(confusion.metrics(["a", "b", "c", "d"])) == {"miou", "pixel_accuracy", "iou/b", "iou/c"}


def test_empty_confusion_matrix_scores_zero():
    confusion = ConfusionMatrix(num_classes=3, ignore_label=255)
    assert confusion.miou() == 0.0 and confusion.pixel_accuracy() == 0.0


METRICS = {"keras/miou": 52.0, "float/miou": 50.0, "float/size_bytes": 4000, "int8/miou": 48.5,
           "int8/pixel_accuracy": 90.0, "int8/size_bytes": 1000, "int8/agreement": 0.9, "int8/xnnpack_partitions": 1,
           "int8/latency_ms_t1": 3.0, "int8/latency_ms_t2": 2.0, "int8/latency_p90_ms_t1": 4.0, "int8/iou/disc": 30.0,
           "deploy/size_bytes": 1000}


def test_deploy_metrics_are_the_shipped_artifacts_under_one_name():
    assert evaluation.deploy_metrics(METRICS, "int8", "float/miou") == {
        "deploy/miou": 48.5, "deploy/pixel_accuracy": 90.0, "deploy/size_bytes": 1000, "deploy/agreement": 0.9,
        "deploy/xnnpack_partitions": 1, "deploy/latency_ms_t1": 3.0, "deploy/latency_ms_t2": 2.0,
        "deploy/delta_miou": -1.5}
    assert "deploy/delta_miou" not in evaluation.deploy_metrics(METRICS, "int8", "keras_float/miou")
    assert "deploy/delta_miou" not in evaluation.deploy_metrics(METRICS, "int8", None)
    assert evaluation.deploy_metrics(METRICS, "qat_int8", "float/miou") == {}


def test_artifacts_in_lists_tflite_files_in_order_without_deploy():
    assert evaluation.artifacts_in(METRICS) == ["float", "int8"]
    assert evaluation.artifacts_in({"keras/miou": 1.0}) == []


@pytest.fixture(scope="module")
def float_logits_tflite(tiny_model) -> bytes:
    return Q.float_tflite(tiny_model, output="logits")


@pytest.mark.parametrize("output", ["labels", "logits"])
def test_segmenter_predicts_the_keras_argmax(tiny_model, tiny_float_tflite, float_logits_tflite, output):
    segmenter = TFLiteSegmenter(tiny_float_tflite if output == "labels" else float_logits_tflite)
    assert segmenter.outputs_labels == (output == "labels") and segmenter.input_hw == (33, 33)
    for image in tiny_images(2, seed=3):
        predicted = segmenter.predict(image)
        expected = np.argmax(tiny_model(image[None], training=False).numpy()[0], axis=-1)
        assert predicted.shape == (33, 33)
        assert np.mean(predicted == expected) > 0.99


def test_segmenter_refuses_other_sizes_and_non_tflite_content(tmp_path, tiny_float_tflite):
    path = tmp_path / "float.tflite"
    path.write_bytes(tiny_float_tflite)
    segmenter = TFLiteSegmenter(str(path))
    with pytest.raises(TFLiteError, match=r"float.tflite takes \(33, 33\) images, got \(32, 33\)"):
        segmenter.predict(np.zeros((32, 33, 3), np.float32))
    with pytest.raises(TFLiteError, match="broken.tflite is not a loadable TFLite model"):
        TFLiteSegmenter(b"not a flatbuffer" * 8, name="broken.tflite")


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    cfg = compose_config(tmp_path_factory.mktemp("eval"), [*TINY, *TINY_DATASET])
    return cfg.dataset, data_lib.open_split(cfg.dataset, "val")


def test_tflite_and_keras_evaluation_count_every_label_pixel_alike(tiny_model, tiny_float_tflite, val_split):
    dataset, split = val_split
    from_tflite = evaluation.evaluate_tflite(TFLiteSegmenter(tiny_float_tflite), split, dataset, max_images=2)
    from_keras = evaluation.evaluate_keras(tiny_model, split, dataset, batch_size=4, max_images=2)
    assert from_tflite.matrix.sum() == from_keras.matrix.sum() == 2 * 28 * 32  # padding is never counted
    assert np.abs(from_tflite.matrix - from_keras.matrix).sum() <= 0.02 * 2 * 28 * 32


def test_tflite_metrics_score_and_time_each_thread_count(tmp_path, tiny_float_tflite, val_split):
    dataset, split = val_split
    path = tmp_path / "float.tflite"
    path.write_bytes(tiny_float_tflite)
    spec = EvalSpec(split="val", max_images=1, latency_threads=(1, 2), latency_warmup=1, latency_runs=3)
    metrics, confusion = evaluation.tflite_metrics(path, "float", split, spec, dataset)
    assert confusion.matrix.sum() == 28 * 32
    assert metrics["float/miou"] == pytest.approx(100 * confusion.miou())
    for threads in (1, 2):
        assert 0 < metrics[f"float/latency_ms_t{threads}"] <= metrics[f"float/latency_p90_ms_t{threads}"]


def test_interleaved_latency_times_every_model_by_name(tmp_path, tiny_float_tflite, float_logits_tflite):
    path = tmp_path / "logits.tflite"
    path.write_bytes(float_logits_tflite)
    latency = evaluation.interleaved_latency({"labels": tiny_float_tflite, "logits": path}, 1, warmup=1, runs=3)
    assert list(latency) == ["labels", "logits"]
    assert all(0 < ms < 10_000 for ms in latency.values())
