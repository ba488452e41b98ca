"""``quant=qat_finetune``: the seeds' recommended path. Fake quantization from the first step of a fine-tune of
a converged float model (quantize.md: 3000 steps at 3e-5). Ships ``qat_int8``; its float source is scored too
(``keras_float/*``), and ``deploy/delta_miou`` is measured against it."""

from __future__ import annotations

from deeplabq.export import ExportPlan
from deeplabq.quant_modes.base import QuantMode, register
from deeplabq.quant_modes.common import (
    freeze_bn_step,
    load_float_checkpoint,
    require_float_checkpoint,
    start_quantization,
)
from deeplabq.training import fit


@register
class QatFinetune(QuantMode):
    name = "qat_finetune"

    def validate(self, spec):
        freeze_bn_step(spec, 0)
        require_float_checkpoint(spec)

    def export_plan(self, spec):
        return ExportPlan(("qat_int8",), shipped="qat_int8", float_reference="keras_float/miou", qat=True)

    def train(self, model, context):
        load_float_checkpoint(model, context.spec)
        # Calibrate on the same augmented train pipeline the fine-tuning uses, then train with quantization on.
        qat = fit(model, context.spec, context.output_dir, context.train_split, quantize_at=0,
                  quantize_fn=start_quantization, freeze_bn_at=freeze_bn_step(context.spec, 0))
        return qat, model
