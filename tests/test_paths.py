"""The id -> path table: sorted runs merged into one id-sorted table, looked up by id (ground truth: the rows written);
query and serve answer with paths looked up on demand, the same answers, without holding the paths (measured in a
subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cluster.paths
from cluster.paths import PathTable, sorted_chunks, write_paths
from cluster.search import Index
from embedder.outdir import INDEX_FILE, PATHS_FILE, OutDir
from embedder.reader import image_id
from jobs.cli import main
from test_index import brute_force, write_out


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


MEASURE = """
import asyncio, ctypes, json, sys
import numpy as np
from starlette.requests import Request
import cluster.search
from cluster.search import Index
from jobs.serve_options import ServeOptions
from jobs.service import SearchService

def rss():
    # Resident bytes once freed memory is given back to the system (Arrow allocates with malloc here: see the env).
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) * 1024

class NoModel:
    # The replica's VGG-16, left out: what is measured is what the index, the paths and the clusters cost.
    device = "cpu"
    def __call__(self, pixels):
        return np.zeros((len(pixels), 4), np.float32)

def answer(out, like):
    # Load OUT as `who` does and answer: 20 searches and one search by path (and, for serve, the clusters listing).
    if who == "query":
        index = Index.load(out)
        xq = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
        return index, {"search": [[h.as_dict() for h in row] for row in index.search_vectors(xq, 10)],
                       "like": [h.as_dict() for h in index.like([like], 10)[0]]}
    service = SearchService.func_or_class.__mro__[1](out, None, ServeOptions(), 1)  # the class under the ingress wrapper
    request = Request({"type": "http", "method": "GET", "path": "/", "query_string": b"", "headers": [(b"host", b"127.0.0.1")]})
    return service, {"like": asyncio.run(service.search_path(request, like, 10))[0]["results"],
                     "clusters": asyncio.run(service.clusters(request, 4))}

small, big, who, like_small, like_big = sys.argv[1:]
cluster.search.Index.embedder = lambda self: NoModel()
held = answer(small, like_small)  # what loading any OUT costs once (imports, thread pools, allocator arenas)
before = rss()
held, answers = answer(big, like_big)
grown = rss() - before
# What holding the paths takes, as Index.load did before: a dict of every id -> path.
import pyarrow.parquet as pq
from embedder.collection import shard_names
from embedder.outdir import OutDir
paths = {}
for name in shard_names(OutDir(big)):
    table = pq.read_table(f"{big}/{name}", columns=["id", "path"])
    paths.update(zip(table.column("id").to_pylist(), table.column("path").to_pylist()))
print(json.dumps({"grown": grown, "dict": rss() - before - grown, "answers": answers}))
"""
N, PREFIX = 200_000, "/data/" + "every-image-of-the-collection/" * 8  # 250-byte paths, 54 MB of them


def collection(folder: str, n: int) -> tuple[str, np.ndarray, np.ndarray, dict]:
    """An OUT of n 4-d vectors with long paths (ids as embed makes them), indexed (IVF) and clustered (k = 3); its
    ids, vectors and id -> path."""
    names = [f"{PREFIX}{i}.jpg" for i in range(n)]
    ids = np.array([image_id(name) for name in names], dtype=np.int64)
    xb = np.random.default_rng(0).standard_normal((n, 4)).astype(np.float32)
    rows = min(n, 20_000)
    shards = [(ids[s:s + rows], xb[s:s + rows], np.ones(rows, np.int64)) for s in range(0, n, rows)]
    paths = dict(zip(ids.tolist(), names))
    write_out(folder, shards, path_of=paths.__getitem__)
    assert main(["index", folder, "--index", "IVF64,Flat", "--target-recall", "0.99"]) == 0
    assert main(["cluster", folder, "--clusters", "3"]) == 0
    return folder, ids, xb, paths


@pytest.fixture(scope="module")
def outs(tmp_path_factory) -> tuple[tuple, tuple]:
    """A small OUT (4,000 images: what loading any OUT costs) and a large one (N images)."""
    folder = tmp_path_factory.mktemp("paths")
    return collection(str(folder / "small"), 4000), collection(str(folder / "big"), N)


def measure(outs: tuple, who: str) -> dict:
    """Run MEASURE for `who` (query: the Python Index; serve: the service's replica class) in a fresh process."""
    (small, small_ids, _, small_paths), (big, big_ids, _, big_paths) = outs
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), ARROW_DEFAULT_MEMORY_POOL="system", MALLOC_MMAP_THRESHOLD_="65536")
    args = [small, big, who, small_paths[int(small_ids[7])], big_paths[int(big_ids[7])]]
    done = subprocess.run([sys.executable, "-c", MEASURE, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def check_memory(result: dict, out: str, who: str, per_id: int) -> None:
    """What loading and answering added is the index, `per_id` bytes of numbers per image, and far less than the
    paths; a dict of the paths, measured the same way, is more than their text."""
    text = N * len(f"{PREFIX}{2**62}.jpg")
    index_bytes = os.path.getsize(f"{out}/{INDEX_FILE}")
    print(f"{who}: paths {text / 1e6:.0f} MB, a dict of them +{result['dict'] / 1e6:.0f} MB RSS; loading and answering "
          f"+{result['grown'] / 1e6:.1f} MB (index.faiss {index_bytes / 1e6:.1f} MB, per-id numbers {N * per_id / 1e6:.1f} MB)")
    assert result["dict"] > text
    assert result["grown"] - index_bytes - N * per_id < text / 4


def test_query_answers_with_paths_it_does_not_hold(outs):
    out, ids, xb, paths = outs[1]
    result = measure(outs, "query")
    xq = np.random.default_rng(1).standard_normal((20, 4)).astype(np.float32)
    exact = ids[brute_force(xb, xq, 10, "l2")[1]]
    found = [[hit["id"] for hit in row] for row in result["answers"]["search"]]
    assert np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)]) >= 0.95
    hits = [hit for row in result["answers"]["search"] for hit in row] + result["answers"]["like"]
    assert all(hit["path"] == paths[hit["id"]] and hit["cluster"] in (0, 1, 2) for hit in hits)
    check_memory(result, out, "query", 12)  # the sorted ids and clusters


def test_serve_answers_as_query_with_paths_it_does_not_hold(outs):
    out, ids, _, paths = outs[1]
    result = measure(outs, "serve")
    assert result["answers"]["like"] == [hit.as_dict() for hit in Index.load(out).like([paths[int(ids[7])]], 10)[0]]
    members = pd.read_csv(f"{out}/clusters.csv")
    for answer in result["answers"]["clusters"]:
        rows = members[members["cluster"] == answer["cluster"]]
        assert answer["size"] == len(rows)
        assert [(e["id"], e["path"]) for e in answer["examples"]] == list(zip(rows["id"][:4], rows["path"][:4]))
    check_memory(result, out, "serve", 12 + 24)  # and the members table: id, cluster, distance
