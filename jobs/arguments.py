"""The command line: one parser for every entry point, each option's default and choices read from its step's options
object, and the one process exit every entry point shares (a UserError is one line and exit status 2).

`imgindex` (jobs/cli.py) and `python -m jobs.<command>` (each command module) both parse with `build_parser`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from cluster.options import DISTRIBUTE_MIN_VECTORS, INDEX_CHOICES, KEEP_RULES, ClusterOptions, DuplicateOptions, IndexOptions, RayOptions, parse_clusters, parse_keep_rule, parse_threshold
from embedder.config import DECODES, LAYERS, METRICS, PRECISIONS, JobConfig, UserError, absolute, is_uri
from jobs.serve_options import ServeOptions

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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _add_embed_options(p: argparse.ArgumentParser) -> None:
    d = JobConfig
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="directory (recursive), glob, or .txt/.csv/.parquet list of paths")
    p.add_argument("--out", required=True, help="output folder (local path or s3://... URI)")
    p.add_argument("--weights", default=d.weights, help="imagenet (torchvision ImageNet weights), random (seeded) or PATH of a VGG-16 state dict (default %(default)s)")
    p.add_argument("--layer", default=d.layer, choices=LAYERS, help="fc6 = output of classifier[0], the first Linear, before its ReLU (default); fc7 = output of classifier[4], the ReLU after the second Linear")
    p.add_argument("--metric", default=d.metric, choices=METRICS, help="distance the index and k-means use (default %(default)s)")
    p.add_argument("--precision", default=d.precision, choices=PRECISIONS, help="auto = bf16 where the hardware runs it natively, fp16 on older tensor-core GPUs, else fp32 (default %(default)s)")
    p.add_argument("--decode", default=d.decode, choices=DECODES, help="cpu: Pillow in Ray CPU tasks; gpu: nvJPEG on the model replicas' GPUs, CPU fallback per image (default %(default)s)")
    p.add_argument("--batch-size", type=_positive_int, default=d.batch_size, help="images per model batch (default: sized from the replicas' device)")
    p.add_argument("--actors", type=_positive_int, default=d.actors, help="model replicas (default: one per GPU, autoscaling; CPU: one per 8 cores)")
    p.add_argument("--num-gpus-per-actor", type=float, default=d.num_gpus_per_actor, help="GPUs per replica, e.g. 0.5 for two per GPU; 0 forces CPU (default 1 if the cluster has GPUs)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of random weights, k-means and the index's samples (default %(default)s)")
    p.add_argument("--rows-per-shard", type=_positive_int, default=d.rows_per_shard, help="rows per Parquet shard (default %(default)s)")
    p.add_argument("--max-errors", default=d.max_errors, metavar="N|P%", help="fail (outputs kept) when more than N files, or P%% of the listed files, cannot be embedded (default: no limit)")
    p.add_argument("--address", default=d.address, help="Ray address to connect to (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--follow-links", action="store_true", default=d.follow_links, help="walk into directory symlinks of the input folders, each real folder once (default: not followed, as find does)")
    p.add_argument("--dry-run", action="store_true", help="count inputs, estimate disk and time, and stop")


def _add_cluster_options(p: argparse.ArgumentParser) -> None:
    d = ClusterOptions
    p.add_argument("--clusters", required=True, help="k-means clusters: K, a sweep 5,10,20 or 5:50:5 (STOP included), or auto (= 5:50:5, best silhouette kept)")
    p.add_argument("--keep", type=_positive_int, default=d.keep, help="with a sweep: the k whose assignments are kept (default: best silhouette)")
    p.add_argument("--niter", type=_positive_int, default=d.niter, help="k-means iterations on the training sample (default %(default)s)")
    p.add_argument("--recluster", action="store_true", help="train k-means again instead of assigning new images to the existing centroids")


def _add_index_options(p: argparse.ArgumentParser) -> None:
    d = IndexOptions
    p.add_argument("--index", default=d.index, help=f"{', '.join(INDEX_CHOICES)}, or a faiss.index_factory string such as IVF4096,PQ32,RFlat (default %(default)s)")
    p.add_argument("--max-memory", default=d.max_memory, help="RAM budget of the index, e.g. 4G or 512M (default %(default)s)")
    p.add_argument("--pca", type=_positive_int, default=d.pca, help="reduce the vectors to DIM dimensions by PCA before indexing")
    p.add_argument("--whiten", action="store_true", help="with --pca: whiten (scale each component to unit variance)")
    p.add_argument("--target-recall", type=float, default=d.target_recall, help="10-recall@10 the tuned search parameters must reach (default %(default)s)")


def _add_ray_options(p: argparse.ArgumentParser, address: bool = True) -> None:
    """--tasks (and --address, which `run` already has from the embed options) of index, cluster and run."""
    d = RayOptions
    p.add_argument("--tasks", type=_positive_int, default=d.tasks, metavar="N", help=f"run the index and k-means passes as N Ray tasks over groups of shards, also on the embedded local Ray; 1: in this process (default: one task per CPU on a Ray cluster with more than {DISTRIBUTE_MIN_VECTORS:,} vectors, else this process)")
    if address:
        p.add_argument("--address", default=d.address, help="Ray address to connect to (default: RAY_ADDRESS, else an embedded local Ray)")


def _add_duplicate_options(p: argparse.ArgumentParser) -> None:
    d = DuplicateOptions
    p.add_argument("--threshold", default=d.threshold, metavar="auto|D", help="largest distance (1 - cosine, or Euclidean) between an image and its group's keeper; auto = calibrated on near-copies of a sample (default %(default)s)")
    p.add_argument("--keep-rule", default=",".join(d.keep_rule), help=f"tie-breakers that choose each group's keeper, in order, from {','.join(KEEP_RULES)}; then the path (default %(default)s)")
    p.add_argument("--measure", action="store_true", help="with --threshold D: calibrate on near-copies too and record D's precision and recall")
    p.add_argument("--outlier-k", type=_positive_int, default=d.outlier_k, help="outliers.csv ranks images by the distance to their k-th nearest other image (default %(default)s)")
    p.add_argument("--sample", type=_positive_int, default=d.sample, help="images whose near-copies calibrate auto and --measure (default %(default)s)")


def _add_serve_options(p: argparse.ArgumentParser) -> None:
    d = ServeOptions
    p.add_argument("out", metavar="OUT")
    p.add_argument("--host", default=d.host, help="address to listen on (default %(default)s; others need --allow-remote)")
    p.add_argument("--port", type=_positive_int, default=d.port, help="HTTP port (default %(default)s)")
    p.add_argument("--replicas", default=d.replicas, help="N replicas, or MIN-MAX for Serve autoscaling (default %(default)s)")
    p.add_argument("--allow-remote", action="store_true", help="permit a --host other machines can reach")
    p.add_argument("--token-file", default=d.token_file, help="file holding a bearer token the data endpoints then require")
    p.add_argument("--weights", default=d.weights, help="where to load the index's weights from, if not where the manifest says (sha256 checked)")
    p.add_argument("--address", default=d.address, help="Ray address to connect to (default: RAY_ADDRESS, else an embedded local Ray)")
    p.add_argument("--max-upload-bytes", type=_positive_int, default=d.max_upload_bytes, help="largest upload accepted, in bytes (default %(default)s)")
    p.add_argument("--max-upload-pixels", type=_positive_int, default=d.max_upload_pixels, help="largest image accepted, width x height (default %(default)s)")
    p.add_argument("--max-ongoing-requests", type=_positive_int, default=d.max_ongoing_requests, help="requests one replica works on at once (default %(default)s)")
    p.add_argument("--max-queued-requests", type=_positive_int, default=d.max_queued_requests, help="requests waiting for a replica before Serve answers 503 (default %(default)s)")
    p.add_argument("--body-timeout-s", type=_positive_seconds, default=d.body_timeout_s, metavar="SECONDS", help="time a request body may take to arrive, from when a replica takes the request; slower ones get 408 and the connection is closed (default %(default)s)")
    p.add_argument("--decode-memory", default=d.decode_memory, metavar="SIZE", help="memory the image decodes of one replica may allocate together, e.g. 2G or 512M; decodes wait for their share, images that need more get 413 (default %(default)s)")
    p.add_argument("--allow-host", action="append", default=list(d.allow_hosts), metavar="NAME", help="also answer requests whose Host header names NAME (repeatable); on a loopback --host only loopback names are answered otherwise")
    p.add_argument("--openapi", action="store_true", default=d.openapi, help="serve the OpenAPI schema at /openapi.json (behind the token, if any)")


def build_parser() -> argparse.ArgumentParser:
    """The parser of `imgindex` and of `python -m jobs.<command>`."""
    parser = argparse.ArgumentParser(prog="imgindex", description="Cluster and search images by VGG-16 features, FAISS and Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="embed, index and cluster in one go (the main job)")
    _add_embed_options(run)
    _add_cluster_options(run)
    _add_index_options(run)
    _add_ray_options(run, address=False)
    run.add_argument("--duplicates", action="store_true", help="also write OUT/duplicates.csv and OUT/outliers.csv (the duplicates step)")
    _add_duplicate_options(run)

    embed = commands.add_parser("embed", help="embed images into OUT/embeddings/*.parquet")
    _add_embed_options(embed)

    index = commands.add_parser("index", help="build OUT/index.faiss from the embeddings")
    index.add_argument("out", metavar="OUT")
    _add_index_options(index)
    index.add_argument("--seed", type=int, default=IndexOptions.seed, help="seed of the training and query samples (default %(default)s)")
    _add_ray_options(index)

    cluster = commands.add_parser("cluster", help="k-means over the embeddings -> OUT/clusters.csv")
    cluster.add_argument("out", metavar="OUT")
    _add_cluster_options(cluster)
    cluster.add_argument("--seed", type=int, default=ClusterOptions.seed, help="k-means seed (default %(default)s)")
    _add_ray_options(cluster)

    duplicates = commands.add_parser("duplicates", help="near-duplicate groups -> OUT/duplicates.csv, outliers -> OUT/outliers.csv")
    duplicates.add_argument("out", metavar="OUT")
    _add_duplicate_options(duplicates)
    duplicates.add_argument("--weights", help="where the calibration loads the collection's weights from, if not where the manifest says (sha256 checked)")
    duplicates.add_argument("--seed", type=int, default=DuplicateOptions.seed, help="seed of the calibration's sample and copies (default %(default)s)")
    duplicates.add_argument("--address", default=DuplicateOptions.address,
                            help="Ray cluster whose model replicas embed the calibration's near-copies (default: RAY_ADDRESS, else this process)")

    query = commands.add_parser("query", help="the k nearest indexed images to each query image")
    query.add_argument("out", metavar="OUT")
    query.add_argument("images", nargs="*", metavar="IMAGE", help="query image files")
    query.add_argument("--like", action="append", default=[], metavar="PATH", help="an already-indexed image (repeatable); itself left out")
    query.add_argument("-k", type=_positive_int, default=10, help="neighbours per query (default %(default)s)")
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    query.add_argument("--weights", help="where to load the index's weights from, if not where the manifest says (sha256 checked)")

    report = commands.add_parser("report", help="write OUT/report/index.html: numbers, clusters, map, failed files")
    report.add_argument("out", metavar="OUT")

    serve = commands.add_parser("serve", help="nearest-image search as an HTTP service (Ray Serve) with a web page")
    _add_serve_options(serve)

    demo = commands.add_parser("demo", help="run the main job on bundled sample photos and show a query")
    demo.add_argument("--out", default="demo-out", help="output folder (default ./%(default)s)")
    demo.add_argument("--data", default="demo-data", help="where the sample images are written (default ./%(default)s)")
    demo.add_argument("--clusters", type=_positive_int, default=6, help="k-means clusters (default %(default)s)")
    for command in commands.choices.values():
        command.add_argument("--verbose", action="store_true", help="also show Ray's own output (its log lines, its workers' output, its C++ core's lines) and Python warnings")
    return parser


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
    return _options(JobConfig, args, inputs=tuple(args.inputs), out=absolute(args.out), weights=weights).validate()


def ray_options_from_args(args: argparse.Namespace) -> RayOptions:
    """The RayOptions of an `index`/`cluster`/`run` command line."""
    return RayOptions(args.tasks, args.address)


def index_options_from_args(args: argparse.Namespace) -> IndexOptions:
    """The validated IndexOptions of an `index`/`run` command line."""
    return IndexOptions(args.index, args.max_memory, args.pca, args.whiten, args.target_recall, args.seed, ray_options_from_args(args)).validate()


def cluster_options_from_args(args: argparse.Namespace) -> ClusterOptions:
    """The validated ClusterOptions of a `cluster`/`run` command line."""
    return ClusterOptions(parse_clusters(args.clusters), args.keep, args.niter, args.seed, args.recluster, ray_options_from_args(args)).validate()


def duplicate_options_from_args(args: argparse.Namespace) -> DuplicateOptions:
    """The DuplicateOptions of a `duplicates`/`run` command line (`run` calibrates with the weights it embeds with)."""
    weights = args.weights if args.command == "duplicates" else None
    return _options(DuplicateOptions, args, threshold=parse_threshold(args.threshold), keep_rule=parse_keep_rule(args.keep_rule),
                    weights=weights).validate(getattr(args, "metric", None))


def serve_options_from_args(args: argparse.Namespace) -> ServeOptions:
    """The validated ServeOptions of a `serve` command line."""
    allow_hosts = tuple(name.lower().rstrip(".") for name in args.allow_host)
    return _options(ServeOptions, args, allow_hosts=allow_hosts).validate()


def _options(cls, args: argparse.Namespace, **resolved):
    """An options object of `cls` from the parsed command line: each field from the argument of the same name (the
    parser took its default from `cls`), or from `resolved` where the command line's value needed resolving."""
    return cls(**{f.name: resolved[f.name] if f.name in resolved else getattr(args, f.name) for f in dataclasses.fields(cls)
                  if f.name in resolved or hasattr(args, f.name)})


