"""Accuracy-controlled PTQ: how many of the worst int8 layers to keep in float so that the int8 file's mIoU drop
stays within a budget (what NNCF's ``quantize_with_accuracy_control`` does for OpenVINO, here for TFLite, with
the LiteRT latency and XNNPACK partition count of every candidate measured along the way).

The search is pure: it gets the layers ranked worst first (the QuantizationDebugger's report) and a ``measure``
callable that converts and scores the int8 file with the first ``k`` of them in float. It measures ``k = 0``;
then ``k = 1, 2, 4, ...`` (one layer, then a few at a time) up to the cap, until one meets the budget; then
bisects between the last failing and the first passing ``k`` for the fewest layers that meet it. That assumes
the drop shrinks as layers go float, which holds roughly, not exactly; every measured point is kept, and the
chosen one was measured. At most ``2 log2(cap) + 2`` conversions. If even the cap misses the budget, the result
says so (``met`` False) with every point measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Measured:
    """What ``measure`` returns for one candidate file."""

    miou: float  # %
    latency_ms: float = float("nan")
    xnnpack_partitions: int = 0
    size_bytes: int = 0
    float_latency_ms: float = float("nan")  # the float file, timed interleaved with this one


@dataclass(frozen=True)
class Step:
    float_layers: int  # k: how many of the worst layers are float
    layers: tuple[str, ...]
    measured: Measured
    drop: float  # baseline mIoU - this mIoU, points

    def row(self) -> dict:
        m = self.measured
        return {"float_layers": self.float_layers, "miou": m.miou, "drop": self.drop, "latency_ms": m.latency_ms,
                "float_latency_ms": m.float_latency_ms, "xnnpack_partitions": m.xnnpack_partitions,
                "size_bytes": m.size_bytes, "layers": " ".join(self.layers)}


@dataclass
class SearchResult:
    baseline: float
    max_drop: float
    cap: int
    steps: list[Step] = field(default_factory=list)  # in the order they were measured
    chosen: Step | None = None  # the fewest float layers measured to meet the budget; None if none did

    @property
    def met(self) -> bool:
        return self.chosen is not None

    def curve(self) -> list[Step]:
        """The measured points by number of float layers."""
        return sorted(self.steps, key=lambda step: step.float_layers)

    def best(self) -> Step:
        return max(self.steps, key=lambda step: (step.measured.miou, -step.float_layers))


def unique_layers(ranking: Sequence[str]) -> list[str]:
    """The ranking's layers, worst first, each once (a layer with several ops appears once, at its worst)."""
    return list(dict.fromkeys(ranking))


def search(ranking: Sequence[str], measure: Callable[[tuple[str, ...]], Measured], *, baseline: float,
           max_drop: float, cap: int) -> SearchResult:
    """Find the fewest worst-ranked layers to keep in float for a drop <= ``max_drop`` (module docstring)."""
    layers = unique_layers(ranking)
    cap = max(0, min(int(cap), len(layers)))
    result = SearchResult(baseline=baseline, max_drop=max_drop, cap=cap)
    measured: dict[int, Step] = {}

    def ok(k: int) -> bool:
        if k not in measured:
            chosen = tuple(layers[:k])
            score = measure(chosen)
            measured[k] = Step(k, chosen, score, baseline - score.miou)
            result.steps.append(measured[k])
        return measured[k].drop <= max_drop

    if ok(0):
        result.chosen = measured[0]
        return result
    failing, k = 0, 1
    while k <= cap and not ok(k):
        failing, k = k, (cap if k < cap < 2 * k else 2 * k)
    if k > cap or not ok(k):
        return result
    passing = k
    while passing - failing > 1:
        middle = (failing + passing) // 2
        if ok(middle):
            passing = middle
        else:
            failing = middle
    result.chosen = measured[passing]
    return result
