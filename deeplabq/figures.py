"""Result figures as PNG files: per-class IoU, confusion matrix, prediction overlays, mIoU-vs-cost trade-off.

Pure functions of plain numpy arrays and dicts; each writes one PNG. They draw on ``matplotlib.figure.Figure``
objects with their own Agg canvas, never through pyplot, so the caller's matplotlib backend and pyplot state
are left alone (and nothing needs a display).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

IGNORE_COLOUR = (0, 0, 0)
MAX_OVERLAY_ROWS = 4
MAX_ANNOTATED_CLASSES = 21


def label_palette(num_classes: int) -> np.ndarray:
    """A fixed categorical colour per class, (num_classes, 3) uint8; never black (black marks ignored pixels).

    Up to 20 classes: matplotlib's tab20 (its 10 strong colours first, then their light partners). More: the
    PASCAL VOC bit-interleaved palette of ids 1..num_classes, which gives every id a different colour.
    """
    if num_classes <= 20:
        tab20 = np.asarray(matplotlib.colormaps["tab20"].colors)
        order = [*range(0, 20, 2), *range(1, 20, 2)]
        return np.round(255 * tab20[order[:num_classes]]).astype(np.uint8)
    palette = np.zeros((num_classes, 3), np.uint8)
    for index in range(num_classes):
        value, colour = index + 1, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << (7 - bit)
            value >>= 3
        palette[index] = colour
    return palette


def colorize(labels: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
    """HxW class ids -> HxWx3 uint8 colours from :func:`label_palette`; ``ignore_label`` (and any id that is
    not a class) is black."""
    labels = np.asarray(labels).astype(np.int64)
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_label)
    out = np.zeros((*labels.shape, 3), np.uint8)
    out[...] = IGNORE_COLOUR
    out[valid] = label_palette(num_classes)[labels[valid]]
    return out


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110)
    return path


def per_class_iou_figure(ious: dict[str, dict[str, float]], class_names: list[str], path,
                         title: str = "Per-class IoU") -> Path:
    """Horizontal grouped bars: one group per class, one bar per artifact (``{artifact: {class: IoU %}}``).
    A class an artifact has no IoU for (missing or NaN) is a gap marked n/a; the legend gives each artifact's
    mean over the classes it has (as ``ConfusionMatrix.miou`` leaves out classes never seen)."""
    artifacts = list(ious)
    values = np.array([[ious[a].get(name, np.nan) for name in class_names] for a in artifacts], float)
    height = 0.8 / max(len(artifacts), 1)
    fig = Figure(figsize=(10, min(1.5 + len(class_names) * (0.1 + 0.1 * len(artifacts)), 60)), layout="constrained")
    ax = fig.add_subplot()
    rows = np.arange(len(class_names))
    for k, (artifact, row) in enumerate(zip(artifacts, values, strict=True)):
        present = ~np.isnan(row)
        mean = f"mean {np.mean(row[present]):.1f}" if present.any() else "no classes"
        if 0 < present.sum() < len(row):
            mean += f" of {present.sum()}/{len(row)} classes"
        y = rows - 0.4 + height * (k + 0.5)
        ax.barh(y, np.nan_to_num(row), height, label=f"{artifact} ({mean})",
                color=matplotlib.colormaps["tab10"](k % 10))
        for gap in y[~present]:
            ax.text(0.5, gap, "n/a", va="center", fontsize=6, color="grey")
    ax.set_yticks(rows, class_names)
    ax.set_ylim(len(class_names) - 0.5, -0.5)  # first class at the top
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def normalize_rows(matrix: np.ndarray) -> np.ndarray:
    """Confusion matrix rows (true classes) as percentages of the row; NaN for a class with no pixels."""
    matrix = np.asarray(matrix, np.float64)
    totals = matrix.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(totals > 0, 100 * matrix / totals, np.nan)


def confusion_matrix_figure(matrix: np.ndarray, class_names: list[str], path,
                            title: str = "Confusion matrix (% of each true class)") -> np.ndarray:
    """Heat map of the row-normalised matrix (rows: true class, columns: predicted); a class with no pixels
    is a blank row. Percentages are written in the cells for up to 21 classes. Returns the drawn percentages."""
    percent = normalize_rows(matrix)
    n = len(class_names)
    side = min(max(4.0, 0.45 * n + 2), 24.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(percent, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, label="% of true class", shrink=0.8)
    ticks = np.arange(n)
    fontsize = 8 if n <= 30 else 5
    ax.set_xticks(ticks, class_names, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, class_names, fontsize=fontsize)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= MAX_ANNOTATED_CLASSES:
        for (i, j), value in np.ndenumerate(percent):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=7,
                        color="white" if value > 60 else "black")
    ax.set_title(title)
    _save(fig, path)
    return percent


def overlay_figure(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray]], num_classes: int,
                   ignore_label: int, path, title: str = "Image | ground truth | prediction") -> Path:
    """One row per (image, label, prediction) sample, at most 4: the image (HxWx3, 0..255) and both label maps
    drawn with :func:`label_palette`, ignored pixels black."""
    samples = list(samples)[:MAX_OVERLAY_ROWS]
    if not samples:
        raise ValueError("overlay_figure needs at least one (image, label, prediction) sample")
    height, width = np.asarray(samples[0][0]).shape[:2]
    panel = 3.0
    fig = Figure(figsize=(3 * panel, len(samples) * panel * height / width + 0.6), layout="constrained")
    axes = fig.subplots(len(samples), 3, squeeze=False)
    for row, (image, label, prediction) in zip(axes, samples, strict=True):
        pictures = (np.clip(np.asarray(image, np.float64), 0, 255).astype(np.uint8),
                    colorize(label, num_classes, ignore_label), colorize(prediction, num_classes, ignore_label))
        for ax, picture in zip(row, pictures, strict=True):
            ax.imshow(picture, interpolation="nearest")
            ax.set_axis_off()
    for ax, heading in zip(axes[0], ("image", "ground truth", "prediction"), strict=True):
        ax.set_title(heading, fontsize=9)
    fig.suptitle(title)
    return _save(fig, path)


def _finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def tradeoff_figure(points: list[dict], path, title: str = "mIoU against latency and size") -> Path:
    """Two panels: mIoU (%) against latency (ms, left) and against size (KB, right), one labelled point per
    artifact (``name``, ``miou`` in %, ``latency_ms``, ``size_bytes``, optional ``baseline`` and ``pareto``). A
    baseline is a star with a dashed line at its mIoU; a point on the Pareto front (``pareto``: no other point
    beats it on all of mIoU, latency and size) has a red ring. A point without a finite latency (or size) is left
    off that panel. Points of the same name share a colour."""
    names = list(dict.fromkeys(p["name"] for p in points))
    colours = {name: matplotlib.colormaps["tab10"](k % 10) for k, name in enumerate(names)}
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = ((axes[0], "latency_ms", "latency (ms)", 1.0), (axes[1], "size_bytes", "size (KB)", 1 / 1024))
    for ax, key, label, scale in panels:
        drawn = [p for p in points if _finite(p.get(key)) and _finite(p.get("miou"))]
        for p in drawn:
            x, y = float(p[key]) * scale, float(p["miou"])
            baseline = bool(p.get("baseline", False))
            front = bool(p.get("pareto", False))
            ax.scatter(x, y, s=150 if baseline else 45, marker="*" if baseline else "o", color=colours[p["name"]],
                       edgecolors="red" if front else "black", linewidths=2 if front else 0.5, zorder=3)
            ax.annotate(p["name"], (x, y), fontsize=8, xytext=(5, 4), textcoords="offset points")
            if baseline:
                ax.axhline(y, color=colours[p["name"]], linestyle="--", linewidth=1,
                           label=f"{p['name']} baseline ({y:.1f})")
        if not drawn:
            ax.text(0.5, 0.5, f"no point has a {label.split(' ')[0]}", transform=ax.transAxes,
                    ha="center", va="center", color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
        if any(p.get("pareto") for p in drawn):
            ax.scatter([], [], s=45, facecolors="none", edgecolors="red", linewidths=2,
                       label="Pareto front (mIoU, latency, size)")
        if any(p.get("baseline") or p.get("pareto") for p in drawn):
            ax.legend(fontsize=8, loc="lower right")
        ax.set_xlabel(label)
        ax.set_ylabel("mIoU (%)")
        ax.margins(0.15)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def accuracy_control_figure(rows: list[dict], baseline: float, max_drop: float, path,
                            title: str = "int8 accuracy control") -> Path:
    """The accuracy-controlled int8 search's curve: mIoU (%) against the number of layers kept in float (left,
    with the float baseline and the budget), and 1-thread latency (ms) with the float file's beside it (right,
    each point labelled with its XNNPACK partitions). ``rows``: ``float_layers``, ``miou``, ``latency_ms``,
    ``float_latency_ms``, ``xnnpack_partitions``."""
    rows = sorted(rows, key=lambda row: row["float_layers"])
    x = [row["float_layers"] for row in rows]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(x, [row["miou"] for row in rows], "o-", label="int8")
    left.axhline(baseline, color="black", linestyle="--", linewidth=1, label=f"float ({baseline:.2f})")
    left.axhline(baseline - max_drop, color="red", linestyle=":", linewidth=1, label=f"budget (-{max_drop})")
    left.set_ylabel("mIoU (%)")
    right.plot(x, [row["latency_ms"] for row in rows], "o-", label="int8")
    right.plot(x, [row["float_latency_ms"] for row in rows], "s--", color="black", label="float (same runs)")
    for row in rows:
        right.annotate(f"{row['xnnpack_partitions']}p", (row["float_layers"], row["latency_ms"]), fontsize=7,
                       xytext=(3, 3), textcoords="offset points")
    right.set_ylabel("latency, 1 thread (ms)")
    for ax in (left, right):
        ax.set_xlabel("worst layers kept in float")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)
