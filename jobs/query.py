"""`imgindex query OUT IMAGE... [-k 10] [--json] [--like PATH]`: nearest indexed images, as a table or JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

from cluster.search import Index
from embedder.config import UserError


def query(out: str, images: Sequence[str], like: Sequence[str] = (), k: int = 10, as_json: bool = False, weights: str | None = None) -> list[dict]:
    """Print (and return) the k nearest indexed images to each query image and each --like image.

    Parameters
    ----------
    out
        A finished output folder (manifest.json and index.faiss).
    images
        Query image files, embedded with the manifest's configuration.
    like
        Already-indexed images, searched by their stored vectors; each is left out of its own results.
    k
        Neighbours per query.
    as_json
        Print `[{"query": PATH, "results": [{"rank", "id", "path", "distance", "cluster"}, ...]}, ...]`.
    weights
        Override for where the weights are loaded from; their sha256 must match the manifest's.
    """
    index = Index.load(out, weights=weights)
    results = []
    if images:
        results += [{"query": q, "results": [h.as_dict() for h in hits]} for q, hits in zip(images, index.search(images, k))]
    if like:
        results += [{"query": q, "results": [h.as_dict() for h in hits]} for q, hits in zip(like, index.like(like, k))]
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print(f"query: {result['query']}")
            print(f"  {'rank':>4}  {'distance':>8}  {'cluster':>7}  path")
            for hit in result["results"]:
                cluster = "" if hit["cluster"] is None else hit["cluster"]
                print(f"  {hit['rank']:>4}  {hit['distance']:>8.4f}  {cluster:>7}  {hit['path']}")
    return results


def main(args: argparse.Namespace) -> int:
    """`imgindex query` from its parsed command line."""
    if not args.images and not args.like:
        raise UserError("query needs at least one IMAGE or --like PATH")
    from jobs.arguments import setup_logging

    setup_logging(None, args.verbose)
    query(args.out, args.images, args.like, args.k, args.json, args.weights)
    return 0


if __name__ == "__main__":
    from jobs.arguments import command_entry

    command_entry("query", main)
