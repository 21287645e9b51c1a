"""Runtime: connect to a Ray cluster or start one in-process, and read what it offers (CPUs, GPUs it can scale to)."""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("imgindex")


def start_ray(address: str | None) -> None:
    """Connect to the cluster at `address` (or RAY_ADDRESS, as inside `ray job submit`), else start Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    from embedder.outdir import kill_hook_driver

    target = address or os.environ.get("RAY_ADDRESS")
    started = time.monotonic()
    hook = kill_hook_driver()
    runtime_env = {"env_vars": hook} if hook else None
    if target:
        ray.init(address=target, log_to_driver=True, logging_level=logging.WARNING, runtime_env=runtime_env)
    else:
        ray.init(include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING, runtime_env=runtime_env)
    log.info("ray ready in %.1f s (%s)", time.monotonic() - started, target or "embedded local instance")


def cluster_gpus() -> float:
    """GPUs the connected cluster has now or can scale to.

    An autoscaling cluster (KubeRay, the cluster launcher) may have no GPU worker up at submit time; sizing from
    `ray.cluster_resources()` alone would then plan CPU replicas. The autoscaler publishes its node groups' maximum
    resources to the GCS, which Ray Data reads the same way to size its own operators.
    """
    import ray

    scalable = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    return max(ray.cluster_resources().get("GPU", 0.0), float(scalable.get("GPU", 0)))


def cluster_cpus() -> float:
    """CPUs the connected cluster has now."""
    import ray

    return ray.cluster_resources().get("CPU", 1.0)