def setup_logging(out: str | None, verbose: bool) -> None:
    """imgindex's lines to stderr; for local OUT also appended, with timestamps, to OUT/run.log.

    Python warnings (Pillow's about odd files, for one) and Ray's own output go to OUT/run.log, and to the terminal
    only if `verbose` (Ray's: see embedder.runtime.route_ray_output).
    """
    from embedder.runtime import LIBRARY_LOG_FORMAT, route_ray_output

    run_log, logfile = None, []
    if out and not is_uri(out):
        from embedder.outdir import RUN_LOG

        folder = absolute(out)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise UserError(f"--out {out} is a file; OUT must be a folder (new, or one an earlier run wrote)")
        run_log = os.path.join(folder, RUN_LOG)
        try:
            os.makedirs(folder, exist_ok=True)
            logfile = _appending(run_log, "%(asctime)s %(levelname)s %(message)s")
        except OSError as e:  # a read-only or foreign folder, a file on the way: the user picks another OUT
            raise UserError(f"--out {out}: cannot write {RUN_LOG} there ({e.strerror or e}); choose a folder you can write to") from None
    log.setLevel(logging.INFO)
    _set_handlers(log, [_console("imgindex: %(message)s"), *logfile])
    logging.captureWarnings(True)
    shown = [_console("%(message)s")] if verbose else []
    _set_handlers(logging.getLogger("py.warnings"), [*shown, *_appending(run_log, LIBRARY_LOG_FORMAT)])
    route_ray_output(verbose, run_log)


