"""`imgindex index OUT` / `python -m jobs.index`: OUT/embeddings -> OUT/index.faiss (+ OUT/index_ids.parquet, what
it holds, and OUT/index_paths.parquet, its ids' paths).

A re-run updates the index in place when it can: ids no longer in the shards (or whose fingerprint changed) are
removed, new and changed ones added. It rebuilds instead when the index type cannot remove ids (HNSW), when more than
REBUILD_FRACTION of the collection changed (the PCA and the quantiser were trained on the old one), or when the plan
differs (another --index, --pca, or an `auto` choice that the new size changes). With Ray tasks (`--tasks`, see
`cluster.distributed`) the passes over the vectors of a build or an update run in tasks; training, merging and tuning
here.
"""

from __future__ import annotations

import argparse
import logging

import faiss
import numpy as np
import pandas as pd

from cluster.distributed import TaskVectors, add_on_tasks, build_index_on_tasks, mergeable, open_vectors
from cluster.index import IndexPlan, build_index, load_index, plan_index, prepare, removable
from cluster.options import IndexOptions
from cluster.paths import collection_paths, read_run, run_prefix, write_paths
from cluster.vectors import ShardVectors, Vectors, diff_state, read_state, shard_state, state_bytes
from embedder.collection import committed
from embedder.config import UserError
from embedder.outdir import INDEX_FILE, INDEX_IDS_FILE, PATHS_FILE, OutDir, open_out
from jobs.arguments import index_options_from_args, log_into

log = logging.getLogger("imgindex")

REBUILD_FRACTION = 0.5


def _plan_key(plan: IndexPlan) -> dict:
    return {"spec": plan.spec, "dimension": plan.dimension, "metric": plan.metric, "pca": plan.pca, "whiten": plan.whiten}


def _update(
    folder: OutDir, plan: IndexPlan, previous: tuple[pd.DataFrame, dict], state: pd.DataFrame,
    added: np.ndarray, changed: np.ndarray, removed: np.ndarray, source: Vectors,
) -> dict | None:
    """Bring the existing index up to date with the shards and publish it; None when it must be rebuilt instead
    (reason logged). Returns the manifest's index record."""
    before, meta = previous
    if meta.get("plan") != _plan_key(plan):
        log.info("index: rebuilding (%s asked, %s built before)", plan.spec, meta.get("plan", {}).get("spec"))
        return None
    touched = len(added) + len(changed) + len(removed)
    if touched > REBUILD_FRACTION * len(state):
        log.info("index: rebuilding (%d of %d vectors added, changed or removed)", touched, len(state))
        return None
    index = load_index(folder, folder.read_manifest())
    if index.ntotal != len(before):
        log.info("index: rebuilding (index.faiss holds %d vectors, its record %d)", index.ntotal, len(before))
        return None
    drop = np.concatenate([changed, removed])
    if len(drop) and not removable(index):
        log.info("index: rebuilding (%s cannot remove ids; %d to remove)", plan.spec, len(drop))
        return None
    if len(drop):
        index.remove_ids(drop)
    new = np.concatenate([added, changed])
    publish = touched > 0 or not folder.exists(PATHS_FILE)
    runs: list[str] = []
    if publish and isinstance(source, TaskVectors):
        runs = add_on_tasks(index, source, new, plan.metric, run_prefix())
    elif len(new):
        for ids, xb in source.batches():
            wanted = np.isin(ids, new)
            if wanted.any():
                index.add_with_ids(prepare(xb[wanted], plan.metric), ids[wanted])
    counts = {"added": len(added), "changed": len(changed), "removed": len(removed), "rebuilt": False}
    record = meta["record"] | {"ntotal": int(index.ntotal), "update": counts, "tasks": source.tasks}
    if publish:
        _publish(folder, index, state, meta["plan"], record, runs)
    else:
        folder.update_manifest(index=record)
    log.info("index: %d added, %d changed, %d removed in place (%d vectors)", len(added), len(changed), len(removed), index.ntotal)
    return record


def _publish(folder: OutDir, index: faiss.Index, state: pd.DataFrame, plan_key: dict, record: dict, runs: list[str]) -> dict:
    """Publish index.faiss, index_paths.parquet (its ids' paths: the sorted `runs` Ray tasks wrote, merged, or without
    runs read here) and index_ids.parquet (what it holds, and the record) as one update that also removes the runs;
    the record gets the index's size."""
    update = folder.update()
    record["bytes"] = update.write(INDEX_FILE, lambda path: faiss.write_index(index, path))[0]
    sources = [read_run(folder, run) for run in runs] if runs else [collection_paths(folder, list(committed(folder).values()))]
    update.write(PATHS_FILE, lambda path: write_paths(path, sources))
    update.write(INDEX_IDS_FILE, state_bytes(state, {"plan": plan_key, "record": record}))
    update.commit({"index": record}, delete=runs)
    return record


