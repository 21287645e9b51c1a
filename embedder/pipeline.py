"""Pipeline: the Ray Data job that turns the listed images into embedding shards.

    listing (driver) -> decode_batch (Ray CPU tasks) -> EmbedActor (one VGG-16 replica per GPU, or CPU replicas)
    -> ShardWriter (driver, atomic Parquet shards) + errors.csv + manifest.json

Images already in OUT's shards are skipped, so a re-run after a crash or `ray job stop` only does what is missing.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import pandas as pd

from embedder.config import DIMENSION, FORMAT_VERSION, PREPROCESSING, JobConfig, UserError
from embedder.reader import image_id, list_images
from embedder.writer import ERRORS, MANIFEST, OutDir, ShardWriter, read_shard, shard_names, write_shard

log = logging.getLogger("imgindex")

CPU_THREADS_PER_REPLICA = 8
# On an H100, bf16: 4,858 images/s at batch 64, 6,249 at 128, 6,787 at 256 (bench/gpu.sh).
GPU_BATCH = 256
DECODE_TASK_MEMORY = 300 * 1024**2
DECODE_ROWS = 32
# --dry-run estimates, from bench/embed.py (2 cores, bf16: ~10.5 images/s steady, ~11 s of fixed start-up) and
# bench/gpu.sh (one H100 fed by 16 cores decoding JPEGs: ~1,270 images/s, bound by the decoding).
NOMINAL_RATE = {"cpu_per_thread": 5.0, "gpu": 1270.0}
STARTUP_SECONDS = 11.0


@dataclass(frozen=True)
class ReplicaPlan:
    """How the model stage is placed: resources per actor, actor count (fixed or an autoscaling range), batch size."""

    num_gpus: float
    num_cpus: float
    threads: int
    concurrency: int | tuple[int, int]
    batch_size: int

    @property
    def max_actors(self) -> int:
        return self.concurrency if isinstance(self.concurrency, int) else self.concurrency[1]


def plan_replicas(config: JobConfig, cluster_cpus: float, cluster_gpus: float) -> ReplicaPlan:
    """Size the model stage from the cluster: one replica per GPU (or per fraction), else CPU replicas.

    GPU replicas autoscale between 1 and the number of GPUs; CPU replicas get about 8 threads each.
    """
    gpus_per_actor = config.num_gpus_per_actor
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster_gpus > 0 else 0.0
    if gpus_per_actor > 0:
        if cluster_gpus <= 0 and config.actors is None:
            raise UserError("--num-gpus-per-actor asks for GPUs but the cluster has none; pass --num-gpus-per-actor 0 for CPU replicas")
        most = max(1, int(cluster_gpus / gpus_per_actor))
        concurrency: int | tuple[int, int] = config.actors or ((1, most) if most > 1 else 1)
        return ReplicaPlan(gpus_per_actor, 1.0, 4, concurrency, config.batch_size or GPU_BATCH)
    cpus = max(1, int(cluster_cpus))
    actors = config.actors or max(1, round(cpus / CPU_THREADS_PER_REPLICA))
    threads = max(1, cpus // actors)
    # The replicas together reserve all CPUs but one, so a decode task can always be scheduled beside them.
    return ReplicaPlan(0.0, (cpus - 1) / actors, threads, actors, config.batch_size or 16)


def start_ray(address: str | None) -> None:
    """Connect to the cluster at `address` (or RAY_ADDRESS, as inside `ray job submit`), else start Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS")
    started = time.monotonic()
    if target:
        ray.init(address=target, log_to_driver=True, logging_level=logging.WARNING)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    log.info("ray ready in %.1f s (%s)", time.monotonic() - started, target or "embedded local instance")


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the vectors and the index, as recorded in the manifest."""
    versions = {"python": sys.version.split()[0]}
    for name in ("imgindex", "torch", "torchvision", "ray", "faiss-cpu", "pillow", "numpy", "pyarrow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def check_identity(out: OutDir, identity: dict) -> dict | None:
    """The existing manifest, if any; refuse an OUT whose vectors were made differently from what is asked now."""
    if not out.exists(MANIFEST):
        if shard_names(out):
            raise UserError(f"{out.location} holds embeddings but no manifest.json; use a new --out")
        return None
    manifest = out.read_json(MANIFEST)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{out.location} was written by format version {manifest.get('format_version')}; use a new --out")
    for key, value in identity.items():
        if manifest.get("identity", {}).get(key) != value:
            raise UserError(
                f"{out.location} was made with a different {key} ({manifest.get('identity', {}).get(key)!r}, now "
                f"{value!r}); use a new --out or the same options as before"
            )
    return manifest


def shard_ids(out: OutDir) -> dict[str, np.ndarray]:
    """The ids each finished shard of OUT holds (only the id column is read)."""
    return {name: read_shard(out, name, ["id"]).column("id").to_numpy() for name in shard_names(out)}


def drop_stale_rows(out: OutDir, shards: dict[str, np.ndarray], current: np.ndarray) -> tuple[set[int], int]:
    """Rewrite shards without rows whose image is no longer listed; return (ids kept, rows removed)."""
    kept: set[int] = set()
    removed = 0
    for name, ids in shards.items():
        live = np.isin(ids, current)
        kept.update(ids[live].tolist())
        if live.all():
            continue
        removed += int((~live).sum())
        if live.any():
            write_shard(out, name, read_shard(out, name).filter(live))
        else:
            out.delete(name)
    return kept, removed


@dataclass
class EmbedSummary:
    """What an embed run did, as printed and recorded."""

    listed: int
    skipped: int
    embedded: int
    removed: int
    errors: int
    seconds: float
    precision: list[str]


def dry_run(config: JobConfig) -> dict:
    """Count the inputs and estimate disk and time without loading a model or starting Ray."""
    paths = list_images(config.inputs)
    cpus = os.cpu_count() or 1
    rate = NOMINAL_RATE["cpu_per_thread"] * cpus
    return {
        "images": len(paths),
        "vector_bytes": len(paths) * DIMENSION * 4,
        "estimated_seconds_on_this_machine_cpu": round(STARTUP_SECONDS + len(paths) / rate, 1),
        "estimated_seconds_on_one_gpu": round(STARTUP_SECONDS + len(paths) / NOMINAL_RATE["gpu"], 1),
    }


def embed(config: JobConfig, weights_note: str | None = None) -> EmbedSummary:
    """Embed every listed image that OUT does not hold yet; write shards, errors.csv and the manifest.

    `weights_note` is recorded with the weights in the manifest (the demo's "imagenet unavailable, random used").
    """
    started = time.monotonic()
    out = OutDir(config.out)
    paths = list_images(config.inputs)
    if not paths:
        raise UserError(f"no images found in {' '.join(config.inputs)} (looked for {', '.join(sorted({'.jpg', '.png', '.gif', '.webp', '.tif', '.bmp'}))}, ...)")
    ids = np.array([image_id(p) for p in paths], dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise UserError("two input paths hash to the same id; please report this with the paths")

    shards = shard_ids(out)
    state_dict = _weights_while_ray_starts(config, shards, ids)
    weights_sha = _model().state_dict_sha256(state_dict)
    identity = config.vector_identity(weights_sha)
    previous = check_identity(out, identity)
    done, removed = drop_stale_rows(out, shards, ids) if previous else (set(), 0)
    todo = ~np.isin(ids, np.fromiter(done, dtype=np.int64, count=len(done)))
    log.info("%d images listed, %d already embedded, %d to embed, %d stale rows removed", len(paths), len(done), int(todo.sum()), removed)

    manifest = {
        "format_version": FORMAT_VERSION,
        "identity": identity,
        "model": "vgg16",
        "layer": config.layer,
        "dimension": DIMENSION,
        "weights": {"name": config.weights, "sha256": weights_sha, "seed": config.seed}
        | ({"note": weights_note} if weights_note else {}),
        "preprocessing": PREPROCESSING,
        "metric": config.metric,
        "precision": {"requested": config.precision, "used": (previous or {}).get("precision", {}).get("used", [])},
        "versions": package_versions(),
        "created": (previous or {}).get("created", now_iso()),
        "updated": now_iso(),
        "status": "embedding",
        "counts": {"listed": len(paths)},
    }
    out.write_json(MANIFEST, manifest)
    out.write_bytes("config.json", (config.to_json() + "\n").encode())

    writer = ShardWriter(out, config.rows_per_shard)
    failures: list[tuple[str, str]] = []
    precisions = set(manifest["precision"]["used"])
    if todo.any():
        for batch in _run_ray_data(config, ids[todo], [p for p, t in zip(paths, todo) if t], state_dict, weights_sha):
            bad = np.array([bool(e) for e in batch["error"]], dtype=bool)
            failures.extend(zip(batch["path"][bad].tolist(), batch["error"][bad].tolist()))
            writer.add(batch["id"][~bad], batch["path"][~bad], batch["embedding"][~bad])
            precisions.update(batch["precision"][~bad].tolist())
        writer.flush()
    out.write_csv(ERRORS, pd.DataFrame(failures, columns=["path", "error"]).sort_values("path"))

    summary = EmbedSummary(len(paths), len(done), writer.rows_written, removed, len(failures), time.monotonic() - started, sorted(precisions))
    manifest.update(
        status="embedded",
        updated=now_iso(),
        precision={"requested": config.precision, "used": summary.precision},
        counts={"listed": len(paths), "images": len(done) + writer.rows_written, "errors": len(failures)},
    )
    out.write_json(MANIFEST, manifest)
    log.info(
        "embedded %d images (%d already there, %d failed, see %s) in %.1f s",
        summary.embedded, summary.skipped, summary.errors, ERRORS, summary.seconds,
    )
    return summary


def _weights_while_ray_starts(config: JobConfig, shards: dict[str, np.ndarray], ids: np.ndarray) -> dict[str, np.ndarray]:
    """Build the weights; when images are left to embed, start Ray meanwhile (both take seconds, neither needs the other).

    ImageNet weights not yet in the torch cache are fetched first, so an offline machine fails before Ray starts.
    """
    embedded = np.concatenate(list(shards.values())) if shards else np.empty(0, dtype=np.int64)
    cached = config.weights != "imagenet" or os.path.isfile(_model().imagenet_cache_path())
    if np.isin(ids, embedded).all() or not cached:
        return _model().build_state_dict(config.weights, config.seed)
    with ThreadPoolExecutor(1) as pool:
        weights = pool.submit(_build_and_import_ray_data, config.weights, config.seed)
        start_ray(config.address)
        return weights.result()


def _model():
    """embedder.model, imported on first use: torch and torchvision take ~2.5 s to import, which a run that has to
    start Ray spends in the weights thread, off the critical path."""
    return importlib.import_module("embedder.model")


def _build_and_import_ray_data(weights: str, seed: int) -> dict[str, np.ndarray]:
    """The weights (importing torch), and Ray Data's import (1.5 s), while the main thread waits for Ray to start."""
    state_dict = _model().build_state_dict(weights, seed)
    importlib.import_module("ray.data")
    return state_dict


def _run_ray_data(config: JobConfig, ids: np.ndarray, paths: list[str], state_dict: dict, weights_sha: str):
    """Yield output batches {id, path, embedding, error, precision} of the Ray Data pipeline over (ids, paths)."""
    import ray

    from embedder.actor import EmbedActor
    from embedder.reader import decode_batch
    from embedder.shared_storage import check_shared_storage

    start_ray(config.address)
    check_shared_storage(config.out, paths[0])
    resources = ray.cluster_resources()
    plan = plan_replicas(config, resources.get("CPU", 1), resources.get("GPU", 0))
    log.info("model replicas: %s", dataclasses.asdict(plan))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = sys.stderr.isatty()

    weights_ref = ray.put(state_dict)
    # Small input blocks spread decoding over many CPU tasks; the actor stage regroups them into model batches.
    frame = pd.DataFrame({"id": ids, "path": paths})
    decode_rows = min(plan.batch_size, DECODE_ROWS)
    blocks = [frame.iloc[i : i + decode_rows] for i in range(0, len(frame), decode_rows)]
    dataset = (
        ray.data.from_pandas(blocks)
        # A decode task may hold one image at Pillow's pixel limit (89 Mpx, ~270 MB as RGB). Declaring that memory
        # also keeps decoding out of the actors: Ray Data fuses only stages with equal resources, and decoding
        # belongs in CPU tasks that run beside the model, not before it in the same process.
        .map_batches(decode_batch, batch_size=decode_rows, batch_format="numpy", num_cpus=1, memory=DECODE_TASK_MEMORY)
        .map_batches(
            EmbedActor,
            fn_constructor_kwargs={"config": config, "weights": weights_ref, "weights_sha256": weights_sha, "threads": plan.threads},
            batch_size=plan.batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=plan.concurrency) if isinstance(plan.concurrency, int)
            else ray.data.ActorPoolStrategy(min_size=plan.concurrency[0], max_size=plan.concurrency[1]),
            num_gpus=plan.num_gpus,
            num_cpus=plan.num_cpus,
        )
    )
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
