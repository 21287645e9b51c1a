"""Writer: atomic files, shard sizes and schema, streaming the shards back, checksums and damaged files."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedder.config import UserError
from embedder.outdir import OutDir, verify_checksum
from embedder.writer import ShardWriter, embedding_schema, iter_embeddings, shard_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    out = OutDir(str(tmp_path / "out"))
    out.write_bytes("a/b.bin", b"x" * 10)
    out.write_bytes("a/b.bin", b"y" * 3)
    out.write_json("m.json", {"k": 1})
    assert out.read_bytes("a/b.bin") == b"yyy" and out.read_json("m.json") == {"k": 1}
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if ".tmp-" in f]
    assert leftovers == []


def test_shard_writer_splits_rows_and_round_trips(tmp_path):
    out = OutDir(str(tmp_path))
    writer = ShardWriter(out, rows_per_shard=4, dimension=8)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((10, 8)).astype(np.float32)
    ids = np.arange(100, 110, dtype=np.int64)
    paths = np.array([f"/img/{i}.jpg" for i in range(10)], dtype=object)
    versions = [ids * 7, ids + 1000, ids * 1_000_000_000]  # fingerprint, size, mtime_ns
    done = []
    writer.on_shard = lambda name, sha, rows: done.append((name, sha, rows))
    writer.add(ids[:3], paths[:3], vectors[:3], *(v[:3] for v in versions))
    writer.add(ids[3:], paths[3:], vectors[3:], *(v[3:] for v in versions))
    writer.flush()
    names = shard_names(out)
    assert [pq.read_metadata(tmp_path / n).num_rows for n in names] == [4, 4, 2] and writer.rows_written == 10
    assert pq.read_schema(tmp_path / names[0]) == embedding_schema(8)
    assert [(n, r) for n, _, r in done] == list(zip(names, [4, 4, 2]))
    assert all(hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() == sha for n, sha, _ in done)
    table = pq.read_table(tmp_path / names[0])
    assert table.column("fingerprint").to_pylist() == (ids[:4] * 7).tolist()
    assert table.column("mtime_ns").to_pylist() == (ids[:4] * 1_000_000_000).tolist()
    got_ids, got_paths, got_xb = (np.concatenate(part) for part in zip(*iter_embeddings(out, batch_rows=3)))
    assert got_ids.tolist() == ids.tolist() and got_paths.tolist() == paths.tolist()
    assert np.array_equal(got_xb, vectors)


def test_embedder_model_code_imports_without_ray_or_faiss():
    script = (
        "import sys; import embedder.model, embedder.reader, embedder.actor, embedder.gpu_decode, embedder.config; "
        "print(sorted(m for m in ('ray', 'faiss') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    assert result.stdout.strip() == "[]"


def test_checksums_refuse_a_changed_file_and_the_cache_is_keyed_by_size_and_mtime(tmp_path):
    out = OutDir(str(tmp_path))
    manifest = {"checksums": {"f.bin": out.write_bytes("f.bin", b"abcdef")}}
    assert manifest["checksums"]["f.bin"] == hashlib.sha256(b"abcdef").hexdigest()
    verify_checksum(out, "f.bin", manifest, cached=True)
    stamp = os.stat(tmp_path / "f.bin")
    (tmp_path / "f.bin").write_bytes(b"abcdeX")  # same size; restore the mtime: only the cache cannot tell
    os.utime(tmp_path / "f.bin", ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    verify_checksum(out, "f.bin", manifest, cached=True)
    with pytest.raises(UserError, match="does not match the sha256"):
        verify_checksum(out, "f.bin", manifest)
    (tmp_path / "f.bin").write_bytes(b"abc")  # truncated: new size, so the cache does not answer
    with pytest.raises(UserError, match="does not match the sha256"):
        verify_checksum(out, "f.bin", manifest, cached=True)
    verify_checksum(out, "f.bin", {})  # nothing recorded (an OUT from before checksums): nothing to check


def test_a_damaged_shard_or_manifest_is_a_user_error(tmp_path):
    out = OutDir(str(tmp_path))
    out.write_bytes("embeddings/part-x.parquet", b"PAR1 not really parquet")
    with pytest.raises(UserError, match="not a readable Parquet shard"):
        list(iter_embeddings(out))
    out.write_bytes("manifest.json", b"{ broken")
    with pytest.raises(UserError, match="not valid JSON"):
        out.read_json("manifest.json")
