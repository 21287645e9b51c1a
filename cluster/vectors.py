"""Vectors: the collection as a stream of batches, so that index building and k-means never hold all of it at once.

`ShardVectors` streams OUT/embeddings/*.parquet (through `embedder.collection.iter_embeddings`); `ArrayVectors` wraps
an in-memory array (tests, the benchmark's k-means comparison). Both give the row count up front, batches of
(ids, xb), a sample of rows by position taken in one streaming pass, and `map`, which passes over the collection part
by part (here one part, in this process; `cluster.distributed.TaskVectors` runs a Ray task per group of shards).
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.collection import ShardRecord, committed, iter_embeddings, verify_shard
from embedder.config import UserError
from embedder.outdir import OutDir
from embedder.writer import read_shard, shard_column

# 16,384 rows of 4096 float32 = 256 MB per batch: large enough for BLAS, small enough to sit beside the budget.
BATCH_ROWS = 16384
T = TypeVar("T")


class Vectors:
    """A collection of `count` vectors of `dimension` float32 values with unique int64 ids, read in batches.

    Samples are drawn by position in the collection sorted by id, never by position in the stream: the same images
    give the same sample however the shards happen to hold them (a resumed run writes other shards than an
    uninterrupted one), so index and clusters do not depend on how the collection was written."""

    count: int
    dimension: int
    tasks = 1  # Ray tasks a pass over the collection runs as (`map`); 1: this process

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids int64 (n,), xb float32 (n, d)) over the whole collection, in a fixed order."""
        raise NotImplementedError

    def sorted_ids(self) -> np.ndarray:
        """Every id of the collection, sorted."""
        raise NotImplementedError

    def take(self, positions: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) at `positions` of the collection sorted by id (in the order given), in one streaming pass; each
        batch's chosen rows pass through `transform` before they are kept."""
        wanted = self.sorted_ids()[np.asarray(positions, dtype=np.int64)]
        taken_ids, taken = self.rows_of(wanted, transform)
        found = np.argsort(taken_ids)
        at = found[np.searchsorted(taken_ids, wanted, sorter=found)]
        return taken_ids[at], taken[at]

    def rows_of(self, wanted: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, rows) of the vectors whose ids are among `wanted`, in stream order, in one streaming pass; each
        batch's chosen rows pass through `transform` before they are kept."""
        id_parts, parts = [], []
        for ids, xb in self.batches():
            hit = np.flatnonzero(np.isin(ids, wanted))
            if len(hit):
                id_parts.append(ids[hit])
                parts.append(transform(xb[hit]) if transform else xb[hit])
        if not parts:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dimension), dtype=np.float32)
        return np.concatenate(id_parts), np.concatenate(parts)

    def map(self, fn: Callable[..., T], *args) -> Iterator[T]:
        """`fn(part, *args)` for every part of the collection, in order, `part` a `Vectors` over some of its rows. Here
        the collection is one part, read in this process."""
        yield fn(self, *args)


