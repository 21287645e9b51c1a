"""Writer: everything that lands in OUT, written so that no reader ever sees a half-written file.

Every file goes to a temporary name first and is moved into place (atomic on a local filesystem; on object stores a
PUT is only visible once complete). OUT may be a local path or a URI that pyarrow's filesystems open (s3://, gs://).
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs

from embedder.config import DIMENSION, UserError, absolute

log = logging.getLogger("imgindex")

EMBEDDINGS_DIR = "embeddings"
MANIFEST = "manifest.json"
ERRORS = "errors.csv"


def embedding_schema(dimension: int = DIMENSION) -> pa.Schema:
    """The Parquet schema of OUT/embeddings/*.parquet: id int64, path string, embedding fixed-size list of float32."""
    return pa.schema(
        [("id", pa.int64()), ("path", pa.string()), ("embedding", pa.list_(pa.float32(), dimension))]
    )


class OutDir:
    """The output location of a job: atomic writes, reads and listings relative to its root."""

    def __init__(self, location: str):
        self.location = absolute(location)
        self.fs, self.root = fs.FileSystem.from_uri(self.location)

    def path(self, name: str) -> str:
        """Filesystem path of `name` (relative to the root)."""
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str = "") -> bool:
        """True if `name` (or the root itself) exists."""
        return self.fs.get_file_info(self.path(name) if name else self.root).type != fs.FileType.NotFound

    def read_bytes(self, name: str) -> bytes:
        """The whole content of `name`."""
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write `name` atomically: a temporary sibling first, then a move onto the final name."""
        final = self.path(name)
        folder = final.rsplit("/", 1)[0]
        try:
            self.fs.create_dir(folder, recursive=True)
        except OSError as e:  # a missing bucket, no permission: nothing a retry would fix
            raise UserError(f"cannot create {folder} for --out {self.location}: {e}") from None
        temporary = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        with self.fs.open_output_stream(temporary) as f:
            f.write(data)
        self.fs.move(temporary, final)

    def delete(self, name: str) -> None:
        """Remove `name`."""
        self.fs.delete_file(self.path(name))

    def list(self, folder: str, suffix: str) -> list[str]:
        """Names (relative to the root) of the finished files in `folder` ending in `suffix`, sorted."""
        selector = fs.FileSelector(self.path(folder), allow_not_found=True)
        prefix = self.root.rstrip("/") + "/"
        names = [
            info.path[len(prefix):]
            for info in self.fs.get_file_info(selector)
            if info.type == fs.FileType.File and info.path.endswith(suffix)
        ]
        return sorted(names)

    def read_json(self, name: str) -> dict:
        """A JSON file as a dict."""
        return json.loads(self.read_bytes(name))

    def write_json(self, name: str, value: dict) -> None:
        """A dict as an indented JSON file, atomically."""
        self.write_bytes(name, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def write_csv(self, name: str, frame: pd.DataFrame) -> None:
        """A DataFrame as CSV without its index, atomically."""
        self.write_bytes(name, frame.to_csv(index=False).encode())


def shard_names(out: OutDir) -> list[str]:
    """The finished embedding shards in OUT."""
    return out.list(EMBEDDINGS_DIR, ".parquet")


def read_shard(out: OutDir, name: str, columns: list[str] | None = None) -> pa.Table:
    """One shard (or some of its columns)."""
    return pq.read_table(out.path(name), filesystem=out.fs, columns=columns)


def write_shard(out: OutDir, name: str, table: pa.Table) -> None:
    """Write one shard atomically."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    out.write_bytes(name, buffer.getvalue())


def iter_embeddings(out: OutDir, batch_rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream (ids int64, paths object, xb float32 (n, d)) over every shard, `batch_rows` at a time."""
    for name in shard_names(out):
        with out.fs.open_input_file(out.path(name)) as source:
            for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows):
                emb = batch.column("embedding")
                xb = emb.values.to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)
                paths = np.asarray(batch.column("path").to_pylist(), dtype=object)
                yield batch.column("id").to_numpy(), paths, np.ascontiguousarray(xb, dtype=np.float32)


class ShardWriter:
    """Buffers embedded rows and writes them as Parquet shards of `rows_per_shard` rows (or every `flush_seconds`).

    Shard names carry a per-run token, so a re-run never overwrites a shard another run wrote.
    """

    def __init__(self, out: OutDir, rows_per_shard: int, dimension: int = DIMENSION, flush_seconds: float = 60.0):
        self.out = out
        self.rows_per_shard = rows_per_shard
        self.schema = embedding_schema(dimension)
        self.flush_seconds = flush_seconds
        self.token = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
        self.sequence = 0
        self.rows_written = 0
        self._batches: list[pa.RecordBatch] = []
        self._buffered = 0
        self._last_flush = time.monotonic()

    def add(self, ids: np.ndarray, paths: np.ndarray, embeddings: np.ndarray) -> None:
        """Buffer rows; write a shard when enough rows or enough time has gathered."""
        if len(ids) == 0:
            return
        flat = pa.array(np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1))
        batch = pa.record_batch(
            [
                pa.array(np.asarray(ids, dtype=np.int64)),
                pa.array([str(p) for p in paths], type=pa.string()),
                pa.FixedSizeListArray.from_arrays(flat, self.schema.field("embedding").type.list_size),
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
            write_shard(self.out, f"{EMBEDDINGS_DIR}/part-{self.token}-{self.sequence:05d}.parquet", part)
            self.sequence += 1
            self.rows_written += part.num_rows
        log.info("wrote %d embeddings so far", self.rows_written)
        self._batches, self._buffered = [], 0
        self._last_flush = time.monotonic()
