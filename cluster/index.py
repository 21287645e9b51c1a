"""Index: choose, build by streaming, tune, save and load the FAISS index over OUT's embeddings, ids = the `id` column.

Cosine is inner product on L2-normalised vectors. The index is whatever `faiss.index_factory` builds from a spec
("Flat", "HNSW32", "IVF1024,Flat", "IVF4096,PQ32,RFlat", ...), optionally behind a PCA (`IndexPreTransform`), with
ids kept by the IVF itself (`add_with_ids`, so `remove_ids` works) or by an `IndexIDMap2`. The saved file is plain
FAISS: `faiss.read_index` loads it, with the tuned search parameters already set.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
from pyarrow import fs

from cluster.vectors import Vectors
from embedder.config import UserError
from embedder.outdir import INDEX_FILE, OutDir, verify_checksum

log = logging.getLogger("imgindex")

K = 10  # recall is 10-recall@10
# Exact neighbours kept per held-out query; ties with the K-th count as hits (Truth.recall).
TRUTH_DEPTH = 4 * K
TIE_TOLERANCE = 1e-5
QUERIES = 1000  # held-out sample of the collection's own vectors used as queries
# `auto`: exact search while N is at most this and the vectors fit the budget (a flat scan of 50,000 x 4096 floats
# reads 0.8 GB per query); beyond it an IVF answers much faster at the same recall (docs/benchmarks.md, "Index").
FLAT_MAX_N = 50_000
HNSW_M = 32
PQ_SIZES = (64, 32, 16, 8)  # bytes per vector tried by `auto`, largest first
TRAIN_POINTS_PER_LIST = 40  # FAISS warns below 39 training points per IVF list
PQ_TRAIN_POINTS = 256 * 40  # 256 centroids per PQ sub-quantiser
PCA_TRAIN_POINTS = 20_000
# Candidates re-ranked exactly = k_factor x k, tried in order. PQ codes at a million vectors need the largest
# (docs/benchmarks.md, "Index"); faiss.read_index refuses an IndexRefine whose k_factor is above 1000, hence the last.
REFINE_K_FACTORS = (4, 16, 64, 256, 1000)
def prepare(xb: np.ndarray, metric: str) -> np.ndarray:
    """Vectors as the index stores them: L2-normalised for cosine (so inner product = cosine), as is for l2."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if metric == "cosine":
        xb = xb.copy()
        faiss.normalize_L2(xb)
    return xb


def to_distance(D: np.ndarray, metric: str) -> np.ndarray:
    """FAISS scores -> our distance: 1 - cosine similarity for cosine, Euclidean (not squared) for l2."""
    if metric == "cosine":
        return np.clip(1.0 - D, 0.0, 2.0)
    return np.sqrt(np.maximum(D, 0.0))


