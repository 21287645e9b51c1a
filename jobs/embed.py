"""`imgindex embed` / `python -m jobs.embed`: images -> OUT/embeddings/*.parquet, errors.csv, manifest.json."""

from __future__ import annotations

import json
import sys

from embedder.config import JobConfig
from embedder.pipeline import EmbedSummary, dry_run
from embedder.pipeline import embed as run_pipeline


def embed(config: JobConfig, weights_note: str | None = None) -> EmbedSummary:
    """Embed every image of `config.inputs` not yet in `config.out`.

    Parameters
    ----------
    config
        The validated job configuration (see `jobs.cli.config_from_args`): inputs, out, weights, layer, metric,
        precision, batch size, actors, GPUs per actor, seed, rows per shard, Ray address.
    weights_note
        A remark recorded with the weights in the manifest (only the demo's fallback to random weights sets it).

    Returns
    -------
    EmbedSummary with the counts of listed, skipped (already embedded), embedded, removed and failed images.
    """
    return run_pipeline(config, weights_note)


def print_dry_run(config: JobConfig) -> int:
    """Print the input count, the disk the vectors will take and a time estimate, as JSON; start nothing."""
    print(json.dumps(dry_run(config), indent=2))
    return 0


if __name__ == "__main__":
    from jobs.cli import entry

    entry(["embed", *sys.argv[1:]])
