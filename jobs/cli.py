"""The `imgindex` command: one argument parser for every entry point, errors as one line and a non-zero exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from embedder.config import JobConfig, UserError, absolute, is_uri

log = logging.getLogger("imgindex")

# Set by Ray for the entrypoint of `ray job submit`, whose working directory is a temporary copy.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_embed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="directory (recursive), glob, or .txt/.csv/.parquet list of paths")
    p.add_argument("--out", required=True, help="output folder (local path or s3://... URI)")
    p.add_argument("--weights", default="imagenet", help="imagenet (torchvision ImageNet weights), random (seeded) or PATH of a VGG-16 state dict")
    p.add_argument("--layer", default="fc6", choices=["fc6", "fc7"], help="fc6 = classifier[0] before ReLU (default); fc7 = classifier[4] after ReLU")
    p.add_argument("--metric", default="cosine", choices=["cosine", "l2"], help="cosine (default) or l2")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto = bf16 where native, else fp32")
    p.add_argument("--decode", default="cpu", choices=["cpu", "gpu"], help="cpu (default): Pillow in Ray CPU tasks; gpu: nvJPEG on the model replicas' GPUs, CPU fallback per image")
    p.add_argument("--batch-size", type=_positive_int, help="images per model batch (default 16 on CPU, 256 on GPU)")
    p.add_argument("--actors", type=_positive_int, help="model replicas (default: one per GPU, autoscaling; CPU: one per 8 cores)")
    p.add_argument("--num-gpus-per-actor", type=float, help="GPUs per replica, e.g. 0.5 for two per GPU; 0 forces CPU (default 1 if the cluster has GPUs)")
    p.add_argument("--seed", type=int, default=0, help="seed for random weights and k-means (default 0)")
    p.add_argument("--rows-per-shard", type=_positive_int, default=4096, help="rows per Parquet shard (default 4096)")
    p.add_argument("--max-errors", metavar="N|P%", help="fail (outputs kept) when more than N files, or P%% of the listed files, cannot be embedded (default: no limit)")
    p.add_argument("--address", help="Ray address to connect to (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--dry-run", action="store_true", help="count inputs, estimate disk and time, and stop")


def _add_cluster_options(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--clusters", required=required, default=None if required else "8",
        help="k-means clusters: K, a sweep 5,10,20 or 5:50:5 (STOP included), or auto (= 5:50:5, best silhouette kept)",
    )
    p.add_argument("--keep", type=_positive_int, help="with a sweep: the k whose assignments are kept (default: best silhouette)")
    p.add_argument("--niter", type=_positive_int, default=20, help="k-means iterations on the training sample (default 20)")
    p.add_argument("--recluster", action="store_true", help="train k-means again instead of assigning new images to the existing centroids")


def _add_index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", default="auto", help="auto (default), flat, hnsw, ivf, or a faiss.index_factory string such as IVF4096,PQ32,RFlat")
    p.add_argument("--max-memory", default="4G", help="RAM budget of the index, e.g. 4G or 512M (default 4G)")
    p.add_argument("--pca", type=_positive_int, help="reduce the vectors to DIM dimensions by PCA before indexing")
    p.add_argument("--whiten", action="store_true", help="with --pca: whiten (scale each component to unit variance)")
    p.add_argument("--target-recall", type=float, default=0.95, help="10-recall@10 the tuned search parameters must reach (default 0.95)")


def index_options_from_args(args: argparse.Namespace):
    """The validated IndexOptions of an `index`/`run` command line."""
    from jobs.index import IndexOptions

    return IndexOptions(args.index, args.max_memory, args.pca, args.whiten, args.target_recall, args.seed).validate()


def cluster_options_from_args(args: argparse.Namespace):
    """The ClusterOptions of a `cluster`/`run` command line."""
    from jobs.cluster import ClusterOptions, parse_clusters

    return ClusterOptions(parse_clusters(args.clusters), args.keep, args.niter, args.seed, args.recluster)


def build_parser() -> argparse.ArgumentParser:
    """The parser of `imgindex` and of `python -m jobs.<command>`."""
    parser = argparse.ArgumentParser(prog="imgindex", description="Cluster and search images by VGG-16 features, FAISS and Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="embed, index and cluster in one go (the main job)")
    _add_embed_options(run)
    _add_cluster_options(run, required=True)
    _add_index_options(run)

    embed = commands.add_parser("embed", help="embed images into OUT/embeddings/*.parquet")
    _add_embed_options(embed)

    index = commands.add_parser("index", help="build OUT/index.faiss from the embeddings")
    index.add_argument("out", metavar="OUT")
    _add_index_options(index)
    index.add_argument("--seed", type=int, default=0, help="seed of the training and query samples (default 0)")

    cluster = commands.add_parser("cluster", help="k-means over the embeddings -> OUT/clusters.csv")
    cluster.add_argument("out", metavar="OUT")
    _add_cluster_options(cluster, required=True)
    cluster.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")

    query = commands.add_parser("query", help="the k nearest indexed images to each query image")
    query.add_argument("out", metavar="OUT")
    query.add_argument("images", nargs="*", metavar="IMAGE", help="query image files")
    query.add_argument("--like", action="append", default=[], metavar="PATH", help="an already-indexed image (repeatable); itself left out")
    query.add_argument("-k", type=_positive_int, default=10, help="neighbours per query (default 10)")
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    query.add_argument("--weights", help="where to load the index's weights from, if not where the manifest says (sha256 checked)")

    report = commands.add_parser("report", help="write OUT/report/index.html: numbers, clusters, map, failed files")
    report.add_argument("out", metavar="OUT")

    serve = commands.add_parser("serve", help="nearest-image search as an HTTP service (Ray Serve) with a web page")
    serve.add_argument("out", metavar="OUT")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others need --allow-remote)")
    serve.add_argument("--port", type=_positive_int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--replicas", default="1", help="N replicas, or MIN-MAX for Serve autoscaling (default 1)")
    serve.add_argument("--allow-remote", action="store_true", help="permit a --host other machines can reach")
    serve.add_argument("--token-file", help="file holding a bearer token the data endpoints then require")
    serve.add_argument("--weights", help="where to load the index's weights from, if not where the manifest says (sha256 checked)")
    serve.add_argument("--address", help="Ray address to connect to (default: RAY_ADDRESS, else an embedded local Ray)")
    serve.add_argument("--max-upload-bytes", type=_positive_int, default=20 * 1024 * 1024, help="largest upload accepted (default 20 MiB)")
    serve.add_argument("--max-upload-pixels", type=_positive_int, default=50_000_000, help="largest image accepted, width x height (default 50,000,000)")
    serve.add_argument("--max-ongoing-requests", type=_positive_int, default=16, help="requests one replica works on at once (default 16)")
    serve.add_argument("--max-queued-requests", type=_positive_int, default=32, help="requests waiting for a replica before Serve answers 503 (default 32)")

    demo = commands.add_parser("demo", help="run the main job on bundled sample photos and show a query")
    demo.add_argument("--out", default="demo-out", help="output folder (default ./demo-out)")
    demo.add_argument("--data", default="demo-data", help="where the sample images are written (default ./demo-data)")
    demo.add_argument("--clusters", type=_positive_int, default=6, help="k-means clusters (default 6)")
    return parser


def _first_k(clusters: str | None) -> int:
    if clusters is None:
        return 8
    from jobs.cluster import AUTO_CLUSTERS, parse_clusters

    ks = parse_clusters(clusters)
    return (AUTO_CLUSTERS if ks == "auto" else ks)[0]


def config_from_args(args: argparse.Namespace) -> JobConfig:
    """The frozen, validated JobConfig of a `run`/`embed` command line."""
    if os.environ.get(RAY_JOB_ENV):
        relative = [p for p in [*args.inputs, args.out] if not is_uri(p) and not os.path.isabs(os.path.expanduser(p))]
        if relative:
            raise UserError(
                f"{relative[0]} is relative, but inside `ray job submit` the working directory is a temporary copy: "
                "pass absolute paths on shared storage or s3:// URIs"
            )
    weights = args.weights if args.weights in ("imagenet", "random") else absolute(args.weights)
    return JobConfig(
        inputs=tuple(args.inputs),
        out=absolute(args.out),
        weights=weights,
        layer=args.layer,
        metric=args.metric,
        precision=args.precision,
        decode=args.decode,
        batch_size=args.batch_size,
        actors=args.actors,
        num_gpus_per_actor=args.num_gpus_per_actor,
        seed=args.seed,
        # config.json records one k: --keep, or the first of a sweep (the sweep itself is in manifest["clusters"]).
        clusters=getattr(args, "keep", None) or _first_k(getattr(args, "clusters", None)),
        niter=getattr(args, "niter", 20),
        rows_per_shard=args.rows_per_shard,
        address=args.address,
        max_errors=args.max_errors,
    ).validate()


def setup_logging(out: str | None) -> None:
    """Progress to stderr; for local OUT also appended, with timestamps, to OUT/run.log."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("imgindex: %(message)s"))
    log.addHandler(console)
    if out and not is_uri(out):
        os.makedirs(absolute(out), exist_ok=True)
        logfile = logging.FileHandler(os.path.join(absolute(out), "run.log"), encoding="utf-8")
        logfile.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(logfile)


def dispatch(args: argparse.Namespace) -> int:
    """Run one parsed command; returns the exit status."""
    # Each command imports only what it uses: start-up time counts on small jobs.
    if args.command in ("run", "embed"):
        from jobs.embed import embed, print_dry_run

        config = config_from_args(args)
        if args.dry_run:
            return print_dry_run(config)
        setup_logging(config.out)
        if args.command == "run":
            from jobs.run import run

            run(config, index_options=index_options_from_args(args), cluster_options=cluster_options_from_args(args))
        else:
            embed(config)
        return 0
    if args.command == "index":
        from jobs.index import index

        setup_logging(args.out)
        index(args.out, index_options_from_args(args))
        return 0
    if args.command == "cluster":
        from jobs.cluster import cluster

        setup_logging(args.out)
        options = cluster_options_from_args(args)
        cluster(args.out, options.clusters, options.niter, options.seed, options.keep, options.recluster)
        return 0
    if args.command == "query":
        from jobs.query import query

        if not args.images and not args.like:
            raise UserError("query needs at least one IMAGE or --like PATH")
        query(args.out, args.images, args.like, args.k, args.json, args.weights)
        return 0
    if args.command == "report":
        from cluster.search import open_out
        from jobs.report import report

        open_out(args.out)  # before the log file would create the folder
        setup_logging(args.out)
        report(args.out)
        return 0
    if args.command == "serve":
        from jobs.serve import ServeLimits, serve_forever

        setup_logging(None)
        limits = ServeLimits(args.max_upload_bytes, args.max_upload_pixels, args.max_ongoing_requests, args.max_queued_requests)
        serve_forever(args.out, args.host, args.port, args.replicas, args.allow_remote, args.token_file, args.weights,
                      args.address, limits)
        return 0
    from jobs.demo import demo

    setup_logging(None)
    demo(args.out, args.data, args.clusters)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `imgindex`: parse, run, and turn a UserError into one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return dispatch(args)
    except UserError as e:
        print(f"imgindex: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgindex: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def entry(argv: Sequence[str] | None = None) -> NoReturn:
    """Console-script entry (`imgindex`, `python -m jobs.<command>`): run `main`, then exit without interpreter teardown.

    Python's finalisation of torch, pyarrow and Ray's core worker takes about 1.5 s and does nothing for us: every
    output is already closed and moved into place, so Ray is shut down, the streams flushed, and the process ends.
    """
    code = main(argv)
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
