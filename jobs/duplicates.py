"""`imgindex duplicates OUT` / `python -m jobs.duplicates`: near-duplicate groups -> OUT/duplicates.csv, every image's
distance to its k-th nearest other image -> OUT/outliers.csv.

Candidates come from OUT/index.faiss and every decision from exact distances (cluster/duplicates.py); `--threshold
auto` and `--measure` embed near-copies of a sample (cluster/calibration.py) on the job's model replicas when Ray runs,
else in this process; the keeper of each group is chosen by `--keep-rule` from the files' headers (cluster/keeper.py).
A re-run keeps the ids of the groups that did not change (OUT/duplicate_ids.parquet). Deletes and moves no image: the lists are for a person or a script to act on.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable

import numpy as np
import pandas as pd

from cluster.calibration import NEGATIVES, Calibration, calibrate, copy_distances
from cluster.duplicates import NEIGHBOURS, Proposals, RowStore, group_around_keepers, kth_distance, nearest_of, propose, runs_of, widen, within
from cluster.index import load_index, set_search_params
from cluster.keeper import ImageFacts, keep_key, kept_reason, member_reason, read_all_facts
from cluster.options import DuplicateOptions
from cluster.vectors import ShardVectors, diff_state, read_state, shard_state, state_bytes
from embedder.collection import shard_names
from embedder.config import JobConfig, UserError
from embedder.outdir import CONFIG, DUPLICATE_IDS_FILE, DUPLICATES_FILE, DUPLICATES_SCRATCH, INDEX_FILE, INDEX_IDS_FILE, MANIFEST, OUTLIERS_FILE, PENDING, TEMPORARY, OutDir, open_out
from embedder.writer import read_shard
from jobs.arguments import duplicate_options_from_args, log_into

log = logging.getLogger("imgindex")

COLUMNS = ["group", "id", "path", "distance", "keep", "reason"]
IN_PROCESS_BATCH = 16  # near-copies through the in-process model at a time (VGG-16's activations grow with the batch)


def check(out: str, options: DuplicateOptions) -> tuple[OutDir, dict, pd.DataFrame]:
    """OUT, its manifest and its shards' (id, fingerprint) rows, checked: an index that holds exactly those rows (at
    least two), a metric the threshold fits; a one-line UserError otherwise. Writes nothing. An update a stopped run
    committed is not checked against (`duplicates` finishes it first, then checks)."""
    folder = open_out(out, (MANIFEST, INDEX_FILE))
    manifest = folder.read_manifest()
    options.validate(manifest["metric"])
    state = shard_state(folder)
    if len(state) < 2:
        raise UserError(f"{out}: {len(state)} embedded image(s); near-duplicates need at least 2")
    previous = read_state(folder, INDEX_IDS_FILE)
    if PENDING not in manifest and (previous is None or any(len(ids) for ids in diff_state(previous[0], state))):
        raise UserError(f"{out}/{INDEX_FILE} does not hold the current embeddings; run `imgindex index {out}` first")
    return folder, manifest, state


def scratch_path(folder: OutDir) -> str:
    """Where the scratch copy of the vectors goes: inside a local OUT under a temporary name, which the next step in
    OUT removes (`OutDir.recover`) if this one is killed; in the local temporary folder when OUT is remote."""
    name = f"{DUPLICATES_SCRATCH}{TEMPORARY}{uuid.uuid4().hex[:12]}"
    return folder.path(name) if folder.is_local else os.path.join(tempfile.gettempdir(), name)


def _paths(folder: OutDir) -> pd.Series:
    """id -> path of every committed row."""
    frames = [read_shard(folder, name, ["id", "path"]).to_pandas() for name in shard_names(folder)]
    return pd.concat(frames, ignore_index=True).set_index("id")["path"]


def copy_embedder(folder: OutDir, manifest: dict, options: DuplicateOptions) -> Callable[[np.ndarray], np.ndarray]:
    """How the calibration embeds its near-copies: on model replicas placed as the job places them (embedder/replicas.py)
    when Ray already runs in this process (`imgindex run`) or a cluster is named (--address, RAY_ADDRESS), with the
    configuration the collection was embedded with (OUT/config.json); else with the collection's model in this process.
    Either way with the collection's weights, checked against the manifest's sha256."""
    from cluster.search import collection_model, collection_weights

    ray = sys.modules.get("ray")
    if options.address or os.environ.get("RAY_ADDRESS") or (ray is not None and ray.is_initialized()):
        from embedder.replicas import embed_pixels

        config = JobConfig.from_json(folder.read_bytes(CONFIG).decode())
        config = dataclasses.replace(config, address=options.address or config.address)
        state_dict, sha = collection_weights(manifest, options.weights)
        log.info("calibration: near-copies embedded on the job's model replicas")
        return lambda pixels: embed_pixels(config, state_dict, sha, pixels)
    model = collection_model(manifest, options.weights)
    log.info("calibration: near-copies embedded in this process")
    return lambda pixels: np.concatenate([model(pixels[i : i + IN_PROCESS_BATCH]) for i in range(0, len(pixels), IN_PROCESS_BATCH)])


def _calibrate(proposals: Proposals, index, store: RowStore, paths: pd.Series, metric: str, options: DuplicateOptions,
               embed: Callable[[np.ndarray], np.ndarray]) -> Calibration:
    """Near-copies of a seeded sample, embedded by `embed`, scored against the sample's nearest neighbours."""
    n = len(proposals.ids)
    rows = np.sort(np.random.default_rng(options.seed).choice(n, min(options.sample, n), replace=False))
    log.info("calibration: near-copies of %d sampled images", len(rows))
    copies = copy_distances(paths.loc[proposals.ids[rows]].tolist(), store.rows(rows), embed, metric, seed=options.seed)
    _, _, negatives = nearest_of(proposals, index, metric, store, rows, NEGATIVES)
    return calibrate(copies, negatives, None if options.threshold == "auto" else float(options.threshold))


