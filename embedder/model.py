"""Model: VGG-16 cut after `features -> avgpool -> flatten -> classifier[0]` (fc6: the first Linear, before its ReLU)
or after `classifier[4]` (fc7: the ReLU after the second Linear, `classifier[3]`).

The weights are built once (on the driver) as a dict of numpy arrays, so Ray's object store hands the same bytes to
every replica without copying them per actor; `build_model` turns them into a module without a random init.
Imports neither Ray nor FAISS, so it can be benchmarked alone on a bare GPU machine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import urllib.error
from collections.abc import Mapping

import numpy as np
import torch
import torchvision
from torch import nn

from embedder.config import IMAGENET_URL, PREPROCESSING, UserError, imagenet_cache_path

log = logging.getLogger("imgindex")

# Test hook (not an option): when set, the ImageNet weights are never downloaded. "offline" behaves as a machine
# without network; any other value fails loudly, so a test that would download 528 MB fails instead.
DOWNLOAD_HOOK_ENV = "IMGINDEX_TEST_DOWNLOAD"

# Layers of `classifier` kept: fc6 = classifier[:1], the Linear 25088->4096; fc7 = classifier[:5], through classifier[4],
# the ReLU after the second Linear (classifier[3], 4096->4096), dropouts inert in eval mode.
HEAD_LAYERS = {"fc6": 1, "fc7": 5}


def _vgg16_shapes() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in torchvision.models.vgg16().state_dict().items()}


def _imagenet_state_dict() -> Mapping[str, torch.Tensor]:
    """torchvision's ImageNet weights from the local torch cache, downloaded (hash-checked) once if missing."""
    hook = os.environ.get(DOWNLOAD_HOOK_ENV)
    try:
        if hook and not os.path.isfile(imagenet_cache_path()):
            if hook == "offline":
                raise urllib.error.URLError(f"no network ({DOWNLOAD_HOOK_ENV}=offline)")
            raise RuntimeError(
                f"{DOWNLOAD_HOOK_ENV}={hook}: a test was about to download the VGG-16 ImageNet weights (528 MB); "
                f"give it a cached file, --weights random, or set {DOWNLOAD_HOOK_ENV}=offline"
            )
        path = imagenet_cache_path()
        if not os.path.isfile(path):
            # What torch.hub.load_state_dict_from_url does, less the line it prints to stdout: ours goes to the log.
            log.info("downloading the VGG-16 ImageNet weights (528 MB, once) to %s", path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            hash_prefix = os.path.basename(IMAGENET_URL).rsplit("-", 1)[1].split(".")[0]
            torch.hub.download_url_to_file(IMAGENET_URL, path, hash_prefix=hash_prefix, progress=False)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise UserError(
            f"cannot download the VGG-16 ImageNet weights ({getattr(e, 'reason', e)}): fetch {IMAGENET_URL} "
            f"on a connected machine and pass --weights /path/to/{os.path.basename(IMAGENET_URL)} "
            f"(or copy it to {imagenet_cache_path()})"
        ) from None


def _file_state_dict(path: str) -> Mapping[str, torch.Tensor]:
    """A torchvision-format VGG-16 state dict from a file, loaded with weights_only=True (no pickled code runs)."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        raise UserError(f"--weights {path}: not a loadable torch state dict ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, Mapping):
        raise UserError(f"--weights {path}: holds a {type(loaded).__name__}, not a state dict (save model.state_dict())")
    return loaded


def build_state_dict(weights: str, seed: int) -> dict[str, np.ndarray]:
    """The full VGG-16 state dict for `imagenet`, `random` (seeded) or a file path, as float32 numpy arrays.

    Checked against torchvision's VGG-16 names and shapes, so a wrong file fails here, once, with a clear message.
    """
    if weights == "imagenet":
        loaded: Mapping[str, torch.Tensor] = _imagenet_state_dict()
    elif weights == "random":
        # torch's CPU initialisers are deterministic for a seed, so query time can rebuild the very same weights.
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        loaded = torchvision.models.vgg16(weights=None).state_dict()
        torch.random.set_rng_state(generator_state)
    else:
        loaded = _file_state_dict(weights)
    expected = _vgg16_shapes()
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise UserError(f"--weights {weights}: not a torchvision VGG-16 state dict (missing {missing[0]} and {len(missing) - 1} more)")
    wrong = [k for k in expected if tuple(loaded[k].shape) != expected[k]]
    if wrong:
        raise UserError(f"--weights {weights}: {wrong[0]} has shape {tuple(loaded[wrong[0]].shape)}, VGG-16 needs {expected[wrong[0]]}")
    return {k: loaded[k].detach().to(torch.float32).contiguous().numpy() for k in expected}


def state_dict_sha256(state_dict: Mapping[str, np.ndarray]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order: equal hashes mean bit-identical weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        arr = np.ascontiguousarray(state_dict[name])
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def cpu_supports_bf16() -> bool:
    """True on x86 CPUs with native bf16 (AVX512-BF16 or AMX), where bf16 autocast is faster than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(requested: str, device: torch.device) -> str:
    """`auto` -> bf16 where the hardware runs it natively, fp16 on older tensor-core GPUs, fp32 elsewhere."""
    if requested != "auto":
        return requested
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"
    return "bf16" if cpu_supports_bf16() else "fp32"


class FeatureExtractor(nn.Module):
    """VGG-16 up to the chosen fully-connected layer: features -> avgpool -> flatten -> classifier[:n]."""

    def __init__(self, vgg: torchvision.models.VGG, layer: str):
        super().__init__()
        self.features = vgg.features
        self.avgpool = vgg.avgpool
        self.head = vgg.classifier[: HEAD_LAYERS[layer]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.avgpool(self.features(x)), 1))


def build_model(state_dict: Mapping[str, np.ndarray], layer: str, device: torch.device) -> FeatureExtractor:
    """The feature extractor on `device` in eval mode, channels_last, with exactly the given weights (no random init)."""
    with torch.device("meta"):
        vgg = torchvision.models.vgg16()
    prefixes = ("features.",) + tuple(f"classifier.{i}." for i in range(HEAD_LAYERS[layer]))
    needed = {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items() if k.startswith(prefixes)}
    vgg.load_state_dict(needed, strict=False, assign=True)
    model = FeatureExtractor(vgg, layer).eval()
    return model.to(device=device, memory_format=torch.channels_last)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Embedder:
    """uint8 pixels (N, 224, 224, 3) -> float32 vectors (N, 4096): normalisation, autocast and the model on one device."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], layer: str, precision: str = "auto", device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda":
            # Batch shapes repeat, so cuDNN's one-off search for the fastest convolution pays for itself.
            torch.backends.cudnn.benchmark = True
        self.precision = resolve_precision(precision, self.device)
        self.model = build_model(state_dict, layer, self.device)
        self.mean = torch.tensor(PREPROCESSING["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(PREPROCESSING["std"], device=self.device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def embed_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 224, 224, 3) pixels on this device -> float32 (N, d) vectors left on the device."""
        # NHWC memory viewed as NCHW is already channels_last, the layout the convolutions run fastest in.
        x = (pixels.permute(0, 3, 1, 2).float().div_(255.0) - self.mean) / self.std
        dtype = AUTOCAST_DTYPES.get(self.precision)
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            return self.model(x).float()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, 224, 224, 3) host pixels -> float32 (N, d) numpy vectors."""
        # Ray hands batches over as read-only views of its object store; torch wants memory it may write.
        x = torch.from_numpy(np.require(pixels, dtype=np.uint8, requirements=["C_CONTIGUOUS", "WRITEABLE"]))
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return self.embed_tensor(x).cpu().numpy()
