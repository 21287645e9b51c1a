"""Where the CPU goes in one run of a command and every process it starts (not part of `make test`).

    python bench/cpu_account.py [--interval 0.1] -- imgindex embed DIR --out OUT --weights random --precision bf16
    python bench/cpu_account.py -- python bench/plain_dataloader.py DIR --precision bf16

Polls the command's process tree every --interval seconds and prints, per process, the CPU seconds it used (user +
system, last reading before it exited), when it was first seen, and what it was: Ray sets a worker's process title to
the task or actor it runs (`ray::MapBatches(decode_batch)`, `ray::_StatsActor`, ...), so every title a process had is
listed. On a machine with few cores the sum over processes, against the plain script's, shows how much of a short
job's wall time any parallelism can win back. CPU used in the last interval before a process exits is not counted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

import psutil

# Command-line fragments that name Ray's own processes (their titles are not set per task).
RAY_PROCESSES = ("dashboard/agent.py", "runtime_env/agent", "log_monitor", "monitor.py", "dashboard.py")


@dataclass
class Seen:
    """One process as polled: every name it had, its CPU seconds at the last reading, when it was first seen."""

    first_seen: float
    cpu: float = 0.0
    names: list[str] = field(default_factory=list)


def process_name(process: psutil.Process) -> str:
    """A short name: the Ray task or actor title, Ray's own process kind, or the start of the command line."""
    if process.name() in ("raylet", "gcs_server"):
        return process.name()
    command = " ".join(process.cmdline())
    if command.startswith("ray::"):
        return command.split()[0][:48]
    if "default_worker.py" in command:
        return "ray worker (starting)"
    for fragment in RAY_PROCESSES:
        if fragment in command:
            return fragment
    return os.path.basename(command.split()[0]) + " " + " ".join(os.path.basename(a) for a in command.split()[1:3]) if command else "?"


def account(command: list[str], interval: float) -> tuple[float, int, dict[int, Seen]]:
    """Run `command` to the end, polling its process tree; (wall seconds, exit status, what each process used)."""
    started = time.monotonic()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    root = psutil.Process(child.pid)
    seen: dict[int, Seen] = {}
    while child.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for process in tree:
            try:
                with process.oneshot():
                    times, name = process.cpu_times(), process_name(process)
            except psutil.Error:
                continue
            record = seen.setdefault(process.pid, Seen(time.monotonic() - started))
            record.cpu = times.user + times.system
            if name not in record.names:
                record.names.append(name)
        time.sleep(interval)
    return time.monotonic() - started, child.returncode, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between polls (default 0.1)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command to run, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    wall, code, seen = account(command, args.interval)
    print(f"{' '.join(command)}\nwall {wall:.1f} s, exit status {code}, {os.cpu_count()} CPU cores\n")
    print("| first seen s | CPU s | process (every title it had) |\n|---:|---:|---|")
    for record in sorted(seen.values(), key=lambda r: r.first_seen):
        print(f"| {record.first_seen:.1f} | {record.cpu:.1f} | {' → '.join(record.names)} |")
    total = sum(r.cpu for r in seen.values())
    print(f"\ntotal {total:.1f} CPU s in {wall:.1f} s of wall time ({total / wall:.2f} cores busy on average)")
    sys.exit(code)


if __name__ == "__main__":
    main()
