"""Ray processes that tests start on this machine: free ports, a clean environment, cleanup by pid; and a fresh copy
of the checkout to submit or package.

Every process a test cluster starts (head, raylets, workers, job drivers) inherits a marker variable from the
environment built here, so the test can find and end exactly those pids afterwards, whatever process group or parent
Ray gave them — never `ray stop`, which would end every Ray on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

MARKER_ENV = "IMGINDEX_TEST_CLUSTER"
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = os.path.dirname(sys.executable)
# Variables a cluster under test must not inherit from the pytest process: the worktree on PYTHONPATH (the job must
# run the code it was shipped), the session's replica report folder, and any auth settings (each test sets its own).
NOT_INHERITED = ("PYTHONPATH", "IMGINDEX_REPLICA_REPORT_DIR", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on every address right now.

    Bound on all interfaces, not 127.0.0.1 alone: Ray's agents listen on the node's IP, and a port another Ray
    instance holds there is still free on 127.0.0.1 (a head given one had its runtime-env agent fail to bind, and
    its raylet then talked to the other instance's agent, which refused its token)."""
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def cluster_env(**extra: str) -> tuple[dict[str, str], str]:
    """(environment, marker) for processes of a test cluster: this venv's bin first on PATH, a fresh marker."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""), RAY_USAGE_STATS_ENABLED="0", **extra)
    env[MARKER_ENV] = marker
    return env, marker


def marked_pids(marker: str) -> list[int]:
    """Pids of the live processes whose environment carries `marker`."""
    needle = f"{MARKER_ENV}={marker}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    pids.append(int(entry))
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def kill_marked(marker: str, grace_seconds: float = 3.0) -> None:
    """SIGTERM every process carrying `marker`, then SIGKILL whatever is left after `grace_seconds`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in marked_pids(marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + grace_seconds
        while marked_pids(marker) and time.monotonic() < deadline:
            time.sleep(0.2)
    left = marked_pids(marker)
    assert not left, f"test cluster processes still alive: {left}"


def copy_checkout(dest: Path) -> Path:
    """Copy the repository's files into `dest` as a fresh clone of this change has them: tracked and new, not ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest
