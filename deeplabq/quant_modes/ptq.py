"""``quant=ptq``: post-training quantization of a converged float model, no training. Exports the float file
and the one of ``quant.scheme`` (dynamic_range, float16 or int8, the TFLite PTQ tutorial's three), which it
ships."""

from __future__ import annotations

from deeplabq.config import PTQ_SCHEMES, require
from deeplabq.export import ExportPlan
from deeplabq.quant_modes.base import QuantMode, register
from deeplabq.quant_modes.common import load_float_checkpoint, require_float_checkpoint


@register
class PostTrainingQuantization(QuantMode):
    name = "ptq"

    def validate(self, spec):
        require(spec.quant.scheme in PTQ_SCHEMES,
                f"quant.scheme must be one of {PTQ_SCHEMES}, got {spec.quant.scheme!r}")
        require_float_checkpoint(spec)

    def run_name_parts(self, quant):
        return [str(quant.scheme)]

    def export_plan(self, spec):
        return ExportPlan(("float", str(spec.quant.scheme)), shipped=str(spec.quant.scheme),
                          float_reference="float/miou")

    def train(self, model, context):
        load_float_checkpoint(model, context.spec)
        return model, model
