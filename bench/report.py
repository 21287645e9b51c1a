"""Time `imgindex report` on a large synthetic OUT: N random 4096-d vectors in Parquet shards, k clusters, real JPEGs.

    python bench/report.py --images 100000 --clusters 100 --work /tmp/report-bench

The vectors are random (the report does not care what they mean); every path points at one of 12 generated 640x480
JPEGs, so thumbnails cost what they cost on real photos. Prints the seconds and the size of what the report wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from embedder.config import DIMENSION  # noqa: E402
from embedder.outdir import ERRORS, MANIFEST, REPORT_DIR, OutDir  # noqa: E402
from embedder.writer import embedding_schema, write_shard  # noqa: E402
from jobs.demo import sample_photos  # noqa: E402
from jobs.report import report  # noqa: E402


def synthetic_out(work: str, images: int, clusters: int, rows_per_shard: int = 4096, seed: int = 0) -> str:
    """An OUT with `images` random vectors, a clusters.csv over `clusters` clusters, some errors; returns its path."""
    rng = np.random.default_rng(seed)
    photos = sample_photos(os.path.join(work, "photos"), 12, seed=seed)
    folder = OutDir(os.path.join(work, "out"))
    ids = np.arange(images, dtype=np.int64) * 7919 + 1
    paths = np.array([photos[i % len(photos)] for i in range(images)], dtype=object)
    for start in range(0, images, rows_per_shard):
        end = min(images, start + rows_per_shard)
        xb = rng.standard_normal((end - start, DIMENSION), dtype=np.float32)
        table = pa.table(
            {"id": ids[start:end], "path": paths[start:end],
             "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.ravel()), DIMENSION),
             "fingerprint": np.zeros(end - start, dtype=np.int64), "size": np.full(end - start, -1, dtype=np.int64),
             "mtime_ns": np.full(end - start, -1, dtype=np.int64)},
            schema=embedding_schema(),
        )
        write_shard(folder, f"embeddings/part-{start // rows_per_shard:05d}.parquet", table)
    labels = rng.integers(0, clusters, images)
    table = pd.DataFrame({"id": ids, "path": paths, "cluster": labels, "distance": rng.uniform(0.1, 0.6, images)})
    folder.write_csv("clusters.csv", table.sort_values(["cluster", "distance", "id"]))
    folder.write_csv(ERRORS, pd.DataFrame({"path": [f"/data/broken-{i}.jpg" for i in range(images // 100)],
                                           "error": "not an image (unrecognised format)"}))
    folder.write_json(MANIFEST, {
        "model": "vgg16", "layer": "fc6", "dimension": DIMENSION, "metric": "cosine",
        "weights": {"name": "random", "sha256": "0" * 64, "seed": 0},
        "precision": {"requested": "auto", "used": ["fp32"]},
        "counts": {"listed": images + images // 100, "images": images, "errors": images // 100},
        "index": {"file": "index.faiss", "type": "flat", "ntotal": images},
        "clusters": {"k": clusters, "sizes": np.bincount(labels, minlength=clusters).tolist()},
    })
    return folder.location


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--clusters", type=int, default=100)
    parser.add_argument("--work", default="/tmp/imgindex-report-bench")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic OUT (1.6 GB per 100,000 images)")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    try:
        started = time.monotonic()
        out = synthetic_out(args.work, args.images, args.clusters)
        print(f"synthetic OUT: {args.images:,} images, {args.clusters} clusters in {time.monotonic() - started:.1f} s")
        started = time.monotonic()
        report(out)
        seconds = time.monotonic() - started
        folder = os.path.join(out, REPORT_DIR)
        html = os.path.getsize(os.path.join(folder, "index.html"))
        total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)
        print(json.dumps({"images": args.images, "clusters": args.clusters, "report_seconds": round(seconds, 1),
                          "html_bytes": html, "report_folder_bytes": total}))
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
