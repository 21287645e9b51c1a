"""Writer: everything that lands in OUT, written so that no reader ever sees a half-written file.

Every file goes to a temporary name first and is moved into place (atomic on a local filesystem; on object stores a
PUT is only visible once complete). OUT may be a local path or a URI that pyarrow's filesystems open (s3://, gs://).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator

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
# Manifest key: {file name relative to OUT: sha256 hex} for the shards and index.faiss.
CHECKSUMS = "checksums"
# Where `query` remembers files it has verified, by size and modification time (hashing a 16 GB index costs ~10 s).
VERIFIED_CACHE_ENV = "IMGINDEX_VERIFIED_CACHE"


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

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write `name` atomically (a temporary sibling first, then a move onto the final name); return its sha256."""
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
        return hashlib.sha256(data).hexdigest()

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
        """A JSON file as a dict; one that does not parse is a UserError."""
        try:
            return json.loads(self.read_bytes(name))
        except ValueError as e:
            raise UserError(f"{self.location}/{name} is not valid JSON ({e}); it was damaged or replaced") from None

    def write_json(self, name: str, value: dict) -> None:
        """A dict as an indented JSON file, atomically."""
        self.write_bytes(name, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def write_csv(self, name: str, frame: pd.DataFrame) -> None:
        """A DataFrame as CSV without its index, atomically."""
        self.write_bytes(name, frame.to_csv(index=False).encode())


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


def _verified_cache_path() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "imgindex", "verified.json")
    return os.environ.get(VERIFIED_CACHE_ENV, default)


def _read_verified() -> dict:
    try:
        with open(_verified_cache_path(), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _remember_verified(key: str, stamp: list) -> None:
    """Record a verified file in the cache; a cache that cannot be written only costs a re-hash next time."""
    path = _verified_cache_path()
    cache = _read_verified()
    cache[key] = stamp
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(temporary, path)
    except OSError as e:
        log.debug("verification cache %s not written: %s", path, e)


def verify_checksum(out: OutDir, name: str, manifest: dict, data: bytes | None = None, cached: bool = False) -> None:
    """Check `name` (or its already-read `data`) against the sha256 the manifest records; UserError if it differs.

    Files the manifest has no checksum for (outputs written before checksums were recorded) are not checked.
    With `cached`, a file verified before with the same size and modification time is not hashed again.
    """
    expected = manifest.get(CHECKSUMS, {}).get(name)
    if expected is None:
        return
    key = f"{out.location}/{name}"
    stamp: list = []
    if cached:
        info = out.fs.get_file_info(out.path(name))
        stamp = [info.size, info.mtime_ns, expected]
        if _read_verified().get(key) == stamp:
            return
    if data is None:
        digest = hashlib.sha256()
        with out.fs.open_input_stream(out.path(name)) as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        actual = digest.hexdigest()
    else:
        actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise UserError(
            f"{key} does not match the sha256 recorded in {MANIFEST} (truncated, replaced or corrupted); "
            "rebuild it (delete it and run the same `imgindex run` again)"
        )
    if cached:
        _remember_verified(key, stamp)


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
