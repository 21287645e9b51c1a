"""Collection: which embedding shards make up OUT, one small commit record per shard.

A shard (OUT/embeddings/part-*.parquet) is part of the collection once its record (OUT/commits/part-*.json: rows,
bytes, sha256, and the shards it replaces) exists; a record written after its shard is the commit. Committing a shard
writes one record of a few hundred bytes, the same at shard 10 and at shard 100,000 (manifest.json holds no shard
list). A shard without a record is not part of the collection: readers ignore it, and the next embed run commits it
after checking it (a run killed between the two writes) or removes it. A committed shard whose bytes no longer match
its record is refused (it was truncated or replaced).

Replacing a shard (some of its images left the input) writes the smaller shard, then its record naming the old shard
as replaced (from then on readers see only the new one), then removes the old record and the old shard. OUTs of format
version 1 (shard checksums in manifest.json) are read as they are and migrated by the next embed run.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from embedder.config import UserError
from embedder.outdir import CHECKSUMS, COMMITS_DIR, EMBEDDINGS_DIR, FORMAT_VERSION, MANIFEST, OutDir, check_sha256
from embedder.writer import embedding_schema, shard_name, unreadable, write_shard

log = logging.getLogger("imgindex")


@dataclass(frozen=True)
class ShardRecord:
    """The commit record of one shard: its name relative to OUT, rows, size, sha256, and the shards it replaces."""

    shard: str
    rows: int
    bytes: int
    sha256: str
    replaces: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self) | {"replaces": list(self.replaces)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "ShardRecord":
        value = json.loads(data)
        return cls(value["shard"], int(value["rows"]), int(value["bytes"]), value["sha256"], tuple(value.get("replaces", ())))


def record_name(shard: str) -> str:
    """Where the commit record of `shard` (embeddings/part-X.parquet) lives: commits/part-X.json."""
    return f"{COMMITS_DIR}/{shard.rsplit('/', 1)[-1].removesuffix('.parquet')}.json"


def commit(out: OutDir, record: ShardRecord) -> None:
    """Make `record.shard` part of the collection: one write of its record."""
    out.write_bytes(record_name(record.shard), record.to_json())


def _read_records(out: OutDir) -> list[ShardRecord]:
    names = out.list(COMMITS_DIR, ".json")
    if not names:
        return []
    # Object stores answer one small read at a time slowly; a local folder does not mind the threads.
    with ThreadPoolExecutor(16) as pool:
        datas = list(pool.map(out.read_bytes, names))
    records = []
    for name, data in zip(names, datas):
        try:
            records.append(ShardRecord.from_json(data))
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{out.location}/{name} is not a commit record ({e}); it was damaged or replaced") from None
    return records


def format_version(out: OutDir) -> int:
    """The OUT's format version as its manifest records it (the current one for an OUT without a manifest)."""
    return int(out.read_json(MANIFEST).get("format_version", 1)) if out.exists(MANIFEST) else FORMAT_VERSION


def committed(out: OutDir) -> dict[str, ShardRecord]:
    """The shards of the collection, by name: every committed record, less the shards another record replaces.

    Format version 1: every shard file, with the sha256 the manifest records for it (none for the oldest ones).
    """
    if format_version(out) == 1:
        checksums = out.read_json(MANIFEST).get(CHECKSUMS, {}) if out.exists(MANIFEST) else {}
        return {name: ShardRecord(name, -1, -1, checksums.get(name, "")) for name in out.list(EMBEDDINGS_DIR, ".parquet")}
    records = _read_records(out)
    replaced = {old for record in records for old in record.replaces}
    return {r.shard: r for r in sorted(records, key=lambda r: r.shard) if r.shard not in replaced}


def shard_names(out: OutDir) -> list[str]:
    """The committed shards of OUT, sorted."""
    return sorted(committed(out))


def retire(out: OutDir, shard: str) -> None:
    """Take `shard` out of the collection: its record first (the commit), then the file."""
    if out.exists(record_name(shard)):
        out.delete(record_name(shard))
    if out.exists(shard):
        out.delete(shard)


def replace(out: OutDir, old: str, table: pa.Table, token: str) -> ShardRecord:
    """Replace the committed shard `old` by `table` (a subset of its rows): the new shard, its record naming `old` as
    replaced (the commit), then `old`'s record and file removed."""
    name = shard_name(token, table.column("id").to_numpy())
    size, sha256 = write_shard(out, name, table)
    record = ShardRecord(name, table.num_rows, size, sha256, (old,))
    commit(out, record)
    retire(out, old)
    return record


