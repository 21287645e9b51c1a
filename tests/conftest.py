"""Shared, seeded fixtures: generated photos and broken files, one random VGG-16 state dict, one local Ray instance."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import struct
import tempfile
import zlib

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


def png16(width: int, height: int, channels: int = 4, value: int = 30000) -> bytes:
    """A PNG of one 16-bit colour (4 channels: RGBA, 2: grey and alpha): a small file that decodes into a large image.

    Pillow writes no 16-bit colour PNG, so the chunks are written here. Every run of 64 identical rows is compressed
    once and ended with a full flush, which makes its compressed bytes stand alone, so they are repeated instead of
    compressed again (a 7000x7000 image in a second or two rather than fifteen).
    """
    row = b"\x00" + np.full((width, channels), value, dtype=">u2").tobytes()  # filter byte 0, then the pixels
    rows, runs = row * 64, height // 64
    rest = row * (height - 64 * runs)
    packer = zlib.compressobj(9)
    first = packer.compress(rows) + packer.flush(zlib.Z_FULL_FLUSH)
    again = packer.compress(rows) + packer.flush(zlib.Z_FULL_FLUSH)
    end = packer.compress(rest) + packer.flush(zlib.Z_FINISH)
    adler = 1
    for _ in range(runs):
        adler = zlib.adler32(rows, adler)
    stream = first + again * (runs - 1) + end[:-4] + struct.pack(">I", zlib.adler32(rest, adler))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, {2: 4, 4: 6}[channels], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", stream) + chunk(b"IEND", b"")


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


@pytest.fixture(scope="session")
def random_weights_file(random_weights) -> str:
    """random_weights saved as a torchvision-format state dict, for `--weights PATH`: loading it takes a fraction of a
    second where building the random weights again takes seconds, in every run and query that needs them."""
    import torch

    path = os.path.join(SCRATCH, "vgg16-random-seed0.pth")
    torch.save({k: torch.from_numpy(v) for k, v in random_weights.items()}, path)
    return path


# The session's scratch folders, removed when the test process exits (whether or not a fixture used them).
SCRATCH = tempfile.mkdtemp(prefix="imgindex-tests-")
atexit.register(shutil.rmtree, SCRATCH, ignore_errors=True)

# `query`'s cache of verified files (by size and mtime), kept out of the user's ~/.cache.
os.environ.setdefault("IMGINDEX_VERIFIED_CACHE", os.path.join(SCRATCH, "verified", "verified.json"))

# Model replicas write a report here; set before any Ray starts, so every worker inherits it.
REPORT_DIR = os.path.join(SCRATCH, "replica-reports")
os.makedirs(REPORT_DIR)
os.environ["IMGINDEX_REPLICA_REPORT_DIR"] = REPORT_DIR


@pytest.fixture(scope="session")
def report_dir() -> str:
    """Where model replicas write their test report."""
    return REPORT_DIR


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
# The service fixture's limits: a body that has not arrived 3 s after a replica took its request gets 408; uploads of
# up to 1,000,000 bytes; 8 requests at once per replica, of which 6 may be uploads; the default pixel limit and decode
# memory (50,000,000 pixels, 2G).
SERVE_BODY_TIMEOUT_S = 3
SERVE_MAX_UPLOAD_BYTES = 1_000_000
SERVE_MAX_ONGOING_REQUESTS = 8


def _healthy(url: str) -> bool:
    import requests

    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except (requests.ConnectionError, requests.Timeout):  # not listening yet, or still starting
        return False


@pytest.fixture(scope="session")
def service_process(tmp_path_factory, run_out):
    """`imgindex serve` on run_out in a subprocess (its own Ray, as a user runs it), with a token and tight limits.

    Yields (base URL, headers carrying the token, the OUT, the process). Stopped by SIGINT at the end, then killed by
    its process group id if it does not exit; the teardown checks a clean exit.
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
               "--max-upload-bytes", str(SERVE_MAX_UPLOAD_BYTES), "--body-timeout-s", str(SERVE_BODY_TIMEOUT_S),
               "--max-ongoing-requests", str(SERVE_MAX_ONGOING_REQUESTS), "--max-queued-requests", "8"]
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
        yield url, {"Authorization": f"Bearer {SERVE_TOKEN}"}, run_out, process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            code = process.wait()
        log.close()
        assert code == 0, f"imgindex serve did not stop cleanly ({code}):\n{(work / 'serve.log').read_text()[-3000:]}"


@pytest.fixture(scope="session")
def service(service_process):
    """The service_process's (base URL, headers carrying the token, the OUT)."""
    return service_process[:3]
