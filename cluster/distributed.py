"""Distributed: the passes over the vectors as Ray tasks, one per group of shards, merged on the driver.

The driver cuts OUT's committed shards into groups of consecutive shards of about equal rows (`TaskVectors`); a pass
runs one Ray task per group (`TaskVectors.map`), which reads its own shards, so no vector travels to the driver. What
comes back is bounded by the index or by k: the samples the driver trains on (`TaskVectors.take`); for the index, a
copy of the trained empty index with the group's vectors added, the exact top TRUTH_DEPTH of the held-out queries over
the group, and the name of the group's sorted id -> path run, which the task wrote beside OUT's files
(`build_index_on_tasks`, `add_on_tasks`); for k-means, per-cluster sums and counts, then each vector's cluster
(`cluster.kmeans.lloyd_pass`, `assign_all`). Results are merged in group order, so the merged index holds the same
inverted lists, in the same order, as the one-process build.

Retries: Ray runs a task again when its worker dies (killed, out of memory, node lost), up to TASK_RETRIES times. A
task is a pure function of its group and its inputs, its one side effect (the run) is written under a name fixed by
the build and the group, and the driver merges the one result Ray returns per group, so a retried task never adds an
id twice.

What merges: FAISS moves inverted lists from one IVF into another (`merge_from`; IVF with Flat, SQ or PQ codes) and
appends flat code arrays (Flat, PQ, SQ behind an IndexIDMap2). An HNSW graph does not merge: each vector's links
point to neighbours chosen among the vectors inserted before it in the same graph, so two graphs built apart share no
edge, and joining them means inserting every vector of one into the other, the whole cost of the build (NSG likewise).
IndexRefine (RFlat) has no merge in FAISS. Those are built in one process, as without Ray.

What each part costs, and what the driver still holds, at 100 M and 1 B vectors: see the benchmarks
(docs/benchmarks.md, "Index and k-means on Ray tasks").
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from cluster.index import TRUTH_DEPTH, Built, ExactKnn, IndexPlan, Transform, Truth, finish_index, index_parts, new_index, prepare, train_index
from cluster.options import DISTRIBUTE_MIN_VECTORS, RayOptions
from cluster.paths import run_bytes, sorted_chunks
from cluster.vectors import BATCH_ROWS, ShardVectors, T, Vectors
from embedder.collection import ShardRecord
from embedder.config import UserError
from embedder.outdir import OutDir

log = logging.getLogger("imgindex")

# Runs of a task whose worker died before Ray gives up on the pass.
TASK_RETRIES = 3
# Test hook (not an option): a marker file's path; the first task to create it kills its own process after its work,
# before returning its result, so that Ray runs it again.
KILL_TASK_HOOK_ENV = "IMGINDEX_TEST_KILL_TASK"


def task_count(options: RayOptions, n: int) -> int:
    """How many Ray tasks a pass over n vectors runs as (1: in this process), connecting to Ray when there are more.

    `--tasks N` decides; without it, one task per CPU of the cluster when on a Ray cluster (`--address` or RAY_ADDRESS)
    with more than DISTRIBUTE_MIN_VECTORS vectors, else this process."""
    from embedder.runtime import cluster_cpus, start_ray

    if options.tasks is None and not ((options.address or os.environ.get("RAY_ADDRESS")) and n > DISTRIBUTE_MIN_VECTORS):
        return 1
    if options.tasks == 1:
        return 1
    start_ray(options.address)
    return options.tasks or max(1, int(cluster_cpus()))


def open_vectors(out: OutDir, dimension: int, options: RayOptions, batch_rows: int = BATCH_ROWS) -> Vectors:
    """OUT's committed shards as the passes read them: in Ray tasks (`TaskVectors`) when `task_count` says so, else in
    this process (`ShardVectors`)."""
    local = ShardVectors(out, dimension, batch_rows)
    tasks = task_count(options, local.count)
    return local if tasks <= 1 else TaskVectors(local, tasks)


def _groups(records: Sequence[ShardRecord], sizes: Sequence[int], tasks: int) -> list[list[ShardRecord]]:
    """Consecutive shards cut into at most `tasks` groups of about equal rows."""
    starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)[:-1]]).astype(np.int64)
    which = np.minimum(starts * tasks // max(1, int(sum(sizes))), tasks - 1)
    return [[records[i] for i in np.flatnonzero(which == group)] for group in np.unique(which)]


class TaskVectors(Vectors):
    """OUT's committed shards in groups of consecutive shards of about equal rows, read by one Ray task per group.

    Offers `map`, `rows_of` and so `take`, not `batches`: nothing reads vectors in this process."""

    def __init__(self, shards: ShardVectors, tasks: int):
        self.out, self.dimension, self.batch_rows, self.count = shards.out, shards.dimension, shards.batch_rows, shards.count
        self.shards = shards
        self.groups = _groups(shards.records, shards.sizes, tasks)

    @property
    def tasks(self) -> int:
        """Tasks a pass runs (one per group; fewer than asked when there are fewer shards)."""
        return len(self.groups)

    def sorted_ids(self) -> np.ndarray:
        return self.shards.sorted_ids()  # the id column of every shard, read here: no vector

    def map(self, fn: Callable[..., T], *args) -> Iterator[T]:
        """`fn(part, *args)` in one Ray task per group (`part` a ShardVectors over the group), results in group order;
        each argument is put in Ray's object store once for every task."""
        import ray

        shared = [ray.put(arg) for arg in args]
        options = {"num_cpus": 1, "max_retries": TASK_RETRIES}
        if KILL_TASK_HOOK_ENV in os.environ:
            options["runtime_env"] = {"env_vars": {KILL_TASK_HOOK_ENV: os.environ[KILL_TASK_HOOK_ENV]}}
        task = ray.remote(_run_part).options(**options)
        location = self.out.location
        refs = [task.remote(location, self.dimension, self.batch_rows, group, fn, *shared) for group in self.groups]
        for i in range(len(refs)):
            ref, refs[i] = refs[i], None  # a result merged is dropped; the later ones wait in the object store
            yield _get(ref)

    def rows_of(self, wanted: np.ndarray, transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        found = [part for part in self.map(Vectors.rows_of, wanted, transform) if len(part[0])]
        if not found:
            return np.empty(0, dtype=np.int64), np.empty((0, self.dimension), dtype=np.float32)
        return np.concatenate([ids for ids, _ in found]), np.concatenate([rows for _, rows in found])


def _run_part(location: str, dimension: int, batch_rows: int, records: list[ShardRecord], fn: Callable, *args):
    """One task: `fn` over the group of shards `records`."""
    result = fn(ShardVectors(OutDir(location), dimension, batch_rows, records), *args)
    marker = os.environ.get(KILL_TASK_HOOK_ENV)
    if marker:
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return result
        log.warning("test hook %s: killing this task's process (group of %s) before it returns", KILL_TASK_HOOK_ENV, records[0].shard)
        os.kill(os.getpid(), signal.SIGKILL)
    return result


def _get(ref):
    """A task's result; a UserError raised in the task (a damaged shard) is raised here as itself, one line."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise UserError(str(e.cause)) from None
        raise


@dataclass
class Partial:
    """What one add task returns: its partial index (serialized), the exact neighbours of the queries over its group
    (None when not asked), and the name of the sorted id -> path run it wrote."""

    index: np.ndarray
    truth: Truth | None
    truth_full: Truth | None
    run: str


def _add_part(
    part: ShardVectors, empty: np.ndarray, transform: Transform, queries: tuple[np.ndarray, np.ndarray | None] | None,
    wanted: np.ndarray | None, run_prefix: str,
) -> Partial:
    """Add the group's vectors (those of `wanted` ids only, when given) to a copy of the trained empty index `empty`,
    accumulate the exact neighbours of `queries` (in the searched space, and before the PCA), write the group's run."""
    index = faiss.deserialize_index(empty)
    truth = ExactKnn(queries[0], transform.metric) if queries else None
    truth_full = ExactKnn(queries[1], transform.metric) if queries and queries[1] is not None else None
    ids_seen, paths_seen, shard_seen = [], [], []
    names = {record.shard: i for i, record in enumerate(part.records)}
    for shard, ids, paths, xb in part.rows():
        ids_seen.append(ids)
        paths_seen.append(paths)
        shard_seen.append(np.full(len(ids), names[shard], dtype=np.int32))
        if wanted is not None:
            keep = np.isin(ids, wanted)
            ids, xb = ids[keep], xb[keep]
        if not len(ids):
            continue
        x = prepare(xb, transform.metric)
        xt = transform.pca.apply(x) if transform.pca is not None else x
        index.add_with_ids(xt, ids)
        if truth:
            truth.add(xt, ids)
        if truth_full:
            truth_full.add(x, ids)
        del x, xt
    run = run_prefix + part.records[0].shard.rsplit("/", 1)[-1].removesuffix(".parquet")  # the same for a retry
    ids_all = np.concatenate(ids_seen) if ids_seen else np.empty(0, np.int64)
    paths_all = pa.array(np.concatenate(paths_seen) if paths_seen else [], pa.string())
    shards_all = np.concatenate(shard_seen) if shard_seen else np.empty(0, np.int32)
    part.out.write_bytes(run, run_bytes(sorted_chunks(ids_all, paths_all, shards_all, list(names))))
    return Partial(
        faiss.serialize_index(index), None if truth is None else truth.truth(), None if truth_full is None else truth_full.truth(), run,
    )


def mergeable(plan: IndexPlan) -> bool:
    """True when partial indexes of `plan` can be merged into one (not HNSW, NSG or re-ranking; see the module)."""
    index = new_index(plan)  # held here: the parts are views into it
    return not any(isinstance(part, (faiss.IndexHNSW, faiss.IndexNSG, faiss.IndexRefine)) for part in index_parts(index))


def _merge(into: faiss.Index, part: faiss.Index) -> None:
    """Move the vectors of `part` into `into` (or into the index behind its PCA): ids as `part` holds them."""
    target = faiss.downcast_index(into.index) if isinstance(into, faiss.IndexPreTransform) else into
    try:
        target.merge_from(part, 0)
    except RuntimeError as e:
        raise UserError(f"FAISS cannot merge partial indexes of this type ({str(e).rsplit('Error: ', 1)[-1][:160]}); pass --tasks 1") from None
    into.ntotal = target.ntotal


def merge_truths(parts: Sequence[Truth]) -> Truth:
    """The exact neighbours over the whole collection from those over each group (the best TRUTH_DEPTH of all)."""
    heap = faiss.ResultHeap(len(parts[0].D), TRUTH_DEPTH, keep_max=parts[0].metric == "cosine")
    for part in parts:
        heap.add_result(np.ascontiguousarray(part.D, dtype=np.float32), np.ascontiguousarray(part.I, dtype=np.int64))
    heap.finalize()
    return Truth(heap.D, heap.I, parts[0].metric)


def build_index_on_tasks(source: TaskVectors, plan: IndexPlan, target_recall: float, sample_bytes: int, seed: int, run_prefix: str) -> tuple[Built, list[str]]:
    """`cluster.index.build_index` with its passes as Ray tasks: the samples drawn by tasks, the PCA and the quantiser
    trained here, every vector added and the exact neighbours of the queries found by tasks, the partial indexes merged
    here in group order, then recall tuned as in one process. Returns the build and the runs the tasks wrote (each
    group's id -> path rows, sorted; `cluster.paths.write_paths` merges them)."""
    trained = train_index(source, plan, sample_bytes, seed)
    empty = faiss.serialize_index(trained.inner)
    # The partials merge into a copy read back as theirs are: FAISS merges only indexes of the same C++ class, and
    # reading may give a subclass (IndexFlatL2 for the factory's IndexFlat).
    trained.inner = faiss.deserialize_index(empty)
    _merge(faiss.deserialize_index(empty), faiss.deserialize_index(empty))  # a type FAISS cannot merge fails here
    started = time.monotonic()
    queries = (trained.xq, trained.xq_full if trained.pca else None)
    truths, truths_full, runs, merging = [], [], [], 0.0
    for partial in source.map(_add_part, empty, Transform(plan.metric, trained.pca), queries, None, run_prefix):
        merge_started = time.monotonic()
        _merge(trained.inner, faiss.deserialize_index(partial.index))
        merging += time.monotonic() - merge_started
        truths.append(partial.truth)
        truths_full.append(partial.truth_full)
        runs.append(partial.run)
    log.info(
        "index: %d tasks added %d vectors in %.1f s (%.1f s of it merging here)",
        source.tasks, trained.inner.ntotal, time.monotonic() - started, merging,
    )
    built = finish_index(trained, merge_truths(truths), merge_truths(truths_full) if trained.pca else None, target_recall)
    return built, runs


def add_on_tasks(index: faiss.Index, source: TaskVectors, wanted: np.ndarray, metric: str, run_prefix: str) -> list[str]:
    """Add the vectors of the `wanted` ids to `index` (as loaded: trained, behind its PCA if any) in Ray tasks, each
    filling an empty copy of it, merged here; returns the runs the tasks wrote (the id -> path rows of every group)."""
    pca, inner = None, index
    if isinstance(index, faiss.IndexPreTransform):
        pca, inner = faiss.downcast_VectorTransform(index.chain.at(0)), faiss.downcast_index(index.index)
    empty = faiss.clone_index(inner)
    empty.reset()
    runs = []
    for partial in source.map(_add_part, faiss.serialize_index(empty), Transform(metric, pca), None, wanted, run_prefix):
        _merge(index, faiss.deserialize_index(partial.index))
        runs.append(partial.run)
    return runs
