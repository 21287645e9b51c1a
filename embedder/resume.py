"""Resume: what a re-run keeps of OUT — the identity check, which stored rows stay, shards rewritten without the others.

A row stays when its image is still listed and its file has the fingerprint (size, modification time) it was embedded
from; everything else the listing names is embedded again by the pipeline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from embedder.config import UserError
from embedder.outdir import FORMAT_VERSION, MANIFEST, OutDir
from embedder.reader import Listing
from embedder.writer import read_shard, shard_column, shard_names, write_shard


def check_identity(out: OutDir, identity: dict) -> dict | None:
    """The existing manifest, if any; refuse an OUT whose vectors were made differently from what is asked now."""
    if not out.exists(MANIFEST):
        if shard_names(out):
            raise UserError(f"{out.location} holds embeddings but no manifest.json; use a new --out")
        return None
    manifest = out.read_json(MANIFEST)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{out.location} was written by format version {manifest.get('format_version')}; use a new --out")
    for key, value in identity.items():
        if manifest.get("identity", {}).get(key) != value:
            raise UserError(
                f"{out.location} was made with a different {key} ({manifest.get('identity', {}).get(key)!r}, now "
                f"{value!r}); use a new --out or the same options as before"
            )
    return manifest


@dataclass
class ShardPlan:
    """Which stored rows stay: per shard a mask of live rows, and what the others were."""

    live: dict[str, np.ndarray]
    kept: np.ndarray
    stored: np.ndarray
    duplicates: int


def plan_shards(out: OutDir, listing: Listing) -> ShardPlan:
    """Compare OUT's shards with a (non-empty) listing: a row stays only if its image is listed, its file's fingerprint is the
    one it was embedded from, and no earlier row holds the same id.

    Shards written before fingerprints were recorded read as fingerprint 0, which matches no file: their images are
    embedded again once.
    """
    sorter = np.argsort(listing.ids)
    last = len(sorter) - 1
    live: dict[str, np.ndarray] = {}
    kept: set[int] = set()
    stored: list[np.ndarray] = []
    duplicates = 0
    for name in shard_names(out):
        ids = shard_column(out, name, "id", 0)
        fingerprints = shard_column(out, name, "fingerprint", 0)
        stored.append(ids)
        at = sorter[np.minimum(np.searchsorted(listing.ids, ids, sorter=sorter), last)]
        current = (listing.ids[at] == ids) & (listing.fingerprints[at] == fingerprints)
        mask = np.zeros(len(ids), dtype=bool)
        for row in np.flatnonzero(current):
            key = int(ids[row])
            duplicates += key in kept
            mask[row] = key not in kept
            kept.add(key)
        live[name] = mask
    all_stored = np.unique(np.concatenate(stored)) if stored else np.empty(0, dtype=np.int64)
    return ShardPlan(live, np.fromiter(kept, dtype=np.int64, count=len(kept)), all_stored, duplicates)


def rewrite_shards(out: OutDir, plan: ShardPlan, checksums: dict[str, str]) -> int:
    """Rewrite (atomically) every shard holding rows that are not live, without them; delete emptied shards.

    Returns the number of rows dropped; `checksums` is updated for the rewritten and deleted shards.
    """
    dropped = 0
    for name, mask in plan.live.items():
        if mask.all():
            continue
        dropped += int((~mask).sum())
        if mask.any():
            checksums[name] = write_shard(out, name, read_shard(out, name).filter(mask))
        else:
            out.delete(name)
            checksums.pop(name, None)
    return dropped




def adopt_checksums(out: OutDir, recorded: dict[str, str]) -> dict[str, str]:
    """The recorded checksums of files still in OUT, plus those of shards a crashed run finished but had not yet
    recorded (a shard under its final name is complete: it was moved there whole)."""
    checksums = {name: sha for name, sha in recorded.items() if out.exists(name)}
    for name in shard_names(out):
        if name not in checksums:
            checksums[name] = hashlib.sha256(out.read_bytes(name)).hexdigest()
    return checksums
