"""Replicas: how the model stage is placed on the cluster (one VGG-16 replica per GPU, else CPU replicas), the block
sizes the job moves, and embedding pixels made elsewhere on replicas placed the same way.

The embedding job (embedder/pipeline.py) runs its listed images through these replicas; the near-duplicate calibration
(jobs/duplicates.py) runs its near-copies through them with `embed_pixels`, so on a cluster the copies are embedded
where, and exactly as, the collection was.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass

import numpy as np

from embedder.config import JobConfig, UserError
from embedder.runtime import cluster_cpus, cluster_gpus, configure_ray_data, start_ray

CPU_THREADS_PER_REPLICA = 8
# Larger GPU batches keep the model busier up to about this size (docs/benchmarks.md, "GPU model rate").
GPU_BATCH = 256
# Rows per decode task (and per model-actor call): at least this many, so that scheduling costs little per image, and at
# most MAX_BLOCK_ROWS, so that at least BLOCKS_PER_SLOT tasks per free CPU keep decoding beside the model and a block's
# pixels stay small in the object store (what larger blocks save: docs/benchmarks.md, "Job throughput (stand-ins)").
MIN_BLOCK_ROWS = {"cpu": 16, "gpu": 256}
MAX_BLOCK_ROWS = 1024
BLOCKS_PER_SLOT = 4
# A shard holds at most --rows-per-shard rows, and about this much model work, so a crash loses little of a slow run.
SHARD_SECONDS = 60.0
# The replicas' nominal rates, for shard sizes and --dry-run estimates: the rounded figures of docs/benchmarks.md
# ("Embedding on CPU" and "GPU model rate", the whole path decoding JPEGs on 16 cores).
NOMINAL_RATE = {"cpu_per_thread": 5.0, "gpu": 1270.0}


@dataclass(frozen=True)
class ReplicaPlan:
    """How the model stage is placed: resources per actor, actor count (fixed or an autoscaling range), model batch
    size; and the blocks the job moves: rows per decode task and model-actor call, rows per shard."""

    num_gpus: float
    num_cpus: float
    threads: int
    concurrency: int | tuple[int, int]
    batch_size: int
    block_rows: int = MIN_BLOCK_ROWS["cpu"]
    shard_rows: int = MIN_BLOCK_ROWS["cpu"]

    @property
    def max_actors(self) -> int:
        return self.concurrency if isinstance(self.concurrency, int) else self.concurrency[1]

    @property
    def device(self) -> str:
        return "gpu" if self.num_gpus > 0 else "cpu"


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
        plan = ReplicaPlan(gpus_per_actor, 1.0, 4, concurrency, config.batch_size or GPU_BATCH)
    else:
        cpus = max(1, int(cluster_cpus))
        actors = config.actors or max(1, round(cpus / CPU_THREADS_PER_REPLICA))
        threads = max(1, cpus // actors)
        # The replicas together reserve all CPUs but one, so a decode task can always be scheduled beside them.
        plan = ReplicaPlan(0.0, (cpus - 1) / actors, threads, actors, config.batch_size or 16)
    return size_blocks(plan, config, cluster_cpus, images)


def size_blocks(plan: ReplicaPlan, config: JobConfig, cluster_cpus: float, images: int | None) -> ReplicaPlan:
    """The blocks of a job over `images`: rows per decode task (and per model-actor call) and rows per shard.

    Rows per task grow with the job, BLOCKS_PER_SLOT tasks for each CPU the replicas leave free, so scheduling costs
    little per image on a large job while a small one still overlaps decoding with the model; never below a model
    batch nor below MIN_BLOCK_ROWS, never above MAX_BLOCK_ROWS. A shard gathers at most --rows-per-shard rows and
    about SHARD_SECONDS of the replicas' nominal work.
    """
    free = max(1.0, cluster_cpus - plan.num_cpus * plan.max_actors)
    wanted = math.ceil((images or 0) / (BLOCKS_PER_SLOT * free))
    block = max(plan.batch_size, MIN_BLOCK_ROWS[plan.device], min(MAX_BLOCK_ROWS, wanted))
    rate = NOMINAL_RATE["gpu"] if plan.device == "gpu" else NOMINAL_RATE["cpu_per_thread"] * plan.threads
    shard = min(config.rows_per_shard, max(block, int(rate * plan.max_actors * SHARD_SECONDS)))
    return dataclasses.replace(plan, block_rows=block, shard_rows=shard)


def model_stage(plan: ReplicaPlan, config: JobConfig, weights, weights_sha256: str) -> dict:
    """The `map_batches` arguments of the model actors, as `plan` places them: each actor's constructor arguments
    (`weights`: the state dict or its object-store reference), its resources, and a fixed pool or one that autoscales
    in its range. The job (embedder/pipeline.py) and `embed_pixels` run the actors with these."""
    import ray

    if isinstance(plan.concurrency, int):
        compute = ray.data.ActorPoolStrategy(size=plan.concurrency)
    else:
        compute = ray.data.ActorPoolStrategy(min_size=plan.concurrency[0], max_size=plan.concurrency[1])
    return {
        "fn_constructor_kwargs": {"config": config, "weights": weights, "weights_sha256": weights_sha256,
                                  "threads": plan.threads, "batch_size": plan.batch_size},
        "batch_format": "numpy",
        "compute": compute,
        "num_gpus": plan.num_gpus,
        "num_cpus": plan.num_cpus,
    }


def embed_pixels(config: JobConfig, state_dict: dict, weights_sha256: str, pixels: np.ndarray) -> np.ndarray:
    """Embed (n, 224, 224, 3) uint8 pixels, already cropped as the job crops, on model replicas placed as
    `plan_replicas` places the job's (Ray at `config.address`, RAY_ADDRESS or the running one, else embedded), with
    `config`'s layer and precision; returns (n, 4096) float32 in the order given."""
    import ray

    from embedder.actor import EmbedActor

    start_ray(config.address)
    configure_ray_data()
    plan = plan_replicas(config, cluster_cpus(), cluster_gpus(), len(pixels))
    rows = [{"row": i, "pixels": pixels[i], "error": ""} for i in range(len(pixels))]
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, math.ceil(len(rows) / plan.batch_size))).map_batches(
        EmbedActor, batch_size=plan.batch_size, **model_stage(plan, config, ray.put(state_dict), weights_sha256))
    order, vectors = [], []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        order.append(batch["row"])
        vectors.append(batch["embedding"])
    if not vectors:
        return np.empty((0, 0), dtype=np.float32)
    return np.concatenate(vectors)[np.argsort(np.concatenate(order))].astype(np.float32, copy=False)
