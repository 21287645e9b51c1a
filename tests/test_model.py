"""Model: our extractor against a direct torchvision computation, precision, weights loading and hashing."""

from __future__ import annotations

import os
import urllib.error

import numpy as np
import pytest
import torch
import torchvision
from conftest import cosine
from PIL import Image

from embedder import model
from embedder.config import UserError
from embedder.model import Embedder, build_state_dict, resolve_precision, state_dict_sha256
from embedder.reader import load_pixels


@pytest.fixture(scope="module")
def torchvision_vgg(random_weights) -> torchvision.models.VGG:
    vgg = torchvision.models.vgg16()
    vgg.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights.items()})
    return vgg.eval()


def torchvision_features(vgg: torchvision.models.VGG, path: str, layer: str) -> np.ndarray:
    """The original recipe, straight from torchvision: its transforms, then features -> avgpool -> flatten -> classifier."""
    transform = torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms()
    x = transform(Image.open(path).convert("RGB"))[None]
    with torch.no_grad():
        h = torch.flatten(vgg.avgpool(vgg.features(x)), 1)
        return vgg.classifier[: 1 if layer == "fc6" else 5](h)[0].numpy()


@pytest.mark.parametrize("layer", ["fc6", "fc7"])
def test_file_to_vector_matches_torchvision(random_weights, torchvision_vgg, photo_dir, layer):
    embedder = Embedder(random_weights, layer, "fp32", "cpu")
    for name in sorted(os.listdir(photo_dir))[:3]:
        path = os.path.join(photo_dir, name)
        ours = embedder(load_pixels(path)[None])[0]
        assert ours.shape == (4096,) and ours.dtype == np.float32
        assert cosine(ours, torchvision_features(torchvision_vgg, path, layer)) >= 0.9999
        if layer == "fc7":
            assert ours.min() >= 0  # after the second ReLU


def test_bf16_autocast_stays_within_cosine_of_fp32(random_weights, photo_dir):
    # Two images: without native bf16 (AVX512-BF16 or AMX) the CPU emulates it, many times slower than fp32.
    pixels = np.stack([load_pixels(os.path.join(photo_dir, n)) for n in sorted(os.listdir(photo_dir))[:2]])
    fp32 = Embedder(random_weights, "fc6", "fp32", "cpu")(pixels)
    bf16 = Embedder(random_weights, "fc6", "bf16", "cpu")(pixels)
    assert min(cosine(a, b) for a, b in zip(fp32, bf16)) >= 0.9999


def test_precision_auto_follows_the_hardware(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(model, "cpu_supports_bf16", lambda: True)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(model, "cpu_supports_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"


def test_random_weights_are_seeded_and_hash_identically(random_weights):
    again = build_state_dict("random", 0)
    assert state_dict_sha256(again) == state_dict_sha256(random_weights)
    changed = dict(again)
    changed["classifier.0.bias"] = again["classifier.0.bias"] + np.float32(1e-7)
    assert state_dict_sha256(changed) != state_dict_sha256(random_weights)


def test_weights_file_loads_with_the_same_hash(random_weights, tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save({k: torch.from_numpy(v) for k, v in random_weights.items()}, path)
    assert state_dict_sha256(build_state_dict(str(path), 0)) == state_dict_sha256(random_weights)


def test_wrong_weights_files_are_user_errors(tmp_path):
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a loadable"):
        build_state_dict(str(tmp_path / "junk.pth"), 0)
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="not a torchvision VGG-16"):
        build_state_dict(str(tmp_path / "other.pth"), 0)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="not a state dict"):
        build_state_dict(str(tmp_path / "list.pth"), 0)


def test_imagenet_offline_fails_fast_naming_the_fix(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.delenv("IMGINDEX_TEST_DOWNLOAD")  # the download itself is replaced here
    with pytest.raises(UserError, match="--weights /path/to/vgg16-397923af.pth"):
        build_state_dict("imagenet", 0)


def test_no_test_downloads_the_imagenet_weights(monkeypatch, tmp_path):
    """conftest forbids the download for the whole session (subprocesses and Ray workers inherit it): a test that
    would fetch 528 MB on a connected machine fails instead, before any request."""
    import os

    from embedder.model import DOWNLOAD_HOOK_ENV

    assert os.environ[DOWNLOAD_HOOK_ENV] == "forbid"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-cache"))

    def fetched(*args, **kwargs):
        raise AssertionError("the download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fetched)
    with pytest.raises(RuntimeError, match="about to download the VGG-16 ImageNet weights"):
        build_state_dict("imagenet", 0)


def test_imagenet_cache_path_and_url_agree_with_torch(monkeypatch, tmp_path):
    """The cache path is computed without importing torch (so the weights thread overlaps Ray's start-up); it must
    be torch.hub's."""
    from embedder.config import IMAGENET_URL, imagenet_cache_path

    assert IMAGENET_URL == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    for env in ({}, {"TORCH_HOME": str(tmp_path / "th")}, {"XDG_CACHE_HOME": str(tmp_path / "xdg")}):
        monkeypatch.delenv("TORCH_HOME", raising=False)
        monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert imagenet_cache_path() == os.path.join(torch.hub.get_dir(), "checkpoints", "vgg16-397923af.pth")


WHO_IMPORTS_TORCH = """
import importlib.abc, os, sys, threading
first = []
class Spy(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch" and not first:
            first.append(threading.current_thread().name)
        return None
sys.meta_path.insert(0, Spy())
from embedder import pipeline
from embedder.config import JobConfig
pipeline.start_ray = lambda address: None
config = JobConfig(inputs=("x",), out=sys.argv[1], weights="imagenet")
try:
    pipeline._weights_while_ray_starts(config, True)
except Exception as e:  # the cached file is empty: loading it fails, after the import this test watches
    pass
print(first[0] if first else "never")
"""


def test_with_cached_imagenet_weights_torch_is_imported_beside_ray_start_not_before(tmp_path):
    """The weights (and torch's import) are built in a thread while the main thread starts Ray; finding the cached
    file must not import torch on the main thread first."""
    import os
    import subprocess
    import sys

    from embedder.config import imagenet_cache_path

    env = {**os.environ, "TORCH_HOME": str(tmp_path / "th"), "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    os.makedirs(os.path.dirname(os.path.join(tmp_path, "th", "hub", "checkpoints", "x")), exist_ok=True)
    open(os.path.join(tmp_path, "th", "hub", "checkpoints", os.path.basename(imagenet_cache_path())), "wb").close()
    done = subprocess.run([sys.executable, "-c", WHO_IMPORTS_TORCH, str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() not in ("MainThread", "never"), done.stdout
