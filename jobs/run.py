"""`imgindex run` / `python -m jobs.run` (what `ray job submit` runs): embed, index and cluster in one go."""

from __future__ import annotations

import logging
import sys

from embedder.config import JobConfig
from jobs.cluster import cluster
from jobs.embed import embed
from jobs.index import index
from jobs.report import report

log = logging.getLogger("imgindex")


def run(config: JobConfig, weights_note: str | None = None) -> None:
    """The main job: embed every new image of `config.inputs`, rebuild the index, re-cluster.

    Parameters
    ----------
    config
        The validated job configuration (see `jobs.cli.config_from_args`); `config.clusters`, `config.niter` and
        `config.seed` drive the k-means step.
    weights_note
        A remark recorded with the weights in the manifest (only the demo's fallback to random weights sets it).
    """
    embed(config, weights_note)
    index(config.out)
    cluster(config.out, config.clusters, config.niter, config.seed)
    report(config.out)
    log.info("done: %s (manifest.json, embeddings/, index.faiss, clusters.csv, errors.csv)", config.out)


if __name__ == "__main__":
    from jobs.cli import entry

    entry(["run", *sys.argv[1:]])
