"""`imgindex run` / `python -m jobs.run` (what `ray job submit` runs): embed, index and cluster in one go."""

from __future__ import annotations

import argparse
import logging

from cluster.options import ClusterOptions, DuplicateOptions, IndexOptions
from embedder.config import JobConfig
from jobs.arguments import cluster_options_from_args, config_from_args, duplicate_options_from_args, index_options_from_args, setup_logging
from jobs.cluster import cluster
from jobs.duplicates import duplicates
from jobs.embed import embed, print_dry_run
from jobs.index import index
from jobs.report import report

log = logging.getLogger("imgindex")


def run(
    config: JobConfig,
    cluster_options: ClusterOptions,
    index_options: IndexOptions | None = None,
    weights_note: str | None = None,
    duplicate_options: DuplicateOptions | None = None,
) -> None:
    """The main job: embed every new image of `config.inputs`, bring the index and the clusters up to date (and the
    near-duplicates and outliers, if asked), write the report.

    Parameters
    ----------
    config
        The validated embedding configuration (see `jobs.arguments.config_from_args`).
    cluster_options
        --clusters (one k or a sweep), --keep, --niter, --seed, --recluster.
    index_options
        --index, --max-memory, --pca, --whiten, --target-recall, --seed (default: `IndexOptions(seed=config.seed)`).
    weights_note
        A remark recorded with the weights in the manifest (only the demo's fallback to random weights sets it).
    duplicate_options
        With `--duplicates`: --threshold, --keep-rule, --measure, --outlier-k, --sample (None: no duplicates step).
    """
    embed(config, weights_note)
    index(config.out, index_options or IndexOptions(seed=config.seed))
    cluster(config.out, cluster_options)
    if duplicate_options is not None:
        duplicates(config.out, duplicate_options)
    report(config.out)
    written = "clusters.csv, duplicates.csv, outliers.csv" if duplicate_options is not None else "clusters.csv"
    log.info("done: %s (manifest.json, embeddings/, index.faiss, %s, errors.csv, report/index.html)", config.out, written)


def main(args: argparse.Namespace) -> int:
    """`imgindex run` from its parsed command line."""
    config = config_from_args(args)
    cluster_options, index_options = cluster_options_from_args(args), index_options_from_args(args)
    duplicate_options = duplicate_options_from_args(args) if args.duplicates else None
    if args.dry_run:
        steps = {"index": index_options, "cluster": cluster_options} | ({"duplicates": duplicate_options} if duplicate_options else {})
        return print_dry_run(config, **steps)
    setup_logging(config.out, args.verbose)
    run(config, cluster_options, index_options, duplicate_options=duplicate_options)
    return 0


if __name__ == "__main__":
    from jobs.arguments import command_entry

    command_entry("run", main)