def faiss_metric(metric: str) -> int:
    """FAISS metric constant of the job's metric."""
    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU (faiss-gpu); False with faiss-cpu."""
    return hasattr(faiss, "index_cpu_to_all_gpus") and faiss.get_num_gpus() > 0


def on_gpu(index: faiss.Index) -> faiss.Index:
    """`index` copied to every GPU when there are GPUs, else `index` itself (brute-force parts only)."""
    return faiss.index_cpu_to_all_gpus(index) if gpu_available() else index


@dataclass(frozen=True)
class IndexPlan:
    """What to build: `spec` is the `faiss.index_factory` string of the index in the searched space (after PCA)."""

    spec: str
    dimension: int
    metric: str
    pca: int | None = None
    whiten: bool = False
    reason: str = ""

    @property
    def space(self) -> int:
        """Dimension the index searches in."""
        return self.pca or self.dimension


def nlist_for(n: int) -> int:
    """IVF lists for n vectors: the power of two nearest 4 sqrt(n), with at least 39 vectors per list to train on."""
    nlist = 2 ** max(0, round(math.log2(4 * math.sqrt(max(n, 1)))))
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return nlist


def estimate_bytes(spec: str, n: int, d: int) -> int | None:
    """RAM of a FAISS index built from `spec` over n vectors of d dimensions; None for specs this does not model."""
    per_vector, fixed = 8.0, 0.0  # every layout keeps an int64 id per vector
    parts = spec.replace(" ", "").split(",")
    for i, part in enumerate(parts):
        if m := re.fullmatch(r"PCAW?R?(\d+)", part):
            fixed += 4.0 * d * int(m.group(1))
            d = int(m.group(1))
        elif m := re.fullmatch(r"IVF(\d+)", part):
            fixed += 4.0 * d * int(m.group(1))
        elif m := re.fullmatch(r"HNSW(\d+)(?:_Flat)?", part):
            per_vector += 4.0 * d + 2 * 4.0 * int(m.group(1)) * 1.1
        elif part == "Flat":
            per_vector += 0.0 if i and parts[i - 1].startswith("HNSW") else 4.0 * d
        elif part in ("SQ8", "SQ4", "SQfp16", "SQbf16"):
            per_vector += {"SQ8": d, "SQ4": d / 2, "SQfp16": 2 * d, "SQbf16": 2 * d}[part]
        elif m := re.fullmatch(r"PQ(\d+)(?:x(\d+))?(?:np)?", part):
            bits = int(m.group(2) or 8)
            per_vector += int(m.group(1)) * bits / 8
            fixed += 4.0 * d * 2**bits
        elif part in ("RFlat", "Refine(Flat)"):
            per_vector += 4.0 * d
        else:
            return None
    return int(per_vector * n + fixed)


def plan_index(requested: str, n: int, dimension: int, metric: str, max_memory: int, pca: int | None = None, whiten: bool = False) -> IndexPlan:
    """The index to build for n vectors: `requested` is auto, flat, hnsw, ivf or a `faiss.index_factory` string.

    auto: exact (Flat) while n <= FLAT_MAX_N and the vectors fit `max_memory`; otherwise IVF with nlist from n
    (`nlist_for`) and the richest codes that fit the budget: Flat (exact distances), SQ8 (1 byte per dimension),
    then PQ with the largest code of PQ_SIZES that fits. `build_index` refuses an auto index that misses the target
    recall on the held-out sample.
    """
    if pca is not None and not 1 <= pca <= dimension:
        raise UserError(f"--pca {pca}: must be between 1 and the vectors' dimension {dimension}")
    d = pca or dimension
    nlist = nlist_for(n)
    named = {"flat": "Flat", "hnsw": f"HNSW{HNSW_M}", "ivf": f"IVF{nlist},Flat"}

    def plan(spec: str, reason: str) -> IndexPlan:
        return IndexPlan(spec, dimension, metric, pca, whiten, reason)

    if requested == "auto":
        if n <= FLAT_MAX_N and estimate_bytes("Flat", n, d) <= max_memory:
            return plan("Flat", f"exact: {n} vectors <= {FLAT_MAX_N} and they fit --max-memory")
        candidates = [f"IVF{nlist},Flat", f"IVF{nlist},SQ8"] + [f"IVF{nlist},PQ{m}" for m in PQ_SIZES if m <= d and d % m == 0]
        for spec in candidates:
            if estimate_bytes(spec, n, d) <= max_memory:
                return plan(spec, f"{n} vectors: nlist {nlist} from n, codes from --max-memory {max_memory} bytes")
        raise UserError(
            f"no index over {n} vectors of {d} dimensions fits --max-memory {max_memory} bytes "
            f"(the smallest, {candidates[-1]}, needs about {estimate_bytes(candidates[-1], n, d)}); raise it or use --pca"
        )
    spec = named.get(requested, requested)
    try:
        faiss.index_factory(d, spec, faiss_metric(metric))
    except RuntimeError as e:
        raise UserError(f"--index {requested}: not a FAISS index_factory string ({str(e).splitlines()[-1][:120]})") from None
    needed = estimate_bytes(spec, n, d)
    if needed is not None and needed > max_memory:
        raise UserError(f"--index {requested} ({spec}) over {n} vectors needs about {needed} bytes, more than --max-memory {max_memory}")
    return plan(spec, f"--index {requested}")


def index_parts(index: faiss.Index) -> Iterator[faiss.Index]:
    """The index and every index it wraps (IDMap, PreTransform, Refine's base), outermost first, downcast."""
    while index is not None:
        index = faiss.downcast_index(index)
        yield index
        if isinstance(index, (faiss.IndexIDMap, faiss.IndexPreTransform)):
            index = index.index
        elif isinstance(index, faiss.IndexRefine):
            index = index.base_index
        else:
            index = None


def new_index(plan: IndexPlan) -> faiss.Index:
    """An empty index in the searched space (PCA not included): IVF keeps ids itself, other types get an IndexIDMap2."""
    index = faiss.index_factory(plan.space, plan.spec, faiss_metric(plan.metric))
    if isinstance(faiss.downcast_index(index), faiss.IndexIVF):
        return index
    return faiss.IndexIDMap2(index)


def new_pca(plan: IndexPlan) -> faiss.PCAMatrix:
    """An untrained PCA from the full dimension to `plan.pca`, whitened (eigenvalue power -0.5) if asked."""
    return faiss.PCAMatrix(plan.dimension, plan.pca, -0.5 if plan.whiten else 0.0, False)


def removable(index: faiss.Index) -> bool:
    """True if `index.remove_ids` keeps ids right: IVF, or an IndexIDMap2 over a flat index (HNSW cannot remove)."""
    for part in index_parts(index):
        if isinstance(part, faiss.IndexIVF):
            return True
        if isinstance(part, faiss.IndexIDMap):
            return isinstance(faiss.downcast_index(part.index), faiss.IndexFlat)
        if not isinstance(part, faiss.IndexPreTransform):
            return False
    return False


def set_search_params(index: faiss.Index, params: dict) -> None:
    """Apply stored search parameters (nprobe, efSearch, k_factor) wherever they belong in the wrapped index."""
    for part in index_parts(index):
        if isinstance(part, faiss.IndexIVF) and "nprobe" in params:
            part.nprobe = int(params["nprobe"])
        elif isinstance(part, faiss.IndexHNSW) and "efSearch" in params:
            part.hnsw.efSearch = int(params["efSearch"])
        elif isinstance(part, faiss.IndexRefine) and "k_factor" in params:
            part.k_factor = float(params["k_factor"])


@dataclass
class Truth:
    """The exact nearest neighbours of the held-out queries: (nq, TRUTH_DEPTH) FAISS scores and ids, best first.

    Deeper than K so that every vector tied with the K-th (copies of one image, the same picture in two formats) is
    seen: the index and the ground truth may order equal distances differently, and either order is right.
    """

    D: np.ndarray
    I: np.ndarray
    metric: str

    def recall(self, I: np.ndarray) -> float:
        """10-recall@10 of result ids `I` (nq, >= K): a result is a hit when its exact distance is within the K-th exact
        distance (plus a float tolerance, TIE_TOLERANCE relative), the mean hit count divided by K."""
        D = self.D.astype(np.float64)  # FAISS marks missing neighbours with +-FLT_MAX, which float32 slack overflows
        kth = D[:, K - 1 : K]
        slack = TIE_TOLERANCE * np.maximum(1.0, np.abs(kth))
        near = D >= kth - slack if self.metric == "cosine" else D <= kth + slack
        accepted = np.where(near, self.I, np.iinfo(np.int64).min)
        hits = (I[:, :K, None] == accepted[:, None, :]).any(axis=2).sum(axis=1)
        return float(hits.mean() / K)


class ExactKnn:
    """Exact top TRUTH_DEPTH of fixed queries over a collection seen batch by batch (the ground truth for recall)."""

    def __init__(self, xq: np.ndarray, metric: str):
        self.xq = xq
        self.metric = metric
        self.heap = faiss.ResultHeap(len(xq), TRUTH_DEPTH, keep_max=metric == "cosine")

    def add(self, xb: np.ndarray, ids: np.ndarray) -> None:
        """Merge one batch (already prepared, in the queries' space) into the running top."""
        D, I = faiss.knn(self.xq, xb, min(TRUTH_DEPTH, len(xb)), metric=faiss_metric(self.metric))
        if D.shape[1] < TRUTH_DEPTH:
            pad = np.full((len(D), TRUTH_DEPTH - D.shape[1]), -1, dtype=np.int64)
            worst = -np.inf if self.metric == "cosine" else np.inf
            D, I = np.hstack([D, np.full(pad.shape, worst, np.float32)]), np.hstack([I, pad])
        self.heap.add_result(D, np.where(I >= 0, ids[np.maximum(I, 0)], -1))

    def truth(self) -> Truth:
        """The exact neighbours found over every batch added."""
        self.heap.finalize()
        return Truth(self.heap.D, self.heap.I, self.metric)


def _smallest(recall_of, lo: int, hi: int, target: float) -> tuple[int, float]:
    """Smallest value in [lo, hi] whose recall reaches `target` (recall rising with the value): doubling, then bisection."""
    value, below = lo, None
    while recall_of(value) < target and value < hi:
        below, value = value, min(2 * value, hi)
    if recall_of(value) < target or below is None:
        return value, recall_of(value)
    while value - below > 1:
        middle = (below + value) // 2
        if recall_of(middle) >= target:
            value = middle
        else:
            below = middle
    return value, recall_of(value)


def tune(index: faiss.Index, xq: np.ndarray, truth: Truth, target: float) -> tuple[dict, float]:
    """The search parameters (nprobe for IVF, efSearch for HNSW; k_factor for re-ranking) with the smallest value that
    reaches `target` 10-recall@10 on `xq`, and that recall; the largest tried, and its recall, when none reaches it."""
    parts = list(index_parts(index))
    ivf = next((p for p in parts if isinstance(p, faiss.IndexIVF)), None)
    hnsw = next((p for p in parts if isinstance(p, faiss.IndexHNSW)), None)
    refine = any(isinstance(p, faiss.IndexRefine) for p in parts)
    best: tuple[dict, float] = ({}, -1.0)
    for fixed in ({"k_factor": f} for f in REFINE_K_FACTORS) if refine else [{}]:
        cache: dict[int, float] = {}

        def recall_of(value: int, name: str = "") -> float:
            if value not in cache:
                set_search_params(index, fixed | ({name: value} if name else {}))
                cache[value] = truth.recall(index.search(xq, K)[1])
            return cache[value]

        if ivf is not None:
            value, recall = _smallest(lambda v: recall_of(v, "nprobe"), 1, ivf.nlist, target)
            params = fixed | {"nprobe": value}
        elif hnsw is not None:
            # efSearch below K searches exactly as efSearch = K does.
            value, recall = _smallest(lambda v: recall_of(v, "efSearch"), K, max(K, index.ntotal), target)
            params = fixed | {"efSearch": value}
        else:
            params, recall = fixed, recall_of(0)
        if recall >= target:
            best = (params, recall)
            break
        if recall > best[1]:
            best = (params, recall)
    set_search_params(index, best[0])
    return best


class Transform:
    """Rows as the index stores them (`prepare`), then through the PCA when there is one: a picklable callable, so that
    Ray tasks apply the driver's PCA (a FAISS PCAMatrix does not pickle; its serialized bytes do)."""

    def __init__(self, metric: str, pca: faiss.VectorTransform | None = None):
        self.metric = metric
        self.pca = pca

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        x = prepare(rows, self.metric)
        return self.pca.apply(x) if self.pca is not None else x

    def __getstate__(self) -> dict:
        data = None
        if self.pca is not None:
            writer = faiss.VectorIOWriter()
            faiss.write_VectorTransform(self.pca, writer)
            data = faiss.vector_to_array(writer.data)
        return {"metric": self.metric, "pca": data}

    def __setstate__(self, state: dict) -> None:
        self.metric, self.pca = state["metric"], None
        if state["pca"] is not None:
            reader = faiss.VectorIOReader()
            faiss.copy_array_to_vector(state["pca"], reader.data)
            self.pca = faiss.read_VectorTransform(reader)


@dataclass
class Trained:
    """What a build learns from its samples before any vector is added: the trained empty index (in the searched
    space), the PCA, and the held-out queries (`xq` in the searched space, `xq_full` before the PCA)."""

    inner: faiss.Index
    pca: faiss.PCAMatrix | None
    xq: np.ndarray
    xq_full: np.ndarray
    query_ids: np.ndarray
    train_n: int
    started: float  # time.monotonic() at the start of the build


@dataclass
class Built:
    """A built index and what was measured on it."""

    index: faiss.Index
    params: dict
    recall: float  # 10-recall@10 against exact search in the index's own space (after PCA, if any)
    recall_full: float | None  # with PCA: against exact search on the full-dimensional vectors
    query_ids: np.ndarray  # ids of the held-out query vectors
    train_points: int
    seconds: float


def _train_points(inner: faiss.Index) -> int:
    """Vectors needed to train `inner` (0 if it needs no training)."""
    if inner.is_trained:
        return 0
    ivf = next((p for p in index_parts(inner) if isinstance(p, faiss.IndexIVF)), None)
    points = TRAIN_POINTS_PER_LIST * ivf.nlist if ivf is not None else 0
    if ivf is None or isinstance(ivf, faiss.IndexIVFPQ):
        points = max(points, PQ_TRAIN_POINTS)
    return points


def train_index(source: Vectors, plan: IndexPlan, sample_bytes: int, seed: int = 0) -> Trained:
    """Draw the held-out queries and the training samples of `source`, train the PCA and the empty index of `plan`.

    Passes over `source`: one for queries and the PCA or quantiser sample, one more for the quantiser sample in PCA
    space (only with PCA). `sample_bytes` bounds each sample.
    """
    started = time.monotonic()
    n = source.count
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    nq = min(QUERIES, n)
    # Queries are held out of training where the collection allows it.
    queries, rest = order[:nq], (order[nq:] if n > nq else order)
    inner = new_index(plan)
    cap = max(1000, sample_bytes // (4 * plan.dimension))
    train_n = min(len(rest), _train_points(inner), max(1000, sample_bytes // (4 * plan.space)))
    pca_n = min(len(rest), PCA_TRAIN_POINTS, cap) if plan.pca else 0
    first_ids, first = source.take(np.concatenate([queries, rest[: pca_n if plan.pca else train_n]]), Transform(plan.metric))
    query_ids, xq_full, sample = first_ids[:nq], first[:nq], first[nq:]
    pca = None
    if plan.pca:
        pca = new_pca(plan)
        pca.train(sample)
        del sample
        xq = pca.apply(xq_full)
        sample = source.take(rest[:train_n], Transform(plan.metric, pca))[1] if train_n else None
    else:
        xq = xq_full
    if train_n:
        ivf = next((p for p in index_parts(inner) if isinstance(p, faiss.IndexIVF)), None)
        if ivf is not None and gpu_available():
            ivf.clustering_index = on_gpu(faiss.IndexFlatL2(plan.space))
        inner.train(sample[:train_n])
        log.info("trained %s on %d vectors", plan.spec, train_n)
    del sample
    return Trained(inner, pca, xq, xq_full, query_ids, train_n, started)


def finish_index(trained: Trained, truth: Truth, truth_full: Truth | None, target_recall: float) -> Built:
    """Tune the search parameters of the filled index against the exact neighbours of the queries, put the PCA in front."""
    params, recall = tune(trained.inner, trained.xq, truth, target_recall)
    index = faiss.IndexPreTransform(trained.pca, trained.inner) if trained.pca else trained.inner
    recall_full = truth_full.recall(index.search(trained.xq_full, K)[1]) if truth_full else None
    seconds = time.monotonic() - trained.started
    return Built(index, params, recall, recall_full, trained.query_ids, trained.train_n, seconds)


def build_index(source: Vectors, plan: IndexPlan, target_recall: float, sample_bytes: int, seed: int = 0) -> Built:
    """Build `plan` over every vector of `source` by streaming, measure 10-recall@10 and tune the search parameters.

    Parameters
    ----------
    source
        The collection, read in batches (never all at once).
    plan
        What to build (`plan_index`).
    target_recall
        10-recall@10 to reach on the held-out queries; nprobe / efSearch / k_factor are set to the smallest value
        that reaches it.
    sample_bytes
        Upper bound on the training sample (PCA and quantiser training), so that the build stays within the budget.
    seed
        Seed of the sample draws.

    Returns
    -------
    Built: the index (PCA included, search parameters set), its parameters, recall and timings.

    Passes over `source`: the sample passes of `train_index`, then one that adds every batch and accumulates the
    exact top 10 of each query. `cluster.distributed.build_index_on_tasks` runs that last pass as Ray tasks.
    """
    trained = train_index(source, plan, sample_bytes, seed)
    inner, pca = trained.inner, trained.pca
    truth = ExactKnn(trained.xq, plan.metric)
    truth_full = ExactKnn(trained.xq_full, plan.metric) if pca else None
    ready = Transform(plan.metric)
    for ids, xb in source.batches():
        x = ready(xb)
        xt = pca.apply(x) if pca else x
        inner.add_with_ids(xt, ids)
        truth.add(xt, ids)
        if truth_full:
            truth_full.add(x, ids)
        del x, xt
    return finish_index(trained, truth.truth(), truth_full.truth() if truth_full else None, target_recall)


def load_index(out: OutDir, manifest: dict | None = None, cached: bool = False) -> faiss.Index:
    """Read OUT/index.faiss, after checking it against the sha256 `manifest` records (`cached`: see verify_checksum).

    FAISS trusts the bytes it reads, so the check comes first: a swapped or truncated file is refused, not loaded.
    """
    if manifest is not None:
        verify_checksum(out, INDEX_FILE, manifest, cached=cached)
    try:
        if isinstance(out.fs, fs.LocalFileSystem):
            return faiss.read_index(out.path(INDEX_FILE))
        return faiss.deserialize_index(np.frombuffer(out.read_bytes(INDEX_FILE), dtype=np.uint8))
    except RuntimeError as e:
        raise UserError(
            f"{out.location}/{INDEX_FILE} is not an index FAISS can read ({str(e).splitlines()[0]}); "
            f"run `imgindex index {out.location}`"
        ) from None
