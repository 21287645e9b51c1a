"""Writer and collection: shard names, the shard-writing stage, commit records (constant bytes per commit), replacing
and retiring shards, the update protocol of published files, recovery after a kill, and format-1 OUTs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from embedder.collection import ShardRecord, adopt, commit, committed, iter_embeddings, migrate, record_name, replace, retire, shard_names, uncommitted
from embedder.config import UserError
from embedder.outdir import CHECKSUMS, MANIFEST, PENDING, OutDir, verify_checksum
from embedder.reader import fingerprint
from embedder.resume import recover
from embedder.writer import COMMIT_COLUMNS, embedding_schema, read_shard, shard_name, shard_table, write_shard, write_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = 8


def rows(ids: np.ndarray, seed: int = 0, error: dict[int, str] | None = None) -> dict[str, np.ndarray]:
    """A batch as the model stage hands it to the writer."""
    rng = np.random.default_rng(seed)
    error = error or {}
    return {
        "id": ids.astype(np.int64),
        "path": np.array([f"/img/{i}.jpg" for i in ids], dtype=object),
        "embedding": rng.standard_normal((len(ids), D)).astype(np.float32),
        "size": ids + 1000, "mtime_ns": ids * 1_000_000_000,
        "error": np.array([error.get(int(i), "") for i in ids], dtype=object),
        "precision": np.array(["fp32"] * len(ids), dtype=object),
    }


def committed_out(tmp_path, *groups: np.ndarray) -> OutDir:
    """An OUT (format 2 manifest) with one committed shard per group of ids."""
    out = OutDir(str(tmp_path / "out"))
    out.write_json(MANIFEST, {"format_version": 2})
    for i, ids in enumerate(groups):
        name = shard_name("run", ids)
        size, sha = write_shard(out, name, shard_table(rows(ids, i), D))
        commit(out, ShardRecord(name, len(ids), size, sha))
    return out


def test_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    out = OutDir(str(tmp_path / "out"))
    out.write_bytes("a/b.bin", b"x" * 10)
    out.write_bytes("a/b.bin", b"y" * 3)
    out.write_json("m.json", {"k": 1})
    assert out.read_bytes("a/b.bin") == b"yyy" and out.read_json("m.json") == {"k": 1}
    leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if ".tmp-" in f]
    assert leftovers == []


def test_the_writer_stage_writes_one_shard_and_hands_back_only_what_is_committed(tmp_path):
    out = str(tmp_path / "out")
    batch = rows(np.arange(100, 106), error={102: "cannot decode: broken"})
    result = write_shards(batch, out, "tok", D)
    assert set(result) == set(COMMIT_COLUMNS) and "embedding" not in result
    kinds = result["kind"].tolist()
    assert kinds == ["shard", "error"]
    name = result["shard"][0]
    assert name == shard_name("tok", np.array([100, 101, 103, 104, 105])) and result["rows"][0] == 5
    data = (tmp_path / "out" / name).read_bytes()
    assert result["sha256"][0] == hashlib.sha256(data).hexdigest() and result["bytes"][0] == len(data)
    assert np.frombuffer(result["ids"][0], dtype=np.int64).tolist() == [100, 101, 103, 104, 105]
    assert (result["path"][1], result["error"][1]) == ("/img/102.jpg", "cannot decode: broken")
    table = pq.read_table(tmp_path / "out" / name)
    assert table.schema == embedding_schema(D)
    assert table.column("fingerprint").to_pylist() == [fingerprint(i + 1000, i * 10**9) for i in (100, 101, 103, 104, 105)]
    # A retried task writes the same rows under the same name: no second copy.
    again = write_shards(batch, out, "tok", D)
    assert again["shard"][0] == name and os.listdir(tmp_path / "out" / "embeddings") == [name.split("/")[1]]


def test_commit_records_make_the_collection_and_cost_the_same_at_any_size(tmp_path):
    out = committed_out(tmp_path, np.arange(0, 3))
    assert len(shard_names(out)) == 1
    record_bytes = []
    for i in range(1, 60):
        ids = np.arange(3 * i, 3 * i + 3)
        name = shard_name("run", ids)
        size, sha = write_shard(out, name, shard_table(rows(ids), D))
        record = ShardRecord(name, 3, size, sha)
        commit(out, record)
        record_bytes.append(os.path.getsize(tmp_path / "out" / record_name(name)))
    assert len(set(record_bytes)) == 1  # commit 59 writes as many bytes as commit 1
    assert json.loads((tmp_path / "out" / MANIFEST).read_text()) == {"format_version": 2}  # the manifest did not grow
    got = np.concatenate([ids for ids, _, _ in iter_embeddings(out, batch_rows=4)])
    assert sorted(got.tolist()) == list(range(180))


def test_an_uncommitted_shard_is_not_read_and_is_adopted_or_removed_by_the_next_run(tmp_path):
    out = committed_out(tmp_path, np.arange(0, 3))
    orphan = shard_name("run", np.arange(3, 6))
    write_shard(out, orphan, shard_table(rows(np.arange(3, 6)), D))
    out.write_bytes("embeddings/part-broken.parquet", b"PAR1 half a shard")
    assert uncommitted(out) == sorted([orphan, "embeddings/part-broken.parquet"])
    assert sorted(np.concatenate([ids for ids, _, _ in iter_embeddings(out)]).tolist()) == [0, 1, 2]
    assert adopt(out, orphan, D).rows == 3
    assert adopt(out, "embeddings/part-broken.parquet", D) is None and not out.exists("embeddings/part-broken.parquet")
    assert sorted(np.concatenate([ids for ids, _, _ in iter_embeddings(out)]).tolist()) == list(range(6))


def test_replace_and_retire_are_one_commit_each_and_recovery_finishes_them(tmp_path):
    out = committed_out(tmp_path, np.arange(0, 4), np.arange(4, 8))
    first, second = shard_names(out)
    smaller = read_shard(out, first).filter(np.array([True, False, True, False]))
    new = replace(out, first, smaller, "rerun")
    assert new.replaces == (first,) and not out.exists(first) and not out.exists(record_name(first))
    retire(out, second)
    assert shard_names(out) == [new.shard]
    # Killed after the replacing record, before the old record went: readers already see only the new shard, and
    # recovery removes the old record and file.
    again = replace(out, new.shard, read_shard(out, new.shard).slice(0, 1), "third")
    commit(out, ShardRecord(new.shard, new.rows, new.bytes, new.sha256))  # as if the old record were still there
    write_shard(out, new.shard, smaller)
    assert shard_names(out) == [again.shard]
    recover(out)
    assert out.list("commits", ".json") == [record_name(again.shard)] and out.list("embeddings", ".parquet") == [again.shard]


def test_a_committed_shard_that_changed_is_refused(tmp_path):
    out = committed_out(tmp_path, np.arange(0, 3))
    (name,) = shard_names(out)
    data = (tmp_path / "out" / name).read_bytes()
    (tmp_path / "out" / name).write_bytes(data[:-10] + b"0123456789")
    with pytest.raises(UserError, match="does not match the sha256"):
        list(iter_embeddings(out))


def test_an_update_is_staged_then_committed_and_a_killed_one_is_finished_or_discarded(tmp_path):
    out = OutDir(str(tmp_path / "out"))
    out.write_json(MANIFEST, {"format_version": 2, CHECKSUMS: {"a.bin": hashlib.sha256(b"old").hexdigest()}})
    out.write_bytes("a.bin", b"old")
    digests = out.publish({"a.bin": b"new", "b.bin": lambda path: open(path, "wb").write(b"written")}, {"section": {"k": 1}})
    manifest = out.read_manifest()
    assert out.read_bytes("a.bin") == b"new" and out.read_bytes("b.bin") == b"written"
    assert manifest[CHECKSUMS] == {"a.bin": hashlib.sha256(b"new").hexdigest(), "b.bin": hashlib.sha256(b"written").hexdigest()}
    assert manifest["section"] == {"k": 1} and PENDING not in manifest and digests["b.bin"][0] == 7
    # Staged but not committed (killed before the manifest named it): discarded.
    update = out.update()
    update.write("a.bin", b"never committed")
    recover(out)
    assert out.read_bytes("a.bin") == b"new" and out.leftovers("") == []
    # Committed but not applied (killed after the pending manifest): finished; readers accept either version meanwhile.
    update = out.update()
    update.write("a.bin", b"newer")
    manifest = out.read_manifest()
    manifest[PENDING] = {"token": update.token, "files": {"a.bin": hashlib.sha256(b"newer").hexdigest()}, "delete": ["b.bin"],
                         "sections": {"section": {"k": 2}}}
    out.write_json(MANIFEST, manifest)
    verify_checksum(out, "a.bin", out.read_manifest())
    recover(out)
    manifest = out.read_manifest()
    assert out.read_bytes("a.bin") == b"newer" and not out.exists("b.bin") and manifest["section"] == {"k": 2}
    assert "b.bin" not in manifest[CHECKSUMS] and PENDING not in manifest


def test_a_format_1_out_is_read_and_migrated(tmp_path):
    out = OutDir(str(tmp_path / "out"))
    names = []
    checksums = {}
    for i in range(2):
        ids = np.arange(3 * i, 3 * i + 3)
        name = f"embeddings/part-old-{i:05d}.parquet"
        checksums[name] = write_shard(out, name, shard_table(rows(ids), D))[1]
        names.append(name)
    checksums["index.faiss"] = "ab" * 32
    manifest = {"format_version": 1, CHECKSUMS: checksums}
    out.write_json(MANIFEST, manifest)
    assert shard_names(out) == names  # format 1: every shard file, checked against the manifest
    assert sorted(np.concatenate([ids for ids, _, _ in iter_embeddings(out)]).tolist()) == list(range(6))
    migrated = migrate(out, manifest)
    assert migrated[CHECKSUMS] == {"index.faiss": "ab" * 32}
    out.write_json(MANIFEST, migrated | {"format_version": 2})
    assert [r.sha256 for r in committed(out).values()] == [checksums[n] for n in names]
    assert [r.rows for r in committed(out).values()] == [3, 3]


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
    out.write_json(MANIFEST, {"format_version": 1})
    out.write_bytes("embeddings/part-x.parquet", b"PAR1 not really parquet")
    with pytest.raises(UserError, match="not a readable Parquet shard"):
        list(iter_embeddings(out))
    out.write_bytes("manifest.json", b"{ broken")
    with pytest.raises(UserError, match="not valid JSON"):
        out.read_json("manifest.json")
