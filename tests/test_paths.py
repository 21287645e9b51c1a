"""The id -> path table: sorted runs merged into one id-sorted table, looked up by id (ground truth: the rows written),
and a loaded index that answers with paths looked up on demand without holding them (measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import cluster.paths
from cluster.paths import PathTable, sorted_chunks, write_paths
from embedder.outdir import INDEX_FILE, PATHS_FILE, OutDir
from jobs.cli import main
from test_index import brute_force, gaussian_shards, write_out


def test_merged_runs_are_one_sorted_table_and_every_id_is_found(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster.paths, "PATHS_ROW_GROUP", 100)  # many row groups, runs read a little at a time
    monkeypatch.setattr(cluster.paths, "RUN_BATCH_ROWS", 37)
    rng = np.random.default_rng(0)
    ids = rng.choice(2**62, size=2000, replace=False).astype(np.int64)
    paths = np.array([f"/photos/{i}.jpg" for i in ids], dtype=object)
    sizes = [0, 1, 650, 1349]  # an empty run and a run of one row too
    bounds = np.cumsum([0, *sizes])
    runs = []
    for r, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        shard = np.full(hi - lo, 0, dtype=np.int32)
        runs.append(list(sorted_chunks(ids[lo:hi], pa.array(paths[lo:hi], pa.string()), shard, [f"embeddings/part-{r}.parquet"], rows=37)))
    out = OutDir(str(tmp_path))
    write_paths(out.path(PATHS_FILE), runs)
    written = pq.ParquetFile(out.path(PATHS_FILE))
    assert written.metadata.num_row_groups == 20 and written.metadata.num_rows == 2000
    table = written.read().to_pandas()
    assert table["id"].is_monotonic_increasing and table["id"].tolist() == sorted(ids.tolist())
    lookup = PathTable(out)
    run_of = np.repeat(np.arange(len(sizes)), sizes)
    for i in rng.choice(2000, size=300, replace=False):
        assert lookup.find(int(ids[i])) == (paths[i], f"embeddings/part-{run_of[i]}.parquet")
        assert ids[i] in lookup
    for absent in (0, int(ids.min()) - 1, int(ids.max()) + 1, 2**63 - 1):
        assert lookup.get(absent) is None and absent not in lookup


MEMORY_SCRIPT = """
import ctypes, json, sys
import numpy as np
import faiss, pyarrow.csv, pyarrow.parquet as pq
from cluster.search import Index
from embedder.collection import shard_names
from embedder.outdir import OutDir

def rss():
    # Resident bytes once freed memory is given back to the system (Arrow allocates with malloc here: see the env).
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

out = sys.argv[1]
# Warm up what a process reading Parquet as the lookups do holds whatever N (Arrow's allocator arenas, its thread
# pools): one shard read that way.
folder = OutDir(out)
shard = pq.ParquetFile(folder.fs.open_input_file(folder.path(shard_names(folder)[0])))
for group in range(shard.metadata.num_row_groups):
    shard.read_row_group(group, columns=["id"], use_threads=False)
    for batch in shard.iter_batches(1024, row_groups=[group], columns=["path"], use_threads=False):
        batch.column(0)[0].as_py()
del shard
before = rss()
index = Index.load(out)
xq = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
hits = index.search_vectors(xq, 10)
loaded = rss()
# What holding the paths takes, as Index.load did before: a dict of every id -> path.
paths = {}
for name in shard_names(OutDir(out)):
    table = pq.read_table(f"{out}/{name}", columns=["id", "path"])
    paths.update(zip(table.column("id").to_pylist(), table.column("path").to_pylist()))
print(json.dumps({"index": loaded - before, "dict": rss() - loaded, "hits": [[[h.id, h.path] for h in row] for row in hits]}))
"""


def test_a_loaded_index_answers_with_paths_it_does_not_hold(tmp_path):
    n, length = 200_000, 250
    prefix = "/data/" + "every-image-of-the-collection/" * (length // 30)
    shards = gaussian_shards(n, 4, 20_000)
    out = str(tmp_path / "out")
    write_out(out, shards, prefix=prefix)
    assert main(["index", out, "--index", "IVF64,Flat", "--target-recall", "0.99"]) == 0
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), ARROW_DEFAULT_MEMORY_POOL="system")
    done = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, out], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    ids, xb = np.concatenate([s[0] for s in shards]), np.concatenate([s[1] for s in shards])
    xq = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
    exact = ids[brute_force(xb, xq, 10, "l2")[1]]
    found = [[hit_id for hit_id, _ in row] for row in result["hits"]]
    assert np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]) >= 0.95
    assert all(path == f"{prefix}{hit_id}.jpg" for row in result["hits"] for hit_id, path in row)
    text = n * len(f"{prefix}{ids[0]}.jpg")
    index_bytes = os.path.getsize(f"{out}/{INDEX_FILE}")
    print(f"paths {text / 1e6:.0f} MB; a dict of them +{result['dict'] / 1e6:.0f} MB RSS; Index.load and 20 searches "
          f"+{result['index'] / 1e6:.1f} MB, index.faiss {index_bytes / 1e6:.1f} MB")
    assert result["dict"] > text  # the measure sees the paths when they are held
    assert result["index"] - index_bytes < text / 4
