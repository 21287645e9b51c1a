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

from cluster.index import load_index, prepare, set_search_params, to_distance
from embedder.collection import committed, verify_shard
from embedder.config import UserError, absolute
from embedder.outdir import CLUSTERS_FILE, INDEX_FILE, MANIFEST, OutDir, open_out
from embedder.reader import ImageError, decode_image, image_id, read_bytes
from embedder.writer import read_shard


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
    """A loaded OUT: the FAISS index, id -> path and cluster, and (on first image query) the embedding model."""

    def __init__(
        self, out: OutDir, manifest: dict, index, paths: dict[int, str], clusters: dict[int, int], weights: str | None,
        shards: dict[int, str] | None = None,
    ):
        self.out = out
        self.shards = shards or {}
        self.manifest = manifest
        self.index = index
        self.paths = paths
        self.clusters = clusters
        self.metric = manifest["metric"]
        self._weights = weights
        self._embedder = None

    @classmethod
    def load(cls, location: str, weights: str | None = None) -> "Index":
        """Load OUT's manifest, index and tables; `weights` overrides where the weights come from (sha256 still checked).

        The index and the shards are checked against the manifest's sha256s, hashing only files not verified before
        with the same size and modification time. The search parameters tuned at build time
        (`manifest["index"]["search_params"]`: nprobe, efSearch, k_factor) are applied; they are also stored in
        index.faiss itself, for plain `faiss.read_index`.
        """
        out = open_out(location, (MANIFEST, INDEX_FILE))
        manifest = out.read_manifest()
        index = load_index(out, manifest, cached=True)
        set_search_params(index, manifest.get("index", {}).get("search_params", {}))
        paths: dict[int, str] = {}
        shards: dict[int, str] = {}
        for name, record in committed(out).items():
            verify_shard(out, record, cached=True)
            table = read_shard(out, name, ["id", "path"])
            ids = table.column("id").to_pylist()
            paths.update(zip(ids, table.column("path").to_pylist()))
            shards.update(dict.fromkeys(ids, name))
        table = out.read_csv(CLUSTERS_FILE, ["id", "cluster"])
        clusters = {} if table is None else dict(zip(table["id"].tolist(), table["cluster"].tolist()))
        return cls(out, manifest, index, paths, clusters, weights, shards)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def embedder(self):
        """The query-side model, built once, with the manifest's weights (refused if their sha256 differs)."""
        if self._embedder is None:
            from embedder.model import Embedder, build_state_dict, state_dict_sha256

            recorded = self.manifest["weights"]
            name = self._weights or recorded["name"]
            state_dict = build_state_dict(name, int(recorded.get("seed", 0)))
            sha = state_dict_sha256(state_dict)
            if sha != recorded["sha256"]:
                raise UserError(
                    f"weights {name} (sha256 {sha[:12]}) differ from the ones this index was built with "
                    f"({recorded['sha256'][:12]}); pass --weights with the file used for `imgindex run`"
                )
            used = self.manifest["precision"]["used"]
            precision = used[0] if len(used) == 1 else self.manifest["precision"]["requested"]
            self._embedder = Embedder(state_dict, self.manifest["layer"], precision)
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
        if key not in self.paths:
            raise UserError(f"{path} is not in this index; use `imgindex query OUT IMAGE` for a new image")
        table = read_shard(self.out, self.shards[key], ["id", "embedding"])
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
        results = []
        for row_d, row_i, skip in zip(distances, I, exclude):
            hits = [(int(i), float(d)) for i, d in zip(row_i, row_d) if i >= 0 and i != skip][:k]
            results.append(
                [Hit(r + 1, i, self.paths.get(i, ""), d, self.clusters.get(i)) for r, (i, d) in enumerate(hits)]
            )
        return results

    def search(self, images: Sequence[str | bytes | np.ndarray], k: int = 10) -> list[list[Hit]]:
        """The k nearest indexed images to each query image."""
        return self.search_vectors(self.embed(images), k)

    def like(self, paths: Sequence[str], k: int = 10) -> list[list[Hit]]:
        """The k nearest other indexed images to each already-indexed image (the image itself is left out)."""
        xq = np.stack([self.vector(p) for p in paths])
        return self.search_vectors(xq, k, exclude=[image_id(absolute(p)) for p in paths])
