"""Writer: the embedding shards of OUT (OUT/embeddings/*.parquet): their schema, writing, reading and streaming."""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.config import DIMENSION, UserError
from embedder.outdir import CHECKSUMS, EMBEDDINGS_DIR, MANIFEST, OutDir, verify_checksum

log = logging.getLogger("imgindex")

def embedding_schema(dimension: int = DIMENSION) -> pa.Schema:
    """The Parquet schema of OUT/embeddings/*.parquet.

    id int64, path string, embedding fixed-size list of float32, then the version of the file the row was made
    from: fingerprint int64 (hash of size and modification time), size int64 (bytes), mtime_ns int64.
    """
    return pa.schema(
        [
            ("id", pa.int64()),
            ("path", pa.string()),
            ("embedding", pa.list_(pa.float32(), dimension)),
            ("fingerprint", pa.int64()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
        ]
    )


def shard_names(out: OutDir) -> list[str]:
    """The finished embedding shards in OUT."""
    return out.list(EMBEDDINGS_DIR, ".parquet")


def _unreadable(out: OutDir, name: str, error: Exception) -> UserError:
    return UserError(
        f"{out.location}/{name} is not a readable Parquet shard ({str(error).splitlines()[0]}); "
        "delete it and run the same `imgindex run` again to re-embed its images"
    )


def read_shard(out: OutDir, name: str, columns: list[str] | None = None) -> pa.Table:
    """One shard (or some of its columns); a shard that is not valid Parquet is a UserError."""
    try:
        return pq.read_table(out.path(name), filesystem=out.fs, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise _unreadable(out, name, e) from None


def shard_column(out: OutDir, name: str, column: str, missing: int) -> np.ndarray:
    """One int64 column of a shard; shards written before the column existed read as `missing` in every row."""
    try:
        with out.fs.open_input_file(out.path(name)) as source:
            parquet = pq.ParquetFile(source)
            if column in parquet.schema_arrow.names:
                return parquet.read(columns=[column]).column(column).to_numpy()
            return np.full(parquet.metadata.num_rows, missing, dtype=np.int64)
    except (pa.ArrowInvalid, OSError) as e:
        raise _unreadable(out, name, e) from None


def write_shard(out: OutDir, name: str, table: pa.Table) -> str:
    """Write one shard atomically; return its sha256."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return out.write_bytes(name, buffer.getvalue())


def iter_embeddings(out: OutDir, batch_rows: int = 65536, verify: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream (ids int64, paths object, xb float32 (n, d)) over every shard, `batch_rows` at a time.

    With `verify`, each shard is checked against the sha256 the manifest records before any of its rows is used.
    """
    manifest = out.read_json(MANIFEST) if verify and out.exists(MANIFEST) else {}
    for name in shard_names(out):
        # With a recorded checksum, the bytes that were checked are the bytes parsed (read once, held while the shard
        # is read); without one there is nothing to check and the file is streamed.
        if name in manifest.get(CHECKSUMS, {}):
            data = out.read_bytes(name)
            verify_checksum(out, name, manifest, data)
            source = pa.BufferReader(data)
        else:
            source = out.fs.open_input_file(out.path(name))
        try:
            with source:
                for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=["id", "path", "embedding"]):
                    emb = batch.column("embedding")
                    xb = emb.values.to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)
                    paths = np.asarray(batch.column("path").to_pylist(), dtype=object)
                    yield batch.column("id").to_numpy(), paths, np.ascontiguousarray(xb, dtype=np.float32)
        except (pa.ArrowInvalid, OSError) as e:
            raise _unreadable(out, name, e) from None


class ShardWriter:
    """Buffers embedded rows and writes them as Parquet shards of `rows_per_shard` rows (or every `flush_seconds`).

    Shard names carry a per-run token, so a re-run never overwrites a shard another run wrote. `on_shard(name,
    sha256, rows)` is called once each shard is in place under its final name (the moment it counts as done).
    """

    def __init__(
        self,
        out: OutDir,
        rows_per_shard: int,
        dimension: int = DIMENSION,
        flush_seconds: float = 60.0,
        on_shard: Callable[[str, str, int], None] | None = None,
    ):
        self.out = out
        self.on_shard = on_shard
        self.rows_per_shard = rows_per_shard
        self.schema = embedding_schema(dimension)
        self.flush_seconds = flush_seconds
        self.token = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.sequence = 0
        self.rows_written = 0
        self._batches: list[pa.RecordBatch] = []
        self._buffered = 0
        self._last_flush = time.monotonic()

    def add(
        self, ids: np.ndarray, paths: np.ndarray, embeddings: np.ndarray, fingerprints: np.ndarray, sizes: np.ndarray, mtimes_ns: np.ndarray
    ) -> None:
        """Buffer rows (with the size, modification time and fingerprint of each file); write a shard when enough
        rows or enough time has gathered."""
        if len(ids) == 0:
            return
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
        batch = pa.record_batch(
            [
                pa.array(np.asarray(ids, dtype=np.int64)),
                pa.array([str(p) for p in paths], type=pa.string()),
                pa.FixedSizeListArray.from_arrays(flat, self.schema.field("embedding").type.list_size),
                *(pa.array(np.asarray(column, dtype=np.int64)) for column in (fingerprints, sizes, mtimes_ns)),
            ],
            schema=self.schema,
        )
        self._batches.append(batch)
        self._buffered += len(ids)
        if self._buffered >= self.rows_per_shard or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Write whatever is buffered as shards of at most `rows_per_shard` rows."""
        if not self._batches:
            return
        table = pa.Table.from_batches(self._batches, schema=self.schema)
        for start in range(0, table.num_rows, self.rows_per_shard):
            part = table.slice(start, self.rows_per_shard)
            name = f"{EMBEDDINGS_DIR}/part-{self.token}-{self.sequence:05d}.parquet"
            sha256 = write_shard(self.out, name, part)
            self.sequence += 1
            self.rows_written += part.num_rows
            if self.on_shard:
                self.on_shard(name, sha256, part.num_rows)
        log.info("wrote %d embeddings so far", self.rows_written)
        self._batches, self._buffered = [], 0
        self._last_flush = time.monotonic()
