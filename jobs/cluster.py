"""`imgindex cluster OUT --clusters K` / `python -m jobs.cluster`: k-means -> OUT/clusters.csv, OUT/centroids.npy.

`--clusters 5,10,20`, `5:50:5` or `auto` sweep k: each k's objective, silhouette (on a sample) and size imbalance go
to OUT/k_sweep.csv, and the assignments of `--keep K` (or of the best silhouette) are kept. A re-run with the same
single k assigns new and changed images to the existing centroids (cluster ids stay stable) and drops deleted ones;
`--recluster` trains again.
"""

from __future__ import annotations

import argparse
import io
import logging
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd

from cluster.distributed import open_vectors
from cluster.kmeans import assign, assign_all, imbalance, silhouette, train_kmeans
from cluster.options import AUTO_CLUSTERS, ClusterOptions
from cluster.vectors import Vectors, diff_state, read_state, shard_state, state_bytes
from embedder.collection import shard_names
from embedder.config import UserError
from embedder.outdir import CENTROIDS_FILE, CLUSTER_IDS_FILE, CLUSTERS_FILE, K_SWEEP_FILE, OutDir, open_out
from embedder.writer import read_shard
from jobs.arguments import cluster_options_from_args, log_into

log = logging.getLogger("imgindex")


def _paths(folder: OutDir) -> pd.DataFrame:
    return pd.concat([read_shard(folder, name, ["id", "path"]).to_pandas() for name in shard_names(folder)], ignore_index=True)


def _publish(folder: OutDir, table: pd.DataFrame, centroids: np.ndarray, state: pd.DataFrame, meta: dict, sweep: pd.DataFrame | None) -> pd.DataFrame:
    """Publish clusters.csv, centroids.npy, cluster_ids.parquet (and k_sweep.csv after a sweep) and the manifest's
    clusters record as one update; returns the table as written."""
    table = table.sort_values(["cluster", "distance", "id"]).reset_index(drop=True)[["id", "path", "cluster", "distance"]]
    sizes = np.bincount(table["cluster"], minlength=meta["k"])
    buffer = io.BytesIO()
    np.save(buffer, centroids)
    files = {CLUSTERS_FILE: table.to_csv(index=False).encode(), CENTROIDS_FILE: buffer.getvalue(),
             CLUSTER_IDS_FILE: state_bytes(state, meta)}
    if sweep is not None:
        files[K_SWEEP_FILE] = sweep.to_csv(index=False).encode()
    # A new single-k training makes an earlier sweep's table stale; assigning to that sweep's kept k does not.
    stale = [K_SWEEP_FILE] if sweep is None and meta["update"]["reclustered"] and folder.exists(K_SWEEP_FILE) else []
    record = {key: meta.get(key) for key in ("k", "niter", "seed", "objective", "silhouette", "imbalance", "swept", "update", "tasks")}
    folder.publish(files, {"clusters": record | {"sizes": sizes.tolist(), "mean_distance": float(table["distance"].mean())}}, stale)
    log.info("cluster sizes: %s", ", ".join(f"{c}: {n}" for c, n in enumerate(sizes)))
    return table


