"""Shared, seeded fixtures: generated photos and broken files, one random VGG-16 state dict, one local Ray instance."""

from __future__ import annotations

import io
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image

# CPU only, whatever the machine has (as clip-retrieval's tests do).
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# No test downloads the ImageNet weights: in this process, in the subprocesses and Ray workers it starts (they inherit
# the environment), a download fails the test; tests of the offline path set the hook to "offline" themselves.
os.environ["IMGINDEX_TEST_DOWNLOAD"] = "forbid"


def jpeg_bytes(array: np.ndarray, quality: int = 90) -> bytes:
    """Encode an (H, W, 3) uint8 array as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors."""
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> str:
    """Ten 320x240 JPEG variants of scikit-image's sample photos (seeded)."""
    from jobs.demo import sample_photos

    folder = str(tmp_path_factory.mktemp("photos"))
    sample_photos(folder, 10, size=(320, 240), seed=0)
    return folder


@pytest.fixture(scope="session")
def input_dir(tmp_path_factory, photo_dir) -> str:
    """The photos plus the broken files a real folder has: 10 good images and 3 bad ones."""
    folder = tmp_path_factory.mktemp("inputs")
    for name in sorted(os.listdir(photo_dir)):
        os.symlink(os.path.join(photo_dir, name), folder / name)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.PNG").write_bytes(b"<html><body>not an image</body></html>")
    good = open(os.path.join(photo_dir, sorted(os.listdir(photo_dir))[0]), "rb").read()
    (folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    return str(folder)


@pytest.fixture(scope="session")
def random_weights() -> dict:
    """The seeded random VGG-16 state dict (seed 0), built once for the session."""
    from embedder.model import build_state_dict

    return build_state_dict("random", 0)


# `query`'s cache of verified files (by size and mtime), kept out of the user's ~/.cache.
os.environ.setdefault("IMGINDEX_VERIFIED_CACHE", os.path.join(tempfile.mkdtemp(prefix="imgindex-verified-"), "verified.json"))

# Model replicas write a report here; set before any Ray starts, so every worker inherits it.
REPORT_DIR = tempfile.mkdtemp(prefix="imgindex-replica-reports-")
os.environ["IMGINDEX_REPLICA_REPORT_DIR"] = REPORT_DIR


@pytest.fixture(scope="session")
def report_dir() -> str:
    """Where model replicas write their test report."""
    yield REPORT_DIR
    shutil.rmtree(REPORT_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def local_ray(report_dir):
    """One local Ray instance for every pipeline test of the session."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def run_out(tmp_path_factory, input_dir, local_ray) -> str:
    """OUT of one full `imgindex run` (random weights, 3 clusters) over the input folder, shared by read-only tests."""
    from jobs.cli import main

    out = str(tmp_path_factory.mktemp("run") / "out")
    assert main(["run", input_dir, "--out", out, "--clusters", "3", "--weights", "random"]) == 0
    return out


SERVE_TOKEN = "test-token-0123"


def _healthy(url: str) -> bool:
    import requests

    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting
        return False


@pytest.fixture(scope="session")
def service(tmp_path_factory, run_out):
    """`imgindex serve` on run_out in a subprocess (its own Ray, as a user runs it), with a token and tight limits.

    Yields (base URL, headers carrying the token, the OUT). Stopped by SIGINT at the end, then killed by its process
    group id if it does not exit; the teardown checks a clean exit.
    """
    import signal
    import socket
    import subprocess
    import sys
    import time

    work = tmp_path_factory.mktemp("serve")
    (work / "token").write_text(SERVE_TOKEN + "\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(work / "serve.log", "wb")
    command = [sys.executable, "-m", "jobs.serve", run_out, "--port", str(port), "--token-file", str(work / "token"),
               "--max-upload-bytes", "200000", "--max-upload-pixels", "4000000",
               "--max-ongoing-requests", "4", "--max-queued-requests", "8"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                pytest.fail(f"imgindex serve exited with {process.returncode}:\n{(work / 'serve.log').read_text()[-3000:]}")
            if _healthy(url):
                break
            if time.monotonic() > deadline:
                pytest.fail(f"imgindex serve not ready after 180 s:\n{(work / 'serve.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, {"Authorization": f"Bearer {SERVE_TOKEN}"}, run_out
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
        log.close()
        assert code == 0, f"imgindex serve did not stop cleanly ({code}):\n{(work / 'serve.log').read_text()[-3000:]}"
