"""Near-duplicates at scale on this machine, against planted groups (not part of `make test`).

    python bench/duplicates.py [--sizes 100000 1000000] [--baseline 20000] [--threshold 0.05] [--dir DIR] [--keep-data]

Synthetic vectors, not images: no model runs, and the keep rule finds no files, so the path decides every keeper.
The collection is written in the project's own layout (OUT/embeddings/*.parquet, 4096 rows per shard, one commit
record each) by a seeded generator: bench/index.py's model (N vectors in d = 4096 from c = 100 clusters; centres in a
64-d subspace drawn as 2 x standard normal; latent = centre + 64-d standard normal; pre-activation = latent projected
by one random 64 x 4096 matrix (standard normal / 8) + 0.3 x standard normal noise in all 4096 dimensions; vector =
ReLU of it), with planted near-duplicate groups: 10 % of the rows, at positions drawn at random, form groups of 2 to
5 rows; a group's first row is an ordinary vector, each other row has the first row's pre-activation plus its own
sigma x standard normal noise (sigma uniform in [0.05, 0.4]) before the ReLU. At the default threshold 0.05 (1 -
cosine) a planted copy is at most about 0.045 from any other member of its group, and the nearest unplanted
neighbours are about 0.07 apart (measured at N = 40,000). numpy `default_rng(0)` for the ordinary rows,
`default_rng([0, group])` and `default_rng([0, 1, row])` for the planted ones, so every N is reproducible.

For each N: `imgindex index` (auto, cosine, --max-memory 4G; --pca 256 at N >= 1,000,000, as bench/index.py) in its own
process, its time and peak RSS reported apart; then `imgindex duplicates --threshold T` in its own process: time,
peak RSS, the index's size (the target is about memory beyond the index), and pairwise precision and recall of the
found groups against the planted ones (a pair = two rows in one group). At the baseline size the duplicates step
also runs on an IVF index, and an exact all-pairs computation (blocks of 2,048 rows against all rows) followed by the
same keeper rule gives the baseline: the share of its same-group pairs the step finds. Prints markdown tables and
writes them, with the raw figures, to DIR/results.{md,json} after every step; each step logs into DIR/nN/run.log as
it goes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import pandas as pd
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.index import CENTRES, CHUNK, SUBSPACE, D, in_process, save_results  # noqa: E402
from embedder.collection import ShardRecord, commit  # noqa: E402
from embedder.outdir import DUPLICATES_FILE, FORMAT_VERSION, MANIFEST, OutDir  # noqa: E402
from embedder.writer import embedding_schema, write_shard  # noqa: E402

PLANTED_SHARE, SIZES, SIGMA = 0.10, (2, 5), (0.05, 0.4)

INDEX_SCRIPT = """
import json, resource, sys, time
from cluster.options import IndexOptions
from jobs.arguments import setup_logging
from jobs.index import index
out, kind, pca = sys.argv[1], sys.argv[2], (int(sys.argv[3]) or None)
setup_logging(out, False)
started = time.monotonic()
record = index(out, IndexOptions(index=kind, max_memory="4G", pca=pca))
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.monotonic() - started, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss": peak,
                  "record": record}))
"""

DUPLICATES_SCRIPT = """
import json, resource, sys, time
from cluster.options import DuplicateOptions
from jobs.arguments import setup_logging
from jobs.duplicates import duplicates
out, threshold = sys.argv[1], float(sys.argv[2])
setup_logging(out, False)
started = time.monotonic()
record = duplicates(out, DuplicateOptions(threshold=threshold))
peak = int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.monotonic() - started, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss": peak,
                  "record": record}))
