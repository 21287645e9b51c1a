"""Writer: atomic files, shard sizes and schema, and streaming the shards back."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq

from embedder.writer import OutDir, ShardWriter, embedding_schema, iter_embeddings, shard_names

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
