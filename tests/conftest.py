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
