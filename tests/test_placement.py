"""Placement of the model replicas from the cluster's resources (no Ray needed)."""

from __future__ import annotations

import sys

import pytest

from embedder.config import JobConfig, UserError
from embedder.replicas import plan_replicas
from embedder.runtime import cluster_gpus


def config(**kwargs) -> JobConfig:
    return JobConfig(inputs=("/x",), out="/o", weights="random", **kwargs).validate()


@pytest.mark.parametrize("cpus, actors", [(1, None), (2, None), (2, 2), (16, None), (64, None), (8, 3)])
def test_cpu_replicas_always_leave_a_cpu_for_decoding(cpus, actors):
    plan = plan_replicas(config(actors=actors), cpus, 0)
    assert plan.num_gpus == 0 and plan.max_actors == (actors or max(1, round(cpus / 8)))
    assert plan.max_actors * plan.num_cpus <= cpus - 1
    assert plan.threads * plan.max_actors <= cpus and plan.batch_size == 16


def test_one_replica_per_gpu_autoscaling_from_one():
    plan = plan_replicas(config(), 32, 4)
    assert (plan.num_gpus, plan.concurrency, plan.batch_size) == (1.0, (1, 4), 256)
    assert plan_replicas(config(), 8, 1).concurrency == 1


def test_fractional_gpus_double_the_replicas_and_actors_fix_the_count():
    assert plan_replicas(config(num_gpus_per_actor=0.5), 32, 4).concurrency == (1, 8)
    assert plan_replicas(config(actors=3, batch_size=64), 32, 4).concurrency == 3
    assert plan_replicas(config(num_gpus_per_actor=0), 32, 4).num_gpus == 0


def test_asking_for_gpus_on_a_cpu_cluster_is_a_user_error():
    with pytest.raises(UserError, match="--num-gpus-per-actor 0"):
        plan_replicas(config(num_gpus_per_actor=1), 8, 0)


def test_gpu_replicas_never_outnumber_the_batches():
    assert plan_replicas(config(), 64, 8, images=600).concurrency == (1, 3)
    assert plan_replicas(config(), 64, 8, images=10).concurrency == 1
    assert plan_replicas(config(), 64, float(sys.maxsize), images=10**6).concurrency == (1, 3907)


def test_gpu_workers_still_at_zero_count_as_gpus(local_ray, monkeypatch):
    """An autoscaling cluster whose GPU group is at zero plans GPU replicas (the autoscaler then brings one up)."""
    from ray._private import state

    assert cluster_gpus() == local_ray.cluster_resources().get("GPU", 0) == 0
    monkeypatch.setattr(state.state, "get_max_resources_from_cluster_config", lambda: {"CPU": 64, "GPU": 4})
    assert cluster_gpus() == 4
    plan = plan_replicas(config(), 2, cluster_gpus(), images=5000)
    assert plan.num_gpus == 1 and plan.concurrency == (1, 4)