def verify_shard(out: OutDir, record: ShardRecord, data: bytes | None = None, cached: bool = False) -> None:
    """Check a committed shard (or its already-read `data`) against its record's sha256 (none: not checked); with
    `cached`, a shard verified before with the same size and modification time is not hashed again."""
    check_sha256(out, record.shard, {record.sha256} - {""}, record_name(record.shard) if record.rows >= 0 else MANIFEST, data, cached)


def verified_bytes(out: OutDir, record: ShardRecord) -> bytes:
    """The bytes of a committed shard, checked against its record's sha256 (not checked without one)."""
    try:
        data = out.read_bytes(record.shard)
    except OSError as e:
        raise unreadable(out, record.shard, e) from None
    verify_shard(out, record, data)
    return data


def iter_embeddings(
    out: OutDir, batch_rows: int = 65536, verify: bool = True, records: Sequence[ShardRecord] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Stream (ids int64, paths object, xb float32 (n, d)) over every committed shard (or the shards of `records`, in
    their order), `batch_rows` at a time.

    With `verify`, each shard is checked against its record's sha256 before any of its rows is used (the bytes checked
    are the bytes parsed); without a sha256 to check against, the file is streamed.
    """
    for record in committed(out).values() if records is None else records:
        source = pa.BufferReader(verified_bytes(out, record)) if verify and record.sha256 else out.fs.open_input_file(out.path(record.shard))
        try:
            with source:
                for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_rows, columns=["id", "path", "embedding"]):
                    emb = batch.column("embedding")
                    xb = emb.values.to_numpy(zero_copy_only=False).reshape(-1, emb.type.list_size)
                    paths = np.asarray(batch.column("path").to_pylist(), dtype=object)
                    yield batch.column("id").to_numpy(), paths, np.ascontiguousarray(xb, dtype=np.float32)
        except (pa.ArrowInvalid, OSError) as e:
            raise unreadable(out, record.shard, e) from None


def uncommitted(out: OutDir) -> list[str]:
    """Shard files with no commit record (format 2): what a run killed between writing a shard and committing it left."""
    named = {r.shard for r in _read_records(out)} if format_version(out) >= 2 else set(out.list(EMBEDDINGS_DIR, ".parquet"))
    return [name for name in out.list(EMBEDDINGS_DIR, ".parquet") if name not in named]


def adopt(out: OutDir, name: str, dimension: int) -> ShardRecord | None:
    """Commit an uncommitted shard that is a complete shard of this collection (readable, the shard schema); None, and
    the file removed, otherwise. A shard is moved (or PUT) into place whole, so a readable one is complete."""
    try:
        data = out.read_bytes(name)
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        log.info("removing %s, which a stopped run left unreadable (%s)", name, str(e).splitlines()[0])
        out.delete(name)
        return None
    if not table.schema.equals(embedding_schema(dimension), check_metadata=False):
        log.info("removing %s, which a stopped run left with another schema", name)
        out.delete(name)
        return None
    record = ShardRecord(name, table.num_rows, len(data), hashlib.sha256(data).hexdigest())
    commit(out, record)
    return record


def migrate(out: OutDir, manifest: dict) -> dict:
    """Turn a format-1 OUT's shard checksums (in the manifest) into commit records; return the manifest without them.

    The caller writes the returned manifest with the current format version: until then the OUT still reads as format
    1, so a run stopped half-way through migrates again."""
    checksums = manifest.get(CHECKSUMS, {})
    for name in out.list(EMBEDDINGS_DIR, ".parquet"):
        data = out.read_bytes(name)
        sha256 = hashlib.sha256(data).hexdigest()
        if checksums.get(name, sha256) != sha256:
            raise UserError(
                f"{out.location}/{name} does not match the sha256 {MANIFEST} records (truncated, replaced or corrupted); "
                "delete it and run the same command again to re-embed its images"
            )
        commit(out, ShardRecord(name, pq.read_metadata(pa.BufferReader(data)).num_rows, len(data), sha256))
    log.info("migrated %s to format version %d (one commit record per shard)", out.location, FORMAT_VERSION)
    return manifest | {CHECKSUMS: {k: v for k, v in checksums.items() if not k.startswith(f"{EMBEDDINGS_DIR}/")}}
