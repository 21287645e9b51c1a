"""What the job costs around the model: the real embed step with STAND-INS for the model and the decoder only.

    python bench/throughput.py [--sizes 50000,150000] [--data bench-data] [--tiny-shards 10000]

Everything is the real `imgindex embed` step (listing real files, the Ray Data graph, decode tasks, the model actor
stage, the shard-writing tasks, the driver's commits, errors.csv, the manifest) except two STAND-INS, patched in by
this script through `embedder.pipeline.stages` and reachable from nowhere else: a decoder that returns full-size
224x224x3 pixels without reading the file (so the bytes that travel are the real ones), and a model that returns
distinct uniform random vectors per row (which do not compress). The listed files are empty files named like images.

Each size runs in a fresh process with its own embedded Ray (2 CPUs); every process of it is polled for its CPU
seconds (user + system, all threads, from the OS) and peak RSS. The figures are marginal: (size B - size A) per
100,000 images, so that start-up (Ray, the weights, the actor) is left out:
- images/s, the driver's CPU seconds and the busiest single worker's, and the peak RSS of each;
- with --tiny-shards N: a run with one row per shard, and the bytes written to commit shard 1, 10 and N.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

STAND_IN = "STAND-IN"


def stand_in_decode(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """STAND-IN decoder: full-size model pixels for every row, no file read, no error."""
    n = len(batch["id"])
    return batch | {"pixels": np.zeros((n, 224, 224, 3), dtype=np.uint8), "error": np.full(n, "", dtype=object)}


class StandInModel:
    """STAND-IN model replica: distinct uniform random vectors per row, at no model cost."""

    def __init__(self, config, weights, weights_sha256: str, threads: int, batch_size: int):
        self.dimension = 4096

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        rng = np.random.default_rng(int(batch["id"][0]) & 0xFFFFFFFF)
        passed = {k: v for k, v in batch.items() if k != "pixels"}
        return passed | {"embedding": rng.random((n, self.dimension), dtype=np.float32),
                         "precision": np.full(n, STAND_IN.lower(), dtype=object)}


def empty_images(folder: str, count: int) -> str:
    """`count` empty files named like JPEGs (in subfolders of 10,000), reused when complete."""
    done = os.path.join(folder, f".complete-{count}")
    if os.path.exists(done):
        return folder
    for i in range(count):
        sub = os.path.join(folder, f"{i // 10000:03d}")
        if i % 10000 == 0:
            os.makedirs(sub, exist_ok=True)
        open(os.path.join(sub, f"img-{i:08d}.jpg"), "wb").close()
    open(done, "w").close()
    return folder


class Poller:
    """Every process of `root`'s tree (not `root` itself), polled from outside it: last CPU seconds (user + system,
    all threads) and peak RSS per pid, and the titles each had (Ray titles a worker by its task or actor)."""

    def __init__(self, root: int, interval: float = 0.5):
        self.root = psutil.Process(root)
        self.interval = interval
        self.seen: dict[int, dict] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.poll()
            time.sleep(self.interval)

    def poll(self) -> None:
        try:
            tree = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for process in tree:
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    rss = process.memory_info().rss
                    command = " ".join(process.cmdline())
                    name = process.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            entry = self.seen.setdefault(process.pid, {"cpu": 0.0, "rss": 0, "names": set()})
            entry["cpu"] = max(entry["cpu"], times.user + times.system)
            entry["rss"] = max(entry["rss"], rss)
            entry["names"].add(name if name in ("raylet", "gcs_server") else command.split()[0][:60] if command else "?")

    def finish(self) -> dict[int, dict]:
        self.stop.set()
        self.thread.join()
        return self.seen


class ThreadClock:
    """The CPU seconds of each of this process's threads, by Python thread name, read from /proc every few seconds
    (a thread that ends keeps its last reading): where the driver's CPU goes."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self.cpu: dict[str, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="bench-thread-clock")
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.read()
            self.stop.wait(self.interval)

    def read(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        ticks = os.sysconf("SC_CLK_TCK")
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            name = names.get(int(tid), f"native-{tid}")
            key = f"{name}#{tid}"
            self.cpu[key] = max(self.cpu.get(key, 0.0), (int(fields[11]) + int(fields[12])) / ticks)

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.thread.join()
        self.read()
        merged: dict[str, float] = {}
        for key, seconds in self.cpu.items():
            name = key.rsplit("#", 1)[0].split("-dataset_")[0].rstrip("_0123456789")
            merged[name] = merged.get(name, 0.0) + seconds
        return {name: round(seconds, 2) for name, seconds in sorted(merged.items(), key=lambda kv: -kv[1])}


def child(args: argparse.Namespace) -> None:
    """One embed run with the stand-ins, in this process; prints its accounting as JSON."""
    import ray

    from embedder import pipeline, writer
    from embedder.config import JobConfig

    pipeline.stages = lambda decode: (stand_in_decode, StandInModel, writer.write_shards)
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    clock = ThreadClock()
    config = JobConfig(inputs=(args.photos,), out=args.out, weights="random", rows_per_shard=args.rows_per_shard).validate()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    summary = pipeline.embed(config)
    seconds = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "images": summary.embedded, "seconds": seconds,
        "driver_cpu": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "driver_rss": after.ru_maxrss * 1024, "driver_threads": clock.finish(),
    }), flush=True)
    # The parent reads the workers' last CPU figures while they are still alive.
    sys.stdin.readline()
    ray.shutdown()