def _console(fmt: str) -> logging.Handler:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    return handler


def _appending(path: str | None, fmt: str) -> list[logging.Handler]:
    """A handler appending to the file `path`; none without a path."""
    if not path:
        return []
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(fmt))
    return [handler]


def _set_handlers(logger: logging.Logger, handlers: list[logging.Handler]) -> None:
    """Replace `logger`'s handlers, closing the old ones; with none, a NullHandler keeps Python's last resort quiet."""
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in handlers or [logging.NullHandler()]:
        logger.addHandler(handler)


def log_into(out: str, verbose: bool) -> None:
    """For a command that reads an existing OUT: check it is there (before the log file would create the folder),
    then log as `setup_logging` does."""
    from embedder.outdir import open_out

    open_out(out)
    setup_logging(out, verbose)


def run_main(argv: Sequence[str] | None, dispatch: Callable[[argparse.Namespace], int]) -> int:
    """Parse `argv`, run `dispatch` on it, and turn a UserError into one line on stderr and exit status 2."""
    from embedder.outdir import kill_hook_driver

    args = build_parser().parse_args(argv)
    kill_hook_driver()
    try:
        return dispatch(args)
    except UserError as e:
        print(f"imgindex: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("imgindex: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


def exit_process(code: int) -> NoReturn:
    """End the process with `code` without interpreter teardown.

    Python's finalisation of torch, pyarrow and Ray's core worker takes about a second and does nothing for us: every
    output is already closed and moved into place, so Ray is shut down, the streams flushed, and the process ends.
    """
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def command_entry(command: str, dispatch: Callable[[argparse.Namespace], int]) -> NoReturn:
    """`python -m jobs.<command> ARGS`: the same parser and exit as `imgindex <command> ARGS`."""
    exit_process(run_main([command, *sys.argv[1:]], dispatch))
