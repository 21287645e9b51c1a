"""Index and k-means at scale on this machine (not part of `make test`).

    python bench/index.py [--sizes 100000 1000000] [--dir /tmp/imgindex-bench] [--skip-sklearn] [--keep-data]
    python bench/index.py --tasks 2 [--sizes 1000000] [--dir ...] [--keep-data]

Generates the collection in the project's own layout (OUT/embeddings/*.parquet, 4096 rows per shard, one commit
record each) with a seeded model: N vectors in d = 4096 from c = 100 clusters; centres in a 64-d subspace drawn as
2 x standard normal; each vector = its centre + a 64-d standard normal offset, projected by one random 64 x 4096
matrix (standard normal / 8), plus 0.3 x standard normal noise in all 4096 dimensions, then ReLU; numpy
`default_rng(0)`, drawn 4096 rows at a time.

Without --tasks, for each N:
- `imgindex index` (cosine) as a subprocess per configuration: `flat`, `auto` and PCA 256 + IVF + PQ32 + exact
  re-ranking (`RFlat`); at N >= 1,000,000 every configuration with `--pca 256`. Reports build time, peak RSS of the
  build, 10-recall@10 (held-out sample, as the manifest records it; with PCA also against exact search on the full
  4096-d vectors) and query latency p50/p99 (200 single queries; 5 batches of 1,000).
- at N = 100,000: k-means (k = 100, 20 iterations, l2) of this project, `faiss.Kmeans` with defaults and
  `sklearn.cluster.KMeans` (k-means++, one init): time, objective, NMI against the generating labels.

With --tasks N, for each size: `imgindex index --pca 256` (auto) as N Ray tasks on an embedded local Ray with every
core, then in one process (time, peak RSS of the driver process, recall); the per-vector costs of each step on one core
with the index the one-process build left (`per_vector_costs`: read, transform, add, exact top-10, the paths run in
the tasks; merge and the paths table on the driver; the k-means passes) and the model they give for 100 M and 1 B
vectors on 10 and 100 nodes of 32 cores (`scale_table`); then `imgindex cluster --clusters 100` in one process and as
N tasks (time, driver peak RSS, objective).

Prints markdown tables and writes them, with the raw figures, to DIR/results.{md,json} after every step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

from embedder.collection import ShardRecord, commit
from embedder.outdir import OutDir
from embedder.writer import shard_name, shard_table, write_shard

D, SUBSPACE, CENTRES, CHUNK = 4096, 64, 100, 4096
HERE = os.path.dirname(os.path.abspath(__file__))
# The distributed comparison: `auto` behind a PCA to 256 dimensions, k-means with 100 clusters.
PCA, CLUSTERS = 256, 100
# Vectors the per-vector costs are measured on (held three times over: 16,384 x 16 KB = 268 MB each).
COST_SUBSET = 16_384
# The scale model: sizes, nodes of 32 cores, and the index budget (--max-memory) that `auto` is given there.
SCALE_SIZES, SCALE_NODES, NODE_CORES, SCALE_BUDGET = (100_000_000, 1_000_000_000), (10, 100), 32, 64 << 30

BUILD_SCRIPT = """
import json, sys, time
import faiss, numpy as np
from cluster.index import prepare
from cluster.options import IndexOptions, RayOptions
from cluster.search import Index
from cluster.vectors import ShardVectors
from embedder.outdir import OutDir
from jobs.index import index

out, kind, pca, tasks = sys.argv[1], sys.argv[2], (int(sys.argv[3]) or None), int(sys.argv[4])
started = time.monotonic()
record = index(out, IndexOptions(index=kind, max_memory="4G", pca=pca, ray=RayOptions(tasks=tasks)))
seconds = time.monotonic() - started
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
loaded = Index.load(out).index
xq = prepare(next(iter(ShardVectors(OutDir(out), 4096, 1000).batches()))[1], "cosine")
single = []
for q in xq[:200]:
    t = time.perf_counter(); loaded.search(q[None], 10); single.append(time.perf_counter() - t)
batch = []
for _ in range(5):
    t = time.perf_counter(); loaded.search(xq, 10); batch.append(time.perf_counter() - t)