def _keep_rank(nodes: np.ndarray, paths: np.ndarray, n: int, rules: tuple[str, ...]) -> tuple[np.ndarray, dict[int, ImageFacts]]:
    """Rank (n,) of the rows `nodes` best-first by the keep rule (other rows last), and their facts by row."""
    facts = dict(zip(nodes.tolist(), read_all_facts(paths.tolist())))
    order = sorted(range(len(nodes)), key=lambda i: keep_key(facts[int(nodes[i])], paths[i], rules))
    rank = np.full(n, n, dtype=np.int64)
    rank[nodes[order]] = np.arange(len(nodes))
    return rank, facts


def _group_table(proposals: Proposals, paths: pd.Series, keeper: np.ndarray, distance: np.ndarray, rank: np.ndarray,
                 facts: dict[int, ImageFacts], rules: tuple[str, ...]) -> pd.DataFrame:
    """One row per image in a group, each group's rows together, its keeper first then by the keep rule: keeper row,
    row, id, path, distance, keep, rank, reason."""
    rows = np.flatnonzero(keeper >= 0)
    table = pd.DataFrame({"keeper": keeper[rows], "row": rows, "id": proposals.ids[rows],
                          "path": paths.loc[proposals.ids[rows]].to_numpy(), "distance": distance[rows],
                          "keep": keeper[rows] == rows, "rank": rank[rows]})
    table = table.sort_values(["keeper", "rank"], kind="stable").reset_index(drop=True)
    row = table["row"].to_numpy()
    reasons = np.empty(len(table), dtype=object)
    for run in runs_of(table["keeper"].to_numpy()):
        kept, others = facts[int(row[run.start])], row[run.start + 1 : run.stop].tolist()
        unreadable = sum(bool(facts[r].error) for r in others)
        reasons[run.start] = kept_reason(kept, facts[others[0]], rules, unreadable)  # others[0]: the runner-up
        reasons[run.start + 1 : run.stop] = [member_reason(facts[r], kept, rules) for r in others]
    table["reason"] = reasons
    return table


