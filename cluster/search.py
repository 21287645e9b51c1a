"""Search: the public query API over a finished OUT — nearest indexed images to new images or to an indexed one.

    from cluster.search import Index
    hits = Index.load("out").search(["query.jpg"], k=5)[0]   # [Hit(rank, id, path, distance, cluster), ...]

Query images are embedded in this process with the configuration the manifest records (weights, layer,
preprocessing, precision); weights whose sha256 differs from the manifest's are refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from pyarrow import csv

from cluster.index import load_index, prepare, set_search_params, to_distance
from cluster.paths import PathTable
from embedder.collection import committed, verify_shard
from embedder.config import UserError, absolute
from embedder.outdir import CLUSTERS_FILE, INDEX_FILE, MANIFEST, PATHS_FILE, OutDir, open_out, verify_checksum
from embedder.reader import ImageError, decode_image, image_id, read_bytes
from embedder.writer import read_shard


def read_clusters(out: OutDir, columns: Sequence[str] = ("id", "cluster")) -> pd.DataFrame | None:
    """`columns` of OUT/clusters.csv in its order (None without one), streamed: its paths are read only if asked for."""
    if not out.exists(CLUSTERS_FILE):
        return None
    with out.fs.open_input_stream(out.path(CLUSTERS_FILE)) as source:
        options = csv.ConvertOptions(include_columns=list(columns))
        return csv.read_csv(source, csv.ReadOptions(use_threads=False), convert_options=options).to_pandas()


def collection_weights(manifest: dict, weights: str | None = None) -> tuple[dict, str]:
    """The collection's state dict and its sha256, built from where the manifest says (or `weights`); refused with a
    one-line UserError if their sha256 differs from the manifest's."""
    from embedder.model import build_state_dict, state_dict_sha256

    recorded = manifest["weights"]
    name = weights or recorded["name"]
    state_dict = build_state_dict(name, int(recorded.get("seed", 0)))
    sha = state_dict_sha256(state_dict)
    if sha != recorded["sha256"]:
        raise UserError(
            f"weights {name} (sha256 {sha[:12]}) differ from the ones this index was built with "
            f"({recorded['sha256'][:12]}); pass --weights with the file used for `imgindex run`"
        )
    return state_dict, sha


def collection_model(manifest: dict, weights: str | None = None):
    """An `embedder.model.Embedder` in this process with the collection's weights (`collection_weights`), layer and
    precision."""
    from embedder.model import Embedder

    state_dict, _ = collection_weights(manifest, weights)
    used = manifest["precision"]["used"]
    precision = used[0] if len(used) == 1 else manifest["precision"]["requested"]
    return Embedder(state_dict, manifest["layer"], precision)