def _assign_new(part: Vectors, new: np.ndarray, centroids: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, distances) of the vectors of `part` whose ids are in `new`, assigned to `centroids`."""
    found = [(np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))]
    for ids, xb in part.batches():
        wanted = np.isin(ids, new)
        if wanted.any():
            found.append((ids[wanted], *assign(xb[wanted], centroids, metric)))
    return tuple(np.concatenate(column) for column in zip(*found))


def _update(folder: OutDir, k: int, metric: str, source: Vectors, state: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, dict, None] | None:
    """Assign new and changed images to the existing centroids and drop deleted ones; None if there is nothing to
    update from (no earlier clustering, or one with another k or metric)."""
    previous = read_state(folder, CLUSTER_IDS_FILE) if folder.exists(CLUSTERS_FILE) and folder.exists(CENTROIDS_FILE) else None
    if previous is None or previous[1].get("k") != k or previous[1].get("metric") != metric:
        return None
    before, meta = previous
    centroids = np.load(io.BytesIO(folder.read_bytes(CENTROIDS_FILE)))
    added, changed, removed = diff_state(before, state)
    old = folder.read_csv(CLUSTERS_FILE)
    parts = [old[~old["id"].isin(np.concatenate([changed, removed]))]]
    new = np.concatenate([added, changed])
    if len(new):
        paths = _paths(folder).set_index("id")["path"]
        for ids, labels, distances in source.map(_assign_new, new, centroids, metric):
            parts.append(pd.DataFrame({"id": ids, "path": paths.loc[ids].to_numpy(), "cluster": labels, "distance": distances}))
    counts = {"added": len(added), "changed": len(changed), "removed": len(removed), "reclustered": False}
    log.info("clusters: %d added, %d changed, %d removed, assigned to the existing %d centroids", len(added), len(changed), len(removed), k)
    return pd.concat(parts, ignore_index=True), centroids, meta | {"update": counts}, None


def _sweep(folder: OutDir, ks: Sequence[int], options: ClusterOptions, metric: str, source: Vectors) -> tuple[pd.DataFrame, np.ndarray, dict, pd.DataFrame | None]:
    """Train k-means for every k; the table of the kept k (--keep, else the best silhouette), its centroids, its stats,
    and with several k the sweep's table (one row per k)."""
    keep, niter, seed = options.keep, options.niter, options.seed
    rows, kept = [], None
    for k in ks:
        started = time.monotonic()
        centroids = train_kmeans(source, k, niter, seed, metric)
        result = assign_all(source, centroids, metric, seed)
        stats = {
            "k": k,
            "objective": result.objective,
            "silhouette": silhouette(result.sample, result.sample_labels),
            "imbalance": imbalance(result.sizes(k)),
            "seconds": round(time.monotonic() - started, 2),
        }
        rows.append(stats)
        log.info("k=%d: objective %.6g, silhouette %.4f, imbalance %.3f (%.1f s)", k, stats["objective"], stats["silhouette"], stats["imbalance"], stats["seconds"])
        better = kept is None or (np.nan_to_num(stats["silhouette"], nan=-2) > np.nan_to_num(kept[2]["silhouette"], nan=-2))
        if (keep is None and better) or keep == k:
            kept = (result, centroids, stats)
    result, centroids, stats = kept
    sweep = None
    if len(ks) > 1:
        sweep = pd.DataFrame(rows)
        sweep["kept"] = sweep["k"] == stats["k"]
        log.info("swept k over %s; kept k=%d (%s)", ", ".join(map(str, ks)), stats["k"], "--keep" if keep else "best silhouette")
    paths = _paths(folder).set_index("id")["path"]
    table = pd.DataFrame({"id": result.ids, "path": paths.loc[result.ids].to_numpy(), "cluster": result.labels, "distance": result.distances})
    # NaN (the silhouette of k = 1) is not JSON.
    meta = {key: None if value != value else value for key, value in stats.items()}
    meta |= {"metric": metric, "niter": niter, "seed": seed, "swept": list(ks)}
    return table, centroids, meta, sweep


def cluster(out: str, options: ClusterOptions) -> pd.DataFrame:
    """Group OUT's images with k-means and write the image -> cluster table.

    Parameters
    ----------
    out
        Output folder holding embeddings (local path or URI).
    options
        clusters: k, several k to compare, or "auto" (5:50:5); keep: with several k, the k whose assignments are
        written (default: the best silhouette); niter: FAISS k-means iterations on the training sample (then
        `cluster.kmeans.FULL_PASSES` passes over everything); seed: the same seed on the same embeddings gives the
        same clusters; recluster: train again even when OUT holds clusters of the same k (otherwise new and changed
        images are assigned to the existing centroids and cluster ids stay stable); ray: --tasks and --address, where
        the passes over the vectors run (`cluster.options.RayOptions`).

    Returns
    -------
    The table written to OUT/clusters.csv: id, path, cluster, distance (to the cluster's centroid).
    """
    options = options.validate()
    folder = open_out(out)
    folder.recover()
    manifest = folder.read_manifest()
    metric, dimension = manifest["metric"], manifest["dimension"]
    state = shard_state(folder)
    if len(state) == 0:
        raise UserError(f"{out}: no embeddings to cluster (see {out}/errors.csv)")
    ks = tuple(k for k in AUTO_CLUSTERS if k < len(state)) if options.clusters == "auto" else options.clusters
    if not ks:
        raise UserError(f"--clusters auto needs more than {AUTO_CLUSTERS[0]} embedded images; pass --clusters K")
    if options.keep is not None and options.keep not in ks:
        raise UserError(f"--keep {options.keep} is not among the swept k ({', '.join(map(str, ks))})")
    source = open_vectors(folder, dimension, options.ray)
    updated = None if options.recluster or len(ks) > 1 else _update(folder, ks[0], metric, source, state)
    if updated is None:
        table, centroids, meta, sweep = _sweep(folder, ks, options, metric, source)
        meta["update"] = {"added": len(state), "changed": 0, "removed": 0, "reclustered": True}
    else:
        table, centroids, meta, sweep = updated
    meta["tasks"] = source.tasks
    table = _publish(folder, table, centroids, state, meta, sweep)
    log.info("wrote %s/%s", folder.location, CLUSTERS_FILE)
    return table


def main(args: argparse.Namespace) -> int:
    """`imgindex cluster` from its parsed command line."""
    log_into(args.out, args.verbose)
    cluster(args.out, cluster_options_from_args(args))
    return 0


if __name__ == "__main__":
    from jobs.arguments import command_entry

    command_entry("cluster", main)
