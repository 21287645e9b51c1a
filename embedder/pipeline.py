"""Pipeline: the Ray Data job that turns the listed images into embedding shards (placement: embedder/replicas.py).

    listing (driver) -> decode_batch (Ray CPU tasks) -> EmbedActor (one VGG-16 replica per GPU, or CPU replicas)
    -> write_shards (Ray CPU tasks: Parquet shards in OUT) -> the driver commits each shard (one small record)
    -> errors.csv + manifest.json

Vectors never travel to the driver: it receives one row per shard (name, rows, sha256) and one per failed file. Images
already in OUT's shards, made from the same version of the file (same size and modification time), are skipped (see
embedder/resume.py), so a re-run after a crash or `ray job stop` only does what is missing, and a re-run on a grown or
edited folder embeds only new and changed files.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata

import numpy as np
import pandas as pd

from embedder.collection import ShardRecord, commit, migrate
from embedder.config import DIMENSION, PREPROCESSING, JobConfig, UserError, imagenet_cache_path
from embedder.outdir import CONFIG, ERRORS, FORMAT_VERSION, MANIFEST, OutDir, now_iso
from embedder.reader import Listing, list_images, scan_images
from embedder.replicas import NOMINAL_RATE, model_stage, plan_replicas
from embedder.resume import adopt_uncommitted, apply_plan, check_identity, plan_shards, recover
from embedder.runtime import cluster_cpus, cluster_gpus, configure_ray_data, start_ray

log = logging.getLogger("imgindex")

DECODE_TASK_MEMORY = 300 * 1024**2
# Seconds between progress lines.
PROGRESS_SECONDS = 30.0
STARTUP_SECONDS = 11.0


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
    """Embed every listed image that OUT does not hold from the same file version; commit the shards, write errors.csv
    and the manifest. Rows of images that left the input or whose file changed are removed first.

    Succeeds only when every listed image is in a committed shard or in errors.csv. `weights_note` is recorded with
    the weights in the manifest (the demo's "imagenet unavailable, random used").
    """
    started = time.monotonic()
    out = OutDir(config.out)
    recover(out)
    listing = scan_images(config.inputs, config.out, config.follow_links)
    if not listing.paths:
        raise UserError(f"no images found in {' '.join(config.inputs)} (looked for {', '.join(sorted({'.jpg', '.png', '.gif', '.webp', '.tif', '.bmp'}))}, ...)")
    if len(np.unique(listing.ids)) != len(listing):
        raise UserError("two input paths hash to the same id; please report this with the paths")

    adopt_uncommitted(out, DIMENSION)
    plan = plan_shards(out, listing)
    todo = ~np.isin(listing.ids, plan.kept)
    state_dict = _weights_while_ray_starts(config, bool((todo & (listing.sizes >= 0)).any()))
    weights_sha = _model().state_dict_sha256(state_dict)
    identity = config.vector_identity(weights_sha)
    previous = check_identity(out, identity) or {}
    if previous.get("format_version") == 1:
        previous = migrate(out, previous)
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
    } | {key: previous[key] for key in ("checksums", "index", "clusters") if key in previous}
    out.write_json(MANIFEST, manifest)
    out.write_bytes(CONFIG, (config.to_json() + "\n").encode())
    token = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    apply_plan(out, plan, token)

    run = _Progress(int(todo.sum()))
    unlisted = todo & (listing.sizes < 0)
    run.fail(listing.ids[unlisted], [(p, "cannot read: missing or not accessible when listed") for p, u in zip(listing.paths, unlisted) if u])
    limit = config.error_limit(len(listing))
    sent = todo & ~unlisted
    if sent.any() and not run.too_many(limit):
        for batch in _run_ray_data(config, _rows(listing, sent), state_dict, weights_sha, token):
            run.take(out, batch)
            if run.too_many(limit):
                break
    out.write_csv(ERRORS, pd.DataFrame(run.failures, columns=["path", "error"]).sort_values("path"))

    summary = EmbedSummary(
        len(listing), len(plan.kept), run.rows, removed, len(run.failures), time.monotonic() - started,
        sorted(set(manifest["precision"]["used"]) | run.precisions), added, changed,
    )
    too_many = run.too_many(limit)
    missing = 0 if too_many else run.missing(listing.ids[todo])
    images = len(plan.kept) + run.rows
    manifest.update(
        status="failed: too many bad files" if too_many else f"incomplete: {missing} images not embedded" if missing else "embedded",
        updated=now_iso(),
        precision={"requested": config.precision, "used": summary.precision},
        counts={"listed": len(listing), "images": images, "errors": len(run.failures)},
    )
    out.write_json(MANIFEST, manifest)
    if too_many:
        raise UserError(
            f"{len(run.failures)} files could not be embedded, more than --max-errors {config.max_errors} allows; "
            f"stopped (the {images} embedded images are kept, see {out.location}/{ERRORS})"
        )
    if missing:
        raise UserError(f"{missing} listed images are neither in a committed shard nor in {ERRORS}; run the same command again")
    if images == 0:
        raise UserError(f"no image could be embedded: all {len(listing)} listed files failed (see {out.location}/{ERRORS})")
    log.info(
        "embedded %d images (%d already there, %d failed, see %s) in %.1f s",
        summary.embedded, summary.skipped, summary.errors, ERRORS, summary.seconds,
    )
    return summary


class _Progress:
    """The driver's view of a run: committed rows, failures, the ids accounted for, and a progress line now and then."""

    def __init__(self, total: int):
        self.total = total
        self.rows = 0
        self.failures: list[tuple[str, str]] = []
        self.precisions: set[str] = set()
        self.accounted: list[np.ndarray] = []
        self.started = self.last = time.monotonic()

    def fail(self, ids: np.ndarray, failures: list[tuple[str, str]]) -> None:
        self.failures.extend(failures)
        self.accounted.append(np.asarray(ids, dtype=np.int64))

    def take(self, out: OutDir, batch: dict[str, np.ndarray]) -> None:
        """Commit the shards of one batch of the writer stage's output and record its failed files."""
        for i, kind in enumerate(batch["kind"]):
            ids = np.frombuffer(batch["ids"][i], dtype=np.int64)
            if kind == "shard":
                commit(out, ShardRecord(batch["shard"][i], int(batch["rows"][i]), int(batch["bytes"][i]), batch["sha256"][i]))
                self.rows += int(batch["rows"][i])
                self.precisions.update(batch["precision"][i].split(","))
                self.accounted.append(ids)
            else:
                self.fail(ids, [(batch["path"][i], batch["error"][i])])
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            done = self.rows + len(self.failures)
            log.info("%d of %d images done (%d failed), %.1f images/s", done, self.total, len(self.failures), done / (now - self.started))

    def too_many(self, limit: int | None) -> bool:
        return limit is not None and len(self.failures) > limit

    def missing(self, todo: np.ndarray) -> int:
        """How many of the `todo` ids are neither committed nor failed."""
        accounted = np.concatenate(self.accounted) if self.accounted else np.empty(0, dtype=np.int64)
        return int((~np.isin(todo, accounted)).sum())


def _rows(listing: Listing, chosen: np.ndarray) -> dict[str, np.ndarray]:
    """The columns that travel with each image through the job: id, path and the version of its file (the writer
    hashes it into the fingerprint, off the driver)."""
    return {
        "id": listing.ids[chosen],
        "path": np.array(listing.paths, dtype=object)[chosen],
        "size": listing.sizes[chosen],
        "mtime_ns": listing.mtimes_ns[chosen],
    }


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


def stages(decode: str):
    """The job's per-block functions: the decode (or, for --decode gpu, read) task, the model actor class and the
    shard-writing task. The throughput benchmark (bench/throughput.py) replaces this function to measure the job
    around the model with stand-ins; nothing else does."""
    from embedder.actor import EmbedActor
    from embedder.reader import decode_batch, read_batch
    from embedder.writer import write_shards

    return decode_batch if decode == "cpu" else read_batch, EmbedActor, write_shards


def _run_ray_data(config: JobConfig, rows: dict[str, np.ndarray], state_dict: dict, weights_sha: str, token: str):
    """Yield the writer stage's output batches (one row per committed-to-be shard or failed file) over `rows`."""
    import pyarrow as pa
    import ray

    from embedder.shared_storage import check_shared_storage

    start_ray(config.address)
    check_shared_storage(config.out, str(rows["path"][0]))
    plan = plan_replicas(config, cluster_cpus(), cluster_gpus(), len(rows["id"]))
    log.info("model replicas: %s", dataclasses.asdict(plan))
    configure_ray_data()
    decode, actor, write = stages(config.decode)

    weights_ref = ray.put(state_dict)
    step = plan.block_rows
    blocks = [pa.table({k: v[i : i + step] for k, v in rows.items()}) for i in range(0, len(rows["id"]), step)]
    dataset = (
        ray.data.from_arrow(blocks)
        # A decode task may hold one image at Pillow's pixel limit (89 Mpx, ~270 MB as RGB). Declaring that memory
        # also keeps decoding (or, with --decode gpu, reading) out of the actors: Ray Data fuses only stages with
        # equal resources, and this belongs in CPU tasks that run beside the model, not before it in the same process.
        .map_batches(decode, batch_size=step, batch_format="numpy", num_cpus=1, memory=DECODE_TASK_MEMORY)
        .map_batches(actor, batch_size=step, **model_stage(plan, config, weights_ref, weights_sha))
        .map_batches(write, fn_kwargs={"out": config.out, "token": token}, batch_size=plan.shard_rows,
                     batch_format="numpy", num_cpus=1)
    )
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
