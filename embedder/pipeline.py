"""Pipeline: the Ray Data job that turns the listed images into embedding shards.

    listing (driver) -> decode_batch (Ray CPU tasks) -> EmbedActor (one VGG-16 replica per GPU, or CPU replicas)
    -> ShardWriter (driver, atomic Parquet shards) + errors.csv + manifest.json

Images already in OUT's shards, made from the same version of the file (same size and modification time), are
skipped, so a re-run after a crash or `ray job stop` only does what is missing, and a re-run on a grown or edited
folder embeds only new and changed files.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import pandas as pd

from embedder.config import DIMENSION, PREPROCESSING, JobConfig, UserError, imagenet_cache_path
from embedder.outdir import CHECKSUMS, CONFIG, ERRORS, FORMAT_VERSION, MANIFEST, OutDir, now_iso
from embedder.reader import list_images, scan_images
from embedder.resume import adopt_checksums, check_identity, plan_shards, rewrite_shards
from embedder.runtime import cluster_cpus, cluster_gpus, configure_ray_data, start_ray
from embedder.writer import ShardWriter

log = logging.getLogger("imgindex")

CPU_THREADS_PER_REPLICA = 8
# Larger GPU batches keep the model busier up to about this size (docs/benchmarks.md, "GPU model rate").
GPU_BATCH = 256
DECODE_TASK_MEMORY = 300 * 1024**2
DECODE_ROWS = 32
# --dry-run estimates: the rounded figures of docs/benchmarks.md ("Embedding on CPU" and "GPU model rate", the whole
# path decoding JPEGs on 16 cores).
NOMINAL_RATE = {"cpu_per_thread": 5.0, "gpu": 1270.0}
STARTUP_SECONDS = 11.0
# Test hook (not an option): the driver kills itself with SIGKILL once this many rows are in finished shards.
CRASH_AFTER_ROWS_ENV = "IMGINDEX_TEST_CRASH_AFTER_ROWS"


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


def plan_replicas(config: JobConfig, cluster_cpus: float, cluster_gpus: float, images: int | None = None) -> ReplicaPlan:
    """Size the model stage from the cluster: one replica per GPU (or per fraction), else CPU replicas.

    `cluster_gpus` counts the GPUs the cluster has or can scale to (see `cluster_gpus`). GPU replicas autoscale between
    1 and that many, but never beyond one per batch of `images`; CPU replicas get about 8 threads each.
    """
    gpus_per_actor = config.num_gpus_per_actor
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster_gpus > 0 else 0.0
    if gpus_per_actor > 0:
        if cluster_gpus <= 0 and config.actors is None:
            raise UserError("--num-gpus-per-actor asks for GPUs but the cluster has none; pass --num-gpus-per-actor 0 for CPU replicas")
        most = max(1, int(min(cluster_gpus, sys.maxsize) / gpus_per_actor))
        if images is not None:
            most = min(most, max(1, math.ceil(images / (config.batch_size or GPU_BATCH))))
        concurrency: int | tuple[int, int] = config.actors or ((1, most) if most > 1 else 1)
        return ReplicaPlan(gpus_per_actor, 1.0, 4, concurrency, config.batch_size or GPU_BATCH)
    cpus = max(1, int(cluster_cpus))
    actors = config.actors or max(1, round(cpus / CPU_THREADS_PER_REPLICA))
    threads = max(1, cpus // actors)
    # The replicas together reserve all CPUs but one, so a decode task can always be scheduled beside them.
    return ReplicaPlan(0.0, (cpus - 1) / actors, threads, actors, config.batch_size or 16)


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide the vectors and the index, as recorded in the manifest."""
    versions = {"python": sys.version.split()[0]}
    for name in ("imgindex", "torch", "torchvision", "ray", "faiss-cpu", "pillow", "numpy", "pyarrow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


@dataclass
class EmbedSummary:
    """What an embed run did, as printed and recorded.

    listed: images in the input; skipped: already embedded from the same file version; added: new images to embed;
    changed: images whose file changed since it was embedded (re-embedded); removed: embedded images no longer in the
    input (their rows deleted); embedded: rows written by this run; errors: files that could not be embedded.
    """

    listed: int
    skipped: int
    embedded: int
    removed: int
    errors: int
    seconds: float
    precision: list[str]
    added: int = 0
    changed: int = 0


def dry_run(config: JobConfig) -> dict:
    """Count the inputs and estimate disk and time without loading a model or starting Ray."""
    paths = list_images(config.inputs, config.out, config.follow_links)
    cpus = os.cpu_count() or 1
    rate = NOMINAL_RATE["cpu_per_thread"] * cpus
    return {
        "images": len(paths),
        "vector_bytes": len(paths) * DIMENSION * 4,
        "estimated_seconds_on_this_machine_cpu": round(STARTUP_SECONDS + len(paths) / rate, 1),
        "estimated_seconds_on_one_gpu": round(STARTUP_SECONDS + len(paths) / NOMINAL_RATE["gpu"], 1),
    }


def embed(config: JobConfig, weights_note: str | None = None) -> EmbedSummary:
    """Embed every listed image that OUT does not hold from the same file version; write shards, errors.csv and the
    manifest. Rows of images that left the input or whose file changed are removed first (shards rewritten atomically).

    `weights_note` is recorded with the weights in the manifest (the demo's "imagenet unavailable, random used").
    """
    started = time.monotonic()
    out = OutDir(config.out)
    listing = scan_images(config.inputs, config.out, config.follow_links)
    if not listing.paths:
        raise UserError(f"no images found in {' '.join(config.inputs)} (looked for {', '.join(sorted({'.jpg', '.png', '.gif', '.webp', '.tif', '.bmp'}))}, ...)")
    if len(np.unique(listing.ids)) != len(listing):
        raise UserError("two input paths hash to the same id; please report this with the paths")

    plan = plan_shards(out, listing)
    todo = ~np.isin(listing.ids, plan.kept)
    state_dict = _weights_while_ray_starts(config, bool(todo.any()))
    weights_sha = _model().state_dict_sha256(state_dict)
    identity = config.vector_identity(weights_sha)
    previous = check_identity(out, identity) or {}
    checksums = adopt_checksums(out, previous.get(CHECKSUMS, {}))
    rewrite_shards(out, plan, checksums)
    was_stored = np.isin(listing.ids, plan.stored)
    added, changed = int((todo & ~was_stored).sum()), int((todo & was_stored).sum())
    removed = int((~np.isin(plan.stored, listing.ids)).sum())
    log.info(
        "%d images listed: %d unchanged, %d new, %d changed, %d removed%s",
        len(listing), len(plan.kept), added, changed, removed,
        f", {plan.duplicates} duplicate rows dropped" if plan.duplicates else "",
    )

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
        "precision": {"requested": config.precision, "used": previous.get("precision", {}).get("used", [])},
        "decode": config.decode,
        "versions": package_versions(),
        "created": previous.get("created", now_iso()),
        "updated": now_iso(),
        "status": "embedding",
        "counts": {"listed": len(listing)},
        "changes": {"added": added, "changed": changed, "removed": removed, "unchanged": len(plan.kept)},
        CHECKSUMS: checksums,
    } | {key: previous[key] for key in ("index", "clusters") if key in previous}
    out.write_json(MANIFEST, manifest)
    out.write_bytes(CONFIG, (config.to_json() + "\n").encode())

    writer = ShardWriter(out, config.rows_per_shard, on_shard=_shard_done(out, manifest))
    failures: list[tuple[str, str]] = []
    precisions = set(manifest["precision"]["used"])
    limit = config.error_limit(len(listing))
    if todo.any():
        versions = pd.DataFrame(
            {"fingerprint": listing.fingerprints, "size": listing.sizes, "mtime_ns": listing.mtimes_ns}, index=listing.ids
        )
        for batch in _run_ray_data(config, listing.ids[todo], [p for p, t in zip(listing.paths, todo) if t], state_dict, weights_sha):
            bad = np.array([bool(e) for e in batch["error"]], dtype=bool)
            failures.extend(zip(batch["path"][bad].tolist(), batch["error"][bad].tolist()))
            good = versions.loc[batch["id"][~bad]]
            writer.add(
                batch["id"][~bad], batch["path"][~bad], batch["embedding"][~bad],
                good["fingerprint"].to_numpy(), good["size"].to_numpy(), good["mtime_ns"].to_numpy(),
            )
            precisions.update(batch["precision"][~bad].tolist())
            if limit is not None and len(failures) > limit:
                break
        writer.flush()
    out.write_csv(ERRORS, pd.DataFrame(failures, columns=["path", "error"]).sort_values("path"))

    summary = EmbedSummary(
        len(listing), len(plan.kept), writer.rows_written, removed, len(failures), time.monotonic() - started,
        sorted(precisions), added, changed,
    )
    too_many = limit is not None and len(failures) > limit
    manifest.update(
        status="failed: too many bad files" if too_many else "embedded",
        updated=now_iso(),
        precision={"requested": config.precision, "used": summary.precision},
        counts={"listed": len(listing), "images": len(plan.kept) + writer.rows_written, "errors": len(failures)},
    )
    out.write_json(MANIFEST, manifest)
    if too_many:
        raise UserError(
            f"{len(failures)} files could not be embedded, more than --max-errors {config.max_errors} allows; "
            f"stopped (the {len(plan.kept) + writer.rows_written} embedded images are kept, see {out.location}/{ERRORS})"
        )
    log.info(
        "embedded %d images (%d already there, %d failed, see %s) in %.1f s",
        summary.embedded, summary.skipped, summary.errors, ERRORS, summary.seconds,
    )
    return summary