print(json.dumps({"record": record, "seconds": seconds, "peak_rss": peak,
                  "single_ms": [float(np.percentile(single, p)) * 1e3 for p in (50, 99)],
                  "batch_ms": [float(np.percentile(batch, p)) * 1e3 for p in (50, 99)]}))
"""

CLUSTER_SCRIPT = """
import json, sys, time
from cluster.options import ClusterOptions, RayOptions
from jobs.cluster import cluster

out, k, tasks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
started = time.monotonic()
cluster(out, ClusterOptions(clusters=(k,), recluster=True, ray=RayOptions(tasks=tasks)))
seconds = time.monotonic() - started
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
record = json.load(open(f"{out}/manifest.json"))["clusters"]
print(json.dumps({"record": record, "seconds": seconds, "peak_rss": peak}))
"""


def generate(folder: str, n: int) -> np.ndarray:
    """Write the seeded collection to folder/embeddings/*.parquet with commit records and a manifest; returns the
    generating labels."""
    if os.path.exists(os.path.join(folder, "labels.npy")):
        return np.load(os.path.join(folder, "labels.npy"))
    shutil.rmtree(folder, ignore_errors=True)
    out = OutDir(folder)
    out.write_json("manifest.json", {"format_version": 2, "metric": "cosine", "dimension": D, "note": "bench/index.py synthetic"})
    rng = np.random.default_rng(0)
    centres = 2 * rng.standard_normal((CENTRES, SUBSPACE))
    projection = rng.standard_normal((SUBSPACE, D)) / 8
    labels = []
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        label = rng.integers(CENTRES, size=m)
        z = centres[label] + rng.standard_normal((m, SUBSPACE))
        x = np.maximum(z @ projection + 0.3 * rng.standard_normal((m, D)), 0).astype(np.float32)
        # No files behind these vectors: size and mtime -1, as the listing records a file it cannot stat.
        ids = np.arange(start, start + m, dtype=np.int64)
        unknown = np.full(m, -1, dtype=np.int64)
        rows = {"id": ids, "path": np.array([f"synthetic/{i}" for i in ids]), "embedding": x, "size": unknown, "mtime_ns": unknown}
        name = shard_name("synthetic", ids)
        commit(out, ShardRecord(name, m, *write_shard(out, name, shard_table(rows, D))))
        labels.append(label)
    np.save(os.path.join(folder, "labels.npy"), np.concatenate(labels))
    return np.concatenate(labels)


def in_process(script: str, *args: str) -> dict:
    """Run one step as `python -c script ARGS` in a fresh process, this repository first on its path: the JSON of its
    last stdout line with its `imgindex:` log lines under "log", or {"error": its last stderr line}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1]) | {"log": [line for line in done.stderr.splitlines() if "imgindex:" in line]}


def save_results(folder: str, results: dict, markdown: Callable[[dict], str], started: float) -> None:
    """`results`, with the seconds since `started`, to folder/results.json, and their tables to folder/results.md."""
    results["seconds"] = time.monotonic() - started
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(folder, "results.md"), "w") as f:
        f.write(markdown(results) + "\n")




def build(folder: str, kind: str, pca: int | None, tasks: int = 1) -> dict:
    """One `imgindex index` configuration in a fresh process (`tasks` > 1: as Ray tasks); its figures."""
    for name in ("index.faiss", "index_ids.parquet", "index_paths.parquet"):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    return in_process(BUILD_SCRIPT, folder, kind, str(pca or 0), str(tasks))


def kmeans_comparison(folder: str, labels: np.ndarray, skip_sklearn: bool) -> list[dict]:
    """This project's k-means, faiss.Kmeans defaults and scikit-learn on the same in-memory vectors (l2, k = 100)."""
    import faiss
    from sklearn.metrics import normalized_mutual_info_score

    from cluster.kmeans import FULL_PASSES, SEED_DIM, assign_all, train_kmeans
    from cluster.vectors import ShardVectors

    xb = np.concatenate([x for _ids, x in ShardVectors(OutDir(folder), D).batches()])
    rows = []

    def record(method: str, seconds: float, centroids: np.ndarray) -> None:
        result = assign_all(xb, centroids, "l2")
        rows.append({"method": method, "seconds": seconds, "objective": result.objective,
                     "nmi": float(normalized_mutual_info_score(labels, result.labels))})
        print(rows[-1], flush=True)

    started = time.monotonic()
    ours = train_kmeans(xb, CENTRES, niter=20, seed=0, metric="l2")
    record(f"imgindex (k-means++ on 25,600 in their top {SEED_DIM} PCs, FAISS on them, {FULL_PASSES} full pass)", time.monotonic() - started, ours)
    started = time.monotonic()
    kmeans = faiss.Kmeans(D, CENTRES, niter=20, seed=0)
    kmeans.train(xb)
    record("faiss.Kmeans defaults", time.monotonic() - started, kmeans.centroids)
    if not skip_sklearn:
        from sklearn.cluster import KMeans

        started = time.monotonic()
        model = KMeans(CENTRES, init="k-means++", n_init=1, max_iter=20, random_state=0).fit(xb)
        record("sklearn KMeans (k-means++, 1 init)", time.monotonic() - started, model.cluster_centers_.astype(np.float32))
    return rows


def per_vector_costs(folder: str) -> dict:
    """Seconds per vector of each step on one core, on the first COST_SUBSET vectors, with the trained index a
    one-process build left in `folder` (PCA 256 + IVF): read, transform, add (its IVF,Flat and IVF,PQ32), exact
    top-10 (in PCA space and in 4096-d), the paths run (tasks); merge and the paths table (driver); the Lloyd and the
    assignment pass (tasks); the driver's share of clustering (reading paths, writing clusters.csv) and of the id
    records; fixed costs: the PCA's training (scaled to PCA_TRAIN_POINTS), and the IVF's per training point and
    list."""
    import faiss
    import pandas as pd
    import pyarrow as pa

    from cluster.index import PCA_TRAIN_POINTS, ExactKnn, nlist_for, prepare
    from cluster.kmeans import _assign_part, _lloyd_sums
    from cluster.paths import read_run, run_bytes, sorted_chunks, write_paths
    from cluster.vectors import ArrayVectors, ShardVectors
    from embedder.writer import read_shard

    # One FAISS thread (its BLAS too) while measuring; restored after. OMP_NUM_THREADS is left alone: the k-means
    # steps after it run in subprocesses that inherit the environment.
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    out = OutDir(folder)
    whole = ShardVectors(out, D)
    chosen, rows = [], 0
    for record, size in zip(whole.records, whole.sizes):
        if rows >= COST_SUBSET:
            break
        chosen.append(record)
        rows += size
    part = ShardVectors(out, D, records=chosen)
    n = part.count
    costs: dict[str, float] = {"vectors": n}

    def timed(name: str, started: float) -> None:
        costs[name] = (time.perf_counter() - started) / n

    started = time.perf_counter()
    batches = list(part.rows())
    timed("read", started)
    index = faiss.read_index(os.path.join(folder, "index.faiss"))
    pca, inner = faiss.downcast_VectorTransform(index.chain.at(0)), faiss.downcast_index(index.index)
    empty = faiss.clone_index(inner)
    empty.reset()
    started = time.perf_counter()
    prepared = [prepare(xb, "cosine") for _shard, _ids, _paths, xb in batches]
    reduced = [pca.apply(x) for x in prepared]
    timed("transform", started)
    added = faiss.clone_index(empty)
    started = time.perf_counter()
    for (_shard, ids, _paths, _xb), xt in zip(batches, reduced):
        added.add_with_ids(xt, ids)
    timed("add", started)
    ivf = faiss.extract_index_ivf(empty)
    pq = faiss.IndexIVFPQ(faiss.clone_index(ivf.quantizer), PCA, ivf.nlist, 32, 8, faiss.METRIC_INNER_PRODUCT)
    pq.train(np.concatenate(reduced)[:10_000])
    started = time.perf_counter()
    for (_shard, ids, _paths, _xb), xt in zip(batches, reduced):
        pq.add_with_ids(xt, ids)
    timed("add_pq32", started)
    rng = np.random.default_rng(0)
    xq_full = np.concatenate(prepared)[rng.choice(n, 1000, replace=False)]
    for name, queries, vectors in (("truth", pca.apply(xq_full), reduced), ("truth_full", xq_full, prepared)):
        truth = ExactKnn(queries, "cosine")
        started = time.perf_counter()
        for (_shard, ids, _paths, _xb), x in zip(batches, vectors):
            truth.add(x, ids)
        timed(name, started)
    ids_all = np.concatenate([ids for _shard, ids, _paths, _xb in batches])
    paths_all = pa.array(np.concatenate([paths for _shard, _ids, paths, _xb in batches]), pa.string())
    shards_all = np.repeat(np.arange(len(batches), dtype=np.int32), [len(ids) for _shard, ids, _paths, _xb in batches])
    names = [shard for shard, _ids, _paths, _xb in batches]
    started = time.perf_counter()
    run_bytes(sorted_chunks(ids_all, paths_all, shards_all, names))
    timed("paths_run", started)
    data = faiss.serialize_index(added)
    merged = faiss.clone_index(empty)
    started = time.perf_counter()
    merged.merge_from(faiss.deserialize_index(data), 0)
    timed("merge", started)
    with tempfile.TemporaryDirectory() as scratch:
        runs = OutDir(scratch)
        for r, group in enumerate(np.array_split(np.arange(n), 8)):
            runs.write_bytes(f"run-{r}", run_bytes(sorted_chunks(ids_all[group], paths_all.take(pa.array(group)), shards_all[group], names)))
        started = time.perf_counter()
        write_paths(os.path.join(scratch, "paths.parquet"), [read_run(runs, f"run-{r}") for r in range(8)])
        timed("paths_merge", started)
    in_memory = ArrayVectors(np.concatenate([xb for _shard, _ids, _paths, xb in batches]), ids_all)
    centroids = prepare(in_memory.xb[rng.choice(n, CLUSTERS, replace=False)], "cosine")
    started = time.perf_counter()
    _lloyd_sums(in_memory, centroids, "cosine")
    timed("lloyd", started)
    started = time.perf_counter()
    _, labels, distances, *_ = _assign_part(in_memory, centroids, "cosine", ids_all[::10])
    timed("assign", started)
    started = time.perf_counter()
    table = pd.concat([read_shard(out, record.shard, ["id", "path"]).to_pandas() for record in chosen], ignore_index=True)
    table = pd.DataFrame({"id": ids_all, "path": table.set_index("id")["path"].loc[ids_all].to_numpy(), "cluster": labels, "distance": distances})
    with open(os.devnull, "w") as sink:
        table.sort_values(["cluster", "distance", "id"]).to_csv(sink, index=False)
    timed("clusters_csv", started)
    started = time.perf_counter()
    for record in chosen:
        read_shard(out, record.shard, ["id", "fingerprint"])
    timed("state", started)
    del batches, in_memory
    sample = np.concatenate(reduced)
    started = time.perf_counter()
    faiss.PCAMatrix(D, PCA).train(np.concatenate(prepared))
    costs["train_pca_s"] = (time.perf_counter() - started) * PCA_TRAIN_POINTS / n
    del prepared
    nlist = nlist_for(n)
    started = time.perf_counter()
    faiss.index_factory(PCA, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT).train(sample)
    costs["train_ivf_per_point_list"] = (time.perf_counter() - started) / (len(sample) * nlist)
    faiss.omp_set_num_threads(threads)
    return costs


def scale_table(costs: dict) -> list[dict]:
    """The model: hours to index and cluster N vectors on `nodes` nodes of NODE_CORES cores (one task per core, one
    thread each; the driver on one node with all its cores for training), and what the driver holds."""
    from cluster.index import TRAIN_POINTS_PER_LIST, estimate_bytes, nlist_for, plan_index
    from cluster.paths import RUN_BATCH_ROWS

    rows = []
    for n in SCALE_SIZES:
        plan = plan_index("auto", n, D, "cosine", SCALE_BUDGET, PCA)
        nlist = nlist_for(n)
        train_n = min(TRAIN_POINTS_PER_LIST * nlist, SCALE_BUDGET // 4 // (4 * PCA))
        add = costs["add_pq32"] if "PQ" in plan.spec else costs["add"]
        # Samples are drawn by id, so each sample pass reads every shard: two with PCA (queries and the PCA's sample,
        # then the IVF's sample in PCA space), then the pass that adds; k-means: its sample, Lloyd's pass, assignment.
        per_task = 3 * costs["read"] + costs["transform"] + add + costs["truth"] + costs["truth_full"] + costs["paths_run"]
        kmeans_per_task = 3 * costs["read"] + costs["lloyd"] + costs["assign"]
        # The driver reads the ids (and fingerprints) of every shard twice a step: the records, then the sorted ids.
        driver_per_vector = costs["merge"] + costs["paths_merge"] + 2 * costs["state"]
        for nodes in SCALE_NODES:
            cores = nodes * NODE_CORES
            train = costs["train_pca_s"] + costs["train_ivf_per_point_list"] * train_n * nlist / NODE_CORES
            tasks = n * per_task / cores
            driver = n * driver_per_vector
            kmeans_tasks = n * kmeans_per_task / cores
            kmeans_driver = n * (costs["clusters_csv"] + 2 * costs["state"])
            index_bytes = estimate_bytes(plan.spec, n, PCA)
            rows.append({
                "n": n, "nodes": nodes, "plan": f"PCA{PCA},{plan.spec}", "train_h": train / 3600, "tasks_h": tasks / 3600,
                "driver_h": driver / 3600, "kmeans_tasks_h": kmeans_tasks / 3600, "kmeans_driver_h": kmeans_driver / 3600,
                "total_h": (train + tasks + driver + kmeans_tasks + kmeans_driver) / 3600,
                "index_gb": index_bytes / 1e9, "state_gb": n * 32 / 1e9, "train_sample_gb": train_n * PCA * 4 / 1e9,
                "paths_merge_gb": cores * RUN_BATCH_ROWS * 100 / 1e9, "clusters_table_gb": n * 140 / 1e9,
            })
    return rows


def _params(record: dict) -> str:
    """An index record's search parameters as `name=value, ...` ('-' without any)."""
    return ", ".join(f"{k}={v}" for k, v in record.get("search_params", {}).items()) or "-"


def _result_lines(rows: list[dict], label: Callable[[dict], str], empty_cells: int, line: Callable[[dict, dict], str]) -> list[str]:
    """Markdown rows: `line(row, result)` for each measured row; for a failed one, its `label` cells, the error, and
    `empty_cells` empty cells."""
    return [
        f"| {label(row)} | failed: {row['result']['error']} |" + " |" * empty_cells if "error" in row["result"] else line(row, row["result"])
        for row in rows
    ]


def markdown(results: dict) -> str:
    lines = []
    if results["index"]:
        lines += ["| N | configuration | index | params | build s | peak RSS GB | 10-recall@10 | recall vs full 4096-d | single p50/p99 ms | batch 1000 p50/p99 ms |",
                  "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]

    def index_line(row: dict, r: dict) -> str:
        rec = r["record"]
        full = rec["recall"]["full_dimension"]
        return (
            f"| {row['n']:,} | {row['config']} | {rec['type']} | {_params(rec)} "
            f"| {r['seconds']:.0f} | {r['peak_rss'] / 2**30:.2f} | {rec['recall']['10-recall@10']:.3f} | {'-' if full is None else f'{full:.3f}'} "
            f"| {r['single_ms'][0]:.2f} / {r['single_ms'][1]:.2f} | {r['batch_ms'][0]:.0f} / {r['batch_ms'][1]:.0f} |"
        )

    lines += _result_lines(results["index"], lambda row: f"{row['n']:,} | {row['config']}", 7, index_line)
    if results.get("kmeans"):
        lines += ["", "| k-means, N = 100,000, k = 100 | s | objective | NMI |", "|---|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['seconds']:.1f} | {r['objective']:.4g} | {r['nmi']:.3f} |" for r in results["kmeans"]]
    if results.get("tasks"):
        lines += ["", "| N | step | tasks | s | driver peak RSS GB | 10-recall@10 / objective | search params |", "|---:|---|---:|---:|---:|---:|---|"]

        def tasks_line(row: dict, r: dict) -> str:
            rec = r["record"]
            figure = f"{rec['recall']['10-recall@10']:.3f}" if row["step"] == "index" else f"{rec['objective']:.6g}"
            return f"| {row['n']:,} | {row['step']} | {row['tasks']} | {r['seconds']:.1f} | {r['peak_rss'] / 2**30:.2f} | {figure} | {_params(rec)} |"

        lines += _result_lines(results["tasks"], lambda row: f"{row['n']:,} | {row['step']} | {row['tasks']}", 3, tasks_line)
    for costs in results.get("costs", []):
        lines += ["", f"| per-vector cost, one core (N = {costs['n']:,}, measured on {costs['vectors']:,}) | µs |", "|---|---:|"]
        lines += [f"| {name} | {value * 1e6:.2f} |" for name, value in costs.items() if name not in ("n", "vectors") and not name.startswith("train_")]
        lines += [f"| train PCA (fixed, s) | {costs['train_pca_s']:.1f} |",
                  f"| train IVF per training point and list (ns) | {costs['train_ivf_per_point_list'] * 1e9:.2f} |"]
    if results.get("scale"):
        lines += ["", "| N | nodes x 32 cores | plan | train h | add tasks h | driver h (merge, paths, ids) | k-means tasks h | k-means driver h | total h | driver holds GB: index / ids / sample / paths merge / clusters table |",
                  "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in results["scale"]:
            lines.append(
                f"| {r['n']:,} | {r['nodes']} | {r['plan']} | {r['train_h']:.2f} | {r['tasks_h']:.2f} | {r['driver_h']:.2f} | {r['kmeans_tasks_h']:.2f} "
                f"| {r['kmeans_driver_h']:.2f} | {r['total_h']:.2f} | {r['index_gb']:.0f} / {r['state_gb']:.0f} / {r['train_sample_gb']:.1f} / {r['paths_merge_gb']:.1f} / {r['clusters_table_gb']:.0f} |"
            )
    lines += ["", f"whole bench: {results['seconds'] / 60:.1f} min"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="default 100000 1000000; with --tasks 1000000")
    parser.add_argument("--dir", default="/tmp/imgindex-bench")
    parser.add_argument("--tasks", type=int, default=0, help="compare one process with this many Ray tasks (and model the scale)")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--keep-data", action="store_true")
    args = parser.parse_args()
    sizes = args.sizes or ([1_000_000] if args.tasks else [100_000, 1_000_000])
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.dir, exist_ok=True)
    started = time.monotonic()
    results: dict = {"index": [], "kmeans": [], "tasks": [], "costs": [], "scale": [], "seconds": 0.0}

    def save() -> None:
        save_results(args.dir, results, markdown, started)

    for n in sizes:
        folder = os.path.join(args.dir, f"n{n}")
        t = time.monotonic()
        labels = generate(folder, n)
        print(f"N={n}: generated in {time.monotonic() - t:.0f} s", flush=True)
        if args.tasks:
            # The one-process build runs second, so that its index is the one the per-vector costs are measured with;
            # the costs come before k-means, so that a run stopped during k-means still has them.
            for tasks in (args.tasks, 1):
                result = build(folder, "auto", PCA, tasks)
                results["tasks"].append({"n": n, "step": "index", "tasks": tasks, "result": result})
                print("index", tasks, json.dumps(result)[:400], flush=True)
                save()
            costs = per_vector_costs(folder) | {"n": n}
            results["costs"].append(costs)
            results["scale"] = scale_table(costs)
            print(json.dumps(costs), flush=True)
            save()
            for tasks in (1, args.tasks):
                result = in_process(CLUSTER_SCRIPT, folder, str(CLUSTERS), str(tasks))
                results["tasks"].append({"n": n, "step": f"cluster k={CLUSTERS}", "tasks": tasks, "result": result})
                print("cluster", tasks, json.dumps(result)[:400], flush=True)
                save()
        else:
            big = n >= 1_000_000
            nlist = 4096 if big else 1024
            configs = [("flat", "flat", 256 if big else None), ("auto", "auto", 256 if big else None),
                       (f"PCA256 + IVF{nlist},PQ32,RFlat", f"IVF{nlist},PQ32,RFlat", 256)]
            for name, kind, pca in configs:
                result = build(folder, kind, pca)
                results["index"].append({"n": n, "config": name + (" --pca 256" if pca and big else ""), "result": result})
                print(name, json.dumps(result)[:400], flush=True)
                save()
            if n == 100_000:
                results["kmeans"] = kmeans_comparison(folder, labels, args.skip_sklearn)
                save()
        if not args.keep_data:
            shutil.rmtree(folder)
    save()
    print(markdown(results))


if __name__ == "__main__":
    main()
