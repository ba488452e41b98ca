"""What every loader of :mod:`deeplabq.checkpoints` shares: the one error type, :class:`CheckpointMismatchError`
(every missing, unexpected and wrongly shaped variable, raised before anything is assigned), the
:class:`LoadReport` a loader returns, the walk over a model's layers (into nested models) and the regular
expression of the MobileNetV2 backbone's ``keras.applications`` layer names, which both the TF1 name map and
the Keras ImageNet loader match.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import tf_keras as keras

from deeplabq.errors import UserError

# keras.applications' MobileNetV2 block layer names (block 0 is expanded_conv), ours too.
_BACKBONE_RE = re.compile(r"^(?:expanded_conv|block_(\d+))_(expand|depthwise|project)(_BN)?$")
_MAX_LISTED = 40


class CheckpointMismatchError(UserError, ValueError):
    """The weights at ``source`` do not fit the model. Nothing was assigned.

    ``missing``: names the model needs that the source lacks; ``unexpected``: names in the source the
    model does not use; ``mismatched``: ``(name, source shape, model shape)``.
    """

    def __init__(
        self,
        source,
        *,
        missing: Iterable[str] = (),
        unexpected: Iterable[str] = (),
        mismatched: Iterable[tuple[str, tuple, tuple]] = (),
        hints: Iterable[str] = (),
        kind: str = "checkpoint",
    ):
        self.source = str(source)
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.mismatched = sorted((n, tuple(a), tuple(b)) for n, a, b in mismatched)
        self.hints = list(hints)
        lines = [f"The {kind} {self.source} does not fit the model:"]
        if self.missing:
            lines.append(f"  missing ({len(self.missing)}; needed by the model, not in the {kind}):")
            lines += _listed(self.missing, "missing")
        if self.unexpected:
            lines.append(f"  unexpected ({len(self.unexpected)}; in the {kind}, not used by the model):")
            lines += _listed(self.unexpected, "unexpected")
        if self.mismatched:
            lines.append(f"  wrong shape ({len(self.mismatched)}; name: {kind} shape vs model shape):")
            lines += _listed([f"{n}: {list(a)} vs {list(b)}" for n, a, b in self.mismatched], "mismatched")
        lines += [f"  hint: {h}" for h in self.hints]
        lines.append("Nothing was loaded; the model's weights are unchanged.")
        super().__init__("\n".join(lines))

    def naming(self, key: str, differences: str = "") -> CheckpointMismatchError:
        """This error, its first line naming the config key that pointed at the checkpoint and the config
        values of the checkpoint's run that differ from this model's."""
        first, _, rest = str(self).partition("\n")
        first = f"{key}: {first.rstrip(':')}" + (f" ({differences})" if differences else "") + ":"
        self.args = (f"{first}\n{rest}" if rest else first,)
        return self


def _listed(items: list[str], attribute: str) -> list[str]:
    shown = [f"    {item}" for item in items[:_MAX_LISTED]]
    if len(items) > _MAX_LISTED:
        shown.append(f"    ... and {len(items) - _MAX_LISTED} more (all in the exception's .{attribute})")
    return shown


@dataclass
class LoadReport:
    """What a loader did. ``loaded``: model weights assigned (source names); ``skipped``: model weights
    deliberately left as they were; ``ignored``: source entries deliberately not used."""

    source: str
    loaded: list[str]
    skipped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (
            f"loaded {len(self.loaded)} weights from {self.source}; {len(self.skipped)} model weights kept "
            f"their values; {len(self.ignored)} entries of the source ignored"
        )


def _iter_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _iter_layers(layer)
        else:
            yield layer