"""


def path(row: int) -> str:
    """Zero-padded, so that path order (the keep rule's last word, and here its only one) is row order."""
    return f"synthetic/{row:08d}"


def plant(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(group of each row or -1, member number within its group, sigma of each row) for the planted groups."""
    sizes = []
    while sum(sizes) < PLANTED_SHARE * n:
        sizes.append(int(rng.integers(SIZES[0], SIZES[1] + 1)))
    rows = rng.permutation(n)[: sum(sizes)]
    group, member, sigma = np.full(n, -1), np.zeros(n, dtype=np.int64), np.zeros(n)
    start = 0
    for g, size in enumerate(sizes):
        chosen = np.sort(rows[start : start + size])
        group[chosen], member[chosen] = g, np.arange(size)
        sigma[chosen[1:]] = rng.uniform(*SIGMA, size - 1)
        start += size
    return group, member, sigma


def generate(folder: str, n: int) -> np.ndarray:
    """Write the seeded collection (shards, commit records, manifest) to `folder`; returns the planted group of each
    row (-1: none). Kept for a rerun when its labels file is there."""
    labels_file = os.path.join(folder, "planted.npy")
    if os.path.exists(labels_file):
        return np.load(labels_file)
    shutil.rmtree(folder, ignore_errors=True)
    out = OutDir(folder)
    rng = np.random.default_rng(0)
    centres = 2 * rng.standard_normal((CENTRES, SUBSPACE))
    projection = rng.standard_normal((SUBSPACE, D)) / 8
    group, member, sigma = plant(n, rng)
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        label = rng.integers(CENTRES, size=m)
        pre = (centres[label] + rng.standard_normal((m, SUBSPACE))) @ projection + 0.3 * rng.standard_normal((m, D))
        for i in np.flatnonzero(group[start : start + m] >= 0):
            row = start + i
            own = np.random.default_rng([0, int(group[row])])  # the group's first row, the same for every member
            pre[i] = (centres[own.integers(CENTRES)] + own.standard_normal(SUBSPACE)) @ projection + 0.3 * own.standard_normal(D)
            if member[row] > 0:
                pre[i] += sigma[row] * np.random.default_rng([0, 1, row]).standard_normal(D)
        x = np.maximum(pre, 0).astype(np.float32)
        ids = np.arange(start, start + m, dtype=np.int64)
        unknown = np.full(m, -1, dtype=np.int64)  # no files behind these vectors
        table = pa.table(
            [pa.array(ids), pa.array([path(i) for i in ids]), pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), D),
             pa.array(np.zeros(m, dtype=np.int64)), pa.array(unknown), pa.array(unknown)],
            schema=embedding_schema(D),
        )
        name = f"embeddings/part-bench-{start // CHUNK:06d}.parquet"
        size, sha256 = write_shard(out, name, table)
        commit(out, ShardRecord(name, m, size, sha256))
    out.write_json(MANIFEST, {"format_version": FORMAT_VERSION, "metric": "cosine", "dimension": D,
                              "counts": {"images": n}, "note": "bench/duplicates.py synthetic"})
    np.save(labels_file, group)
    return group


def pairs_of(groups: list[np.ndarray]) -> set[tuple[int, int]]:
    """Every pair of rows that share a group."""
    return {(int(a), int(b)) for rows in groups for i, a in enumerate(np.sort(rows)) for b in np.sort(rows)[i + 1 :]}


def found_groups(folder: str) -> list[np.ndarray]:
    table = pd.read_csv(os.path.join(folder, DUPLICATES_FILE), usecols=["group", "id"])
    return [rows["id"].to_numpy() for _, rows in table.groupby("group")]


def planted_groups(labels: np.ndarray) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    order = order[labels[order] >= 0]
    return np.split(order, np.flatnonzero(np.diff(labels[order])) + 1)


def score(found: set, truth: set) -> dict:
    hits = len(found & truth)
    return {"pairs_found": len(found), "pairs_planted": len(truth),
            "precision": hits / len(found) if found else 1.0, "recall": hits / len(truth) if truth else 1.0}


def baseline(folder: str, threshold: float) -> tuple[set, float]:
    """Exact all-pairs distances in blocks, the keeper rule on them (path order = row order); its same-group pairs."""
    from cluster.duplicates import group_around_keepers
    from cluster.index import prepare
    from cluster.vectors import ShardVectors

    started = time.monotonic()
    parts = [(ids, prepare(xb, "cosine")) for ids, xb in ShardVectors(OutDir(folder), D).batches()]
    ids = np.concatenate([p[0] for p in parts])
    x = np.concatenate([p[1] for p in parts])
    a, b, d = [], [], []
    for lo in range(0, len(x), 2048):
        distance = 1.0 - x[lo : lo + 2048] @ x.T
        i, j = np.nonzero(distance <= threshold)
        keep = lo + i < j
        a.append(lo + i[keep])
        b.append(j[keep])
        d.append(distance[i[keep], j[keep]])
    # Paths are zero-padded row numbers, so the keep rule's order (the path: no files) is the id order.
    keeper, _ = group_around_keepers(len(x), np.concatenate(a), np.concatenate(b), np.concatenate(d), ids)
    rows = np.flatnonzero(keeper >= 0)
    groups = [ids[rows[keeper[rows] == k]] for k in np.unique(keeper[rows])]
    return pairs_of(groups), time.monotonic() - started


def markdown(results: dict) -> str:
    lines = ["| N | index | index build s | index GB | duplicates s (CPU s) | peak RSS GB | beyond the index GB "
             "| groups planted / found | pairwise precision | pairwise recall | share of all-pairs baseline |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["runs"]:
        if "error" in row:
            lines.append(f"| {row['n']:,} | {row['index']} | failed: {row['error']} | | | | | | | | |")
            continue
        share = "-" if row.get("baseline_share") is None else f"{row['baseline_share']:.4f}"
        lines.append(
            f"| {row['n']:,} | {row['type']} | {row['index_seconds']:.0f} | {row['index_bytes'] / 2**30:.2f} "
            f"| {row['seconds']:.0f} ({row['cpu_seconds']:.0f}) | {row['peak_rss'] / 2**30:.2f} | {(row['peak_rss'] - row['index_bytes']) / 2**30:.2f} "
            f"| {row['planted']:,} / {row['groups']:,} | {row['precision']:.4f} | {row['recall']:.4f} | {share} |"
        )
    for b in results["baselines"]:
        lines.append(f"\nall-pairs baseline at N = {b['n']:,}: {b['seconds']:.0f} s, {b['pairs']:,} same-group pairs, "
                     f"precision {b['precision']:.4f}, recall {b['recall']:.4f} against the planted groups")
    lines.append(f"\nthreshold {results['threshold']}; whole bench: {results['seconds'] / 60:.1f} min")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline", type=int, default=20_000, help="N of the exact all-pairs comparison (0: none)")
    parser.add_argument("--threshold", type=float, default=0.05)
    parser.add_argument("--dir", default="/tmp/imgindex-bench-duplicates")
    parser.add_argument("--keep-data", action="store_true")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    started = time.monotonic()
    results: dict = {"threshold": args.threshold, "runs": [], "baselines": [], "seconds": 0.0}

    def save() -> None:
        save_results(args.dir, results, markdown, started)

    sizes = ([args.baseline] if args.baseline else []) + [n for n in args.sizes if n != args.baseline]
    for n in sizes:
        folder = os.path.join(args.dir, f"n{n}")
        t = time.monotonic()
        labels = generate(folder, n)
        print(f"N={n}: generated in {time.monotonic() - t:.0f} s", flush=True)
        truth = pairs_of(planted_groups(labels))
        reference = None
        if n == args.baseline:
            reference, seconds = baseline(folder, args.threshold)
            results["baselines"].append({"n": n, "seconds": seconds, "pairs": len(reference)} | score(reference, truth))
            print(results["baselines"][-1], flush=True)
        kinds = ["auto", "ivf"] if n == args.baseline else ["auto"]
        for kind in kinds:
            for name in ("index.faiss", "index_ids.parquet", DUPLICATES_FILE):
                if os.path.exists(os.path.join(folder, name)):
                    os.remove(os.path.join(folder, name))
            built = in_process(INDEX_SCRIPT, folder, kind, "256" if n >= 1_000_000 else "0")
            row = {"n": n, "index": kind}
            if "error" in built:
                results["runs"].append(row | {"error": f"index: {built['error']}"})
                save()
                continue
            print(f"N={n}: index {kind} built in {built['seconds']:.0f} s, {built['record']['bytes'] / 2**30:.2f} GB", flush=True)
            step = in_process(DUPLICATES_SCRIPT, folder, str(args.threshold))
            if "error" in step:
                results["runs"].append(row | {"error": f"duplicates: {step['error']}"})
                save()
                continue
            groups = found_groups(folder)
            found = pairs_of(groups)
            row |= {"type": ("PCA256 + " if n >= 1_000_000 else "") + built["record"]["type"], "index_seconds": built["seconds"],
                    "index_peak_rss": built["peak_rss"], "index_bytes": built["record"]["bytes"], "seconds": step["seconds"], "cpu_seconds": step["cpu_seconds"],
                    "peak_rss": step["peak_rss"], "record": step["record"], "log": step["log"],
                    "planted": int(labels.max() + 1), "groups": len(groups)} | score(found, truth)
            row["baseline_share"] = len(found & reference) / len(reference) if reference else None
            results["runs"].append(row)
            print({k: v for k, v in row.items() if k not in ("record", "log")}, flush=True)
            save()
        if not args.keep_data:
            shutil.rmtree(folder)
    save()
    print(markdown(results))


if __name__ == "__main__":
    main()
