"""Calibration: how precise a near-duplicate threshold is on the collection itself, and the choice of `auto`.

A seeded sample of the collection's images is copied the ways duplicates arise (`CopySpec`: resized to half, JPEG
quality 50, cropped to 90 %, 10 % brighter and 10 % darker; a mirror image is not a duplicate, so none is made) and
the copies are embedded with the collection's own model and settings. Positives: each sampled image's stored vector
to each of its copies. Negatives: each sampled image's NEGATIVES nearest other images in the collection (proposed by
the index, distances exact), except those with the very same vector (the same pixels: copies already there).

Pairwise precision at a threshold t = positives within t / (positives and negatives within t); recall = positives
within t / positives. Real near-duplicates among the negatives count as false positives, so the precision is a lower
bound. `auto` picks the largest distance at which the precision is at least TARGET_PRECISION: midway between the
largest such observed distance and the next observed one.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance

from cluster.duplicates import distances
from cluster.index import prepare
from embedder.config import UserError
from embedder.reader import ImageError, decode_rgb, model_pixels, read_bytes

log = logging.getLogger("imgindex")

TARGET_PRECISION = 0.99
NEGATIVES = 10  # nearest other images of each sampled image counted as negatives
SAME_VECTOR = 1e-6  # a neighbour this near has the sampled image's pixels: a copy already in the collection


@dataclass(frozen=True)
class CopySpec:
    """How near-copies are made: `scale` of each side, JPEG `quality`, `crop` share of each side (at a seeded
    offset), `brightness` change up and down."""

    scale: float = 0.5
    quality: int = 50
    crop: float = 0.9
    brightness: float = 0.1

    def copies(self, rgb: Image.Image, rng: np.random.Generator) -> list[tuple[str, Image.Image]]:
        """The near-copies of one RGB image, each with the name of what was done to it."""
        w, h = rgb.size
        buffer = io.BytesIO()
        rgb.save(buffer, "JPEG", quality=self.quality)
        cw, ch = max(1, round(w * self.crop)), max(1, round(h * self.crop))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return [
            (f"resized to {self.scale:g}", rgb.resize((max(1, round(w * self.scale)), max(1, round(h * self.scale))), Image.Resampling.LANCZOS)),
            (f"JPEG quality {self.quality}", decode_rgb(buffer.getvalue())),
            (f"cropped to {self.crop:.0%}", rgb.crop((left, top, left + cw, top + ch))),
            (f"{self.brightness:.0%} brighter", ImageEnhance.Brightness(rgb).enhance(1 + self.brightness)),
            (f"{self.brightness:.0%} darker", ImageEnhance.Brightness(rgb).enhance(1 - self.brightness)),
        ]


@dataclass(frozen=True)
class CopyDistances:
    """Distances from sampled images' stored vectors to their near-copies: one row per readable image, one column per
    kind of copy."""

    distance: np.ndarray  # (images, kinds)
    kinds: list[str]
    unreadable: int


def copy_distances(paths: Sequence[str], originals: np.ndarray, embed: Callable[[np.ndarray], np.ndarray], metric: str,
                   spec: CopySpec = CopySpec(), seed: int = 0) -> CopyDistances:
    """Make `spec`'s near-copies of each image at `paths`, embed them with `embed` ((n, 224, 224, 3) uint8 -> (n, d),
    called once with every copy), and measure each copy's exact distance to the image's stored vector (`originals`, prepared for `metric`).
    Images that cannot be read are skipped and counted."""
    rng = np.random.default_rng(seed)
    pixels, owners, kinds, unreadable = [], [], [], 0
    for row, path in enumerate(paths):
        try:
            copies = spec.copies(decode_rgb(read_bytes(path)), rng)
        except (OSError, ImageError) as e:
            log.warning("calibration: skipping %s (%s)", path, e)
            unreadable += 1
            continue
        kinds = [name for name, _ in copies]
        pixels += [model_pixels(image) for _, image in copies]
        owners += [row] * len(copies)
    if not pixels:
        return CopyDistances(np.empty((0, 0), dtype=np.float32), kinds, unreadable)
    vectors = embed(np.stack(pixels))
    d = distances(originals[np.asarray(owners)], prepare(vectors, metric), metric)
    return CopyDistances(d.reshape(-1, len(kinds)), kinds, unreadable)


def precision_recall(positives: np.ndarray, negatives: np.ndarray, threshold: float) -> tuple[float, float]:
    """Pairwise precision and recall at `threshold` (precision 1 when nothing is within it)."""
    tp = int((positives <= threshold).sum())
    fp = int((negatives <= threshold).sum())
    return (tp / (tp + fp) if tp + fp else 1.0), (tp / len(positives) if len(positives) else 0.0)


def _curve(positives: np.ndarray, negatives: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(observed distances ascending, true positives within each, precision at each)."""
    values = np.unique(np.concatenate([positives, negatives]))
    tp = np.searchsorted(np.sort(positives), values, side="right")
    fp = np.searchsorted(np.sort(negatives), values, side="right")
    return values, tp, tp / np.maximum(tp + fp, 1)


