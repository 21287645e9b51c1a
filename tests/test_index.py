"""The index job on hand-written OUT folders: search vs brute force, plain faiss.read_index with the tuned
parameters, peak memory of the streaming build, --max-memory, and incremental add/change/remove."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import faiss
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from cluster.index import IndexPlan, new_index, prepare, to_distance
from cluster.search import Index
from embedder.outdir import INDEX_FILE, OutDir
from embedder.writer import embedding_schema, write_shard
from jobs.cli import main


def write_out(folder: str, shards: list[tuple[np.ndarray, np.ndarray, np.ndarray]], metric: str = "l2", path_of=None) -> OutDir:
    """An OUT as `imgindex embed` leaves it, by hand: manifest.json and one shard per (ids, xb, fingerprints); the image
    of id j is at `path_of(j)` (default /images/j.jpg)."""
    dimension = shards[0][1].shape[1]
    out = OutDir(folder)
    out.write_json("manifest.json", {"format_version": 1, "metric": metric, "dimension": dimension})
    schema = embedding_schema(dimension)
    for name in [n for n in out.list("embeddings", ".parquet")]:
        out.delete(name)
    for i, (ids, xb, fingerprints) in enumerate(shards):
        columns = {
            "id": pa.array(ids, pa.int64()),
            "path": pa.array([path_of(j) if path_of else f"/images/{j}.jpg" for j in ids]),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(xb.astype(np.float32).ravel()), dimension),
            "fingerprint": pa.array(fingerprints, pa.int64()),
            "size": pa.array(np.full(len(ids), 1000), pa.int64()),
            "mtime_ns": pa.array(fingerprints, pa.int64()),
        }
        write_shard(out, f"embeddings/part-{i:05d}.parquet", pa.table([columns[n] for n in schema.names], schema=schema))
    return out


def brute_force(xb: np.ndarray, xq: np.ndarray, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    if metric == "cosine":
        xb = xb / np.linalg.norm(xb, axis=1, keepdims=True)
        xq = xq / np.linalg.norm(xq, axis=1, keepdims=True)
        distance = 1.0 - xq @ xb.T
    else:
        distance = np.sqrt(((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1))
    order = np.argsort(distance, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distance, order, axis=1), order


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_equals_brute_force(metric):
    rng = np.random.default_rng(0)
    xb = np.maximum(rng.standard_normal((500, 64)), 0).astype(np.float32) + 0.01
    xq = np.maximum(rng.standard_normal((20, 64)), 0).astype(np.float32) + 0.01
    ids = rng.choice(2**62, size=500, replace=False).astype(np.int64)
    index = new_index(IndexPlan("Flat", 64, metric))
    index.add_with_ids(prepare(xb, metric), ids)
    D, I = index.search(prepare(xq, metric), 10)
    expected_d, expected_rows = brute_force(xb.astype(np.float64), xq.astype(np.float64), 10, metric)
    assert np.array_equal(I, ids[expected_rows])
    np.testing.assert_allclose(to_distance(D, metric), expected_d, atol=1e-4)


def gaussian_shards(n: int, d: int, per_shard: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    xb = rng.standard_normal((n, d)).astype(np.float32)
    ids = rng.choice(2**62, size=n, replace=False).astype(np.int64)
    return [(ids[s:s + per_shard], xb[s:s + per_shard], np.ones(len(ids[s:s + per_shard]), np.int64)) for s in range(0, n, per_shard)]


def test_saved_index_loads_with_plain_faiss_and_the_tuned_parameters(tmp_path, capsys):
    shards = gaussian_shards(3000, 32, 1000)
    out = str(tmp_path / "out")
    write_out(out, shards)
    assert main(["index", out, "--index", "IVF32,Flat"]) == 0
    record = json.load(open(f"{out}/manifest.json"))["index"]
    assert record["type"] == "IVF32,Flat" and record["ntotal"] == 3000 and record["target_met"]
    assert record["recall"]["10-recall@10"] >= 0.95 and record["recall"]["queries"] == 1000
    assert "10-recall@10" in capsys.readouterr().err
    nprobe = record["search_params"]["nprobe"]
    loaded = faiss.read_index(f"{out}/{INDEX_FILE}")
    assert faiss.downcast_index(loaded).nprobe == nprobe > 1
    ids, xb, _ = shards[0]
    _, I = loaded.search(xb[:5], 1)
    assert I[:, 0].tolist() == ids[:5].tolist()
    # The query API applies the manifest's parameters, whatever the file holds.
    faiss.downcast_index(loaded).nprobe = 1
    faiss.write_index(loaded, f"{out}/{INDEX_FILE}")
    manifest = json.load(open(f"{out}/manifest.json"))
    manifest["checksums"][INDEX_FILE] = hashlib.sha256(open(f"{out}/{INDEX_FILE}", "rb").read()).hexdigest()
    json.dump(manifest, open(f"{out}/manifest.json", "w"))
    assert faiss.downcast_index(Index.load(out).index).nprobe == nprobe


PEAK_SCRIPT = """
import json, sys
import faiss, numpy as np
from cluster.vectors import ShardVectors
from cluster.options import IndexOptions
from embedder.outdir import OutDir
from jobs.index import index

def peak():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024

