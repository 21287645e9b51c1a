"""Duplicates: near-duplicate groups held together around a keeper, and every image's distance to its k-th nearest
other image (outliers), found through the collection's FAISS index, decided on exact distances.

The index only proposes. One streaming pass over the collection writes every vector (as the index compares them:
L2-normalised for cosine) to a local scratch file and asks the index for each vector's nearest images; every distance
used afterwards is recomputed from that copy of the stored vectors, so a PCA or PQ index changes which pairs are seen,
never a distance. Where all of an image's proposed neighbours are within the threshold, the index is asked again for
WIDEN times as many (up to MAX_NEIGHBOURS), so a large group is found whole. Nothing is ever all-pairs: memory is the
index, the pairs (a few per image) and one block of rows (BLOCK_BYTES); the scratch file takes N x d x 4 bytes of
local disk and is read back in sequence, never a row at a time at random (see pair_distances). The search is most
of the time, and over a Flat index it is every image against all (docs/benchmarks.md, "Near-duplicates").

Groups are held around keepers, not chained: images are walked best-first by the keep rule; each image not yet claimed
becomes a keeper and claims the unclaimed images within the threshold of it, so no member is farther than the
threshold from its keeper, and an image within the threshold of two keepers belongs to the one first in keep order.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import faiss
import numpy as np

from cluster.index import prepare
from cluster.vectors import Vectors

log = logging.getLogger("imgindex")

NEIGHBOURS = 8  # nearest images asked per image (itself included) before widening
WIDEN = 4
MAX_NEIGHBOURS = 1024
PAIR_CHUNK = 4096  # pairs whose exact distance is computed at a time: 2 x 4096 rows of 16 KB at d = 4096
BLOCK_BYTES = 1 << 30  # rows held at once while exact distances are computed (pair_distances)
SCAN_ROWS = 4096  # rows read at a time after the held block
DENSE = 8  # rows needed at least 1 in DENSE of a span: the span is read whole, in sequence


class RowStore:
    """The collection's vectors in stream order, float32 rows in a local scratch file at `path` (created, and removed
    by `close`), read back by row number."""

    def __init__(self, path: str, dimension: int):
        self.path = path
        self.file = open(self.path, "x+b")
        self.dimension = dimension
        self.count = 0

    def append(self, x: np.ndarray) -> None:
        """Add rows (n, d) after the ones already stored."""
        self.file.write(memoryview(np.ascontiguousarray(x, dtype=np.float32)).cast("B"))
        self.count += len(x)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        """The rows at `positions` (any order, repeats allowed), read with one pread per run of consecutive rows.

        Explicit reads, not a memory map: the pages read stay in the OS cache and out of this process's resident set
        (a map would count whole page-cache folios, megabytes per row read, while it is mapped)."""
        self.file.flush()
        positions = np.asarray(positions, dtype=np.int64)
        unique, inverse = np.unique(positions, return_inverse=True)
        out = np.empty((len(unique), self.dimension), dtype=np.float32)
        buffer = memoryview(out).cast("B")
        row_bytes = 4 * self.dimension
        starts = np.concatenate([[0], np.flatnonzero(np.diff(unique) != 1) + 1, [len(unique)]])
        for lo, hi, first in zip(starts[:-1].tolist(), starts[1:].tolist(), unique[starts[:-1]].tolist()):
            done, size = 0, (hi - lo) * row_bytes
            while done < size:
                got = os.preadv(self.file.fileno(), [buffer[lo * row_bytes + done : hi * row_bytes]], first * row_bytes + done)
                if got <= 0:
                    raise OSError(f"scratch file {self.path} ended early")
                done += got
        return out if np.array_equal(unique, positions) else out[inverse]

    def close(self) -> None:
        self.file.close()
        os.remove(self.path)


def distances(a: np.ndarray, b: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise exact distance of prepared vectors: 1 - cosine (a, b L2-normalised) or Euclidean."""
    if metric == "cosine":
        return np.clip(1.0 - np.einsum("ij,ij->i", a, b), 0.0, 2.0).astype(np.float32)
    diff = a - b
    return np.sqrt(np.einsum("ij,ij->i", diff, diff)).astype(np.float32)


