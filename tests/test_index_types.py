"""Each index type against exact (numpy) search: the tuned nprobe / efSearch reaches the target recall, is the
smallest value that does, and the easy setting (nprobe 1, efSearch 10) does not; PCA recall in both spaces; the
auto rule under --max-memory."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from cluster.index import REFINE_K_FACTORS, TRUTH_DEPTH, IndexPlan, K, Truth, build_index, estimate_bytes, plan_index, set_search_params
from cluster.vectors import ArrayVectors
from embedder.config import UserError

N, D = 4000, 48


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    """Unclustered Gaussian vectors (hard for IVF with one probe) with scattered int64 ids."""
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((N, D)).astype(np.float32)
    ids = rng.choice(2**62, size=N, replace=False).astype(np.int64)
    return xb, ids


def exact_ids(xb: np.ndarray, ids: np.ndarray, xq: np.ndarray, metric: str) -> np.ndarray:
    """Top-K ids by brute force in float64 (cosine on normalised vectors, else squared L2)."""
    xb, xq = xb.astype(np.float64), xq.astype(np.float64)
    if metric == "cosine":
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
        distance = -xq @ xb.T
    else:
        distance = (xq**2).sum(1)[:, None] - 2 * xq @ xb.T + (xb**2).sum(1)[None, :]
    order = np.argsort(distance, axis=1, kind="stable")[:, :TRUTH_DEPTH]
    return Truth(-np.take_along_axis(distance, order, 1) if metric == "cosine" else np.take_along_axis(distance, order, 1),
                 ids[order], metric)


def recall_with(index: faiss.Index, params: dict, xq: np.ndarray, truth: Truth) -> float:
    set_search_params(index, params)
    return truth.recall(index.search(np.ascontiguousarray(xq), K)[1])


CASES = [
    # (spec, metric, target, the parameter tuned)
    ("IVF32,Flat", "l2", 0.95, "nprobe"),
    ("IVF32,Flat", "cosine", 0.95, "nprobe"),
    ("IVF32,SQ8", "l2", 0.95, "nprobe"),
    ("HNSW16", "l2", 0.99, "efSearch"),
    ("IVF32,PQ12x4,RFlat", "l2", 0.95, "nprobe"),
]


@pytest.mark.parametrize("spec,metric,target,name", CASES)
def test_tuned_parameter_is_the_smallest_that_reaches_the_target(data, spec, metric, target, name):
    xb, ids = data
    built = build_index(ArrayVectors(xb, ids, batch_rows=1000), IndexPlan(spec, D, metric), target, 10**9)
    rows = np.searchsorted(np.sort(ids), built.query_ids)
    xq = xb[np.argsort(ids)][rows]
    truth = exact_ids(xb, ids, xq, metric)
    xq = xq / np.linalg.norm(xq, axis=1, keepdims=True) if metric == "cosine" else xq
    chosen = built.params[name]
    easy = 1 if name == "nprobe" else K
    assert chosen > easy
    assert recall_with(built.index, built.params, xq, truth) == pytest.approx(built.recall) and built.recall >= target
    assert recall_with(built.index, built.params | {name: chosen - 1}, xq, truth) < target
    assert recall_with(built.index, built.params | {name: easy}, xq, truth) < target
    # The index keeps its tuned parameters through a plain FAISS write and read.
    set_search_params(built.index, built.params)
    loaded = faiss.deserialize_index(faiss.serialize_index(built.index))
    assert truth.recall(loaded.search(np.ascontiguousarray(xq), K)[1]) == pytest.approx(built.recall)


def test_every_k_factor_the_tuner_may_choose_survives_a_plain_faiss_write_and_read(data):
    xb, _ = data
    index = faiss.index_factory(D, "IVF8,PQ12x4,RFlat")
    index.train(xb)
    index.add(xb)
    for k_factor in REFINE_K_FACTORS:
        set_search_params(index, {"k_factor": k_factor})
        assert faiss.downcast_index(faiss.deserialize_index(faiss.serialize_index(index))).k_factor == k_factor


def test_flat_is_exact(data):
    xb, ids = data
    built = build_index(ArrayVectors(xb, ids, batch_rows=1000), IndexPlan("Flat", D, "l2"), 0.95, 10**9)
    xq = xb[np.isin(ids, built.query_ids)]
    assert built.recall == 1.0 and built.params == {}
    assert np.array_equal(built.index.search(xq, K)[1], exact_ids(xb, ids, xq, "l2").I[:, :K])


def test_pca_recall_is_reported_in_both_spaces(data):
    xb, ids = data
    built = build_index(ArrayVectors(xb, ids, batch_rows=1000), IndexPlan("IVF32,Flat", D, "l2", pca=16), 0.95, 10**9)
    assert isinstance(built.index, faiss.IndexPreTransform) and built.index.ntotal == N
    order = np.argsort(ids)
    xq = xb[order][np.searchsorted(ids[order], built.query_ids)]
    pca = faiss.downcast_VectorTransform(built.index.chain.at(0))
    in_pca = recall_with(built.index.index, built.params, pca.apply(xq), exact_ids(pca.apply(xb), ids, pca.apply(xq), "l2"))
    full = recall_with(built.index, built.params, xq, exact_ids(xb, ids, xq, "l2"))
    assert built.recall == pytest.approx(in_pca) and built.recall >= 0.95
    # 16 of 48 isotropic dimensions keep little of the neighbourhoods: the full-space recall says so.
    assert built.recall_full == pytest.approx(full) and full < 0.5


def test_auto_follows_the_memory_budget():
    n, d = 100_000, 4096
    assert plan_index("auto", 20_000, d, "cosine", 4 << 30).spec == "Flat"
    assert plan_index("auto", n, d, "cosine", 4 << 30).spec == "IVF1024,Flat"
    assert plan_index("auto", n, d, "cosine", 1 << 30).spec == "IVF1024,SQ8"
    assert plan_index("auto", n, d, "cosine", 100 << 20).spec == "IVF1024,PQ64"
    assert plan_index("auto", 1_000_000, d, "cosine", 4 << 30, pca=256).spec == "IVF4096,Flat"
    for budget in (4 << 30, 1 << 30, 100 << 20):
        assert estimate_bytes(plan_index("auto", n, d, "cosine", budget).spec, n, d) <= budget
    with pytest.raises(UserError, match="no index over 100000 vectors"):
        plan_index("auto", n, d, "cosine", 1 << 20)
    with pytest.raises(UserError, match="more than --max-memory"):
        plan_index("flat", n, d, "cosine", 1 << 30)
    with pytest.raises(UserError, match="not a FAISS index_factory string"):
        plan_index("IVF12,Bogus", n, d, "cosine", 1 << 30)


def test_exact_search_over_duplicate_vectors_reports_full_recall():
    """Copies of one picture have equal distances, which the index and the ground truth may order differently: exact
    search still counts as 1.000 (a collection of 681 files with 468 distinct vectors read 0.980 by id overlap)."""
    rng = np.random.default_rng(3)
    distinct = rng.standard_normal((500, D)).astype(np.float32)
    xb = np.concatenate([distinct, distinct[:300], distinct[:150]])
    ids = rng.choice(2**40, size=len(xb), replace=False).astype(np.int64)
    for metric in ("cosine", "l2"):
        built = build_index(ArrayVectors(xb, ids, batch_rows=256), IndexPlan("Flat", D, metric), 0.95, 10**9)
        assert built.recall == 1.0
        xq = xb[np.argsort(ids)][np.searchsorted(np.sort(ids), built.query_ids)]
        # The same exact neighbours, with ties broken in another order (by id instead of by position).
        truth = exact_ids(xb[np.argsort(ids)], np.sort(ids), xq, metric)
        assert truth.recall(built.index.search(_prepared(xq, metric), K)[1]) == 1.0
        found = built.index.search(_prepared(xq, metric), K)[1]
        by_id_overlap = (found[:, :, None] == truth.I[:, None, :K]).any(axis=2).mean()
        assert by_id_overlap < 1.0, "the data must hold ties that id overlap misreads"


def _prepared(x: np.ndarray, metric: str) -> np.ndarray:
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x, dtype=np.float32)