# Warm up what a build holds whatever N (BLAS thread buffers, Arrow's pool after one shard), then measure.
next(iter(ShardVectors(OutDir(sys.argv[1]), 1024).batches()))
faiss.knn(np.ones((1000, 1024), np.float32), np.ones((1000, 1024), np.float32), 10)
before = peak()
record = index(sys.argv[1], IndexOptions(index="IVF64,Flat", max_memory="32M", pca=64), batch_rows=2048)
print(json.dumps({"growth": peak() - before, "record": record}))
"""


def test_streaming_build_peak_memory_stays_near_the_index_plus_one_batch(tmp_path):
    n, d, per_shard = 48_000, 1024, 1000
    out = str(tmp_path / "out")
    write_out(out, gaussian_shards(n, d, per_shard))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, out], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    all_vectors = n * d * 4  # 197 MB: what holding the collection at once would take, before any copy
    index_bytes = result["record"]["bytes"]
    assert result["record"]["ntotal"] == n and index_bytes <= 32 << 20
    print(f"peak RSS growth {result['growth'] / 1e6:.1f} MB, collection {all_vectors / 1e6:.0f} MB, index {index_bytes / 1e6:.1f} MB")
    # The index, one 4 MB shard in its Parquet, numpy and PCA forms, the 8 MB training samples, the queries.
    assert result["growth"] < index_bytes + (64 << 20) < all_vectors / 2


def index_record(out: str) -> dict:
    return json.load(open(f"{out}/manifest.json"))["index"]


def error_lines(capsys) -> list[str]:
    """The error lines on stderr (progress lines start `imgindex: ` too, errors `imgindex: error: `)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("imgindex: error: ")]


def test_max_memory_is_respected(tmp_path, capsys):
    out = str(tmp_path / "out")
    write_out(out, gaussian_shards(4000, 64, 2000))
    # Flat would take 4000 x (256 + 8) bytes = 1.06 MB: over 400K, auto takes 8-bit scalar codes.
    assert main(["index", out, "--max-memory", "400K"]) == 0
    record = index_record(out)
    assert record["type"] == "IVF64,SQ8" and record["bytes"] == os.path.getsize(f"{out}/{INDEX_FILE}") <= 400 * 1024
    assert record["target_met"] and record["recall"]["10-recall@10"] >= 0.95
    capsys.readouterr()
    assert main(["index", out, "--index", "flat", "--max-memory", "400K"]) == 2
    (err,) = error_lines(capsys)
    assert "more than --max-memory" in err
    # auto never keeps an index that misses the target on the held-out sample.
    os.remove(f"{out}/{INDEX_FILE}")
    assert main(["index", out, "--max-memory", "400K", "--target-recall", "0.9999"]) == 2
    (err,) = error_lines(capsys)
    assert "below --target-recall 0.9999" in err and not os.path.exists(f"{out}/{INDEX_FILE}")


def changed_collection(shards: list, seed: int = 1) -> tuple[list, np.ndarray, np.ndarray, np.ndarray]:
    """The shards after a day: 50 rows of shard 0 deleted, 30 of shard 1 changed (new vector and fingerprint), a new
    shard of 100; returns (shards, removed ids, changed ids, added ids)."""
    rng = np.random.default_rng(seed)
    (ids0, xb0, fp0), (ids1, xb1, fp1), *rest = shards
    xb1, fp1 = xb1.copy(), fp1.copy()
    xb1[:30] = rng.standard_normal((30, xb1.shape[1]))
    fp1[:30] += 1
    new_ids = rng.choice(2**62, size=100, replace=False).astype(np.int64)
    grown = [(ids0[50:], xb0[50:], fp0[50:]), (ids1, xb1, fp1), *rest, (new_ids, rng.standard_normal((100, xb0.shape[1])).astype(np.float32), np.ones(100, np.int64))]
    return grown, ids0[:50], ids1[:30], new_ids


@pytest.mark.parametrize("index_type,in_place", [("flat", True), ("IVF16,Flat", True), ("hnsw", False)])
def test_rerun_adds_changes_and_removes_ids(tmp_path, index_type, in_place):
    out = str(tmp_path / "out")
    shards = gaussian_shards(1200, 32, 400)
    write_out(out, shards)
    assert main(["index", out, "--index", index_type]) == 0
    assert index_record(out)["update"] == {"added": 1200, "changed": 0, "removed": 0, "rebuilt": True}

    grown, removed, changed, added = changed_collection(shards)
    write_out(out, grown)
    assert main(["index", out, "--index", index_type]) == 0
    record = index_record(out)
    assert record["update"] == {"added": 100, "changed": 30, "removed": 50, "rebuilt": not in_place}
    ids = np.concatenate([g[0] for g in grown])
    xb = np.concatenate([g[1] for g in grown])
    index = Index.load(out).index
    assert index.ntotal == record["ntotal"] == len(ids) == 1250
    _, I = index.search(xb, 10)
    assert set(I.ravel().tolist()) <= set(ids.tolist())  # removed ids are gone, also as neighbours
    moved = np.isin(ids, np.concatenate([changed, added]))
    assert (I[moved, 0] == ids[moved]).all()  # changed and added vectors are found at their new place
    if index_type == "flat":
        assert np.array_equal(I, ids[brute_force(xb, xb, 10, "l2")[1]])
    recorded = pd.read_parquet(f"{out}/index_ids.parquet")
    assert sorted(recorded["id"]) == sorted(ids.tolist())
    assert recorded.set_index("id").loc[changed, "fingerprint"].eq(2).all()

    mtime = os.path.getmtime(f"{out}/{INDEX_FILE}")
    assert main(["index", out, "--index", index_type]) == 0
    assert index_record(out)["update"] == {"added": 0, "changed": 0, "removed": 0, "rebuilt": False}
    assert os.path.getmtime(f"{out}/{INDEX_FILE}") == mtime
