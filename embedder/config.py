"""The one frozen configuration of a job: built once from the CLI, validated, passed to the actors, saved with the outputs."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass

LAYERS = ("fc6", "fc7")
METRICS = ("cosine", "l2")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DECODES = ("cpu", "gpu")
DIMENSION = 4096
# torchvision's VGG16_Weights.IMAGENET1K_V1 (tests check they agree); written here so that finding the cached file does
# not import torch, which a run with work to do imports in a thread while Ray starts.
IMAGENET_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
# torchvision's transforms for VGG16_Weights.IMAGENET1K_V1, applied after EXIF orientation and conversion to RGB.
PREPROCESSING = {
    "resize_short_side": 256,
    "center_crop": 224,
    "interpolation": "bilinear",
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


class UserError(Exception):
    """A problem the user can fix (bad input, bad option, missing file): printed as one line, exit status 2."""


@dataclass(frozen=True)
class JobConfig:
    """Everything a job needs, resolved: absolute paths, validated choices.

    `weights` is `imagenet`, `random` or an absolute path to a torchvision-format state dict.
    `batch_size`, `actors` and `num_gpus_per_actor` may be None, meaning "sized from the cluster at run time".
    `follow_links`: walk into directory symlinks of the input folders (off by default, as in find, fd and ripgrep).
    """

    inputs: tuple[str, ...]
    out: str
    weights: str = "imagenet"
    layer: str = "fc6"
    metric: str = "cosine"
    precision: str = "auto"
    decode: str = "cpu"
    batch_size: int | None = None
    actors: int | None = None
    num_gpus_per_actor: float | None = None
    seed: int = 0
    rows_per_shard: int = 4096
    address: str | None = None
    max_errors: str | None = None
    follow_links: bool = False

    def validate(self) -> "JobConfig":
        """Check every field; raise UserError with what to change."""
        if self.layer not in LAYERS:
            raise UserError(f"--layer must be one of {', '.join(LAYERS)}, not {self.layer!r}")
        if self.metric not in METRICS:
            raise UserError(f"--metric must be one of {', '.join(METRICS)}, not {self.metric!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.decode not in DECODES:
            raise UserError(f"--decode must be one of {', '.join(DECODES)}, not {self.decode!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, not {self.batch_size}")
        if self.actors is not None and self.actors < 1:
            raise UserError(f"--actors must be at least 1, not {self.actors}")
        gpus = self.num_gpus_per_actor
        if gpus is not None and (gpus < 0 or (gpus > 1 and gpus != int(gpus))):
            raise UserError(f"--num-gpus-per-actor must be 0 (CPU), a fraction up to 1, or a whole number, not {gpus}")
        if self.rows_per_shard < 1:
            raise UserError(f"--rows-per-shard must be at least 1, not {self.rows_per_shard}")
        if self.max_errors is not None and not re.fullmatch(r"\d+|\d+(\.\d+)?%", self.max_errors):
            raise UserError(f"--max-errors must be a count (10) or a percentage of the listed files (5%), not {self.max_errors!r}")
        if self.weights not in ("imagenet", "random") and not os.path.isfile(self.weights):
            raise UserError(f"--weights {self.weights}: no such file; pass imagenet, random or the path of a VGG-16 state dict (.pth)")
        return self

    def error_limit(self, listed: int) -> int | None:
        """The most bad files a run over `listed` files may meet before it fails (--max-errors); None = no limit."""
        if self.max_errors is None:
            return None
        if self.max_errors.endswith("%"):
            return int(listed * float(self.max_errors[:-1]) / 100)
        return int(self.max_errors)

    def to_json(self) -> str:
        """The resolved configuration as JSON, as saved in OUT/config.json."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "JobConfig":
        """The configuration `to_json` saved (OUT/config.json), as the run that saved it resolved it."""
        fields = json.loads(text)
        return cls(**{f.name: fields[f.name] for f in dataclasses.fields(cls) if f.name in fields} | {"inputs": tuple(fields["inputs"])})

    def vector_identity(self, weights_sha256: str) -> dict:
        """What decides the vectors: a run may only add to an OUT whose manifest has the same identity."""
        return {
            "model": "vgg16",
            "layer": self.layer,
            "weights_sha256": weights_sha256,
            "preprocessing": PREPROCESSING,
            "metric": self.metric,
            "precision": self.precision,
        }


def imagenet_cache_path() -> str:
    """Where torch.hub keeps the ImageNet weights file once downloaded (torch.hub.get_dir()'s rule, without torch)."""
    cache = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
    torch_home = os.path.expanduser(os.environ.get("TORCH_HOME", os.path.join(cache, "torch")))
    return os.path.join(torch_home, "hub", "checkpoints", os.path.basename(IMAGENET_URL))


def is_uri(path: str) -> bool:
    """True for `scheme://...` locations (s3://, gs://), which are passed through unchanged."""
    return "://" in path


def absolute(path: str) -> str:
    """Local paths made absolute (and user-expanded); URIs unchanged."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))
