"""K-means: k-means++ seeds and FAISS k-means on a sample, then a full Lloyd pass over every vector, streamed.

FAISS seeds Lloyd's iterations with random points and trains on at most `max_points_per_centroid` x k vectors; with
its defaults it lands well above scikit-learn's objective on the benchmark's data (docs/benchmarks.md, "k-means"). Greedy k-means++ seeding (as
scikit-learn does) on the sample, then a Lloyd pass over the whole collection (FAISS for the assignment, per-cluster
sums as one sparse assignment-matrix product per batch) close the gap at a fraction of the cost. The seeding picks
its points by distances in the sample's top principal subspace (SEED_DIM dimensions): on 4096-d vectors the full
distances made the seeding memory-bound and several times slower, for the same objective after training. For cosine the
vectors are L2-normalised and the centroids kept on the unit sphere (spherical k-means). The passes over every vector
(Lloyd's, the final assignment) go part by part through `Vectors.map`: as Ray tasks over groups of shards with
`cluster.distributed.TaskVectors`, each returning per-cluster sums and counts or its vectors' clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import scipy.sparse

from cluster.index import Transform, gpu_available, on_gpu, prepare, to_distance
from cluster.vectors import ArrayVectors, Vectors
from embedder.config import UserError

MAX_POINTS_PER_CENTROID = 256
# One full pass after the sample: more passes cost a pass each and barely move the objective (docs/benchmarks.md,
# "k-means").
FULL_PASSES = 1
SILHOUETTE_SAMPLE = 2000
# Dimensions of the subspace k-means++ measures distances in: the smallest that matched seeding in the full 4096
# dimensions on bench/index.py's data, at a quarter of the time (docs/benchmarks.md, "k-means").
SEED_DIM = 128


def principal_coordinates(xb: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Coordinates (n, dim) of the centred rows of `xb` in their top-`dim` principal subspace.

    A randomised range finder with one power iteration (Halko, Martinsson & Tropp 2011): five products of `xb` with a
    thin matrix instead of a d x d covariance (docs/benchmarks.md, "k-means", gives its time)."""
    centred = xb - xb.mean(axis=0)
    probe = np.random.default_rng(seed).standard_normal((xb.shape[1], dim)).astype(np.float32)
    basis = np.linalg.qr(centred @ probe)[0]
    basis = np.linalg.qr(centred @ (centred.T @ basis))[0]
    directions = np.linalg.svd(basis.T @ centred, full_matrices=False)[2]
    return (centred @ directions.T).astype(np.float32)


