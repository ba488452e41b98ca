"""predict.py's job: label maps of a folder (or file, or glob) of images with any model source.

Not an MLflow run: it only reads the model (and the source run's config) and writes PNGs to ``output_dir``.
"""

from __future__ import annotations

import glob
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from deeplabq import data as data_lib
from deeplabq import sources, tracking
from deeplabq.console import progress
from deeplabq.errors import ConfigError, InputNotFoundError, UserError
from deeplabq.figures import colorize, label_palette
from deeplabq.segmenter import Segmenter

OVERLAY_ALPHA = 0.5


def find_images(spec: str) -> list[Path]:
    """An image file, a folder (its image files, not recursive) or a glob, sorted."""
    path = Path(spec)
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in data_lib.IMAGE_SUFFIXES]
    elif path.is_file():
        found = [path]
    else:
        found = [Path(p) for p in glob.glob(spec) if Path(p).is_file()]
    if not found:
        raise InputNotFoundError(f"input={spec}: no image file there (a file, a folder of images or a glob)")
    return sorted(found)


def read_image(path: Path) -> np.ndarray | None:
    """RGB pixels of an image file, or None when it does not decode."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception:  # noqa: BLE001  (PIL raises many kinds for a bad file; each is reported by the caller)
        return None


def label_png(labels: np.ndarray, num_classes: int) -> Image.Image:
    """A palette PNG whose indices are the class ids (readable back as ids, shown in colour)."""
    png = Image.fromarray(labels.astype(np.uint8), mode="P")
    palette = np.zeros((256, 3), np.uint8)
    palette[:num_classes] = label_palette(num_classes)[:256]
    png.putpalette(palette.reshape(-1).tolist())
    return png


def outputs_of(images: list[Path], output_dir: Path, overlay: bool) -> dict[Path, list[Path]]:
    """The files each image gives: ``<stem>.png`` and, with overlays, ``<stem>_overlay.png``."""
    stems = {}
    for image in images:
        if image.stem in stems:
            raise ConfigError(f"input: {stems[image.stem]} and {image} would both write {image.stem}.png")
        stems[image.stem] = image
    return {image: [output_dir / f"{image.stem}.png"] + ([output_dir / f"{image.stem}_overlay.png"] if overlay
                                                          else []) for image in images}


def predict(cfg: DictConfig, output_dir) -> dict[str, float]:
    """Write one label PNG per input image (at the image's size) to ``cfg.output_dir``; a user error at the
    end when some images could not be read (each reported as it is met)."""
    output_dir = Path(cfg.output_dir)
    images = find_images(str(cfg.input))
    planned = outputs_of(images, output_dir, bool(cfg.overlay))
    if not cfg.overwrite:
        existing = next((f for files in planned.values() for f in files if f.exists()), None)
        if existing is not None:
            raise ConfigError(f"{existing} exists; set overwrite=true to replace the files in output_dir={output_dir}")
    if sources.RUN_ID.match(str(cfg.source)):
        tracking.setup_mlflow(cfg.tracking)  # a run id source is looked up in the configured store
    segmenter = Segmenter.from_source(cfg.source, cfg, tracking.command_line_overrides())
    output_dir.mkdir(parents=True, exist_ok=True)
    unreadable, started = [], time.perf_counter()
    for image_path in progress(images, desc="predict"):
        image = read_image(image_path)
        if image is None:
            print(f"cannot read image {image_path}: skipped")
            unreadable.append(image_path)
            continue
        labels = segmenter.segment(image)
        label_file, *overlay_file = planned[image_path]
        label_png(labels, segmenter.num_classes).save(label_file)
        if overlay_file:
            colours = colorize(labels, segmenter.num_classes, segmenter.ignore_label).astype(np.float32)
            blended = (1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colours
            Image.fromarray(np.round(blended).astype(np.uint8)).save(overlay_file[0])
    seconds = time.perf_counter() - started
    done = len(images) - len(unreadable)
    print(f"{done} label maps in {output_dir} ({done / max(seconds, 1e-9):.1f} images/s, {segmenter.name})")
    if unreadable:
        raise UserError(f"{len(unreadable)} of {len(images)} images could not be read (first: {unreadable[0]})")
    return {"images": float(done), "images_per_second": done / max(seconds, 1e-9)}
