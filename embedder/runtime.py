"""Runtime: connect to a Ray cluster or start one in-process, read what it offers (CPUs, GPUs it can scale to), and keep
Ray's own output (its log records, its workers' output, its C++ core's lines) off the terminal unless --verbose.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

log = logging.getLogger("imgindex")

# Ray's records and Python warnings in OUT/run.log name their logger, so they read apart from imgindex's own lines.
LIBRARY_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _RayOutput:
    """Where this process sends Ray's own output; set for each command by `route_ray_output`."""

    verbose = False
    run_log: str | None = None
    handler: logging.Handler = logging.NullHandler()
    native_stderr_moved = False


def route_ray_output(verbose: bool, run_log: str | None) -> None:
    """From now on show Ray's own output on the terminal only if `verbose`, and copy Ray's log records to `run_log`
    (OUT/run.log of a local OUT; None: Ray's log folder only). Called by jobs.arguments.setup_logging."""
    previous = _RayOutput.handler
    for logger in _ray_loggers():
        logger.removeHandler(previous)
    previous.close()
    _RayOutput.verbose, _RayOutput.run_log = verbose, run_log
    if run_log:
        _RayOutput.handler = logging.FileHandler(run_log, encoding="utf-8")
        _RayOutput.handler.setLevel(logging.INFO)
    else:
        _RayOutput.handler = logging.NullHandler()
    _route_ray_loggers()


def start_ray(address: str | None) -> None:
    """Connect to the cluster at `address` (or RAY_ADDRESS, as inside `ray job submit`), else start Ray in-process.

    The embedded instance listens on loopback only, its metrics exporters included (Ray 2.60 also turns its token
    authentication on, and says so in a warning that goes to run.log). Workers' output reaches this process only with
    --verbose; otherwise it stays in Ray's log folder (session_*/logs).
    """
    import ray

    if ray.is_initialized():
        return
    from embedder.outdir import kill_hook_driver

    target = address or os.environ.get("RAY_ADDRESS")
    started = time.monotonic()
    hook = kill_hook_driver()
    output = {"log_to_driver": _RayOutput.verbose, "logging_level": logging.INFO,
              "runtime_env": {"env_vars": hook} if hook else None}
    _route_ray_loggers()  # before ray.init, which may log
    _move_native_stderr()
    if target:
        ray.init(address=target, **output)
    else:
        with _loopback_node():
            ray.init(include_dashboard=False, **output)
    _route_ray_loggers()
    log.info("ray ready in %.1f s (%s)", time.monotonic() - started, target or "embedded local instance")


def configure_ray_data() -> None:
    """Ray Data for this run: its progress bars on a terminal only, its log records routed like the rest of Ray's."""
    import ray.data

    _route_ray_loggers()  # Ray Data sets up its loggers when it is imported, which may be after start_ray
    ray.data.DataContext.get_current().enable_progress_bars = sys.stderr.isatty()


@contextlib.contextmanager
def _loopback_node():
    """Start Ray's processes on 127.0.0.1: then every server it starts binds to loopback, the Prometheus metrics
    exporters of the dashboard agent, the dashboard and the autoscaler monitor included (they bind to all interfaces
    when the node has a network address).

    Ray replaces a loopback `_node_ip_address` by the machine's address; ENABLE_RAY_CLUSTER is the switch its
    single-machine mode (macOS, Windows) uses to keep the node on loopback. tests/test_quiet.py checks the result.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _ray_loggers() -> list[logging.Logger]:
    """The loggers of Ray's libraries that exist in this process ("ray", "ray.data", "ray.serve", ...)."""
    return [
        logger for name, logger in list(logging.root.manager.loggerDict.items())
        if isinstance(logger, logging.Logger) and (name == "ray" or name.startswith("ray."))
    ]


def _route_ray_loggers() -> None:
    """Ray's loggers ("ray" at import, "ray.data" and "ray.serve" as each library is imported, each with its own
    terminal handler and propagation off): terminal handlers removed unless --verbose; records copied to run.log."""
    _RayOutput.handler.setFormatter(logging.Formatter(LIBRARY_LOG_FORMAT))  # again: ray.init sets its own on "ray"'s
    for logger in _ray_loggers():
        if not _RayOutput.verbose:
            for handler in logger.handlers[:]:
                if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                    logger.removeHandler(handler)
        # A logger that does not propagate gets the handler even without run.log (a NullHandler): with no handler at
        # all, Python's last-resort handler would print its warnings to stderr.
        if not logger.propagate and _RayOutput.handler not in logger.handlers:
            logger.addHandler(_RayOutput.handler)


def _move_native_stderr() -> None:
    """Point file descriptor 2 at run.log (or /dev/null) and give Python's sys.stderr a copy of the terminal's.

    Ray's C++ core in this process writes each of its ERROR lines to its log file in Ray's log folder
    (python-core-driver-*.log) and, straight to descriptor 2, a copy; Python logging cannot reach that copy. The
    known one is harmless: Ray Data's actors get their constructor arguments through the object store while this
    driver holds them (ray-project/ray#53727). Done before ray.init, whose GCS client also writes its retries there.
    Not done with --verbose, or when sys.stderr is not descriptor 2 (a test capturing it).
    """
    if _RayOutput.verbose or _RayOutput.native_stderr_moved:
        return
    try:
        if sys.stderr.fileno() != 2:
            return
    except (AttributeError, OSError, ValueError):
        return
    sys.stderr.flush()
    old = sys.stderr
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=old.encoding, errors=old.errors)
    target = os.open(_RayOutput.run_log or os.devnull, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = terminal
    for logger in [logging.root, *logging.root.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and handler.stream is old:
                handler.setStream(terminal)
    _RayOutput.native_stderr_moved = True


def cluster_gpus() -> float:
    """GPUs the connected cluster has now or can scale to.

    An autoscaling cluster (KubeRay, the cluster launcher) may have no GPU worker up at submit time; sizing from
    `ray.cluster_resources()` alone would then plan CPU replicas. The autoscaler publishes its node groups' maximum
    resources to the GCS, which Ray Data reads the same way to size its own operators.
    """
    import ray

    scalable = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    return max(ray.cluster_resources().get("GPU", 0.0), float(scalable.get("GPU", 0)))


def cluster_cpus() -> float:
    """CPUs the connected cluster has now."""
    import ray

    return ray.cluster_resources().get("CPU", 1.0)
