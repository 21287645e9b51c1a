"""Writer: the embedding shards of OUT (OUT/embeddings/*.parquet): their schema and names, writing them (also as the
Ray Data stage after the model, so vectors never travel to the driver), reading them."""

from __future__ import annotations

import hashlib
import io
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.config import DIMENSION, UserError
from embedder.outdir import EMBEDDINGS_DIR, OutDir

log = logging.getLogger("imgindex")

# Parquet statistics are kept for the small columns only.
STATISTICS_COLUMNS = ["id", "fingerprint", "size", "mtime_ns"]
# What the shard-writing stage hands the driver (see write_shards).
COMMIT_COLUMNS = ("kind", "shard", "rows", "bytes", "sha256", "ids", "precision", "path", "error")

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


def shard_name(token: str, ids: np.ndarray) -> str:
    """The name of the shard holding rows `ids`, written by the run `token`: the same rows of the same run always get
    the same name, so a retried task writes over its own earlier attempt instead of adding a second copy."""
    digest = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()[:16]
    return f"{EMBEDDINGS_DIR}/part-{token}-{digest}.parquet"


def unreadable(out: OutDir, name: str, error: Exception) -> UserError:
    """The one-line error for a shard that cannot be read."""
    return UserError(
        f"{out.location}/{name} is not a readable Parquet shard ({str(error).splitlines()[0]}); "
        "delete it and run the same `imgindex run` again to re-embed its images"
    )


def read_shard(out: OutDir, name: str, columns: list[str] | None = None) -> pa.Table:
    """One shard (or some of its columns); a shard that is not valid Parquet is a UserError."""
    try:
        return pq.read_table(out.path(name), filesystem=out.fs, columns=columns)
    except (pa.ArrowInvalid, OSError) as e:
        raise unreadable(out, name, e) from None


def shard_column(out: OutDir, name: str, column: str, missing: int) -> np.ndarray:
    """One int64 column of a shard; shards written before the column existed read as `missing` in every row."""
    try:
        with out.fs.open_input_file(out.path(name)) as source:
            parquet = pq.ParquetFile(source)
            if column in parquet.schema_arrow.names:
                return parquet.read(columns=[column]).column(column).to_numpy()
            return np.full(parquet.metadata.num_rows, missing, dtype=np.int64)
    except (pa.ArrowInvalid, OSError) as e:
        raise unreadable(out, name, e) from None


def write_shard(out: OutDir, name: str, table: pa.Table) -> tuple[int, str]:
    """Write one shard atomically; return its size and sha256.

    No dictionary encoding and no statistics for the vectors: float vectors do not repeat, and both cost CPU per row."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, use_dictionary=False, write_statistics=STATISTICS_COLUMNS)
    data = buffer.getvalue()
    return len(data), out.write_bytes(name, data)


def shard_table(batch: dict[str, np.ndarray], dimension: int = DIMENSION) -> pa.Table:
    """The rows of a batch ({id, path, embedding, size, mtime_ns} numpy columns) as a shard table; the fingerprint is
    hashed from size and mtime_ns here."""
    from embedder.reader import fingerprints

    schema = embedding_schema(dimension)
    batch = batch | {"fingerprint": fingerprints(batch["size"], batch["mtime_ns"])}
    flat = pa.array(np.ascontiguousarray(batch["embedding"], dtype=np.float32).reshape(-1))
    return pa.table(
        [
            pa.array(np.asarray(batch["id"], dtype=np.int64)),
            pa.array([str(p) for p in batch["path"]], type=pa.string()),
            pa.FixedSizeListArray.from_arrays(flat, dimension),
            *(pa.array(np.asarray(batch[column], dtype=np.int64)) for column in ("fingerprint", "size", "mtime_ns")),
        ],
        schema=schema,
    )


def write_shards(batch: dict[str, np.ndarray], out: str, token: str, dimension: int = DIMENSION) -> dict[str, np.ndarray]:
    """Ray Data stage after the model: the embedded rows of `batch` become one shard in OUT; what the driver needs to
    commit comes back instead of the vectors: one row per shard (name, rows, bytes, sha256, ids, precision) and one
    per failed image (its path, id and error), in the columns of COMMIT_COLUMNS."""
    folder = OutDir(out)
    failed = np.array([bool(e) for e in batch["error"]], dtype=bool)
    rows: dict[str, list] = {column: [] for column in COMMIT_COLUMNS}

    def add(**values) -> None:
        for column in COMMIT_COLUMNS:
            rows[column].append(values.get(column, 0 if column in ("rows", "bytes") else ""))

    good = {key: np.asarray(value)[~failed] for key, value in batch.items()}
    if len(good["id"]):
        name = shard_name(token, good["id"])
        size, sha256 = write_shard(folder, name, shard_table(good, dimension))
        add(kind="shard", shard=name, rows=len(good["id"]), bytes=size, sha256=sha256,
            ids=good["id"].astype(np.int64).tobytes(), precision=",".join(sorted(set(good["precision"].tolist()))))
    for key, path, error in zip(batch["id"][failed], batch["path"][failed], batch["error"][failed]):
        add(kind="error", ids=np.int64(key).tobytes(), path=str(path), error=str(error))
    return {column: np.array(values, dtype=object if column not in ("rows", "bytes") else np.int64) for column, values in rows.items()}
