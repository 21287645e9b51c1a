"""Placement of the model replicas from the cluster's resources (no Ray needed)."""

from __future__ import annotations

import pytest

from embedder.config import JobConfig, UserError
from embedder.pipeline import plan_replicas


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
