"""Index: build, save and load the FAISS index over OUT's embeddings, ids = the `id` column.

The choice of index type lives here alone (today: exact search, IndexIDMap2 over a flat index).
"""

from __future__ import annotations

import logging

import faiss
import numpy as np

from embedder.config import UserError
from embedder.writer import OutDir, iter_embeddings, verify_checksum

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


def save_index(out: OutDir, index: faiss.Index) -> str:
    """Write OUT/index.faiss atomically (plain `faiss.read_index` loads it); return its sha256 for the manifest."""
    return out.write_bytes(INDEX_FILE, faiss.serialize_index(index).tobytes())


def load_index(out: OutDir, manifest: dict, cached: bool = False) -> faiss.Index:
    """Read OUT/index.faiss after checking it against the sha256 the manifest records (`cached`: see verify_checksum).

    FAISS trusts the bytes it deserialises, so the check comes first: a swapped or truncated file is refused.
    """
    data = out.read_bytes(INDEX_FILE)
    verify_checksum(out, INDEX_FILE, manifest, data, cached)
    try:
        return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    except RuntimeError as e:
        raise UserError(f"{out.location}/{INDEX_FILE} is not a FAISS index FAISS can read ({str(e).splitlines()[0]}); run `imgindex index {out.location}`") from None
