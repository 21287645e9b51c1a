"""Index: build, save and load the FAISS index over OUT's embeddings, ids = the `id` column.

The choice of index type lives here alone (today: exact search, IndexIDMap2 over a flat index).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from embedder.writer import OutDir, iter_embeddings

log = logging.getLogger("imgindex")

INDEX_FILE = "index.faiss"


def prepare(xb: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as the index stores them: L2-normalised for cosine (so inner product = cosine), as is for l2."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if metric == "cosine":
        xb = xb.copy()
        faiss.normalize_L2(xb)
    return xb


def to_distance(D: np.ndarray, metric: str) -> np.ndarray:
    """FAISS scores -> our distance: 1 - cosine similarity for cosine, Euclidean (not squared) for l2."""
    if metric == "cosine":
        return np.clip(1.0 - D, 0.0, 2.0)
    return np.sqrt(np.maximum(D, 0.0))


def new_index(dimension: int, metric: str) -> faiss.Index:
    """An empty exact index with caller-chosen int64 ids: inner product on normalised vectors, or L2."""
    flat = faiss.IndexFlatIP(dimension) if metric == "cosine" else faiss.IndexFlatL2(dimension)
    return faiss.IndexIDMap2(flat)


def build_index(out: OutDir, dimension: int, metric: str) -> faiss.Index:
    """Stream every shard of OUT into a new index, batch by batch."""
    index = new_index(dimension, metric)
    for ids, _paths, xb in iter_embeddings(out):
        index.add_with_ids(prepare(xb, metric), ids)
    log.info("indexed %d vectors (%s, exact)", index.ntotal, metric)
    return index


def save_index(out: OutDir, index: faiss.Index) -> None:
    """Write OUT/index.faiss atomically; plain `faiss.read_index` loads it."""
    out.write_bytes(INDEX_FILE, faiss.serialize_index(index).tobytes())


def load_index(out: OutDir) -> faiss.Index:
    """Read OUT/index.faiss."""
    return faiss.deserialize_index(np.frombuffer(out.read_bytes(INDEX_FILE), dtype=np.uint8))