def index(out: str, options: IndexOptions | None = None, batch_rows: int | None = None) -> dict:
    """Build (or bring up to date) the FAISS index over every embedding in OUT, save OUT/index.faiss, measure recall.

    Parameters
    ----------
    out
        Output folder of `imgindex embed` (local path or URI).
    options
        --index (auto, flat, hnsw, ivf or a faiss.index_factory string), --max-memory (the index's RAM budget, e.g.
        "4G"), --pca DIM, --whiten, --target-recall (10-recall@10 to reach), --tasks and --address (where the passes
        over the vectors run: `cluster.options.RayOptions`). Default: `IndexOptions()`.
    batch_rows
        Rows read from the shards at a time (default `cluster.vectors.BATCH_ROWS`); peak memory is about the index
        plus one batch.

    Returns
    -------
    The record written to `manifest["index"]`: type, search parameters, recall, size, counts of what changed.
    """
    from cluster.vectors import BATCH_ROWS

    options = (options or IndexOptions()).validate()
    batch_rows = batch_rows or BATCH_ROWS
    folder = open_out(out)
    folder.recover()
    manifest = folder.read_manifest()
    budget = options.budget
    state = shard_state(folder)
    if len(state) == 0:
        raise UserError(f"{out}: no embeddings to index (see {out}/errors.csv)")
    plan = plan_index(options.index, len(state), manifest["dimension"], manifest["metric"], budget, options.pca, options.whiten)
    previous = read_state(folder, INDEX_IDS_FILE) if folder.exists(INDEX_FILE) else None
    before = previous[0] if previous else state.iloc[:0]
    added, changed, removed = diff_state(before, state)
    source = open_vectors(folder, plan.dimension, options.ray, batch_rows)
    record = _update(folder, plan, previous, state, added, changed, removed, source) if previous else None
    if record is None:
        counts = {"added": len(added), "changed": len(changed), "removed": len(removed), "rebuilt": True}
        record = _build(folder, plan, options, budget, state, counts, source)
    return record


def _build(folder: OutDir, plan: IndexPlan, options: IndexOptions, budget: int, state: pd.DataFrame, counts: dict, source: Vectors) -> dict:
    """Build the index from scratch, refuse an `auto` index that misses the target, publish it and its id record."""
    log.info("index: building %s%s over %d vectors (%s)", f"PCA{plan.pca}," if plan.pca else "", plan.spec, len(state), plan.reason)
    if isinstance(source, TaskVectors) and not mergeable(plan):
        log.info("index: %s cannot be merged from partial indexes (cluster/distributed.py says why); building it here", plan.spec)
        source = ShardVectors(source.out, source.dimension, source.batch_rows)
    runs: list[str] = []
    if isinstance(source, TaskVectors):
        built, runs = build_index_on_tasks(source, plan, options.target_recall, budget // 4, options.seed, run_prefix())
    else:
        built = build_index(source, plan, options.target_recall, budget // 4, options.seed)
    target_met = built.recall >= options.target_recall
    if not target_met and options.index == "auto":
        raise UserError(
            f"the index that fits --max-memory {options.max_memory} ({plan.spec}) reaches 10-recall@10 {built.recall:.3f}, "
            f"below --target-recall {options.target_recall}; raise --max-memory, use --pca, or lower the target"
        )
    record = {
        "file": INDEX_FILE,
        "type": plan.spec,
        "requested": options.index,
        "reason": plan.reason,
        "pca": plan.pca,
        "whiten": plan.whiten,
        "metric": plan.metric,
        "ntotal": int(built.index.ntotal),
        "max_memory": budget,
        "search_params": built.params,
        "recall": {
            "10-recall@10": round(built.recall, 4),
            "full_dimension": None if built.recall_full is None else round(built.recall_full, 4),
            "queries": len(built.query_ids),
            "measured_at_ntotal": int(built.index.ntotal),
        },
        "target_recall": options.target_recall,
        "target_met": target_met,
        "train_points": built.train_points,
        "build_seconds": round(built.seconds, 1),
        "tasks": source.tasks,
        "update": counts,
    }
    _publish(folder, built.index, state, _plan_key(plan), record, runs)
    space = f"PCA-{plan.pca} space" if plan.pca else f"{plan.dimension}-d space"
    log.info(
        "index %s: 10-recall@10 %.3f in %s (target %.2f%s) with %s; %d vectors, %.1f MB, %.1f s",
        plan.spec, built.recall, space, options.target_recall, "" if target_met else ", NOT met",
        ", ".join(f"{k}={v}" for k, v in built.params.items()) or "no search parameters", built.index.ntotal,
        record["bytes"] / 1e6, built.seconds,
    )
    if built.recall_full is not None:
        log.info("index: 10-recall@10 %.3f against exact search on the full %d-d vectors", built.recall_full, plan.dimension)
    if record["bytes"] > budget:
        log.warning("index: %d bytes, more than --max-memory %s", record["bytes"], options.max_memory)
    return record


def main(args: argparse.Namespace) -> int:
    """`imgindex index` from its parsed command line."""
    log_into(args.out, args.verbose)
    index(args.out, index_options_from_args(args))
    return 0


if __name__ == "__main__":
    from jobs.arguments import command_entry

    command_entry("index", main)
