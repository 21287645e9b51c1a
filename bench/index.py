"""Index and k-means at scale on this machine, every configuration in one run (not part of `make test`).

    python bench/index.py [--sizes 100000 1000000] [--dir /tmp/imgindex-bench] [--skip-sklearn] [--keep-data]

Generates the collection in the project's own Parquet layout (OUT/embeddings/*.parquet, 4096 rows per shard) with a
seeded model: N vectors in d = 4096 from c = 100 clusters; centres in a 64-d subspace drawn as 2 x standard normal;
each vector = its centre + a 64-d standard normal offset, projected by one random 64 x 4096 matrix (standard normal
/ 8), plus 0.3 x standard normal noise in all 4096 dimensions, then ReLU; numpy `default_rng(0)`, drawn 4096 rows at
a time. Then, for each N:
- `imgindex index` (cosine) as a subprocess per configuration: `flat`, `auto` and PCA 256 + IVF + PQ32 + exact
  re-ranking (`RFlat`); at N >= 1,000,000 every configuration with `--pca 256`. Reports build time, peak RSS of the
  build, 10-recall@10 (held-out sample, as the manifest records it; with PCA also against exact search on the full
  4096-d vectors) and query latency p50/p99 (200 single queries; 5 batches of 1,000).
- at N = 100,000: k-means (k = 100, 20 iterations, l2) of this project, `faiss.Kmeans` with defaults and
  `sklearn.cluster.KMeans` (k-means++, one init): time, objective, NMI against the generating labels.
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
import time

import numpy as np

from embedder.collection import ShardRecord, commit
from embedder.outdir import OutDir
from embedder.writer import shard_name, shard_table, write_shard

D, SUBSPACE, CENTRES, CHUNK = 4096, 64, 100, 4096
HERE = os.path.dirname(os.path.abspath(__file__))

BUILD_SCRIPT = """
import json, sys, time
import faiss, numpy as np
from cluster.index import prepare
from cluster.search import Index
from cluster.vectors import ShardVectors
from cluster.options import IndexOptions
from embedder.outdir import OutDir
from jobs.index import index

out, kind, pca = sys.argv[1], sys.argv[2], (int(sys.argv[3]) or None)
started = time.monotonic()
record = index(out, IndexOptions(index=kind, max_memory="4G", pca=pca))
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


def generate(folder: str, n: int) -> np.ndarray:
    """Write the seeded collection to folder/embeddings/*.parquet with a manifest; returns the generating labels."""
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


def build(folder: str, kind: str, pca: int | None) -> dict:
    """One `imgindex index` configuration in a fresh process; its figures."""
    for name in ("index.faiss", "index_ids.parquet"):
        if os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, folder, kind, str(pca or 0)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def markdown(results: dict) -> str:
    lines = ["| N | configuration | index | params | build s | peak RSS GB | 10-recall@10 | recall vs full 4096-d | single p50/p99 ms | batch 1000 p50/p99 ms |",
             "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in results["index"]:
        r = row["result"]
        if "error" in r:
            lines.append(f"| {row['n']:,} | {row['config']} | failed: {r['error']} | | | | | | | |")
            continue
        rec = r["record"]
        full = rec["recall"]["full_dimension"]
        lines.append(
            f"| {row['n']:,} | {row['config']} | {rec['type']} | {', '.join(f'{k}={v}' for k, v in rec['search_params'].items()) or '-'} "
            f"| {r['seconds']:.0f} | {r['peak_rss'] / 2**30:.2f} | {rec['recall']['10-recall@10']:.3f} | {'-' if full is None else f'{full:.3f}'} "
            f"| {r['single_ms'][0]:.2f} / {r['single_ms'][1]:.2f} | {r['batch_ms'][0]:.0f} / {r['batch_ms'][1]:.0f} |"
        )
    if results.get("kmeans"):
        lines += ["", "| k-means, N = 100,000, k = 100 | s | objective | NMI |", "|---|---:|---:|---:|"]
        lines += [f"| {r['method']} | {r['seconds']:.1f} | {r['objective']:.4g} | {r['nmi']:.3f} |" for r in results["kmeans"]]
    lines += ["", f"whole bench: {results['seconds'] / 60:.1f} min"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dir", default="/tmp/imgindex-bench")
    parser.add_argument("--skip-sklearn", action="store_true")
    parser.add_argument("--keep-data", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.dir, exist_ok=True)
    started = time.monotonic()
    results: dict = {"index": [], "kmeans": [], "seconds": 0.0}

    def save() -> None:
        results["seconds"] = time.monotonic() - started
        with open(os.path.join(args.dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(args.dir, "results.md"), "w") as f:
            f.write(markdown(results) + "\n")

    for n in args.sizes:
        folder = os.path.join(args.dir, f"n{n}")
        t = time.monotonic()
        labels = generate(folder, n)
        print(f"N={n}: generated in {time.monotonic() - t:.0f} s", flush=True)
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
