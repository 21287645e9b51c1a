"""Quiet runs: a job prints imgindex's own lines only, Ray's output goes to OUT/run.log (or the terminal with --verbose),
an error is still one line; the embedded Ray listens on loopback only, its metrics exporters included."""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
import sys
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    """The environment of a job of its own: this checkout importable, no cluster to connect to."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    return env


def _listening(process: psutil.Process) -> set[tuple[str, str, int]]:
    """(process name, address, port) of each listening TCP socket of `process` and every process it started."""
    found = set()
    try:
        tree = [process, *process.children(recursive=True)]
    except psutil.Error:
        return found
    for member in tree:
        try:
            name = member.name()
            connections = member.net_connections(kind="inet")
        except psutil.Error:  # exited meanwhile
            continue
        found.update((name, c.laddr.ip, c.laddr.port) for c in connections if c.status == psutil.CONN_LISTEN)
    return found


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_loopback


def test_a_run_prints_only_imgindex_lines_and_its_ray_listens_on_loopback_only(input_dir, tmp_path):
    """`python -m jobs.run` with its own embedded Ray: stderr holds imgindex's lines only, Ray's records are in run.log,
    and no process of that Ray instance (the dashboard agent's, the dashboard's and the autoscaler's Prometheus
    exporters among them) listens on anything but loopback while the job runs."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "jobs.run", input_dir, "--out", str(out), "--weights", "random", "--clusters", "2"]
    listening: set[tuple[str, str, int]] = set()
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        process = psutil.Popen(command, stdout=stdout, stderr=stderr, env=_env(), cwd=REPO)
        try:
            while process.poll() is None:
                listening |= _listening(process)
                time.sleep(1.0)
        finally:
            if process.poll() is None:
                process.kill()
    err = (tmp_path / "stderr").read_text()
    assert process.returncode == 0, err[-3000:]

    assert [line for line in err.splitlines() if line and not line.startswith("imgindex: ")] == [], err
    assert "imgindex: done: " in err
    run_log = (out / "run.log").read_text()
    assert re.search(r"^\S+ \S+ (INFO|WARNING) ray\.data[\w.]*: ", run_log, re.M), run_log[-3000:]

    assert any("DashboardAgent" in name for name, _, _ in listening), listening  # the agent hosts the exporter
    assert [entry for entry in listening if not _is_loopback(entry[1])] == [], listening


def test_verbose_shows_rays_output_and_an_error_is_still_one_line(input_dir, tmp_path):
    """--verbose: Ray Data's own lines reach stderr; a job stopped by --max-errors still ends in one error line."""
    command = [sys.executable, "-m", "jobs.embed", input_dir, "--out", str(tmp_path / "out"), "--weights", "random",
               "--max-errors", "0", "--verbose"]
    done = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=500)
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("imgindex: error: ")]
    assert len(errors) == 1 and "--max-errors 0" in errors[0] and "Traceback" not in done.stderr, done.stderr
    theirs = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("imgindex: ")]
    assert any("Dataset" in line for line in theirs), done.stderr


NATIVE_STDERR = """
import logging, os, sys
from jobs.arguments import setup_logging
from embedder import runtime
setup_logging(sys.argv[1], False)
runtime._move_native_stderr()
logging.getLogger("imgindex").info("a line of ours")
print("imgindex: error: printed", file=sys.stderr, flush=True)
os.write(2, b"[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:1: a line of Ray's C++ core\\n")
"""


def test_what_is_written_to_descriptor_2_goes_to_run_log_and_pythons_stderr_stays_on_the_terminal(tmp_path):
    """The C++ core's copy of its ERROR lines goes to run.log; imgindex's logged and printed lines still reach stderr."""
    done = subprocess.run([sys.executable, "-c", NATIVE_STDERR, str(tmp_path)], capture_output=True, text=True,
                          env=_env(), cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == ["imgindex: a line of ours", "imgindex: error: printed"]
    run_log = (tmp_path / "run.log").read_text()
    assert "a line of ours" in run_log and "a line of Ray's C++ core" in run_log
