"""Resume: what a re-run keeps of OUT — the identity check, what a killed run left, which stored rows stay, and the
shards replaced without the others.

A row stays when its image is still listed and its file has the fingerprint (size, modification time) it was embedded
from; everything else the listing names is embedded again by the pipeline.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from embedder.collection import adopt, committed, replace, retire, uncommitted
from embedder.config import UserError
from embedder.outdir import COMMITS_DIR, EMBEDDINGS_DIR, FORMAT_VERSION, MANIFEST, OutDir
from embedder.reader import Listing
from embedder.writer import read_shard, shard_column

log = logging.getLogger("imgindex")


def recover(out: OutDir) -> None:
    """Finish or discard what a killed run left in OUT: a committed update applied, staged and half-written files and
    the records of replaced shards removed (uncommitted shards are `adopt_uncommitted`'s)."""
    if not out.exists():
        return
    out.recover(("", EMBEDDINGS_DIR, COMMITS_DIR))
    live = committed(out)
    for name in out.list(COMMITS_DIR, ".json"):
        shard = f"{EMBEDDINGS_DIR}/{name.rsplit('/', 1)[-1].removesuffix('.json')}.parquet"
        if shard not in live:
            retire(out, shard)


def adopt_uncommitted(out: OutDir, dimension: int) -> int:
    """Commit the complete shards a killed run wrote but did not commit (removing broken ones); returns the rows kept."""
    if not out.exists(MANIFEST):
        return 0
    rows = 0
    for name in uncommitted(out):
        record = adopt(out, name, dimension)
        rows += record.rows if record else 0
    if rows:
        log.info("kept %d rows a stopped run had written but not committed", rows)
    return rows


def check_identity(out: OutDir, identity: dict) -> dict | None:
    """The existing manifest, if any; refuse an OUT whose vectors were made differently from what is asked now."""
    if not out.exists(MANIFEST):
        if out.list(EMBEDDINGS_DIR, ".parquet"):
            raise UserError(f"{out.location} holds embeddings but no manifest.json; use a new --out")
        return None
    manifest = out.read_json(MANIFEST)
    if manifest.get("format_version") not in range(1, FORMAT_VERSION + 1):
        raise UserError(
            f"{out.location} was written by format version {manifest.get('format_version')}, which this imgindex "
            f"(format {FORMAT_VERSION}) cannot read; use a new --out or a newer imgindex"
        )
    for key, value in identity.items():
        if manifest.get("identity", {}).get(key) != value:
            raise UserError(
                f"{out.location} was made with a different {key} ({manifest.get('identity', {}).get(key)!r}, now "
                f"{value!r}); use a new --out or the same options as before"
            )
    return manifest


@dataclass
class ShardPlan:
    """Which stored rows stay: per committed shard a mask of live rows, and what the others were."""

    live: dict[str, np.ndarray]
    kept: np.ndarray
    stored: np.ndarray
    duplicates: int


def plan_shards(out: OutDir, listing: Listing) -> ShardPlan:
    """Compare OUT's committed shards with a (non-empty) listing: a row stays only if its image is listed, its file has
    the size and modification time it was embedded from (what the fingerprint hashes), and no earlier row holds the
    same id.

    Shards written before file versions were recorded read as size -1, which matches no file: their images are
    embedded again once.
    """
    sorter = np.argsort(listing.ids)
    last = len(sorter) - 1
    names = list(committed(out))
    stored = [shard_column(out, name, "id", 0) for name in names]
    ids = np.concatenate(stored) if stored else np.empty(0, dtype=np.int64)
    sizes = np.concatenate([shard_column(out, name, "size", -1) for name in names]) if names else ids
    mtimes = np.concatenate([shard_column(out, name, "mtime_ns", -1) for name in names]) if names else ids
    at = sorter[np.minimum(np.searchsorted(listing.ids, ids, sorter=sorter), last)]
    same = (listing.ids[at] == ids) & (listing.sizes[at] == sizes) & (listing.mtimes_ns[at] == mtimes)
    current = np.flatnonzero(same & (listing.sizes[at] >= 0))
    kept, first = np.unique(ids[current], return_index=True)
    alive = np.zeros(len(ids), dtype=bool)
    alive[current[first]] = True
    bounds = np.cumsum([0] + [len(part) for part in stored])
    live = {name: alive[bounds[i] : bounds[i + 1]] for i, name in enumerate(names)}
    return ShardPlan(live, kept, np.unique(ids), len(current) - len(kept))


def apply_plan(out: OutDir, plan: ShardPlan, token: str) -> int:
    """Replace every committed shard holding rows that are not live by one without them; retire emptied shards.
    Returns the number of rows dropped."""
    dropped = 0
    for name, mask in plan.live.items():
        if mask.all():
            continue
        dropped += int((~mask).sum())
        if mask.any():
            replace(out, name, read_shard(out, name).filter(mask), token)
        else:
            retire(out, name)
    return dropped