def _shard_done(out: OutDir, manifest: dict):
    """The ShardWriter callback: record each finished shard's sha256 in the manifest as soon as it is in place."""
    crash_after = int(os.environ.get(CRASH_AFTER_ROWS_ENV, "0"))
    written = [0]

    def done(name: str, sha256: str, rows: int) -> None:
        manifest[CHECKSUMS][name] = sha256
        out.write_json(MANIFEST, manifest)
        written[0] += rows
        if crash_after and written[0] >= crash_after:
            log.warning("test hook %s: killing the driver after %d rows", CRASH_AFTER_ROWS_ENV, written[0])
            os.kill(os.getpid(), signal.SIGKILL)

    return done


def _weights_while_ray_starts(config: JobConfig, work_left: bool) -> dict[str, np.ndarray]:
    """Build the weights; when images are left to embed, start Ray meanwhile (both take seconds, neither needs the other).

    ImageNet weights not yet in the torch cache are fetched first, so an offline machine fails before Ray starts.
    """
    cached = config.weights != "imagenet" or os.path.isfile(imagenet_cache_path())
    if not work_left or not cached:
        return _model().build_state_dict(config.weights, config.seed)
    with ThreadPoolExecutor(1) as pool:
        weights = pool.submit(_build_and_import_ray_data, config.weights, config.seed)
        start_ray(config.address)
        return weights.result()