def choose_threshold(positives: np.ndarray, negatives: np.ndarray, target: float = TARGET_PRECISION) -> float | None:
    """The largest distance whose pairwise precision is at least `target` (midway to the next observed distance);
    None when no distance that admits a positive reaches it."""
    values, tp, precision = _curve(positives, negatives)
    admissible = np.flatnonzero((tp > 0) & (precision >= target))
    if not len(admissible):
        return None
    last = admissible[-1]
    return float(values[last] if last + 1 == len(values) else (values[last] + values[last + 1]) / 2)


@dataclass(frozen=True)
class Calibration:
    """What the calibration measured at the threshold used, and what `auto` would choose."""

    threshold: float
    precision: float
    recall: float
    suggested: float | None
    images: int
    unreadable: int
    positives: int
    negatives: int
    same_vector: int
    recall_by_copy: dict[str, float]

    def record(self) -> dict:
        """The manifest's `duplicates.calibration` record."""
        return {
            "precision": round(self.precision, 4), "recall": round(self.recall, 4), "target_precision": TARGET_PRECISION,
            "suggested_threshold": self.suggested, "images": self.images, "unreadable": self.unreadable,
            "positives": self.positives, "negatives": self.negatives, "left_out_same_vector": self.same_vector,
            "recall_by_copy": {k: round(v, 4) for k, v in self.recall_by_copy.items()},
        }


def calibrate(copies: CopyDistances, negatives: np.ndarray, threshold: float | None) -> Calibration:
    """Score `threshold` (None: choose it, as `--threshold auto`) on the copies' distances (positives) and the
    sampled images' nearest neighbours' distances (negatives, including same-vector ones, which are left out)."""
    positives = copies.distance.ravel()
    if not len(positives):
        raise UserError(f"calibration: none of the {copies.unreadable} sampled images could be read; pass --threshold D")
    same = negatives <= SAME_VECTOR
    negatives = negatives[~same]
    suggested = choose_threshold(positives, negatives)
    if threshold is None and suggested is None:
        values, tp, precision = _curve(positives, negatives)
        best = int(np.argmax(np.where(tp > 0, precision, -1)))
        raise UserError(
            f"--threshold auto: no distance reaches calibration precision {TARGET_PRECISION} (best {precision[best]:.3f} "
            f"at {values[best]:.4g}); real duplicates near the sampled images count against it: pass --threshold D "
            "(with --measure to see its precision)"
        )
    used = suggested if threshold is None else threshold
    precision, recall = precision_recall(positives, negatives, used)
    by_copy = {kind: float((copies.distance[:, i] <= used).mean()) for i, kind in enumerate(copies.kinds)}
    return Calibration(used, precision, recall, suggested, len(copies.distance), copies.unreadable, len(positives),
                       len(negatives), int(same.sum()), by_copy)
