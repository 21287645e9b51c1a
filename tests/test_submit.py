"""`ray job submit --working-dir <repo>` against a real `ray start --head` on 127.0.0.1 with token authentication."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from embedder.reader import image_id, list_images
from localcluster import VENV_BIN, cluster_env, copy_checkout, free_ports, kill_marked

RAY = os.path.join(VENV_BIN, "ray")


def dashboard_status(port: int) -> int | None:
    """HTTP status of an unauthenticated request to the dashboard, None while it does not answer."""
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2).status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> str:
    """The working directory to submit: this repository's files as a fresh clone has them."""
    return str(copy_checkout(tmp_path_factory.mktemp("clone") / "imgindex"))


@pytest.fixture(scope="module")
def head(tmp_path_factory, clone):
    """A Ray head in token mode, its HOME (holding ~/.ray/auth_token) apart from the user's, on free local ports."""
    home = tmp_path_factory.mktemp("head-home")
    env, marker = cluster_env(HOME=str(home), RAY_AUTH_MODE="token")
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics, client = free_ports(7)
    # Socket paths live under the temp dir and must stay short (108 bytes on Linux).
    temp_dir = tmp_path_factory.mktemp("r", numbered=True)
    command = [
        RAY, "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0", "--disable-usage-stats",
        "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
        "--ray-client-server-port", str(client), "--temp-dir", str(temp_dir),
    ]
    with open(temp_dir / "ray-start.log", "wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while dashboard_status(dashboard) is None:
            assert process.poll() is None, (temp_dir / "ray-start.log").read_text()
            assert time.monotonic() < deadline, "the dashboard did not come up in 90 s"
            time.sleep(0.5)
        yield {"address": f"http://127.0.0.1:{dashboard}", "port": dashboard, "home": str(home), "env": env, "clone": clone}
    finally:
        kill_marked(marker)
        process.wait(timeout=10)


def submit(head, entrypoint: list[str], **client_env: str) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <fresh clone> -- <entrypoint>`, from a client with head's environment plus `client_env`."""
    env = {k: v for k, v in head["env"].items() if k not in ("RAY_AUTH_MODE", "HOME")} | client_env
    command = [RAY, "job", "submit", "--address", head["address"], "--working-dir", head["clone"], "--", *entrypoint]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


def test_the_jobs_port_refuses_requests_without_the_token(head, tmp_path):
    assert dashboard_status(head["port"]) == 401
    entrypoint = ["python", "-c", "print('should never run')"]
    # A client with no token sends none; the server has to refuse it (and one with a wrong token).
    no_token = submit(head, entrypoint, HOME=str(tmp_path))
    wrong_token = submit(head, entrypoint, HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 32)
    for refused, reason in ((no_token, "Unauthorized: Missing authentication token"), (wrong_token, "Forbidden: Invalid authentication token")):
        assert refused.returncode != 0 and "should never run" not in refused.stdout
        assert reason in refused.stderr


def test_submitted_run_writes_the_whole_out_contract(head, photo_dir, tmp_path):
    out = tmp_path / "out"
    done = submit(
        head,
        ["python", "-m", "jobs.run", photo_dir, "--out", str(out), "--clusters", "3", "--weights", "random"],
        HOME=head["home"], RAY_AUTH_MODE="token",
    )
    assert done.returncode == 0 and "succeeded" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]

    paths = list_images([photo_dir])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "embedded" and manifest["clusters"]["k"] == 3
    assert manifest["counts"] == {"listed": len(paths), "images": len(paths), "errors": 0}
    rows = pq.read_table(out / "embeddings").to_pandas()
    assert sorted(rows["path"]) == paths and rows["id"].is_unique
    assert set(rows["id"]) == {image_id(p) for p in paths}
    index = faiss.read_index(str(out / "index.faiss"))
    assert index.ntotal == len(paths)
    assert set(faiss.vector_to_array(index.id_map).tolist()) == set(rows["id"])
    clusters = pd.read_csv(out / "clusters.csv")
    assert sorted(clusters["path"]) == paths and clusters["cluster"].between(0, 2).all()
    assert np.isfinite(clusters["distance"]).all()


def test_relative_paths_are_refused_inside_the_job_with_one_line(head, tmp_path):
    # This client holds the token in RAY_AUTH_TOKEN rather than in ~/.ray/auth_token (README's second way).
    token = open(os.path.join(head["home"], ".ray", "auth_token")).read().strip()
    done = submit(
        head,
        ["python", "-m", "jobs.run", "images", "--out", str(tmp_path / "out"), "--clusters", "2", "--weights", "random"],
        HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token,
    )
    assert done.returncode != 0 and "failed with exit code 2" in done.stdout
    # What the job printed: the lines after Ray's "Running entrypoint ..." up to the CLI's next own line.
    lines = done.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Running entrypoint"))
    printed = list(itertools.takewhile(lambda line: "cli.py:" not in line, lines[start + 1 :]))
    assert len(printed) == 1 and printed[0].startswith("imgindex: error: images is relative"), printed
    assert "temporary copy" in printed[0]
    assert not (tmp_path / "out").exists()