def _model():
    """embedder.model, imported on first use: torch and torchvision take seconds to import, which a run that has to
    start Ray spends in the weights thread, off the critical path."""
    return importlib.import_module("embedder.model")


def _build_and_import_ray_data(weights: str, seed: int) -> dict[str, np.ndarray]:
    """The weights (importing torch), and Ray Data's import, while the main thread waits for Ray to start."""
    state_dict = _model().build_state_dict(weights, seed)
    importlib.import_module("ray.data")
    return state_dict


def _run_ray_data(config: JobConfig, ids: np.ndarray, paths: list[str], state_dict: dict, weights_sha: str):
    """Yield output batches {id, path, embedding, error, precision} of the Ray Data pipeline over (ids, paths)."""
    import ray

    from embedder.actor import EmbedActor
    from embedder.reader import decode_batch, read_batch
    from embedder.shared_storage import check_shared_storage

    start_ray(config.address)
    check_shared_storage(config.out, paths[0])
    plan = plan_replicas(config, cluster_cpus(), cluster_gpus(), len(ids))
    log.info("model replicas: %s", dataclasses.asdict(plan))
    configure_ray_data()

    weights_ref = ray.put(state_dict)
    # Small input blocks spread decoding over many CPU tasks; the actor stage regroups them into model batches.
    frame = pd.DataFrame({"id": ids, "path": paths})
    decode_rows = min(plan.batch_size, DECODE_ROWS)
    blocks = [frame.iloc[i : i + decode_rows] for i in range(0, len(frame), decode_rows)]
    dataset = (
        ray.data.from_pandas(blocks)
        # A decode task may hold one image at Pillow's pixel limit (89 Mpx, ~270 MB as RGB). Declaring that memory
        # also keeps decoding (or, with --decode gpu, reading) out of the actors: Ray Data fuses only stages with
        # equal resources, and this belongs in CPU tasks that run beside the model, not before it in the same process.
        .map_batches(
            decode_batch if config.decode == "cpu" else read_batch,
            batch_size=decode_rows, batch_format="numpy", num_cpus=1, memory=DECODE_TASK_MEMORY,
        )
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
