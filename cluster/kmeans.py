"""K-means: FAISS k-means over the embeddings (spherical for cosine), seeded by k-means++, and assignment to centroids.

FAISS seeds Lloyd's iterations with random points, which on real data often merges two groups and splits another;
greedy k-means++ seeding (as scikit-learn does) on a sample avoids most of that for little cost.
"""

from __future__ import annotations

import faiss
import numpy as np

from cluster.index import prepare, to_distance
from embedder.config import UserError

MAX_POINTS_PER_CENTROID = 256


def kmeans_plus_plus(xb: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeds: each new centre is the best of 2 + log(k) candidates drawn by squared distance."""
    rng = np.random.default_rng(seed)
    norms = np.einsum("ij,ij->i", xb, xb)
    centres = np.empty((k, xb.shape[1]), dtype=np.float32)
    centres[0] = xb[rng.integers(len(xb))]
    closest = np.maximum(norms - 2 * xb @ centres[0] + centres[0] @ centres[0], 0)
    trials = 2 + int(np.log(k))
    for c in range(1, k):
        total = closest.sum()
        if total <= 0:
            centres[c:] = xb[rng.integers(len(xb), size=k - c)]
            break
        candidates = rng.choice(len(xb), size=trials, p=closest / total)
        cand = xb[candidates]
        distance = np.maximum(norms[:, None] - 2 * xb @ cand.T + np.einsum("ij,ij->i", cand, cand)[None, :], 0)
        merged = np.minimum(closest[:, None], distance)
        best = int(np.argmin(merged.sum(axis=0)))
        centres[c] = cand[best]
        closest = merged[:, best]
    return centres


def train_kmeans(xb: np.ndarray, k: int, niter: int, seed: int, metric: str) -> np.ndarray:
    """Centroids (k, d) of `xb`; for cosine the vectors are normalised and the centroids kept on the unit sphere."""
    if k > len(xb):
        raise UserError(f"--clusters {k} is more than the {len(xb)} embedded images; pass --clusters {len(xb)} or fewer")
    x = prepare(xb, metric)
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(len(x), size=min(len(x), MAX_POINTS_PER_CENTROID * k), replace=False)]
    kmeans = faiss.Kmeans(
        x.shape[1], k, niter=niter, seed=seed, spherical=metric == "cosine",
        # Small collections are legitimate: no warning below FAISS's default of 39 points per centroid.
        max_points_per_centroid=MAX_POINTS_PER_CENTROID, min_points_per_centroid=1, verbose=False,
    )
    kmeans.train(x, init_centroids=kmeans_plus_plus(sample, k, seed))
    return kmeans.centroids


def assign(xb: np.ndarray, centroids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(cluster label, distance to its centroid) for every row of `xb`, nearest centroid by the job's metric."""
    index = faiss.IndexFlatIP(centroids.shape[1]) if metric == "cosine" else faiss.IndexFlatL2(centroids.shape[1])
    index.add(prepare(centroids, metric))
    D, I = index.search(prepare(xb, metric), 1)
    return I[:, 0].astype(np.int64), to_distance(D[:, 0], metric).astype(np.float32)
