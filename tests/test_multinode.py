"""Placement on a two-node cluster with fake GPUs (2 per node), and the shared-storage refusal, in a separate process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from embedder.reader import image_id, list_images
from embedder.shared_storage import SENTINEL_PREFIX
from localcluster import cluster_env, kill_marked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, photo_dir):
    """Run tests/fake_gpu_cluster.py once; (its RESULT, its stderr, the work folder, the replica reports)."""
    workdir = tmp_path_factory.mktemp("multinode")
    reports = workdir / "reports"
    reports.mkdir()
    # Its own Ray (no RAY_ADDRESS, no auth: the cluster lives on local ports for seconds), our code on the path.
    # Ray Data waits for all 4 replicas before feeding them: 10 images could otherwise be done before the last starts.
    env, marker = cluster_env(
        PYTHONPATH=REPO, IMGINDEX_REPLICA_REPORT_DIR=str(reports), RAY_AUTH_MODE="disabled",
        RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300",
    )
    # conftest hides real GPUs with CUDA_VISIBLE_DEVICES=""; Ray refuses fake GPUs under that, and assigns its own ids.
    env.pop("CUDA_VISIBLE_DEVICES", None)
    try:
        done = subprocess.run(
            [sys.executable, os.path.join(REPO, "tests", "fake_gpu_cluster.py"), photo_dir, str(workdir)],
            env=env, capture_output=True, text=True, timeout=400,
        )
    finally:
        kill_marked(marker)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    found = [json.loads((reports / name).read_text()) for name in sorted(os.listdir(reports)) if name.endswith(".json")]
    return json.loads(lines[-1][len("RESULT "):]), done.stderr, workdir, found


def test_each_replica_gets_its_own_gpu_and_both_nodes_work(cluster_run, photo_dir):
    result, _, workdir, reports = cluster_run
    assert result["placed_exit"] == 0
    assert len(reports) == 4 and len({r["pid"] for r in reports}) == 4
    assert all(len(r["gpu_ids"]) == 1 for r in reports)
    assert len({(r["node_id"], r["gpu_ids"][0]) for r in reports}) == 4
    assert {r["node_id"] for r in reports} == set(result["nodes"])
    manifest = json.loads((workdir / "out" / "manifest.json").read_text())
    assert {r["weights_sha256"] for r in reports} == {manifest["weights"]["sha256"]}
    assert result["weights_built"] == 1

    paths = list_images([photo_dir])
    rows = pq.read_table(workdir / "out" / "embeddings").to_pandas()
    assert sorted(rows["path"]) == paths and rows["id"].is_unique
    assert set(rows["id"]) == {image_id(p) for p in paths}
    assert manifest["counts"] == {"listed": len(paths), "images": len(paths), "errors": 0}
    assert not [n for n in os.listdir(workdir / "out") if n.startswith(SENTINEL_PREFIX)]


def test_a_local_out_one_node_cannot_see_is_refused_before_embedding(cluster_run):
    result, stderr, workdir, _ = cluster_run
    assert result["hidden_exit"] == 2
    errors = [line for line in stderr.splitlines() if line.startswith("imgindex: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr
    assert f"--out {workdir / 'hidden'} is not on storage every node sees" in errors[0]
    assert f"({result['nodes'][1][:8]})" in errors[0] and "s3://" in errors[0]
    assert not (workdir / "hidden" / "embeddings").exists()
    assert not [n for n in os.listdir(workdir / "hidden") if n.startswith(SENTINEL_PREFIX)]
