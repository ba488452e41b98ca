"""convert.py's job: a trained checkpoint (run dir, checkpoint prefix or MLflow run id) → the requested TFLite
variants, each validated, measured and logged in a run of its own."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from omegaconf import DictConfig

from deeplabq import data as data_lib
from deeplabq import export, reporting, sources, tracking
from deeplabq.config import RunSpec
from deeplabq.errors import ConfigError, SourceError
from deeplabq.export import VARIANTS


def convert(cfg: DictConfig, output_dir) -> dict[str, float]:
    """The conversion is a child run of the source's run when it has one, named by its options: it never
    overwrites what the source run recorded. The last of ``variants`` is its ``deploy/*`` artifact."""
    output_dir = Path(output_dir)
    tracking.setup_mlflow(cfg.tracking)  # a run id source is looked up in the configured store
    source = sources.resolve_source(cfg.source)
    if source.kind != "checkpoint":
        raise SourceError(f"convert.py needs a checkpoint, run dir or run id, got {source.describe()}")
    for variant in cfg.variants:
        if variant not in VARIANTS:
            raise ConfigError(f"variants: unknown TFLite variant {variant!r}; choose from {VARIANTS}")
        if (variant == "qat_int8") != source.quantized:
            raise ConfigError(f"variants: {variant!r} does not fit {source.describe()} "
                             f"({'a QAT' if source.quantized else 'a float'} checkpoint)")
    overrides = tracking.command_line_overrides()
    if cfg.use_run_config:
        cfg = sources.with_run_architecture(cfg, source, overrides)
    options = [o for o in overrides if o.startswith(("variants=", "export."))]
    cfg = tracking.with_run_name(cfg, "convert " + (" ".join(options) or ",".join(cfg.variants)))
    with tracking.tracked_run(cfg, output_dir, parent_run_id=source.run_id):
        mlflow.set_tag("deeplabq.converted_from", source.describe())
        spec = RunSpec.from_config(cfg)
        spec.validate()
        train_split = data_lib.open_split(spec.dataset, spec.dataset.train_split)
        if set(export.CALIBRATED) & set(cfg.variants):
            reporting.check_calibration_count(spec.quant, train_split)
        eval_split = data_lib.open_split(spec.dataset, spec.eval.split)
        if cfg.get("check_data", True):
            data_lib.check_files(train_split, eval_split)  # calibration and evaluation files
        model = sources.load_keras_model(spec.model, source)
        models = {"qat_model": model} if source.quantized else {"float_model": model}
        metrics = reporting.export_and_measure(spec, output_dir, list(cfg.variants), train_split=train_split,
                                               eval_split=eval_split, **models)
        metrics.update(reporting.ship(metrics, str(cfg.variants[-1]), "float/miou"))
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
        print(reporting.summary_table(metrics, list(spec.eval.latency_threads)))
        reporting.print_run_location(output_dir)
        return metrics
