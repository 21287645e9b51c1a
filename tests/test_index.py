"""Index and k-means: FAISS against brute force, plain faiss.read_index, NMI on labelled synthetic vectors."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score

from cluster.index import INDEX_FILE, new_index, prepare, save_index, to_distance
from cluster.kmeans import assign, train_kmeans
from embedder.config import UserError
from embedder.writer import OutDir


def brute_force(xb: np.ndarray, xq: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "cosine":
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
        distance = 1.0 - xq @ xb.T
    else:
        distance = np.sqrt(((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1))
    order = np.argsort(distance, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distance, order, axis=1), order


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_equals_brute_force(metric):
    rng = np.random.default_rng(0)
    xb = np.maximum(rng.standard_normal((500, 64)), 0).astype(np.float32) + 0.01
    xq = np.maximum(rng.standard_normal((20, 64)), 0).astype(np.float32) + 0.01
    ids = rng.choice(2**62, size=500, replace=False).astype(np.int64)
    index = new_index(64, metric)
    index.add_with_ids(prepare(xb, metric), ids)
    D, I = index.search(prepare(xq, metric), 10)
    expected_d, expected_rows = brute_force(xb.astype(np.float64), xq.astype(np.float64), 10, metric)
    assert np.array_equal(I, ids[expected_rows])
    np.testing.assert_allclose(to_distance(D, metric), expected_d, atol=1e-4)


def test_saved_index_loads_with_plain_faiss(tmp_path):
    rng = np.random.default_rng(1)
    xb = rng.standard_normal((50, 16)).astype(np.float32)
    ids = np.arange(1000, 1050, dtype=np.int64)
    index = new_index(16, "l2")
    index.add_with_ids(xb, ids)
    save_index(OutDir(str(tmp_path)), index)
    loaded = faiss.read_index(str(tmp_path / INDEX_FILE))
    assert loaded.ntotal == 50
    _, I = loaded.search(xb[:5], 1)
    assert I[:, 0].tolist() == ids[:5].tolist()


def labelled_vectors(n: int = 2000, k: int = 8, d: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 3
    labels = rng.integers(0, k, n)
    xb = np.maximum(centres[labels] + rng.standard_normal((n, d)), 0) + 0.05
    return xb.astype(np.float32), labels


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_kmeans_recovers_labelled_clusters(metric):
    xb, labels = labelled_vectors()
    centroids = train_kmeans(xb, 8, niter=20, seed=0, metric=metric)
    assigned, distances = assign(xb, centroids, metric)
    assert normalized_mutual_info_score(labels, assigned) >= 0.95
    # The distance reported is the distance to the assigned centroid, by the job's metric.
    expected, _ = brute_force(centroids.astype(np.float64), xb.astype(np.float64), 1, metric)
    np.testing.assert_allclose(distances, expected[:, 0], atol=1e-4)


def test_more_clusters_than_vectors_is_a_user_error():
    xb, _ = labelled_vectors(n=5)
    with pytest.raises(UserError, match="--clusters 6 is more than the 5"):
        train_kmeans(xb, 6, niter=5, seed=0, metric="l2")
