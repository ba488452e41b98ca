"""Accuracy-controlled PTQ: the search stops on success with the fewest float layers, and stops when the budget
cannot be met within the cap; run on a real model, it logs its curve and hands its layers to the int8 export."""

import dataclasses
import math

import mlflow
import numpy as np
import pytest
import tf_keras as keras

from deeplabq import data as data_lib
from deeplabq import export, int8_control
from deeplabq.config import RunSpec
from deeplabq.model import build_deeplab
from deeplabq.quantization import reestimate_batch_norm
from deeplabq.quantization.accuracy_control import Measured, search

from .conftest import TINY, TINY_ARCHITECTURE, TINY_DATASET, compose_config, start_test_run, tiny_images

RANKING = [f"layer{i}" for i in range(20)] + ["layer3", "layer0"]  # a layer with two ops is ranked twice


def _measure_with(miou_of_k):
    calls = []

    def measure(layers):
        assert list(layers) == [f"layer{i}" for i in range(len(layers))]  # the worst first, each once
        calls.append(len(layers))
        return Measured(miou=miou_of_k(len(layers)), latency_ms=1.0 + 0.1 * len(layers))
    return measure, calls


def test_search_stops_at_the_fewest_float_layers_that_meet_the_budget():
    measure, calls = _measure_with(lambda k: 45 + 0.5 * k)  # meets 50 - 0.3 from k = 10 on
    result = search(RANKING, measure, baseline=50.0, max_drop=0.3, cap=16)
    assert result.met and result.chosen.float_layers == 10 and math.isclose(result.chosen.drop, 0.0)
    assert calls == [0, 1, 2, 4, 8, 16, 12, 10, 9]  # one, then a few at a time, then bisection
    assert [s.float_layers for s in result.curve()] == sorted(calls)


def test_search_stops_when_the_budget_cannot_be_met_within_the_cap():
    measure, calls = _measure_with(lambda k: 45 + 0.1 * k)
    result = search(RANKING, measure, baseline=50.0, max_drop=0.3, cap=12)
    assert not result.met and calls == [0, 1, 2, 4, 8, 12]
    assert result.best().float_layers == 12


def test_search_converts_once_when_int8_already_meets_the_budget():
    measure, calls = _measure_with(lambda k: 49.9)
    result = search(RANKING, measure, baseline=50.0, max_drop=0.3, cap=16)
    assert result.chosen.float_layers == 0 and calls == [0]


@pytest.fixture
def tiny_run(tmp_path, mlflow_store):
    cfg = compose_config(tmp_path, [*TINY, *TINY_DATASET, *TINY_ARCHITECTURE, "export.int8_max_drop=0.3",
                                    "export.int8_control_images=2", "export.int8_max_float_layers=2",
                                    "export.int8_debug_images=2"])
    spec = RunSpec.from_config(cfg)
    spec.validate()
    keras.utils.set_random_seed(0)
    model = build_deeplab(spec.model)
    reestimate_batch_norm(model, np.stack(tiny_images(8, seed=1)))
    split = data_lib.open_split(spec.dataset, spec.eval.split)
    (tmp_path / "out" / "tflite").mkdir(parents=True)
    with start_test_run(tmp_path):
        yield spec, model, split, tmp_path / "out"


@pytest.mark.slow  # a dozen real conversions: ~25 s of CPU
def test_controlled_int8_logs_its_curve_passes_its_layers_on_or_fails_naming_the_budget(tiny_run):
    spec, model, split, out = tiny_run
    with_budget = lambda drop: dataclasses.replace(spec, export=dataclasses.replace(spec.export, int8_max_drop=drop))  # noqa: E731
    chosen = int8_control.with_controlled_float_layers(with_budget(100.0), out, model, tiny_images(4), split)
    assert chosen.export.int8_float_layers == () and chosen.export.int8_float_worst_layers == 0
    assert (out / "tflite" / "int8_accuracy_control.csv").read_text().startswith("float_layers,miou,drop,latency_ms")
    assert (out / "figures" / "int8_accuracy_control.png").stat().st_size > 10_000
    history = mlflow.tracking.MlflowClient().get_metric_history(mlflow.active_run().info.run_id, "int8_control/miou")
    assert [point.step for point in history] == [0]

    with pytest.raises(export.ExportError, match=r"'int8' failed: export.int8_max_drop=-100.0 cannot be met: with up "
                                                 r"to export.int8_max_float_layers=2 .* best drop is"):
        int8_control.with_controlled_float_layers(with_budget(-100.0), out, model, tiny_images(4), split)
    rows = (out / "tflite" / "int8_accuracy_control.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["0", "1", "2"]