@dataclass(frozen=True)
class Hit:
    """One search result; distance is 1 - cosine similarity (cosine) or Euclidean distance (l2), smaller is nearer."""

    rank: int
    id: int
    path: str
    distance: float
    cluster: int | None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Index:
    """A loaded OUT: the FAISS index, paths looked up by id on demand (`cluster.paths.PathTable`), each id's cluster,
    and (on first image query) the embedding model."""

    def __init__(self, out: OutDir, manifest: dict, index, paths: PathTable, clusters: pd.DataFrame | None, weights: str | None):
        self.out = out
        self.manifest = manifest
        self.index = index
        self.paths = paths
        # Sorted ids and their clusters (12 bytes an image), looked up by bisection.
        table = clusters.sort_values("id") if clusters is not None else pd.DataFrame({"id": [], "cluster": []})
        self._cluster_ids = table["id"].to_numpy(np.int64)
        self._cluster_of = table["cluster"].to_numpy(np.int32)
        self.metric = manifest["metric"]
        self._weights = weights
        self._embedder = None

    @classmethod
    def load(cls, location: str, weights: str | None = None) -> "Index":
        """Load OUT's manifest, index, id -> path table and clusters; `weights` overrides where the weights come from
        (sha256 still checked).

        The index and the path table are checked against the manifest's sha256s, hashing only files not verified
        before with the same size and modification time; a shard is checked when a vector is read from it. The search
        parameters tuned at build time (`manifest["index"]["search_params"]`: nprobe, efSearch, k_factor) are applied;
        they are also stored in index.faiss itself, for plain `faiss.read_index`.
        """
        out = open_out(location, (MANIFEST, INDEX_FILE))
        manifest = out.read_manifest()
        index = load_index(out, manifest, cached=True)
        set_search_params(index, manifest.get("index", {}).get("search_params", {}))
        paths = PathTable(out)
        verify_checksum(out, PATHS_FILE, manifest, cached=True)
        return cls(out, manifest, index, paths, read_clusters(out), weights)

    def cluster(self, key: int) -> int | None:
        """The cluster of the image with id `key`, None when it has none (not clustered, or no clusters.csv)."""
        row = int(np.searchsorted(self._cluster_ids, key))
        return int(self._cluster_of[row]) if row < len(self._cluster_ids) and self._cluster_ids[row] == key else None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def embedder(self):
        """The query-side model, built once, with the manifest's weights (refused if their sha256 differs)."""
        if self._embedder is None:
            self._embedder = collection_model(self.manifest, self._weights)
        return self._embedder

    def embed(self, images: Sequence[str | bytes | np.ndarray]) -> np.ndarray:
        """Vectors (n, d) of query images given as paths, encoded bytes or decoded (224, 224, 3) uint8 pixels."""
        pixels = []
        for image in images:
            try:
                if isinstance(image, np.ndarray):
                    pixels.append(image)
                else:
                    data = image if isinstance(image, bytes) else read_bytes(absolute(image))
                    pixels.append(decode_image(data))
            except (ImageError, OSError) as e:
                name = image if isinstance(image, str) else "query image"
                raise UserError(f"{name}: {e}") from None
        return self.embedder()(np.stack(pixels))

    def vector(self, path: str) -> np.ndarray:
        """The stored vector of an already-indexed image, read from its shard (exact whatever the index compresses)."""
        key = image_id(absolute(path))
        found = self.paths.find(key)
        if found is None:
            raise UserError(f"{path} is not in this index; use `imgindex query OUT IMAGE` for a new image")
        record = committed(self.out).get(found[1])
        if record is None:
            raise UserError(f"{path}: its shard {found[1]} was replaced since the index was built; run `imgindex index {self.out.location}`")
        verify_shard(self.out, record, cached=True)
        table = read_shard(self.out, record.shard, ["id", "embedding"])
        row = table.column("id").to_pylist().index(key)
        return np.asarray(table.column("embedding")[row].as_py(), dtype=np.float32)

    def search_vectors(self, xq: np.ndarray, k: int, exclude: Sequence[int | None] | None = None) -> list[list[Hit]]:
        """The k nearest indexed images to each raw query vector, nearest first."""
        if not 1 <= k <= len(self):
            raise UserError(f"-k {k}: must be between 1 and the {len(self)} indexed images")
        exclude = exclude or [None] * len(xq)
        extra = 1 if any(e is not None for e in exclude) else 0
        D, I = self.index.search(prepare(xq, self.metric), min(k + extra, len(self)))
        distances = to_distance(D, self.metric)
        kept = [[(int(i), float(d)) for i, d in zip(row_i, row_d) if i >= 0 and i != skip][:k] for row_d, row_i, skip in zip(distances, I, exclude)]
        found = self.paths.find_many(i for hits in kept for i, _ in hits)  # one read per row group for all the hits
        return [[Hit(r + 1, i, found.get(i, ("",))[0], d, self.cluster(i)) for r, (i, d) in enumerate(hits)] for hits in kept]

    def search(self, images: Sequence[str | bytes | np.ndarray], k: int = 10) -> list[list[Hit]]:
        """The k nearest indexed images to each query image."""
        return self.search_vectors(self.embed(images), k)

    def like(self, paths: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """The k nearest other indexed images to each already-indexed image (the image itself is left out)."""
        xq = np.stack([self.vector(p) for p in paths])
        return self.search_vectors(xq, k, exclude=[image_id(absolute(p)) for p in paths])