def _group_ids(table: pd.DataFrame, fingerprints: np.ndarray, previous: tuple[pd.DataFrame, dict] | None) -> tuple[np.ndarray, dict, int]:
    """The group id of each row of `table` (`_group_table`'s order; `fingerprints` aligned with it): the id of the
    earlier group with the very same members (same ids and file versions), else of the earlier group whose keeper was
    the same file, else one never used before (largest groups first); also the counts and the next unused id."""
    by_members: dict[frozenset, int] = {}
    by_keeper: dict[tuple[int, int], int] = {}
    next_id = 0
    if previous is not None:
        before, meta = previous
        next_id = int(meta.get("next_group", 0))
        before = before.sort_values(["group", "keep"], ascending=[True, False], kind="stable")
        ids, fps, groups = (before[c].to_numpy() for c in ("id", "fingerprint", "group"))
        for run in runs_of(groups):  # each earlier group's keeper first
            by_members[frozenset(zip(ids[run].tolist(), fps[run].tolist()))] = int(groups[run.start])
            by_keeper[(int(ids[run.start]), int(fps[run.start]))] = int(groups[run.start])
    ids, rank = table["id"].to_numpy(), table["rank"].to_numpy()
    runs = runs_of(table["keeper"].to_numpy())
    order = sorted(range(len(runs)), key=lambda g: (runs[g].start - runs[g].stop, rank[runs[g].start]))
    assigned: list[int | None] = [None] * len(runs)
    used: set[int] = set()
    for g in order:  # the very same members first, so that an unchanged group never loses its id
        old = by_members.get(frozenset(zip(ids[runs[g]].tolist(), fingerprints[runs[g]].tolist())))
        if old is not None:
            assigned[g] = old
            used.add(old)
    for g in order:
        old = by_keeper.get((int(ids[runs[g].start]), int(fingerprints[runs[g].start])))
        if assigned[g] is None and old is not None and old not in used:
            assigned[g] = old
            used.add(old)
    counts = {"kept_ids": len(used), "new_ids": len(runs) - len(used), "gone": len(set(by_members.values()) - used)}
    for g in order:
        if assigned[g] is None:
            assigned[g], next_id = next_id, next_id + 1
    group = np.repeat(np.asarray(assigned, dtype=np.int64), [run.stop - run.start for run in runs])
    return group, counts, next_id


