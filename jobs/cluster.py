"""`imgindex cluster OUT --clusters K` / `python -m jobs.cluster`: k-means -> OUT/clusters.csv, OUT/centroids.npy.

`--clusters 5,10,20`, `5:50:5` or `auto` sweep k: each k's objective, silhouette (on a sample) and size imbalance go
to OUT/k_sweep.csv, and the assignments of `--keep K` (or of the best silhouette) are kept. A re-run with the same
single k assigns new and changed images to the existing centroids (cluster ids stay stable) and drops deleted ones;
`--recluster` trains again.
"""

from __future__ import annotations

import io
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from cluster.kmeans import assign, assign_all, imbalance, silhouette, train_kmeans
from cluster.search import CLUSTERS_FILE, open_out
from cluster.vectors import ShardVectors, diff_state, read_state, shard_state, write_state
from embedder.config import UserError
from embedder.pipeline import now_iso
from embedder.writer import MANIFEST, OutDir, read_shard, shard_names

log = logging.getLogger("imgindex")

CENTROIDS_FILE = "centroids.npy"
K_SWEEP_FILE = "k_sweep.csv"
CLUSTER_IDS_FILE = "cluster_ids.parquet"
AUTO_CLUSTERS = tuple(range(5, 55, 5))


def parse_clusters(text: str) -> tuple[int, ...] | str:
    """`--clusters`: K, a list 5,10,20, a range START:STOP:STEP (STOP included) or auto (= 5:50:5)."""
    text = text.strip().lower()
    if text == "auto":
        return "auto"
    try:
        if ":" in text:
            start, stop, *step = (int(part) for part in text.split(":"))
            ks = tuple(range(start, stop + 1, step[0] if step else 1))
        else:
            ks = tuple(int(part) for part in text.split(","))
    except (ValueError, IndexError):
        raise UserError(f"--clusters {text!r}: expected K, a list such as 5,10,20, a range such as 5:50:5, or auto") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--clusters {text!r}: every k must be at least 1")
    return tuple(sorted(set(ks)))


@dataclass(frozen=True)
class ClusterOptions:
    """How to cluster: the CLI's --clusters, --keep, --niter, --seed, --recluster."""

    clusters: tuple[int, ...] | str = (8,)
    keep: int | None = None
    niter: int = 20
    seed: int = 0
    recluster: bool = False


def _paths(folder: OutDir) -> pd.DataFrame:
    return pd.concat([read_shard(folder, name, ["id", "path"]).to_pandas() for name in shard_names(folder)], ignore_index=True)


def _write(folder: OutDir, table: pd.DataFrame, centroids: np.ndarray, state: pd.DataFrame, meta: dict) -> pd.DataFrame:
    table = table.sort_values(["cluster", "distance", "id"]).reset_index(drop=True)[["id", "path", "cluster", "distance"]]
    folder.write_csv(CLUSTERS_FILE, table)
    buffer = io.BytesIO()
    np.save(buffer, centroids)
    folder.write_bytes(CENTROIDS_FILE, buffer.getvalue())
    write_state(folder, CLUSTER_IDS_FILE, state, meta)
    return table


def _update(folder: OutDir, k: int, metric: str, dimension: int, state: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, dict] | None:
    """Assign new and changed images to the existing centroids and drop deleted ones; None if there is nothing to
    update from (no earlier clustering, or one with another k or metric)."""
    previous = read_state(folder, CLUSTER_IDS_FILE) if folder.exists(CLUSTERS_FILE) and folder.exists(CENTROIDS_FILE) else None
    if previous is None or previous[1].get("k") != k or previous[1].get("metric") != metric:
        return None
    before, meta = previous
    centroids = np.load(io.BytesIO(folder.read_bytes(CENTROIDS_FILE)))
    added, changed, removed = diff_state(before, state)
    old = pd.read_csv(io.BytesIO(folder.read_bytes(CLUSTERS_FILE)))
    parts = [old[~old["id"].isin(np.concatenate([changed, removed]))]]
    new = np.concatenate([added, changed])
    if len(new):
        paths = _paths(folder).set_index("id")["path"]
        for ids, xb in ShardVectors(folder, dimension).batches():
            wanted = np.isin(ids, new)
            if wanted.any():
                labels, distances = assign(xb[wanted], centroids, metric)
                parts.append(pd.DataFrame({"id": ids[wanted], "path": paths.loc[ids[wanted]].to_numpy(), "cluster": labels, "distance": distances}))
    counts = {"added": len(added), "changed": len(changed), "removed": len(removed), "reclustered": False}
    log.info("clusters: %d added, %d changed, %d removed, assigned to the existing %d centroids", len(added), len(changed), len(removed), k)
    return pd.concat(parts, ignore_index=True), centroids, meta | {"update": counts}