class ArrayVectors(Vectors):
    """An in-memory (n, d) array as a `Vectors`; ids default to the row numbers."""

    def __init__(self, xb: np.ndarray, ids: np.ndarray | None = None, batch_rows: int = BATCH_ROWS):
        self.xb = np.ascontiguousarray(xb, dtype=np.float32)
        self.ids = np.arange(len(xb), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        self.count, self.dimension = self.xb.shape
        self.batch_rows = batch_rows

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, self.count, self.batch_rows):
            yield self.ids[start:start + self.batch_rows], self.xb[start:start + self.batch_rows]

    def sorted_ids(self) -> np.ndarray:
        return np.sort(self.ids)

    def take(self, positions: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        at = np.argsort(self.ids, kind="stable")[np.asarray(positions, dtype=np.int64)]
        rows = self.xb[at]
        return self.ids[at], transform(rows) if transform else rows


class ShardVectors(Vectors):
    """OUT/embeddings/*.parquet (every committed shard, or the shards of `records`) streamed `batch_rows` at a time; the
    row counts come from the commit records (format 1: the Parquet footers)."""

    # Rows read through any ShardVectors in this process: a test hook (the driver of a Ray build reads none).
    rows_read = 0

    def __init__(self, out: OutDir, dimension: int, batch_rows: int = BATCH_ROWS, records: Sequence[ShardRecord] | None = None):
        self.out = out
        self.dimension = dimension
        self.batch_rows = batch_rows
        self._sorted_ids: np.ndarray | None = None
        self.records = list(committed(out).values() if records is None else records)
        self.sizes = [record.rows if record.rows >= 0 else _footer_rows(out, record.shard) for record in self.records]
        self.count = sum(self.sizes)

    def rows(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        """(shard name, ids, paths, xb) batch by batch, shard after shard."""
        for record in self.records:
            for ids, paths, xb in iter_embeddings(self.out, self.batch_rows, records=[record]):
                ShardVectors.rows_read += len(ids)
                yield record.shard, ids, paths, xb

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for _shard, ids, _paths, xb in self.rows():
            yield ids, xb

    def sorted_ids(self) -> np.ndarray:
        """Every id of the shards, sorted, from their id columns alone; a shard whose rows are not the ones its record
        counts is checked against its sha256 (and refused) here, not first when its vectors are read."""
        if self._sorted_ids is None:
            ids = []
            for record, size in zip(self.records, self.sizes):
                ids.append(shard_column(self.out, record.shard, "id", 0))
                if len(ids[-1]) != size:
                    verify_shard(self.out, record)
            self._sorted_ids = np.sort(np.concatenate(ids)) if ids else np.empty(0, np.int64)
        return self._sorted_ids


def _footer_rows(out: OutDir, name: str) -> int:
    """Rows of a shard that has no commit record (format 1), from its Parquet footer."""
    with out.fs.open_input_file(out.path(name)) as source:
        return pq.ParquetFile(source).metadata.num_rows


def shard_state(out: OutDir) -> pd.DataFrame:
    """id and fingerprint (a hash of file size and mtime; 0 where the shards have no such column) of every row.

    A shard whose row count differs from its commit record's was truncated or replaced: a UserError, before anything
    is built on it (its sha256, checked when its vectors are read, would say the same later)."""
    frames = []
    for name, record in committed(out).items():
        ids = shard_column(out, name, "id", 0)
        if record.rows >= 0 and len(ids) != record.rows:
            raise UserError(
                f"{out.location}/{name} does not match the sha256 its commit record holds ({record.rows} rows recorded, "
                f"{len(ids)} found: truncated, replaced or corrupted); delete it and run the same `imgindex run` again"
            )
        frames.append(pd.DataFrame({"id": ids, "fingerprint": shard_column(out, name, "fingerprint", 0)}))
    if not frames:
        return pd.DataFrame({"id": np.empty(0, np.int64), "fingerprint": np.empty(0, np.int64)})
    return pd.concat(frames, ignore_index=True).astype({"id": np.int64, "fingerprint": np.int64})


def diff_state(before: pd.DataFrame, now: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(added, changed, removed) ids between two (id, fingerprint) tables: changed = same id, new fingerprint."""
    merged = before.merge(now, on="id", how="outer", suffixes=("_before", "_now"), indicator=True)
    added = merged.loc[merged["_merge"] == "right_only", "id"].to_numpy(np.int64)
    removed = merged.loc[merged["_merge"] == "left_only", "id"].to_numpy(np.int64)
    both = merged[merged["_merge"] == "both"]
    changed = both.loc[both["fingerprint_before"] != both["fingerprint_now"], "id"].to_numpy(np.int64)
    return added, changed, removed


def state_bytes(state: pd.DataFrame, meta: dict) -> bytes:
    """What a built artefact holds, as the Parquet file published beside it: (id, fingerprint) rows (and whatever
    other int64 columns `state` has, such as the group of each id), and `meta` as JSON in the Parquet metadata."""
    table = pa.Table.from_pandas(state.astype(np.int64), preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata({"imgindex": json.dumps(meta, sort_keys=True)}), buffer)
    return buffer.getvalue()


def read_state(out: OutDir, name: str) -> tuple[pd.DataFrame, dict] | None:
    """The (id, fingerprint) table and metadata `state_bytes` wrote, or None if there is none."""
    if not out.exists(name):
        return None
    table = read_shard(out, name)
    meta = json.loads((table.schema.metadata or {}).get(b"imgindex", b"{}"))
    return table.to_pandas(), meta