def run_size(photos: str, out: str, rows_per_shard: int) -> dict:
    """A child run over `photos`, its process tree polled from here; the child's JSON line plus the workers' figures."""
    command = [sys.executable, __file__, "--child", "--photos", photos, "--out", out, "--rows-per-shard", str(rows_per_shard)]
    child_process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT, env=os.environ | {"PYTHONPATH": ROOT})
    poller = Poller(child_process.pid)
    line = child_process.stdout.readline()
    poller.poll()
    processes = poller.finish()
    _, errors = child_process.communicate("done\n", timeout=120)
    if not line.strip():
        sys.exit(f"child run failed:\n{errors[-3000:]}")
    result = json.loads(line)
    workers = {pid: p for pid, p in processes.items() if any(n.startswith("ray::") for n in p["names"])}
    busiest = max(workers.values(), key=lambda p: p["cpu"])
    return result | {
        "busiest_worker_cpu": busiest["cpu"], "busiest_worker": sorted(busiest["names"]),
        "busiest_worker_rss": max(p["rss"] for p in workers.values()),
        "ray_own_cpu": sum(p["cpu"] for pid, p in processes.items() if pid not in workers), "workers": len(workers),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50000,150000")
    parser.add_argument("--data", default="bench-data")
    parser.add_argument("--rows-per-shard", type=int, default=4096)
    parser.add_argument("--tiny-shards", type=int, default=0, help="also a run of N images with one row per shard")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--photos", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    import shutil

    sizes = [int(s) for s in args.sizes.split(",")]
    results = {}
    for size in sizes:
        photos = empty_images(os.path.join(os.path.abspath(args.data), f"throughput-{size}"), size)
        out = os.path.join(os.path.abspath(args.data), f"throughput-out-{size}")
        shutil.rmtree(out, ignore_errors=True)
        results[size] = run_size(photos, out, args.rows_per_shard)
        shutil.rmtree(out, ignore_errors=True)
        print(f"{size} images ({STAND_IN} model and decoder): {json.dumps(results[size])}", flush=True)
    a, b = sizes[0], sizes[-1]
    per = 100_000 / (b - a)
    ra, rb = results[a], results[b]
    print(f"\n## Marginal cost per 100,000 images ({STAND_IN} model and decoder; sizes {a:,} and {b:,})\n")
    print("| figure | value |\n|---|---:|")
    print(f"| images/s (marginal) | {(b - a) / (rb['seconds'] - ra['seconds']):,.0f} |")
    print(f"| driver CPU s per 100,000 images | {(rb['driver_cpu'] - ra['driver_cpu']) * per:.1f} |")
    print(f"| busiest worker CPU s per 100,000 images | {(rb['busiest_worker_cpu'] - ra['busiest_worker_cpu']) * per:.1f} |")
    print(f"| driver peak RSS (at {b:,}) | {rb['driver_rss'] / 1e6:,.0f} MB |")
    print(f"| busiest worker peak RSS (at {b:,}) | {rb['busiest_worker_rss'] / 1e6:,.0f} MB |")
    print(f"| Ray's own processes CPU s per 100,000 images | {(rb['ray_own_cpu'] - ra['ray_own_cpu']) * per:.1f} |")
    if args.tiny_shards:
        photos = empty_images(os.path.join(os.path.abspath(args.data), f"throughput-{args.tiny_shards}"), args.tiny_shards)
        out = os.path.join(os.path.abspath(args.data), "throughput-out-tiny")
        shutil.rmtree(out, ignore_errors=True)
        run_size(photos, out, 1)
        records = sorted(os.scandir(os.path.join(out, "commits")), key=lambda e: e.stat().st_mtime_ns)
        sizes_by_number = {n: records[n - 1].stat().st_size for n in (1, 10, len(records))}
        print(f"\nbytes written to commit shard 1, 10 and {len(records):,} (one row per shard): "
              + ", ".join(f"{n}: {s}" for n, s in sizes_by_number.items())
              + f"; manifest.json {os.path.getsize(os.path.join(out, 'manifest.json'))} bytes, written twice per run")
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