def kmeans_plus_plus(xb: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Greedy k-means++ seeds (rows of `xb`): each new centre is the best of 2 + log(k) candidates drawn by squared
    distance, distances measured in the top SEED_DIM principal dimensions when `xb` has more."""
    rng = np.random.default_rng(seed)
    dim = min(SEED_DIM, len(xb))
    space = principal_coordinates(xb, dim, seed) if xb.shape[1] > dim else xb
    norms = np.einsum("ij,ij->i", space, space)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(len(space))
    first = space[chosen[0]]
    closest = np.maximum(norms - 2 * space @ first + first @ first, 0)
    trials = 2 + int(np.log(k))
    for c in range(1, k):
        total = closest.sum()
        if total <= 0:
            chosen[c:] = rng.integers(len(space), size=k - c)
            break
        candidates = rng.choice(len(space), size=trials, p=closest / total)
        cand = space[candidates]
        distance = np.maximum(norms[:, None] - 2 * space @ cand.T + np.einsum("ij,ij->i", cand, cand)[None, :], 0)
        merged = np.minimum(closest[:, None], distance)
        best = int(np.argmin(merged.sum(axis=0)))
        chosen[c] = candidates[best]
        closest = merged[:, best]
    return xb[chosen].astype(np.float32)


def centroid_index(centroids: np.ndarray, metric: str) -> faiss.Index:
    """Exact index over the centroids by the job's metric (on the GPU when there is one)."""
    d = centroids.shape[1]
    index = faiss.IndexFlatIP(d) if metric == "cosine" else faiss.IndexFlatL2(d)
    index.add(prepare(centroids, metric))
    return on_gpu(index)


def _as_vectors(xb: np.ndarray | Vectors) -> Vectors:
    return xb if isinstance(xb, Vectors) else ArrayVectors(xb)


def _lloyd_sums(part: Vectors, centroids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (float64) and counts of the vectors of `part`, each assigned to its nearest centroid."""
    index = centroid_index(centroids, metric)
    k = len(centroids)
    sums = np.zeros(centroids.shape, dtype=np.float64)
    counts = np.zeros(k, dtype=np.int64)
    for _ids, xb in part.batches():
        x = prepare(xb, metric)
        labels = index.search(x, 1)[1][:, 0]
        members = scipy.sparse.csr_matrix((np.ones(len(x), dtype=np.float32), (labels, np.arange(len(x)))), shape=(k, len(x)))
        sums += members @ x
        counts += np.bincount(labels, minlength=k)
    return sums, counts


def lloyd_pass(source: Vectors, centroids: np.ndarray, metric: str) -> np.ndarray:
    """One Lloyd iteration over every vector of `source`: assign to the nearest centroid, move each to its mean.

    The sums and counts come part by part (`Vectors.map`: Ray tasks for `cluster.distributed.TaskVectors`) and are
    added here. An empty cluster keeps its centroid; for cosine the means are projected back onto the unit sphere."""
    sums = np.zeros(centroids.shape, dtype=np.float64)
    counts = np.zeros(len(centroids), dtype=np.int64)
    for part_sums, part_counts in source.map(_lloyd_sums, centroids, metric):
        sums += part_sums
        counts += part_counts
    moved = centroids.astype(np.float64)
    filled = counts > 0
    moved[filled] = sums[filled] / counts[filled, None]
    return prepare(moved, metric)


def train_kmeans(xb: np.ndarray | Vectors, k: int, niter: int, seed: int = 0, metric: str = "l2", full_passes: int = FULL_PASSES) -> np.ndarray:
    """Centroids (k, d): k-means++ on a sample of MAX_POINTS_PER_CENTROID x k vectors, FAISS k-means (`niter`
    iterations) on that sample, then `full_passes` Lloyd passes over the whole collection, streamed.

    Parameters
    ----------
    xb
        The vectors: an (n, d) array or a `Vectors` stream (OUT's shards), never loaded whole.
    k
        Number of clusters (at most n).
    niter
        FAISS k-means iterations on the sample.
    seed
        Seed of the sample, the k-means++ draws and FAISS.
    metric
        cosine (spherical k-means on normalised vectors; centroids of unit length) or l2.
    full_passes
        Lloyd passes over every vector after the sample (none when the sample is the whole collection).
    """
    source = _as_vectors(xb)
    n = source.count
    if k > n:
        raise UserError(f"--clusters {k} is more than the {n} embedded images; pass --clusters {n} or fewer")
    rng = np.random.default_rng(seed)
    positions = np.sort(rng.choice(n, size=min(n, MAX_POINTS_PER_CENTROID * k), replace=False))
    sample = source.take(positions, Transform(metric))[1]
    kmeans = faiss.Kmeans(
        source.dimension, k, niter=niter, seed=seed, spherical=metric == "cosine", gpu=gpu_available(),
        # Small collections are legitimate: no warning below FAISS's default of 39 points per centroid.
        max_points_per_centroid=MAX_POINTS_PER_CENTROID, min_points_per_centroid=1, verbose=False,
    )
    kmeans.train(sample, init_centroids=kmeans_plus_plus(sample, k, seed))
    centroids = kmeans.centroids
    if len(sample) < n:
        del sample
        for _ in range(full_passes):
            centroids = lloyd_pass(source, centroids, metric)
    return centroids


def assign(xb: np.ndarray, centroids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(cluster label, distance to its centroid) for every row of `xb`, nearest centroid by the job's metric."""
    D, I = centroid_index(centroids, metric).search(prepare(xb, metric), 1)
    return I[:, 0].astype(np.int64), to_distance(D[:, 0], metric).astype(np.float32)


@dataclass
class Assignment:
    """Every vector's cluster, streamed: ids, labels, distances (by the job's metric), and the sample for silhouette."""

    ids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    objective: float  # sum of squared Euclidean distances to the centroids, in the space k-means ran in
    sample: np.ndarray
    sample_labels: np.ndarray

    def sizes(self, k: int) -> np.ndarray:
        return np.bincount(self.labels, minlength=k)


def _assign_part(part: Vectors, centroids: np.ndarray, metric: str, wanted: np.ndarray) -> tuple[np.ndarray, ...]:
    """(ids, labels, distances, objective, and the rows, ids and labels of those among `wanted`) of the vectors of
    `part`."""
    index = centroid_index(centroids, metric)
    ids, labels, distances, sample, sample_ids, sample_labels = [], [], [], [], [], []
    objective = 0.0
    for batch_ids, batch in part.batches():
        x = prepare(batch, metric)
        D, I = index.search(x, 1)
        ids.append(batch_ids)
        labels.append(I[:, 0].astype(np.int64))
        distances.append(to_distance(D[:, 0], metric).astype(np.float32))
        # Unit vectors and unit centroids: |x - c|^2 = 2 - 2 x.c
        objective += float(np.sum(np.maximum(2 - 2 * D[:, 0].astype(np.float64), 0) if metric == "cosine" else D[:, 0]))
        hit = np.flatnonzero(np.isin(batch_ids, wanted))
        sample.append(x[hit])
        sample_ids.append(batch_ids[hit])
        sample_labels.append(labels[-1][hit])
    columns = (ids, labels, distances, sample, sample_ids, sample_labels)
    return (*(np.concatenate(column) for column in columns[:3]), objective, *(np.concatenate(column) for column in columns[3:]))


def assign_all(xb: np.ndarray | Vectors, centroids: np.ndarray, metric: str, seed: int = 0, sample_size: int = SILHOUETTE_SAMPLE) -> Assignment:
    """Assign every vector of `xb` to its nearest centroid in one streaming pass (part by part, `Vectors.map`), keeping
    a seeded sample."""
    source = _as_vectors(xb)
    positions = np.random.default_rng(seed).choice(source.count, size=min(sample_size, source.count), replace=False)
    wanted = np.sort(source.sorted_ids()[positions])  # by id, as Vectors.take samples
    parts = list(source.map(_assign_part, centroids, metric, wanted))

    def column(i: int) -> np.ndarray:
        return np.concatenate([part[i] for part in parts])

    by_id = np.argsort(column(5))
    return Assignment(column(0), column(1), column(2), sum(part[3] for part in parts), column(4)[by_id], column(6)[by_id])


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette coefficient (Euclidean), as scikit-learn's `silhouette_score`; 0 for a point alone in its cluster."""
    x = x.astype(np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    distance = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0))
    np.fill_diagonal(distance, 0)
    clusters, inverse = np.unique(labels, return_inverse=True)
    if len(clusters) < 2:
        return float("nan")
    onehot = np.zeros((len(x), len(clusters)))
    onehot[np.arange(len(x)), inverse] = 1
    totals = distance @ onehot
    counts = onehot.sum(axis=0)
    own = counts[inverse]
    a = totals[np.arange(len(x)), inverse] / np.maximum(own - 1, 1)
    mean_other = totals / counts
    mean_other[np.arange(len(x)), inverse] = np.inf
    b = mean_other.min(axis=1)
    s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-30), 0.0)
    return float(s.mean())


def imbalance(sizes: np.ndarray) -> float:
    """FAISS's imbalance factor k * sum(n_i^2) / n^2: 1 when every cluster has the same size, k when one has all."""
    sizes = np.asarray(sizes, dtype=np.float64)
    return float(len(sizes) * np.sum(sizes**2) / np.sum(sizes) ** 2)
