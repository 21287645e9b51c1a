"""`imgindex index OUT` / `python -m jobs.index`: OUT/embeddings -> OUT/index.faiss."""

from __future__ import annotations

import logging
import sys

from cluster.index import INDEX_FILE, build_index, save_index
from cluster.search import open_out
from embedder.config import UserError
from embedder.pipeline import now_iso
from embedder.writer import CHECKSUMS, MANIFEST

log = logging.getLogger("imgindex")


def index(out: str) -> int:
    """Build the FAISS index over every embedding in OUT and save it as OUT/index.faiss.

    Parameters
    ----------
    out
        Output folder of `imgindex embed` (local path or URI).

    Returns
    -------
    The number of vectors indexed.
    """
    folder = open_out(out)
    manifest = folder.read_json(MANIFEST)
    built = build_index(folder, manifest["dimension"], manifest["metric"])
    if built.ntotal == 0:
        raise UserError(f"{out}: no embeddings to index (see {out}/errors.csv)")
    manifest.setdefault(CHECKSUMS, {})[INDEX_FILE] = save_index(folder, built)
    manifest.update(index={"file": INDEX_FILE, "type": "flat", "ntotal": int(built.ntotal)}, updated=now_iso())
    folder.write_json(MANIFEST, manifest)
    log.info("wrote %s/%s (%d vectors)", folder.location, INDEX_FILE, built.ntotal)
    return int(built.ntotal)


if __name__ == "__main__":
    from jobs.cli import entry

    entry(["index", *sys.argv[1:]])
