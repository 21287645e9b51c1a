"""Load test of `imgindex serve`: C concurrent clients for S seconds each on search-by-path, then search-by-upload.

    python bench/serve.py --out demo-out                 # an existing OUT (e.g. after `make demo`)
    python bench/serve.py --out /tmp/bench-out --images 200   # builds that OUT first (random weights) if missing

Starts `imgindex serve OUT` on 127.0.0.1 in a subprocess, measures the model's single-image rate in this process
(one image per call, pixels already decoded, the server idle), then runs the two load phases with a client timeout
and prints requests/s, p50/p99 latency, errors and timeouts per phase, and the upload rate / single-image rate.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cluster.search import Index  # noqa: E402
from embedder.reader import load_pixels  # noqa: E402


def build_out(out: str, images: int) -> None:
    """An OUT over `images` sample photos with seeded random weights (no network)."""
    from cluster.options import ClusterOptions
    from embedder.config import JobConfig
    from jobs.demo import sample_photos
    from jobs.run import run

    photos = out + "-photos"
    sample_photos(photos, images)
    run(JobConfig(inputs=(photos,), out=out, weights="random").validate(), ClusterOptions((12,)))
    import ray

    ray.shutdown()  # the service starts its own Ray; this one would only hold memory and processes


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(out: str, port: int, log_path: str) -> subprocess.Popen:
    """`python -m jobs.serve OUT --port PORT` in its own process group; returns once /healthz answers."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    log = open(log_path, "wb")
    process = subprocess.Popen([sys.executable, "-m", "jobs.serve", out, "--port", str(port)], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                return process
        except (requests.ConnectionError, requests.Timeout):
            time.sleep(0.5)
    stop_service(process)
    raise SystemExit(f"the service did not start; see {log_path}")


def stop_service(process: subprocess.Popen) -> None:
    """SIGINT (what Ctrl-C sends), then SIGKILL to its process group if it has not exited within 60 s."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def single_image_rate(index: Index, path: str, seconds: float) -> float:
    """Images/s of the model called on one image at a time (pixels decoded beforehand), after one warm-up call."""
    embedder = index.embedder()
    pixels = load_pixels(path)[None]
    embedder(pixels)
    count, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        embedder(pixels)
        count += 1
    return count / (time.monotonic() - started)


def load_phase(clients: int, seconds: float, timeout: float, send) -> dict:
    """`clients` threads calling `send(session, i)` back to back for `seconds`; latency of each successful call."""
    latencies: list[float] = []
    errors: list[str] = []
    timeouts = [0]
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(worker: int) -> None:
        session = requests.Session()
        i = worker
        while time.monotonic() < stop_at:
            started = time.monotonic()
            try:
                answer = send(session, i, timeout)
                ok = answer.status_code == 200
                reason = f"HTTP {answer.status_code}"
            except requests.Timeout:
                ok, reason = False, "timeout"
            except requests.ConnectionError as e:
                ok, reason = False, f"connection: {e}"
            elapsed = time.monotonic() - started
            with lock:
                if ok:
                    latencies.append(elapsed)
                elif reason == "timeout":
                    timeouts[0] += 1
                else:
                    errors.append(reason)
            i += clients

    began = time.monotonic()
    threads = [threading.Thread(target=client, args=(w,)) for w in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - began
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "requests": len(latencies), "requests_per_s": round(len(latencies) / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1), "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "errors": len(errors), "timeouts": timeouts[0], "error_kinds": sorted(set(errors))[:5],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(ROOT, "demo-out"), help="OUT to serve (default ./demo-out)")
    parser.add_argument("--images", type=int, default=200, help="images of the OUT built when --out does not exist")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each load phase")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout per request")
    parser.add_argument("-k", type=int, default=10)
    args = parser.parse_args()
    out = os.path.abspath(args.out)
    if not os.path.exists(os.path.join(out, "index.faiss")):
        build_out(out, args.images)

    index = Index.load(out)
    paths = sorted(index.paths.values())
    uploads = [open(p, "rb").read() for p in paths[:50]]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    service = start_service(out, port, os.path.join(out, "bench-serve.log"))
    startup_s = time.monotonic() - started
    try:
        model_rate = single_image_rate(index, paths[0], seconds=15)
        by_path = load_phase(args.clients, args.seconds, args.timeout, lambda s, i, t: s.get(
            f"{url}/search", params={"path": paths[i % len(paths)], "k": args.k}, timeout=t))
        by_upload = load_phase(args.clients, args.seconds, args.timeout, lambda s, i, t: s.post(
            f"{url}/search", params={"k": args.k}, files={"file": ("q.jpg", uploads[i % len(uploads)])}, timeout=t))
    finally:
        stop_service(service)
    result = {
        "images_indexed": len(paths), "clients": args.clients, "seconds_per_phase": args.seconds,
        "service_startup_s": round(startup_s, 1), "model_single_image_per_s": round(model_rate, 2),
        "search_by_path": by_path, "search_by_upload": by_upload,
        "upload_rate_over_single_image_rate": round(by_upload["requests_per_s"] / model_rate, 2),
        "cpus": os.cpu_count(), "load_average_after": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(result, indent=2))
    print("\n| phase | requests/s | p50 ms | p99 ms | errors | timeouts |\n|---|---:|---:|---:|---:|---:|")
    for name, phase in (("search by path", by_path), ("search by upload", by_upload)):
        print(f"| {name} | {phase['requests_per_s']} | {phase['p50_ms']} | {phase['p99_ms']} | {phase['errors']} | {phase['timeouts']} |")
    print(f"\nmodel alone, one image per call: {model_rate:.2f} images/s; "
          f"upload throughput / that = {result['upload_rate_over_single_image_rate']}")


if __name__ == "__main__":
    main()
