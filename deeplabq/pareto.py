"""The Pareto front of a set of artifacts: those that no other artifact beats on all of mIoU, latency and size.

An artifact is *dominated* when another one is at least as good on every objective (mIoU no lower, latency and
size no higher) and strictly better on at least one; the front is every artifact that is not. Two artifacts
with equal values on all three both stay on it. A point missing an objective (None or NaN) is compared on the
objectives both points have; with none in common it dominates nothing and is dominated by nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# objective -> +1 to maximize, -1 to minimize; the keys of compare.py's rows
OBJECTIVES = {"miou": 1, "latency_t1": -1, "size_bytes": -1}


def _value(point: dict, key: str) -> float | None:
    value = point.get(key)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def dominates(a: dict, b: dict, objectives: dict[str, int] = OBJECTIVES) -> bool:
    """True when ``a`` is at least as good as ``b`` on every objective both have, and better on one."""
    better = False
    shared = 0
    for key, sign in objectives.items():
        x, y = _value(a, key), _value(b, key)
        if x is None or y is None:
            continue
        shared += 1
        if sign * (x - y) < 0:
            return False
        better = better or sign * (x - y) > 0
    return shared > 0 and better


def pareto_front(points: Sequence[dict], objectives: dict[str, int] = OBJECTIVES) -> list[bool]:
    """For each point, whether it is on the front (no other point dominates it)."""
    return [not any(dominates(other, point, objectives) for j, other in enumerate(points) if j != i)
            for i, point in enumerate(points)]
