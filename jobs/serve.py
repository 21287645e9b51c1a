"""`imgindex serve OUT` / `python -m jobs.serve`: run the search service (jobs/service.py) on Ray Serve until Ctrl-C."""

import logging
import math
import os
import re
import signal
import socket
import sys
import threading

from embedder.config import UserError, absolute
from embedder.outdir import INDEX_FILE, MANIFEST, open_out
from jobs.serve_options import ServeOptions, is_loopback

log = logging.getLogger("imgindex")

APP_NAME = "imgindex"


def read_token(token_file: str) -> str:
    """The bearer token in `token_file` (surrounding whitespace removed); a UserError if unreadable, empty, or not one
    word of printable ASCII, which is what an HTTP header can carry."""
    try:
        with open(absolute(token_file), encoding="ascii") as f:
            token = f.read().strip()
    except OSError as e:
        raise UserError(f"--token-file {token_file}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--token-file {token_file}: not a text token (byte 0x{e.object[e.start]:02x} at offset {e.start} "
                        "is not ASCII)") from None
    if not token:
        raise UserError(f"--token-file {token_file}: the file is empty")
    if not all("!" <= c <= "~" for c in token):
        raise UserError(f"--token-file {token_file}: the token must be one word of printable ASCII (no spaces or "
                        "control characters), as it travels in an HTTP header")
    return token


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None



def _start_failure(error: RuntimeError) -> UserError:
    """The replica's own one-line reason (bad weights, unreadable OUT) when its constructor raised a UserError."""
    from ray import serve

    status = serve.status().applications.get(APP_NAME)
    details = "\n".join(d.message for d in status.deployments.values()) if status else ""
    reasons = re.findall(r"UserError: (.+)", details)
    return UserError(reasons[-1] if reasons else f"the search service did not start: {error}")


def serve_forever(out: str, options: ServeOptions) -> None:
    """Run the search service until Ctrl-C (or SIGTERM), then shut Serve down.

    Parameters
    ----------
    out
        A finished output folder (manifest.json, index.faiss; clusters.csv for the cluster endpoints).
    options
        host and port: where Serve's HTTP proxy listens (a non-loopback host needs allow_remote, and a warning is
        printed; use token_file there). replicas: `N`, or `MIN-MAX` for Serve autoscaling; each holds the index and
        one VGG-16 (one GPU each when the cluster has GPUs, else one CPU reserved and the node's cores shared between
        replicas as torch threads). token_file: a bearer token every data endpoint then requires. weights: where to
        load the index's weights from, if not where the manifest says (sha256 checked). address: the Ray cluster to
        run on (default: RAY_ADDRESS, else an embedded local Ray). The limits: upload bytes and pixels, the time a
        request body may take to arrive (body_timeout_s), the memory one replica's decodes may allocate together
        (decode_memory), per-replica concurrency (a quarter of it kept from uploads) and queue length. allow_hosts: Host
        names answered besides loopback ones (on a loopback host, no others are). openapi: serve /openapi.json.
    """
    options = options.validate()
    open_out(out, (MANIFEST, INDEX_FILE))
    if not is_loopback(options.host):
        log.warning("listening on %s: anyone who can reach it can search this collection and see its images%s",
                    options.host, "" if options.token_file else " (no --token-file: no authentication)")
    token = read_token(options.token_file) if options.token_file else None
    if not (options.address or os.environ.get("RAY_ADDRESS")):
        _check_port_free(options.host, options.port)

    from ray import serve

    from embedder.runtime import cluster_cpus, cluster_gpus, start_ray
    from jobs.service import serve_app

    start_ray(options.address)
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    # A request that Serve's proxy refuses itself (503, its queue full) leaves the connection open with the body
    # unread, and uvicorn closes it only when the keep-alive timer fires: so that timer is the body timeout too.
    http = {"host": options.host, "port": options.port, "keep_alive_timeout_s": math.ceil(options.body_timeout_s)}
    serve.start(http_options=http, logging_config=quiet)
    stop = threading.Event()
    try:
        try:
            serve.run(serve_app(out, token, options, cluster_cpus(), cluster_gpus()), name=APP_NAME, route_prefix="/",
                      logging_config=quiet)
        except RuntimeError as e:
            raise _start_failure(e) from None
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        print(f"imgindex: serving {absolute(out)} on http://{options.host}:{options.port}/ (Ctrl-C to stop)",
              file=sys.stderr, flush=True)
        stop.wait()
        log.info("stopping the search service")
    finally:
        serve.shutdown()


def main(args) -> int:
    """`imgindex serve` from its parsed command line."""
    from jobs.arguments import serve_options_from_args, setup_logging

    setup_logging(None, args.verbose)
    serve_forever(args.out, serve_options_from_args(args))
    return 0


if __name__ == "__main__":
    from jobs.arguments import command_entry

    command_entry("serve", main)