def runs_of(keys: np.ndarray) -> list[slice]:
    """The runs of equal values of a sorted array, as slices."""
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(keys)) + 1, [len(keys)]])
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _held(store: RowStore, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored rows at sorted unique `positions`: (rows, positions, slot of each position in rows). Where they are
    dense (at least 1 in DENSE of their span) the whole span is read in one go, else the rows themselves."""
    start, stop = int(positions[0]), int(positions[-1]) + 1
    if len(positions) * DENSE >= stop - start:
        return store.rows(np.arange(start, stop)), positions, positions - start
    return store.rows(positions), positions, np.arange(len(positions))


def _lookup(held: tuple[np.ndarray, np.ndarray, np.ndarray], rows: np.ndarray) -> np.ndarray:
    """The vectors of `rows` (all among the held positions) from `_held`'s answer."""
    vectors, positions, slots = held
    return vectors[slots[np.searchsorted(positions, rows)]]


def pair_distances(store: RowStore, src: np.ndarray, dst: np.ndarray, metric: str) -> np.ndarray:
    """Exact distances of the pairs (src[i], dst[i]) of stored rows, the scratch file read in sequence.

    The pairs are taken by the block of BLOCK_BYTES rows their smaller row is in: the rows of the block they need are
    held, then their larger rows are read SCAN_ROWS rows at a time, in row order, PAIR_CHUNK pairs computed at a time.
    Read one by one, a pair's rows would cost a random disk read each wherever the scratch file outgrows the page cache
    (N x 16 KB: 16 GB at a million images); in sequence the reads run at the disk's full speed."""
    out = np.empty(len(src), dtype=np.float32)
    if not len(src):
        return out
    low, high = np.minimum(src, dst), np.maximum(src, dst)
    block_rows = max(1, BLOCK_BYTES // (4 * store.dimension))
    order = np.lexsort((high, low // block_rows))
    for block in runs_of(low[order] // block_rows):
        pairs = order[block]
        held = _held(store, np.unique(low[pairs]))
        for scan in runs_of(high[pairs] // SCAN_ROWS):
            inner = pairs[scan]
            partners = _held(store, np.unique(high[inner]))
            for lo in range(0, len(inner), PAIR_CHUNK):
                chunk = inner[lo : lo + PAIR_CHUNK]
                out[chunk] = distances(_lookup(held, low[chunk]), _lookup(partners, high[chunk]), metric)
    return out


@dataclass
class Proposals:
    """Each image's nearest other images as the index proposed them, as flat pairs of row numbers sorted by `src`,
    with exact distances; `asked[row]` is how many neighbours the index was asked for on that row."""

    ids: np.ndarray  # (N,) int64 id of each row
    src: np.ndarray
    dst: np.ndarray
    distance: np.ndarray
    asked: np.ndarray

    def __post_init__(self):
        self._order = np.argsort(self.ids, kind="stable")

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Row numbers of ids (-1 for ids not in the collection, or FAISS's -1 for no result)."""
        if not len(self.ids):
            return np.full(np.shape(ids), -1, dtype=np.int64)
        position = np.clip(np.searchsorted(self.ids, ids, sorter=self._order), 0, len(self.ids) - 1)
        rows = self._order[position]
        return np.where(self.ids[rows] == ids, rows, -1)


def _to_pairs(rows: np.ndarray, I: np.ndarray, rows_of: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """FAISS result ids `I` of the stored rows `rows` as (src, dst) row pairs, self and empty results left out."""
    dst = rows_of(I.ravel()).reshape(I.shape)
    src = np.repeat(rows, I.shape[1]).reshape(I.shape)
    keep = (dst >= 0) & (dst != src)
    return src[keep], dst[keep]


def _search(index: faiss.Index, store: RowStore, rows: np.ndarray, k: int, rows_of: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The index's k nearest to each stored row of `rows`, as (src, dst) row pairs; PAIR_CHUNK rows at a time."""
    parts = [_to_pairs(rows[lo : lo + PAIR_CHUNK], index.search(store.rows(rows[lo : lo + PAIR_CHUNK]), k)[1], rows_of)
             for lo in range(0, len(rows), PAIR_CHUNK)]
    return np.concatenate([src for src, _ in parts]), np.concatenate([dst for _, dst in parts])


def _rank_in_run(src: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values of the sorted array `src`."""
    if not len(src):
        return np.empty(0, dtype=np.int64)
    first = np.concatenate([[0], np.flatnonzero(np.diff(src)) + 1])
    return np.arange(len(src)) - np.repeat(first, np.diff(np.concatenate([first, [len(src)]])))


def propose(source: Vectors, index: faiss.Index, metric: str, store: RowStore, k: int = NEIGHBOURS) -> Proposals:
    """One streaming pass: store every vector and ask the index for its k nearest (itself included); then recompute
    every proposed pair's distance exactly. The index must hold exactly the ids of `source`."""
    k = min(k, index.ntotal)
    started = time.monotonic()
    id_parts, results = [], []
    for ids, xb in source.batches():
        x = prepare(xb, metric)
        results.append((np.arange(store.count, store.count + len(x)), index.search(x, k)[1]))
        store.append(x)
        id_parts.append(np.asarray(ids, dtype=np.int64))
    empty = np.empty(0, dtype=np.int64)
    proposals = Proposals(np.concatenate(id_parts) if id_parts else empty, empty, empty, np.empty(0, np.float32), np.full(store.count, k))
    pairs = [_to_pairs(rows, I, proposals.rows_of) for rows, I in results]
    del results
    proposals.src = np.concatenate([src for src, _ in pairs]) if pairs else empty
    proposals.dst = np.concatenate([dst for _, dst in pairs]) if pairs else empty
    searched = time.monotonic()
    # A pair proposed both ways (each among the other's nearest) is computed once, in order of its smaller row.
    low, high = np.minimum(proposals.src, proposals.dst), np.maximum(proposals.src, proposals.dst)
    _, first, inverse = np.unique(low * store.count + high, return_index=True, return_inverse=True)
    proposals.distance = pair_distances(store, low[first], high[first], metric)[inverse]
    log.info("duplicates: %d images read, stored and searched (%d nearest each) in %.1f s; %d proposed pairs' exact "
             "distances in %.1f s", store.count, k, searched - started, len(proposals.src), time.monotonic() - searched)
    return proposals


def nearest_of(proposals: Proposals, index: faiss.Index, metric: str, store: RowStore, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(src, dst, exact distance) of the k nearest other images the index proposes for each stored row of `rows`,
    nearest first per row."""
    src, dst = _search(index, store, rows, min(k + 1, index.ntotal), proposals.rows_of)
    d = pair_distances(store, src, dst, metric)
    order = np.lexsort((d, src))
    src, dst, d = src[order], dst[order], d[order]
    keep = _rank_in_run(src) < k
    return src[keep], dst[keep], d[keep]


def widen(proposals: Proposals, index: faiss.Index, metric: str, store: RowStore, threshold: float) -> tuple[int, int]:
    """Ask the index for WIDEN times more neighbours of every image whose proposed neighbours are all within
    `threshold`, until each has one beyond it or MAX_NEIGHBOURS were asked; returns (images widened, images capped)."""
    n = len(proposals.ids)
    cap = min(MAX_NEIGHBOURS, index.ntotal)
    widened: set[int] = set()
    while True:
        total = np.bincount(proposals.src, minlength=n)
        near = np.bincount(proposals.src[proposals.distance <= threshold], minlength=n)
        rows = np.flatnonzero((total > 0) & (near == total) & (proposals.asked < cap))
        if not len(rows):
            break
        widened.update(rows.tolist())
        k = np.minimum(proposals.asked[rows] * WIDEN, cap)
        for value in np.unique(k):
            chosen = rows[k == value]
            src, dst = _search(index, store, chosen, int(value), proposals.rows_of)
            keep = ~np.isin(proposals.src, chosen)
            proposals.src = np.concatenate([proposals.src[keep], src])
            proposals.dst = np.concatenate([proposals.dst[keep], dst])
            proposals.distance = np.concatenate([proposals.distance[keep], pair_distances(store, src, dst, metric)])
            proposals.asked[chosen] = value
        order = np.argsort(proposals.src, kind="stable")
        proposals.src, proposals.dst, proposals.distance = proposals.src[order], proposals.dst[order], proposals.distance[order]
    total = np.bincount(proposals.src, minlength=n)
    near = np.bincount(proposals.src[proposals.distance <= threshold], minlength=n)
    capped = int(((total > 0) & (near == total) & (proposals.asked >= cap) & (cap < index.ntotal)).sum())
    return len(widened), capped


def within(proposals: Proposals, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of rows within `threshold` of each other that the index proposed in either direction, once each:
    (a, b, distance) with a < b."""
    near = proposals.distance <= threshold
    a = np.minimum(proposals.src[near], proposals.dst[near])
    b = np.maximum(proposals.src[near], proposals.dst[near])
    d = proposals.distance[near]
    if not len(a):
        return a, b, d
    _, first = np.unique(a * len(proposals.ids) + b, return_index=True)
    return a[first], b[first], d[first]


def group_around_keepers(n: int, a: np.ndarray, b: np.ndarray, d: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Groups of n rows from the pairs (a, b) within the threshold, at distance d; `rank[row]` orders rows best-first
    by the keep rule (lower is better, all distinct).

    Rows are walked best-first; a row not yet claimed becomes a keeper and claims every unclaimed row within the
    threshold of it. A row within the threshold of two keepers is claimed by the first of them in keep order, so every
    keeper comes first in its group by the keep rule. Returns keeper (n,): the keeper's row of each row in a group (a
    keeper's own row for itself), -1 for rows in no group; and distance (n,): each row's exact distance to its keeper
    (0 for keepers, NaN outside groups).
    """
    src, dst, dd = np.concatenate([a, b]), np.concatenate([b, a]), np.concatenate([d, d])
    order = np.argsort(src, kind="stable")
    src, dst, dd = src[order], dst[order], dd[order]
    start = np.searchsorted(src, np.arange(n + 1))
    keeper = np.full(n, -1, dtype=np.int64)
    distance = np.full(n, np.nan, dtype=np.float32)
    nodes = np.unique(src)
    for row in nodes[np.argsort(rank[nodes], kind="stable")]:
        if keeper[row] >= 0:
            continue
        others, near = dst[start[row] : start[row + 1]], dd[start[row] : start[row + 1]]
        free = keeper[others] < 0
        keeper[row] = row  # a keeper, possibly of no one
        distance[row] = 0.0
        keeper[others[free]] = row
        distance[others[free]] = near[free]
    alone = np.bincount(keeper[keeper >= 0], minlength=n) == 1
    keeper[alone], distance[alone] = -1, np.nan
    return keeper, distance


def kth_distance(proposals: Proposals, k: int) -> np.ndarray:
    """Each row's exact distance to its k-th nearest proposed other image (inf where fewer than k were proposed)."""
    order = np.lexsort((proposals.distance, proposals.src))
    src, d = proposals.src[order], proposals.distance[order]
    kth = _rank_in_run(src) == k - 1
    out = np.full(len(proposals.ids), np.inf, dtype=np.float32)
    out[src[kth]] = d[kth]
    return out
