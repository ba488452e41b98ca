"""``quant=float``: no quantization in training. Exports the float file, which it ships, and the post-training
variants of ``export.ptq_variants`` (dynamic-range, float16, int8) beside it."""

from __future__ import annotations

from deeplabq.export import ExportPlan
from deeplabq.quant_modes.base import QuantMode, register
from deeplabq.quant_modes.common import initialize
from deeplabq.training import fit


@register
class Float(QuantMode):
    name = "float"
    mixed_precision = True

    def export_plan(self, spec):
        return ExportPlan(("float", *spec.export.ptq_variants), shipped="float", float_reference="float/miou")

    def train(self, model, context):
        initialize(model, context)
        model = fit(model, context.spec, context.output_dir, context.train_split)
        return model, model
