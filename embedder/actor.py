"""Actor: the Ray Data callable class that holds one VGG-16 replica and embeds batches of decoded pixels.

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
from embedder.model import Embedder, state_dict_sha256

log = logging.getLogger("imgindex")

# Test hook: when set, each replica writes a JSON report (pid, node, GPU ids, weights sha256) into this folder.
REPORT_DIR_ENV = "IMGINDEX_REPLICA_REPORT_DIR"


class EmbedActor:
    """One model replica: {id, path, pixels, error} batches -> {id, path, embedding, error, precision}."""

    def __init__(self, config: JobConfig, weights, weights_sha256: str, threads: int):
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
        with open(os.path.join(report_dir, f"replica-{os.getpid()}.json"), "w", encoding="utf-8") as f:
            json.dump(report, f)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = batch["error"]
        good = np.array([not e for e in errors], dtype=bool)
        if good.all():
            embeddings = self.embedder(batch["pixels"])
        else:
            # Failed rows carry zeros; the driver routes them to errors.csv, never to a shard.
            embeddings = np.zeros((len(errors), DIMENSION), dtype=np.float32)
            if good.any():
                embeddings[good] = self.embedder(batch["pixels"][good])
        return {
            "id": batch["id"],
            "path": batch["path"],
            "embedding": embeddings,
            "error": errors,
            "precision": np.full(len(errors), self.embedder.precision, dtype=object),
        }
