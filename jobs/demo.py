"""`imgindex demo` (what `make demo` runs): the main job on sample photos, offline, then one example query."""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np
from PIL import Image

from cluster.options import ClusterOptions
from embedder.config import JobConfig, UserError, absolute
from embedder.model import build_state_dict
from jobs.arguments import setup_logging
from jobs.query import query
from jobs.run import run

log = logging.getLogger("imgindex")

# Real photos that scikit-image ships inside its wheel (no download at run time).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
          "coins", "camera", "moon", "clock", "stereo_motorcycle", "retina")


def _photo(name: str) -> np.ndarray:
    import skimage.data

    image = getattr(skimage.data, name)()
    image = image[0] if isinstance(image, tuple) else image
    return np.stack([image] * 3, axis=-1) if image.ndim == 2 else image[..., :3]


def sample_photos(folder: str, count: int, size: tuple[int, int] = (640, 480), seed: int = 0, offset: int = 0) -> list[str]:
    """Write `count` JPEG variants (random crop, flip, brightness) of scikit-image's sample photos; return their paths.

    Image i is a variant of photo i % 12, so the collection has 12 natural groups. Deterministic for a seed.
    """
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    cache: dict[str, np.ndarray] = {}
    paths = []
    for i in range(offset, offset + count):
        name = PHOTOS[i % len(PHOTOS)]
        source = cache.setdefault(name, _photo(name))
        h, w = source.shape[:2]
        ch, cw = int(h * rng.uniform(0.6, 0.9)), int(w * rng.uniform(0.6, 0.9))
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = source[top : top + ch, left : left + cw]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop.astype(np.float32) * rng.uniform(0.85, 1.15), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"{name}-{i:04d}.jpg")
        Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR).save(path, quality=90)
        paths.append(path)
    return paths


def _choose_weights() -> tuple[str, str | None]:
    """ImageNet weights when cached or downloadable; else random ones, said in one line and noted in the manifest."""
    try:
        build_state_dict("imagenet", 0)
        return "imagenet", None
    except UserError as e:
        note = "ImageNet weights unavailable (offline), so the demo used seeded random weights: groups follow colour and layout, not meaning"
        log.warning("%s. (%s)", note, str(e).split(":")[0])
        return "random", note


def demo(out: str, data: str, clusters: int, count: int = 36) -> None:
    """Write sample photos (and one broken file) to `data`, run the main job into `out`, print one query's answers."""
    data, out = absolute(data), absolute(out)
    sample_photos(os.path.join(data, "images"), count)
    with open(os.path.join(data, "images", "broken.jpg"), "wb") as f:
        f.write(b"this is not a JPEG")
    query_image = sample_photos(os.path.join(data, "queries"), 1, seed=1)[0]
    weights, note = _choose_weights()
    config = JobConfig(inputs=(os.path.join(data, "images"),), out=out, weights=weights).validate()
    run(config, ClusterOptions((clusters,)), weights_note=note)
    print(f"\nresults in {out}: manifest.json, embeddings/*.parquet, index.faiss, clusters.csv, errors.csv, run.log")
    print(f"report: {out}/report/index.html (open it in a browser)")
    print(f"example: imgindex query {out} {query_image} -k 5\n")
    query(out, [query_image], k=5)


def main(args: argparse.Namespace) -> int:
    """`imgindex demo` from its parsed command line."""
    setup_logging(args.out, args.verbose)
    demo(args.out, args.data, args.clusters)
    return 0
