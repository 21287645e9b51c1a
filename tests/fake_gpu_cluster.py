"""Run by tests/test_multinode.py in its own process: a two-node Ray cluster whose nodes declare 2 fake GPUs each.

    python tests/fake_gpu_cluster.py PHOTOS WORKDIR

1. `imgindex embed` into WORKDIR/hidden while the worker node reports OUT's sentinel missing (must be refused);
2. `imgindex embed --actors 4 --batch-size 2` into WORKDIR/out on the same cluster.
Prints one line `RESULT {json}` with the exit codes, the node ids and how often the driver built the weights.
Its own process, because the test session's Ray (`local_ray`) must not be connected while this cluster runs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

import ray
from ray.cluster_utils import Cluster

from embedder import model
from embedder.shared_storage import HIDE_ON_NODE_ENV
from jobs.cli import main as imgindex
from localcluster import free_ports

NODE = {"num_cpus": 3, "num_gpus": 2, "object_store_memory": 900 * 1024**2}


def run(photos: str, workdir: str) -> dict:
    """Both embeds on a fresh two-node cluster; the cluster is shut down whatever happens."""
    temp_dir = tempfile.mkdtemp(prefix="rc", dir="/tmp")  # short: Ray's socket paths live under it
    # Cluster records its address in $RAY_TMPDIR/ray/ray_current_cluster (else /tmp/ray/), where any ray.init() on
    # this machine would find this cluster and join it, and removes that file on shutdown, whoever wrote it.
    os.environ["RAY_TMPDIR"] = temp_dir
    os.makedirs(os.path.join(temp_dir, "ray"))
    (agent_port,) = free_ports(1)
    cluster = Cluster()
    try:
        cluster.add_node(**NODE, temp_dir=temp_dir, include_dashboard=False, dashboard_agent_listen_port=agent_port)
        worker = cluster.add_node(**NODE, temp_dir=temp_dir)
        cluster.wait_for_nodes()
        builds = []
        real_build = model.build_state_dict

        def counting_build(*args, **kwargs):
            builds.append(args)
            return real_build(*args, **kwargs)

        model.build_state_dict = counting_build
        common = ["--weights", "random", "--address", cluster.address]
        os.environ[HIDE_ON_NODE_ENV] = worker.node_id
        hidden = imgindex(["embed", photos, "--out", os.path.join(workdir, "hidden"), *common])
        del os.environ[HIDE_ON_NODE_ENV]
        builds.clear()
        placed = imgindex(["embed", photos, "--out", os.path.join(workdir, "out"), "--actors", "4", "--batch-size", "2", *common])
        return {
            "hidden_exit": hidden,
            "placed_exit": placed,
            "nodes": [cluster.head_node.node_id, worker.node_id],
            "weights_built": len(builds),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    result = run(sys.argv[1], sys.argv[2])
    print("RESULT " + json.dumps(result), flush=True)
