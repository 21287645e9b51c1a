"""Baseline for `imgindex embed`: one process, no Ray; a PyTorch DataLoader decodes in worker processes and the same
Embedder embeds batches. Runnable alone: `python bench/plain_dataloader.py DIR --precision bf16`.

Logs progress to stderr and prints one JSON line of figures to stdout (bench/embed.py reads it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from embedder.config import PRECISIONS
from embedder.model import Embedder, build_state_dict
from embedder.reader import CROP, ImageError, list_images, load_pixels

log = logging.getLogger("bench")


class Images(Dataset):
    """Image i of `paths` as (pixels, error); a file that does not decode gives zeros and the reason."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        try:
            return load_pixels(self.paths[i]), ""
        except ImageError as e:
            return np.zeros((CROP, CROP, 3), dtype=np.uint8), str(e) or type(e).__name__


def collate(items: list[tuple[np.ndarray, str]]) -> tuple[np.ndarray, list[str]]:
    """Stack pixels as numpy (the Embedder's input), keeping the errors beside them."""
    return np.stack([pixels for pixels, _ in items]), [error for _, error in items]


def default_workers() -> int:
    """One decode worker on a machine of two cores or fewer (the model needs the rest), else two."""
    return 1 if (os.cpu_count() or 1) <= 2 else 2


def embed_folder(inputs: list[str], precision: str, batch_size: int, workers: int, out: str | None) -> dict:
    """Embed every image under `inputs`; return the figures (counts, seconds, steady-state images/s)."""
    started = time.monotonic()
    paths = list_images(inputs)
    torch.set_num_threads(os.cpu_count() or 1)
    embedder = Embedder(build_state_dict("random", 0), "fc6", precision)
    model_ready = time.monotonic()
    log.info("model ready on %s (%s) in %.1f s; %d images, %d decode workers", embedder.device, embedder.precision,
             model_ready - started, len(paths), workers)
    loader = DataLoader(Images(paths), batch_size=batch_size, num_workers=workers, collate_fn=collate)
    vectors, failed, first_batch, first_batch_done = [], 0, 0, None
    for pixels, errors in loader:
        good = np.array([not e for e in errors], dtype=bool)
        failed += int((~good).sum())
        if good.any():
            vectors.append(embedder(pixels[good]))
        if first_batch_done is None:
            first_batch, first_batch_done = len(errors), time.monotonic()
    finished = time.monotonic()
    embedded = sum(len(v) for v in vectors)
    if out:
        np.save(out, np.concatenate(vectors) if vectors else np.zeros((0, 4096), dtype=np.float32))
    rest = len(paths) - first_batch
    steady = rest / (finished - first_batch_done) if first_batch_done is not None and rest and finished > first_batch_done else None
    figures = {
        "images": len(paths),
        "embedded": embedded,
        "errors": failed,
        "precision": embedder.precision,
        "device": str(embedder.device),
        "workers": workers,
        "batch_size": batch_size,
        "seconds_in_process": round(finished - started, 3),
        "seconds_embedding": round(finished - model_ready, 3),
        "steady_images_per_s": round(steady, 3) if steady else None,
    }
    log.info("embedded %d images (%d failed) in %.1f s after the model was ready", embedded, failed, finished - model_ready)
    return figures


def main() -> None:
    """Parse the command line, embed, print the figures as one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image folders, globs or files")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=default_workers(), help="DataLoader worker processes")
    parser.add_argument("--out", help="save the vectors here as .npy (as the pipeline saves its shards)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="plain_dataloader: %(message)s")
    print(json.dumps(embed_folder(args.inputs, args.precision, args.batch_size, args.workers, args.out)))


if __name__ == "__main__":
    main()
