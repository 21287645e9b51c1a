"""`imgindex embed` / `python -m jobs.embed`: images -> OUT/embeddings/*.parquet, errors.csv, manifest.json."""

from __future__ import annotations

import argparse
import dataclasses
import json

from embedder.config import JobConfig
from embedder.pipeline import EmbedSummary, dry_run
from embedder.pipeline import embed as run_pipeline
from jobs.arguments import config_from_args, setup_logging


def embed(config: JobConfig, weights_note: str | None = None) -> EmbedSummary:
    """Embed every image of `config.inputs` not yet in `config.out`.

    Parameters
    ----------
    config
        The validated job configuration (see `jobs.arguments.config_from_args`): inputs, out, weights, layer, metric,
        precision, batch size, actors, GPUs per actor, seed, rows per shard, Ray address.
    weights_note
        A remark recorded with the weights in the manifest (only the demo's fallback to random weights sets it).

    Returns
    -------
    EmbedSummary with the counts of listed, skipped (already embedded), embedded, removed and failed images.
    """
    return run_pipeline(config, weights_note)


def print_dry_run(config: JobConfig, **steps) -> int:
    """Print the input count, the disk the vectors will take, a time estimate and the resolved options (`config` and
    the options objects of the other `steps`, by name) as JSON; start nothing."""
    resolved = {"config": dataclasses.asdict(config)} | {name: dataclasses.asdict(o) for name, o in steps.items()}
    print(json.dumps(dry_run(config) | resolved, indent=2))
    return 0


def main(args: argparse.Namespace) -> int:
    """`imgindex embed` from its parsed command line."""
    config = config_from_args(args)
    if args.dry_run:
        return print_dry_run(config)
    setup_logging(config.out, args.verbose)
    embed(config)
    return 0


if __name__ == "__main__":
    from jobs.arguments import command_entry

    command_entry("embed", main)