def duplicates(out: str, options: DuplicateOptions | None = None, embed: Callable[[np.ndarray], np.ndarray] | None = None) -> dict:
    """Find OUT's near-duplicate groups and outliers and publish duplicates.csv, outliers.csv and their record.

    Parameters
    ----------
    out
        Output folder holding embeddings and an up-to-date index.faiss (local path or URI).
    options
        threshold: "auto" or a distance (1 - cosine, or Euclidean); keep_rule: the tie-breakers that choose each
        group's keeper; measure: calibrate an explicit threshold too; outlier_k: outliers.csv ranks by the distance to
        the k-th nearest other image; sample: images whose near-copies calibrate; weights: where the calibration
        loads the collection's weights from; seed: the calibration's sample and copies. Default `DuplicateOptions()`.
    embed
        (n, 224, 224, 3) uint8 pixels -> (n, d) vectors for the calibration's near-copies; default `copy_embedder`:
        the job's model replicas on Ray, else the collection's model in this process.

    Returns
    -------
    The record written to `manifest["duplicates"]`: threshold, calibration, counts of groups and images.
    """
    started = time.monotonic()
    options = (options or DuplicateOptions()).validate()
    open_out(out).recover()
    folder, manifest, state = check(out, options)
    metric, dimension = manifest["metric"], manifest["dimension"]
    index = load_index(folder, manifest)
    set_search_params(index, manifest.get("index", {}).get("search_params", {}))
    paths = _paths(folder)
    k = max(NEIGHBOURS, options.outlier_k + 1)
    store = RowStore(scratch_path(folder), dimension)
    try:
        proposals = propose(ShardVectors(folder, dimension), index, metric, store, k)
        calibration = None
        if options.calibrates:
            calibration = _calibrate(proposals, index, store, paths, metric, options, embed or copy_embedder(folder, manifest, options))
        threshold = calibration.threshold if options.threshold == "auto" else float(options.threshold)
        widened, capped = widen(proposals, index, metric, store, threshold)
    finally:
        store.close()
    if capped:
        log.warning("duplicates: %d images have more than %d neighbours within %.4g; their groups may be incomplete",
                    capped, proposals.asked.max(), threshold)
    n = len(proposals.ids)
    a, b, d = within(proposals, threshold)
    nodes = np.unique(np.concatenate([a, b]))
    rank, facts = _keep_rank(nodes, paths.loc[proposals.ids[nodes]].to_numpy(), n, options.keep_rule)
    keeper, distance = group_around_keepers(n, a, b, d, rank)
    table = _group_table(proposals, paths, keeper, distance, rank, facts, options.keep_rule)
    fingerprints = state.set_index("id")["fingerprint"].loc[table["id"]].to_numpy()
    previous = read_state(folder, DUPLICATE_IDS_FILE) if folder.exists(DUPLICATES_FILE) else None
    table["group"], counts, next_id = _group_ids(table, fingerprints, previous)
    table["fingerprint"] = fingerprints
    table = table.sort_values(["group", "rank"], kind="stable")

    outlier_k = min(options.outlier_k, n - 1)
    kth = kth_distance(proposals, outlier_k)
    order = np.lexsort((proposals.ids, -kth))
    outliers = pd.DataFrame({"rank": np.arange(1, n + 1), "id": proposals.ids[order],
                             "path": paths.loc[proposals.ids[order]].to_numpy(), "distance": kth[order]})

    sizes = table.groupby("group").size()
    record = {
        "threshold": threshold,
        "threshold_from": "auto" if options.threshold == "auto" else "--threshold",
        "metric": metric,
        "keep_rule": list(options.keep_rule),
        "calibration": calibration.record() if calibration else None,
        "groups": int(len(sizes)),
        "images_in_groups": int(len(table)),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "outlier_k": outlier_k,
        "neighbours": k,
        "widened": widened,
        "capped": capped,
        "update": counts,
        "seconds": round(time.monotonic() - started, 1),
    }
    ids_state = table[["id", "fingerprint", "group", "keep"]]
    folder.publish(
        {DUPLICATES_FILE: table[COLUMNS].to_csv(index=False).encode(),
         OUTLIERS_FILE: outliers.to_csv(index=False).encode(),
         DUPLICATE_IDS_FILE: state_bytes(ids_state, {"next_group": next_id, "threshold": threshold})},
        {"duplicates": record},
    )
    if calibration:
        suggested = "" if options.threshold == "auto" else (
            "; auto would pick none" if calibration.suggested is None else f"; auto would pick {calibration.suggested:.4g}")
        log.info("duplicates: threshold %.4g (%s): calibration precision %.3f (a lower bound), recall %.3f on %d near-copies "
                 "of %d images%s", threshold, record["threshold_from"], calibration.precision, calibration.recall,
                 calibration.positives, calibration.images, suggested)
    else:
        log.info("duplicates: threshold %.4g (--threshold, not measured: add --measure)", threshold)
    log.info("duplicates: %d groups, %d images in them (%d group ids kept, %d new); wrote %s/%s and %s",
             record["groups"], record["images_in_groups"], counts["kept_ids"], counts["new_ids"], folder.location,
             DUPLICATES_FILE, OUTLIERS_FILE)
    return record


def main(args: argparse.Namespace) -> int:
    """`imgindex duplicates` from its parsed command line."""
    options = duplicate_options_from_args(args)
    check(args.out, options)  # bad input writes nothing, not even the log
    log_into(args.out, args.verbose)
    duplicates(args.out, options)
    return 0


if __name__ == "__main__":
    from jobs.arguments import command_entry

    command_entry("duplicates", main)