def _sweep(folder: OutDir, ks: Sequence[int], keep: int | None, niter: int, seed: int, metric: str, dimension: int) -> tuple[pd.DataFrame, np.ndarray, dict]:
    """Train k-means for every k; the table of the kept k (--keep, else the best silhouette), its centroids, its stats."""
    source = ShardVectors(folder, dimension)
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
    if len(ks) > 1:
        sweep = pd.DataFrame(rows)
        sweep["kept"] = sweep["k"] == stats["k"]
        folder.write_csv(K_SWEEP_FILE, sweep)
        log.info("wrote %s/%s; kept k=%d (%s)", folder.location, K_SWEEP_FILE, stats["k"], "--keep" if keep else "best silhouette")
    paths = _paths(folder).set_index("id")["path"]
    table = pd.DataFrame({"id": result.ids, "path": paths.loc[result.ids].to_numpy(), "cluster": result.labels, "distance": result.distances})
    # NaN (the silhouette of k = 1) is not JSON.
    meta = {key: None if value != value else value for key, value in stats.items()}
    meta |= {"metric": metric, "niter": niter, "seed": seed, "swept": list(ks)}
    return table, centroids, meta


def cluster(
    out: str,
    clusters: int | Sequence[int] | str = 8,
    niter: int = 20,
    seed: int = 0,
    keep: int | None = None,
    recluster: bool = False,
) -> pd.DataFrame:
    """Group OUT's images with k-means and write the image -> cluster table.

    Parameters
    ----------
    out
        Output folder holding embeddings (local path or URI).
    clusters
        k, several k to compare (a sequence, or a `parse_clusters` string such as "5:50:5"), or "auto" (5:50:5).
    niter
        FAISS k-means iterations on the training sample (then `cluster.kmeans.FULL_PASSES` passes over everything).
    seed
        k-means seed; the same seed on the same embeddings gives the same clusters.
    keep
        With several k: the k whose assignments are written (default: the best silhouette).
    recluster
        Train again even when OUT holds clusters of the same k (otherwise new and changed images are assigned to the
        existing centroids and cluster ids stay stable).

    Returns
    -------
    The table written to OUT/clusters.csv: id, path, cluster, distance (to the cluster's centroid).
    """
    folder = open_out(out)
    manifest = folder.read_json(MANIFEST)
    metric, dimension = manifest["metric"], manifest["dimension"]
    state = shard_state(folder)
    if len(state) == 0:
        raise UserError(f"{out}: no embeddings to cluster (see {out}/errors.csv)")
    spec = parse_clusters(clusters) if isinstance(clusters, str) else (clusters,) if isinstance(clusters, int) else tuple(clusters)
    ks = tuple(k for k in AUTO_CLUSTERS if k < len(state)) if spec == "auto" else spec
    if not ks:
        raise UserError(f"--clusters auto needs more than {AUTO_CLUSTERS[0]} embedded images; pass --clusters K")
    if keep is not None and keep not in ks:
        raise UserError(f"--keep {keep} is not among the swept k ({', '.join(map(str, ks))})")
    updated = None if recluster or len(ks) > 1 else _update(folder, ks[0], metric, dimension, state)
    if updated is None:
        table, centroids, meta = _sweep(folder, ks, keep, niter, seed, metric, dimension)
        meta["update"] = {"added": len(state), "changed": 0, "removed": 0, "reclustered": True}
    else:
        table, centroids, meta = updated
    k = meta["k"]
    table = _write(folder, table, centroids, state, meta)
    sizes = np.bincount(table["cluster"], minlength=k)
    manifest = folder.read_json(MANIFEST)
    manifest.update(
        clusters={key: meta.get(key) for key in ("k", "niter", "seed", "objective", "silhouette", "imbalance", "swept", "update")}
        | {"sizes": sizes.tolist(), "mean_distance": float(table["distance"].mean())},
        updated=now_iso(),
    )
    folder.write_json(MANIFEST, manifest)
    log.info("cluster sizes: %s", ", ".join(f"{c}: {n}" for c, n in enumerate(sizes)))
    log.info("wrote %s/%s", folder.location, CLUSTERS_FILE)
    return table


if __name__ == "__main__":
    from jobs.cli import entry

    entry(["cluster", *sys.argv[1:]])
