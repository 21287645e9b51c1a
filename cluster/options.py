"""Options of the index, cluster and duplicates steps: each default and each choice defined once, here; the CLI reads them from here.

Imports nothing heavy (no FAISS, no numpy), so building the command line parser stays quick.
"""

from __future__ import annotations

import math
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
# `--keep-rule`: the tie-breakers that choose a group's keeper, in the default order (then the path decides).
KEEP_RULES = ("pixels", "bytes", "lossless", "oldest")
# The largest distance the metric can give (cosine: 1 - cosine similarity); l2 has none.
METRIC_RANGE = {"cosine": 2.0, "l2": math.inf}


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


def parse_threshold(text: str) -> float | str:
    """`--threshold`: auto, or a distance D (> 0) in the metric's own unit."""
    text = text.strip().lower()
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"--threshold {text!r}: expected auto or a distance such as 0.05") from None
    return value


def parse_keep_rule(text: str) -> tuple[str, ...]:
    """`--keep-rule`: a comma-separated order of tie-breakers from KEEP_RULES, e.g. pixels,bytes,lossless,oldest."""
    rules = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    DuplicateOptions(keep_rule=rules).validate()
    return rules


@dataclass(frozen=True)
class DuplicateOptions:
    """How to find near-duplicates and outliers: the CLI's --threshold, --keep-rule, --measure, --outlier-k,
    --sample, --weights, --seed, --address.

    `threshold` is "auto" (calibrated on near-copies of `sample` images of the collection) or a distance in the
    metric's unit (1 - cosine, or Euclidean); `measure` runs the calibration for an explicit threshold too.
    `outlier_k`: outliers.csv ranks images by the distance to their k-th nearest other image. `weights` overrides
    where the calibration loads the collection's weights from (their sha256 must match the manifest's). `address`: the
    Ray cluster whose model replicas embed the calibration's near-copies (`run` passes its own).
    """

    threshold: float | str = "auto"
    keep_rule: tuple[str, ...] = KEEP_RULES
    measure: bool = False
    outlier_k: int = 5
    sample: int = 50
    weights: str | None = None
    seed: int = 0
    address: str | None = None

    @property
    def calibrates(self) -> bool:
        """True when the step embeds near-copies: for `auto`, or to --measure an explicit threshold."""
        return self.threshold == "auto" or self.measure

    def validate(self, metric: str | None = None) -> "DuplicateOptions":
        """Check every field (and, given the collection's metric, the threshold's range); raise UserError with what
        to change."""
        unknown = [rule for rule in self.keep_rule if rule not in KEEP_RULES]
        if unknown or not self.keep_rule:
            raise UserError(f"--keep-rule {','.join(self.keep_rule)!r}: use tie-breakers from {','.join(KEEP_RULES)}, comma-separated")
        if len(set(self.keep_rule)) != len(self.keep_rule):
            raise UserError(f"--keep-rule {','.join(self.keep_rule)!r}: each tie-breaker at most once")
        if self.threshold != "auto":
            top = METRIC_RANGE.get(metric or "l2", math.inf)
            valid = isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and 0 < self.threshold <= top
            if not valid:
                limit = f"in (0, {top:g}] for the {metric} metric" if metric and math.isfinite(top) else "a number greater than 0"
                raise UserError(f"--threshold {self.threshold}: a distance must be {limit}")
        if self.outlier_k < 1:
            raise UserError(f"--outlier-k must be at least 1, not {self.outlier_k}")
        if self.sample < 1:
            raise UserError(f"--sample must be at least 1, not {self.sample}")
        return self
