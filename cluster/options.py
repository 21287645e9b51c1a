"""Options of the index and cluster steps: each default and each choice defined once, here; the CLI reads them from here.

Imports nothing heavy (no FAISS, no numpy), so building the command line parser stays quick.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from embedder.config import UserError

# `--clusters auto`: the sweep 5, 10, ..., 50.
AUTO_CLUSTERS = tuple(range(5, 55, 5))
INDEX_CHOICES = ("auto", "flat", "hnsw", "ivf")
# Without --tasks, the passes run as Ray tasks on a Ray cluster only above this many vectors: below it one process
# builds the index in minutes (docs/benchmarks.md, "Index"), less than a cluster's task start-up and merge are worth.
DISTRIBUTE_MIN_VECTORS = 1_000_000
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def cast_memory_to_bytes(text: str | int, option: str = "--max-memory") -> int:
    """Bytes of a memory size: 4G, 512M, 1.5G, 100K or a plain number of bytes (powers of 1024; a trailing B is allowed).
    `option` names the option in the error."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
    if not match:
        raise UserError(f"{option} {text!r}: expected a size such as 4G, 512M or 800000000")
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def parse_clusters(text: str) -> tuple[int, ...] | str:
    """`--clusters`: K, a list 5,10,20, a range START:STOP:STEP (STOP included) or auto (= 5:50:5)."""
    text = text.strip().lower()
    if text == "auto":
        return "auto"
    try:
        if ":" in text:
            start, stop, *step = (int(part) for part in text.split(":"))
            ks = tuple(range(start, stop + 1, step[0] if step else 1))
        else:
            ks = tuple(int(part) for part in text.split(","))
    except (ValueError, IndexError):
        raise UserError(f"--clusters {text!r}: expected K, a list such as 5,10,20, a range such as 5:50:5, or auto") from None
    if not ks or min(ks) < 1:
        raise UserError(f"--clusters {text!r}: every k must be at least 1")
    return tuple(sorted(set(ks)))


@dataclass(frozen=True)
class RayOptions:
    """Where the index and k-means passes over the vectors run: the CLI's --tasks and --address.

    `tasks` N > 1: N Ray tasks, each over one group of shards, also on the embedded local Ray; 1: this process; None:
    Ray tasks (one per CPU of the cluster) only on a Ray cluster (`address`, or RAY_ADDRESS) with more than
    DISTRIBUTE_MIN_VECTORS vectors. `address`: the Ray cluster to connect to.
    """

    tasks: int | None = None
    address: str | None = None

    def validate(self) -> "RayOptions":
        """Check every field; raise UserError with what to change."""
        if self.tasks is not None and self.tasks < 1:
            raise UserError(f"--tasks must be at least 1, not {self.tasks}")
        return self


@dataclass(frozen=True)
class IndexOptions:
    """How to index: the CLI's --index, --max-memory, --pca, --whiten, --target-recall, --seed, --tasks, --address.

    `index` is one of INDEX_CHOICES or a `faiss.index_factory` string; `max_memory` the index's RAM budget ("4G").
    """

    index: str = "auto"
    max_memory: str = "4G"
    pca: int | None = None
    whiten: bool = False
    target_recall: float = 0.95
    seed: int = 0
    ray: RayOptions = RayOptions()

    @property
    def budget(self) -> int:
        """--max-memory in bytes."""
        return cast_memory_to_bytes(self.max_memory)

    def validate(self) -> "IndexOptions":
        """Check every field; raise UserError with what to change."""
        cast_memory_to_bytes(self.max_memory)
        if not 0 < self.target_recall <= 1:
            raise UserError(f"--target-recall must be in (0, 1], not {self.target_recall}")
        if self.pca is not None and self.pca < 1:
            raise UserError(f"--pca must be at least 1, not {self.pca}")
        if self.whiten and self.pca is None:
            raise UserError("--whiten needs --pca DIM")
        self.ray.validate()
        return self


@dataclass(frozen=True)
class ClusterOptions:
    """How to cluster: the CLI's --clusters (one k, a sweep, or "auto"), --keep, --niter, --seed, --recluster,
    --tasks, --address."""

    clusters: tuple[int, ...] | str
    keep: int | None = None
    niter: int = 20
    seed: int = 0
    recluster: bool = False
    ray: RayOptions = RayOptions()

    def validate(self) -> "ClusterOptions":
        """Check every field; raise UserError with what to change."""
        if self.clusters != "auto" and (not self.clusters or min(self.clusters) < 1):
            raise UserError(f"--clusters {self.clusters}: every k must be at least 1")
        if self.keep is not None and self.keep < 1:
            raise UserError(f"--keep must be at least 1, not {self.keep}")
        if self.keep is not None and self.clusters != "auto" and self.keep not in self.clusters:
            raise UserError(f"--keep {self.keep} is not among the swept k ({', '.join(map(str, self.clusters))})")
        if self.niter < 1:
            raise UserError(f"--niter must be at least 1, not {self.niter}")
        self.ray.validate()
        return self
