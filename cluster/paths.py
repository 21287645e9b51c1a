"""Paths: OUT/index_paths.parquet, the id -> (path, shard) table of the indexed images, sorted by id, and its lookup.

Written with the index, in the same update of OUT, so that it names exactly the ids index.faiss holds. The query side
(`cluster.search.Index`, `imgindex query`, `imgindex serve`) looks a result's path up on demand instead of holding
every path: it keeps the first id of each row group (8 bytes per PATHS_ROW_GROUP rows, from the Parquet footer), reads
the id column of the row group an id falls in (cached for the last few row groups) and decodes its path column a
little at a time up to the row wanted.

Built from sorted runs: one (the whole collection) in the one-process build; one per group of shards, written by the
Ray tasks of a distributed build beside OUT's files, which the driver merges in one streaming pass (RUN_BATCH_ROWS
rows of each run in memory at a time), never holding every path.
"""

from __future__ import annotations

import functools
import io
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from embedder.collection import ShardRecord
from embedder.config import UserError
from embedder.outdir import PATHS_FILE, TEMPORARY, OutDir
from embedder.writer import read_shard

# Rows per row group of the table: a lookup decodes the path column of one (1.6 MB at 100 bytes a path) up to the row it
# wants; the query side keeps one first id per row group and pyarrow its footer entry (61,000 of each at 1,000,000,000
# images).
PATHS_ROW_GROUP = 16384
# Rows of the path column a lookup decodes at a time (it reads a row group's column up to the row it wants).
PATHS_BATCH_ROWS = 1024
# Row groups whose id column (128 KB each) a PathTable keeps: a page of results and its thumbnails read the same ones.
PATHS_CACHE_GROUPS = 16
# Rows of each sorted run read at a time while merging runs.
RUN_BATCH_ROWS = 2048
SCHEMA = pa.schema([("id", pa.int64()), ("path", pa.string()), ("shard", pa.string())])


def sorted_chunks(ids: np.ndarray, paths: pa.Array | pa.ChunkedArray, shards: np.ndarray, names: Sequence[str], rows: int = PATHS_ROW_GROUP) -> Iterator[pa.Table]:
    """Tables of (id, path, shard) sorted by id, `rows` at a time; row i's shard is `names[shards[i]]`."""
    order = np.argsort(ids, kind="stable")
    names = pa.array(list(names), pa.string())
    for lo in range(0, len(order), rows):
        chosen = order[lo:lo + rows]
        yield pa.table([pa.array(ids[chosen]), paths.take(pa.array(chosen)), names.take(pa.array(shards[chosen]))], schema=SCHEMA)


def collection_paths(out: OutDir, records: Sequence[ShardRecord]) -> Iterator[pa.Table]:
    """The (id, path, shard) rows of the shards of `records` sorted by id, read in this process (ids and paths only)."""
    tables = [read_shard(out, record.shard, ["id", "path"]) for record in records]
    ids = np.concatenate([t.column("id").to_numpy() for t in tables]) if tables else np.empty(0, np.int64)
    paths = pa.chunked_array([c for t in tables for c in t.column("path").chunks], pa.string())
    shards = np.repeat(np.arange(len(tables), dtype=np.int32), [t.num_rows for t in tables])
    return sorted_chunks(ids, paths, shards, [record.shard for record in records])


def run_prefix() -> str:
    """The name prefix of one build's runs: beside OUT's files, marked temporary, so that `OutDir.recover` removes the
    runs a stopped build left."""
    return f"{PATHS_FILE}{TEMPORARY}run-{uuid.uuid4().hex[:12]}-"


def run_bytes(chunks: Iterable[pa.Table]) -> bytes:
    """A sorted run as Parquet bytes (what a Ray task writes beside OUT's files)."""
    buffer = io.BytesIO()
    with pq.ParquetWriter(buffer, SCHEMA, use_dictionary=["shard"], write_statistics=["id"]) as writer:
        for chunk in chunks:
            writer.write_table(chunk, row_group_size=PATHS_ROW_GROUP)
    return buffer.getvalue()


def read_run(out: OutDir, name: str) -> Iterator[pa.Table]:
    """A sorted run written by `run_bytes`, RUN_BATCH_ROWS rows at a time."""
    with out.fs.open_input_file(out.path(name)) as source:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=RUN_BATCH_ROWS):
            yield pa.Table.from_batches([batch]).cast(SCHEMA)


