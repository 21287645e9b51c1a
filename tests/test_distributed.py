"""The index and k-means passes as Ray tasks (`--tasks 4` on the embedded local Ray) against the one-process build of
the same data: the same ids, recall and tuned parameters, the same k-means objective; the driver reads no vector; a
killed task is retried without duplicating ids; an index built on tasks updates in place."""

from __future__ import annotations

import json
import os

import faiss
import numpy as np
import pandas as pd
import pytest

from cluster.distributed import KILL_TASK_HOOK_ENV, TaskVectors
from cluster.index import index_parts
from cluster.search import Index
from cluster.vectors import ShardVectors
from jobs.cli import main
from test_index import changed_collection, gaussian_shards, write_out

SHARDS = gaussian_shards(6000, 32, 500)  # 12 shards: 4 groups of 3


def held_ids(index: faiss.Index) -> np.ndarray:
    """Every id the index holds, duplicates included (from the inverted lists, or the IDMap's id array)."""
    parts = list(index_parts(index))
    ivf = next((part for part in parts if isinstance(part, faiss.IndexIVF)), None)
    if ivf is None:
        return faiss.vector_to_array(next(part for part in parts if isinstance(part, faiss.IndexIDMap)).id_map)
    lists = ivf.invlists
    return np.concatenate([faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(ivf.nlist)])


def record(out: str, step: str = "index") -> dict:
    return json.load(open(f"{out}/manifest.json"))[step]


def build(tmp_path, name: str, args: list[str], shards=SHARDS) -> str:
    out = str(tmp_path / name)
    write_out(out, shards)
    assert main(["index", out, *args]) == 0
    return out


@pytest.fixture
def driver_reads(monkeypatch) -> dict:
    """Vectors this process reads from shards during each Ray pass, by the pass's function name."""
    reads: dict[str, int] = {}
    original = TaskVectors.map

    def counting(self, fn, *args):
        before = ShardVectors.rows_read
        yield from original(self, fn, *args)
        reads[fn.__name__] = reads.get(fn.__name__, 0) + ShardVectors.rows_read - before

    monkeypatch.setattr(TaskVectors, "map", counting)
    return reads


@pytest.mark.parametrize("args", [["--index", "IVF32,Flat", "--pca", "16"], ["--index", "flat"], ["--index", "IVF16,SQ8"]])
def test_tasks_build_the_same_index_as_one_process(tmp_path, local_ray, driver_reads, args):
    one = build(tmp_path, "one", args)
    before = ShardVectors.rows_read
    four = build(tmp_path, "four", [*args, "--tasks", "4"])
    assert ShardVectors.rows_read == before and driver_reads["_add_part"] == 0  # no vector read here, sample included
    a, b = record(one), record(four)
    assert (a["tasks"], b["tasks"]) == (1, 4)
    assert a["ntotal"] == b["ntotal"] == 6000 and a["search_params"] == b["search_params"]
    assert abs(a["recall"]["10-recall@10"] - b["recall"]["10-recall@10"]) <= 0.005
    ids_one, ids_four = held_ids(Index.load(one).index), held_ids(Index.load(four).index)
    assert np.array_equal(np.sort(ids_one), np.sort(ids_four)) and len(np.unique(ids_four)) == 6000
    assert pd.read_parquet(f"{four}/index_paths.parquet").equals(pd.read_parquet(f"{one}/index_paths.parquet"))
    assert sorted(os.listdir(four)) == sorted(os.listdir(one))  # the tasks' sorted runs are gone


def test_hnsw_is_built_in_one_process_even_with_tasks(tmp_path, local_ray):
    out = build(tmp_path, "hnsw", ["--index", "hnsw", "--tasks", "4"])
    assert record(out)["tasks"] == 1 and record(out)["ntotal"] == 6000


def test_a_killed_task_is_retried_without_duplicate_ids(tmp_path, local_ray, monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_TASK_HOOK_ENV, str(marker))
    out = build(tmp_path, "killed", ["--index", "IVF32,Flat", "--tasks", "4"])
    assert marker.exists()  # one task's process was killed after its work, before returning
    ids = held_ids(Index.load(out).index)
    expected = np.concatenate([ids for ids, _, _ in SHARDS])
    assert len(ids) == record(out)["ntotal"] == 6000 and np.array_equal(np.sort(ids), np.sort(expected))
    paths = pd.read_parquet(f"{out}/index_paths.parquet")
    assert len(paths) == 6000 and paths["id"].is_unique and paths["id"].is_monotonic_increasing


def test_an_index_built_on_tasks_updates_in_place_on_tasks(tmp_path, local_ray):
    out = build(tmp_path, "grow", ["--index", "IVF32,Flat", "--tasks", "4"])
    grown, removed, changed, added = changed_collection(SHARDS)
    write_out(out, grown)
    assert main(["index", out, "--index", "IVF32,Flat", "--tasks", "4"]) == 0
    assert record(out)["update"] == {"added": 100, "changed": 30, "removed": 50, "rebuilt": False}
    loaded = Index.load(out)
    ids, xb = np.concatenate([g[0] for g in grown]), np.concatenate([g[1] for g in grown])
    assert np.array_equal(np.sort(held_ids(loaded.index)), np.sort(ids))
    moved = np.isin(ids, np.concatenate([changed, added]))
    assert (loaded.index.search(xb[moved], 1)[1][:, 0] == ids[moved]).all()  # at their new place
    assert loaded.paths.get(int(added[0])) == f"/images/{added[0]}.jpg" and loaded.paths.get(int(removed[0])) is None


def test_kmeans_on_tasks_has_the_one_process_objective(tmp_path, local_ray, driver_reads):
    outs = {name: str(tmp_path / name) for name in ("one", "four")}
    for out in outs.values():
        write_out(out, SHARDS)
    # 6000 vectors > 256 x 5: k-means trains on a sample, then makes a full Lloyd pass and the assignment pass.
    assert main(["cluster", outs["one"], "--clusters", "5"]) == 0
    before = ShardVectors.rows_read
    assert main(["cluster", outs["four"], "--clusters", "5", "--tasks", "4"]) == 0
    assert ShardVectors.rows_read == before and driver_reads["_lloyd_sums"] == driver_reads["_assign_part"] == 0
    a, b = record(outs["one"], "clusters"), record(outs["four"], "clusters")
    assert (a["tasks"], b["tasks"]) == (1, 4)
    assert b["objective"] == pytest.approx(a["objective"], rel=1e-6) and a["sizes"] == b["sizes"]
    one, four = (pd.read_csv(f"{outs[n]}/clusters.csv").sort_values("id").reset_index(drop=True) for n in ("one", "four"))
    assert (one["cluster"] == four["cluster"]).mean() > 0.999
