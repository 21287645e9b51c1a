"""K-means: FAISS k-means over the embeddings (spherical for cosine), and assignment of every vector to a centroid."""

from __future__ import annotations

import faiss
import numpy as np

from cluster.index import prepare, to_distance
from embedder.config import UserError


def train_kmeans(xb: np.ndarray, k: int, niter: int, seed: int, metric: str) -> np.ndarray:
    """Centroids (k, d) of `xb`; for cosine the vectors are normalised and the centroids kept on the unit sphere."""
    if k > len(xb):
        raise UserError(f"--clusters {k} is more than the {len(xb)} embedded images; pass --clusters {len(xb)} or fewer")
    kmeans = faiss.Kmeans(xb.shape[1], k, niter=niter, seed=seed, spherical=metric == "cosine", verbose=False)
    kmeans.train(prepare(xb, metric))
    return kmeans.centroids


def assign(xb: np.ndarray, centroids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(cluster label, distance to its centroid) for every row of `xb`, nearest centroid by the job's metric."""
    index = faiss.IndexFlatIP(centroids.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(centroids.shape[1])
    index.add(prepare(centroids, metric))
    D, I = index.search(prepare(xb, metric), 1)
    return I[:, 0].astype(np.int64), to_distance(D[:, 0], metric).astype(np.float32)
