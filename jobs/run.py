"""`imgindex run` / `python -m jobs.run` (what `ray job submit` runs): embed, index and cluster in one go."""

from __future__ import annotations

import logging
import sys

from embedder.config import JobConfig
from jobs.cluster import ClusterOptions, cluster
from jobs.embed import embed
from jobs.index import IndexOptions, index
from jobs.report import report

log = logging.getLogger("imgindex")


def run(
    config: JobConfig,
    weights_note: str | None = None,
    index_options: IndexOptions | None = None,
    cluster_options: ClusterOptions | None = None,
) -> None:
    """The main job: embed every new image of `config.inputs`, bring the index and the clusters up to date.

    Parameters
    ----------
    config
        The validated job configuration (see `jobs.cli.config_from_args`).
    weights_note
        A remark recorded with the weights in the manifest (only the demo's fallback to random weights sets it).
    index_options
        --index, --max-memory, --pca, --whiten, --target-recall (default: `IndexOptions()`, auto under 4G).
    cluster_options
        --clusters (one k or a sweep), --keep, --niter, --seed, --recluster (default: `config.clusters`,
        `config.niter`, `config.seed`).
    """
    embed(config, weights_note)
    index(config.out, index_options or IndexOptions(seed=config.seed))
    options = cluster_options or ClusterOptions((config.clusters,), None, config.niter, config.seed)
    cluster(config.out, options.clusters, options.niter, options.seed, options.keep, options.recluster)
    report(config.out)
    log.info("done: %s (manifest.json, embeddings/, index.faiss, clusters.csv, errors.csv, report/index.html)", config.out)


if __name__ == "__main__":
    from jobs.cli import entry

    entry(["run", *sys.argv[1:]])