def merged(runs: Sequence[Iterable[pa.Table]]) -> Iterator[pa.Table]:
    """Sorted runs merged into one stream sorted by id.

    Each round emits every buffered row up to the smallest last id among the runs' current chunks (no later chunk of
    any run holds a smaller id), sorted; at least one run's chunk is used up each round."""
    streams = [iter(run) for run in runs]
    heads: list[pa.Table | None] = [next(stream, None) for stream in streams]
    while live := [i for i, head in enumerate(heads) if head is not None]:
        bound = min(heads[i].column("id")[-1].as_py() for i in live)
        parts = []
        for i in live:
            cut = int(np.searchsorted(heads[i].column("id").to_numpy(), bound, side="right"))
            parts.append(heads[i].slice(0, cut))
            heads[i] = heads[i].slice(cut) if cut < heads[i].num_rows else next(streams[i], None)
            while heads[i] is not None and heads[i].num_rows == 0:
                heads[i] = next(streams[i], None)
        chunk = pa.concat_tables(parts)
        yield chunk.take(pc.sort_indices(chunk, [("id", "ascending")]))


def write_paths(path: str, runs: Sequence[Iterable[pa.Table]]) -> None:
    """Write the table to the local file `path`: the runs merged, in row groups of PATHS_ROW_GROUP rows."""
    pending: list[pa.Table] = []
    held = 0
    with pq.ParquetWriter(path, SCHEMA, use_dictionary=["shard"], write_statistics=["id"]) as writer:
        for chunk in merged(runs):
            pending.append(chunk)
            held += chunk.num_rows
            while held >= PATHS_ROW_GROUP:
                table = pa.concat_tables(pending)
                writer.write_table(table.slice(0, PATHS_ROW_GROUP), row_group_size=PATHS_ROW_GROUP)
                pending, held = [table.slice(PATHS_ROW_GROUP)], table.num_rows - PATHS_ROW_GROUP
        if held:
            writer.write_table(pa.concat_tables(pending), row_group_size=PATHS_ROW_GROUP)


class PathTable:
    """OUT/index_paths.parquet opened for lookups by id; holds the first id of each row group and the id columns of the
    last few row groups read, never the paths."""

    def __init__(self, out: OutDir):
        if not out.exists(PATHS_FILE):
            raise UserError(f"{out.location}: no {PATHS_FILE} (indexed by an older version); run `imgindex index {out.location}`")
        self.file = pq.ParquetFile(out.fs.open_input_file(out.path(PATHS_FILE)))
        meta = self.file.metadata
        self.rows = meta.num_rows
        self.firsts = np.array([meta.row_group(g).column(0).statistics.min for g in range(meta.num_row_groups)], dtype=np.int64)
        self._lock = threading.Lock()  # one reader of the file at a time (the service looks paths up from threads)
        self._ids = functools.lru_cache(maxsize=PATHS_CACHE_GROUPS)(self._read_ids)

    def __len__(self) -> int:
        return self.rows

    def _read_ids(self, group: int) -> np.ndarray:
        with self._lock:
            return self.file.read_row_group(group, columns=["id"], use_threads=False).column("id").to_numpy()

    def find_many(self, keys: Iterable[int]) -> dict[int, tuple[str, str]]:
        """{id: (path, shard)} for each of `keys` the index holds (the others are left out): the path column of each
        row group they fall in is decoded PATHS_BATCH_ROWS rows at a time, up to the last row wanted."""
        keys = np.unique(np.asarray(list(keys), dtype=np.int64))
        groups = np.searchsorted(self.firsts, keys, side="right") - 1
        found: dict[int, tuple[str, str]] = {}
        for group in np.unique(groups[groups >= 0]).tolist():
            wanted = keys[groups == group]
            ids = self._ids(group)
            rows = np.minimum(np.searchsorted(ids, wanted), len(ids) - 1)
            held = ids[rows] == wanted
            wanted, rows = wanted[held].tolist(), rows[held].tolist()
            if not rows:
                continue
            first, i = 0, 0
            with self._lock:
                batches = self.file.iter_batches(PATHS_BATCH_ROWS, row_groups=[group], columns=["path", "shard"], use_threads=False)
                for batch in batches:
                    while i < len(rows) and rows[i] < first + batch.num_rows:
                        found[wanted[i]] = (batch.column(0)[rows[i] - first].as_py(), batch.column(1)[rows[i] - first].as_py())
                        i += 1
                    if i == len(rows):
                        break
                    first += batch.num_rows
        return found

    def find(self, key: int) -> tuple[str, str] | None:
        """(path, shard) of the image with id `key`, or None if the index does not hold it."""
        return self.find_many([key]).get(int(key))

    def get(self, key: int, default: str | None = None) -> str | None:
        """The path of the image with id `key`, `default` if the index does not hold it."""
        found = self.find(key)
        return default if found is None else found[0]

    def __contains__(self, key: int) -> bool:
        return self.find(key) is not None
