"""Actor: the Ray Data callable class that holds one VGG-16 replica and embeds batches of images.

With `--decode cpu` the batches hold decoded uint8 pixels (from reader.decode_batch); with `--decode gpu` they hold
the files' bytes (from reader.read_batch), decoded here on the model's device (embedder.gpu_decode).

Ray Data builds one instance per actor process (`__init__` runs there, never on the driver), so the model is built
where it runs; the weights arrive through the object store, the same bytes for every replica.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from embedder.config import DIMENSION, JobConfig
from embedder.gpu_decode import decode_batch_gpu
from embedder.model import Embedder, state_dict_sha256
from embedder.reader import CROP

log = logging.getLogger("imgindex")

# Test hook: when set, each replica writes a JSON report (pid, node, GPU ids, weights sha256) into this folder.
REPORT_DIR_ENV = "IMGINDEX_REPLICA_REPORT_DIR"
# Images decoded on the device per step of --decode gpu: all of a chunk's decoded images are on the device at once
# (128 photos of 12 Mpx take 4.6 GB).
DEVICE_DECODE_CHUNK = 128


# Columns of the decode stage's output that the model consumes; every other column travels on to the writer.
CONSUMED = ("pixels", "data", "device")


class EmbedActor:
    """One model replica: {id, path, pixels | data, error, ...} batches -> {id, path, embedding, error, precision, ...}.

    A batch is one decode block; the model runs on it `batch_size` images at a time."""

    def __init__(self, config: JobConfig, weights, weights_sha256: str, threads: int, batch_size: int):
        if not isinstance(weights, dict):
            import ray

            weights = ray.get(weights)
        held = state_dict_sha256(weights)
        if held != weights_sha256:
            raise RuntimeError(f"replica received weights with sha256 {held}, the driver built {weights_sha256}")
        if torch.cuda.is_available():
            device = "cuda"
        else:
            torch.set_num_threads(threads)
            device = "cpu"
        self.embedder = Embedder(weights, config.layer, config.precision, device)
        self.batch_size = batch_size
        self._report(held)

    def _report(self, sha256: str) -> None:
        report_dir = os.environ.get(REPORT_DIR_ENV)
        if not report_dir:
            return
        import ray

        context = ray.get_runtime_context()
        report = {
            "pid": os.getpid(),
            "node_id": context.get_node_id(),
            "gpu_ids": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
            "weights_sha256": sha256,
            "device": str(self.embedder.device),
            "precision": self.embedder.precision,
        }
        final = os.path.join(report_dir, f"replica-{os.getpid()}.json")
        with open(f"{final}.tmp", "w", encoding="utf-8") as f:  # a reader never sees it half written
            json.dump(report, f)
        os.replace(f"{final}.tmp", final)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if "data" in batch:
            embeddings, errors = self._embed_encoded(batch["data"], batch["device"], batch["error"])
        else:
            embeddings, errors = self._embed_pixels(batch["pixels"], batch["error"])
        passed = {key: value for key, value in batch.items() if key not in CONSUMED}
        return passed | {
            "embedding": embeddings,
            "error": errors,
            "precision": np.full(len(errors), self.embedder.precision, dtype=object),
        }

    def _embed_pixels(self, pixels: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of decoded pixels; failed rows carry zeros (the driver routes them to errors.csv, never to a shard).

        Failed rows (zero pixels) go through the model with the rest: batch shapes stay the same, so a GPU's cuDNN
        does not search its convolution algorithms again for every new count of good images.
        """
        embeddings = np.concatenate([self.embedder(pixels[i : i + self.batch_size]) for i in range(0, len(pixels), self.batch_size)])
        embeddings[[bool(e) for e in errors]] = 0.0
        return embeddings, errors

    def _embed_encoded(self, datas: np.ndarray, on_device: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of a read_batch batch: JPEGs decoded on the model's device, the rest already pixels, a chunk at a time.

        Decoding and the model take turns: on an H200, nvJPEG run in a second thread beside VGG-16 gained nothing
        (both need the GPU) and the thread's Python work slowed the model's (bench/gpu_decode_profile.py).
        """
        device = self.embedder.device
        errors = errors.copy()
        embeddings = np.zeros((len(errors), DIMENSION), dtype=np.float32)
        for start in range(0, len(errors), DEVICE_DECODE_CHUNK):
            rows = np.arange(start, min(start + DEVICE_DECODE_CHUNK, len(errors)))
            readable = np.array([not errors[i] for i in rows], dtype=bool)
            jpegs, decoded = np.flatnonzero(on_device[rows] & readable), np.flatnonzero(~on_device[rows] & readable)
            pixels = torch.zeros((len(rows), CROP, CROP, 3), dtype=torch.uint8, device=device)
            if len(jpegs):
                on_gpu, jpeg_errors = decode_batch_gpu([datas[i] for i in rows[jpegs]], device, [True] * len(jpegs))
                pixels[torch.from_numpy(jpegs).to(device)] = on_gpu
                errors[rows[jpegs]] = np.array(jpeg_errors, dtype=object)
            if len(decoded):
                host = np.frombuffer(b"".join(datas[i] for i in rows[decoded]), dtype=np.uint8).reshape(-1, CROP, CROP, 3)
                pixels[torch.from_numpy(decoded).to(device)] = torch.from_numpy(host.copy()).to(device)
            embeddings[rows] = self.embedder.embed_tensor(pixels).cpu().numpy()
        embeddings[[bool(e) for e in errors]] = 0.0
        return embeddings, errors

