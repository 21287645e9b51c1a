"""`imgindex cluster OUT --clusters K` / `python -m jobs.cluster`: k-means -> OUT/clusters.csv, OUT/centroids.npy."""

from __future__ import annotations

import io
import logging
import sys

import numpy as np
import pandas as pd

from cluster.kmeans import assign, train_kmeans
from cluster.search import CLUSTERS_FILE, open_out
from embedder.config import UserError
from embedder.pipeline import now_iso
from embedder.writer import MANIFEST, iter_embeddings

log = logging.getLogger("imgindex")

CENTROIDS_FILE = "centroids.npy"


def cluster(out: str, clusters: int, niter: int = 20, seed: int = 0) -> pd.DataFrame:
    """Group OUT's images with FAISS k-means and write the image -> cluster table.

    Parameters
    ----------
    out
        Output folder holding embeddings (local path or URI).
    clusters
        k, the number of clusters.
    niter
        k-means iterations.
    seed
        k-means seed; the same seed on the same embeddings gives the same clusters.

    Returns
    -------
    The table written to OUT/clusters.csv: id, path, cluster, distance (to the cluster's centroid).
    """
    folder = open_out(out)
    manifest = folder.read_json(MANIFEST)
    metric = manifest["metric"]
    parts = list(iter_embeddings(folder))
    if not parts:
        raise UserError(f"{out}: no embeddings to cluster (see {out}/errors.csv)")
    ids = np.concatenate([p[0] for p in parts])
    paths = np.concatenate([p[1] for p in parts])
    xb = np.concatenate([p[2] for p in parts])
    centroids = train_kmeans(xb, clusters, niter, seed, metric)
    labels, distances = assign(xb, centroids, metric)
    table = (
        pd.DataFrame({"id": ids, "path": paths, "cluster": labels, "distance": distances})
        .sort_values(["cluster", "distance", "id"])
        .reset_index(drop=True)
    )
    folder.write_csv(CLUSTERS_FILE, table)
    buffer = io.BytesIO()
    np.save(buffer, centroids)
    folder.write_bytes(CENTROIDS_FILE, buffer.getvalue())
    sizes = np.bincount(labels, minlength=clusters)
    manifest.update(
        clusters={"k": clusters, "niter": niter, "seed": seed, "sizes": sizes.tolist(), "mean_distance": float(distances.mean())},
        updated=now_iso(),
    )
    folder.write_json(MANIFEST, manifest)
    log.info("cluster sizes: %s", ", ".join(f"{c}: {n}" for c, n in enumerate(sizes)))
    log.info("wrote %s/%s", folder.location, CLUSTERS_FILE)
    return table


if __name__ == "__main__":
    from jobs.cli import entry

    entry(["cluster", *sys.argv[1:]])
