"""``quant=qat_delayed``: research/deeplab's ``--quantize_delay_step``. One run trains float, then fake
quantization switches on at ``quant.delay_steps`` (0: QAT from the start). Ships ``qat_int8``; no float model
survives the switch."""

from __future__ import annotations

from deeplabq.config import require
from deeplabq.export import ExportPlan
from deeplabq.quant_modes.base import QuantMode, register
from deeplabq.quant_modes.common import freeze_bn_step, initialize, start_quantization
from deeplabq.training import fit


@register
class QatDelayed(QuantMode):
    name = "qat_delayed"

    def validate(self, spec):
        quant, steps = spec.quant, int(spec.train.steps)
        require(int(quant.delay_steps) < steps,
                f"quant.delay_steps={quant.delay_steps} is not before the end of training (train.steps={steps}): "
                f"quantization would never switch on")
        freeze = freeze_bn_step(spec, int(quant.delay_steps))
        require(freeze != 0,
                f"quant.freeze_bn_delay=0 freezes batch-norm statistics that were never trained (quant=qat_delayed "
                f"starts from {spec.init.source} weights): use a later step, or null to keep them training")

    def run_name_parts(self, quant):
        return [f"d{quant.delay_steps}"]

    def tags(self, quant):
        return {"deeplabq.quant_delay": str(quant.delay_steps)}

    def export_plan(self, spec):
        return ExportPlan(("qat_int8",), shipped="qat_int8", qat=True)

    def train(self, model, context):
        initialize(model, context)
        spec = context.spec
        qat = fit(model, spec, context.output_dir, context.train_split, quantize_at=int(spec.quant.delay_steps),
                  quantize_fn=start_quantization, freeze_bn_at=freeze_bn_step(spec, int(spec.quant.delay_steps)))
        return qat, None
