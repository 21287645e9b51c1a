"""One prepared benchmark for a machine with one NVIDIA GPU: where does the embedding path lose time to decoding?

Run from the repository root through `bash bench/gpu.sh` (which sets PYTHONPATH and a time limit), or `--smoke` here on
the CPU (tiny N). Needs torch, torchvision, Pillow, numpy, pandas; Ray is optional (the full pipeline runs only if
`import ray` works). Sections, each bounded: synthetic JPEGs (numpy + PIL, written by a process pool); CPU decode with
every core; GPU decode (embedder.gpu_decode); the actor path (EmbedActor.__call__ on decoded batches, batch sizes
64/128/256); the model alone on batches already on the GPU; the embedding path = CPU decode in a pool, or GPU decode,
feeding the model, and the actor with --decode gpu; the embedding path / model-only ratio (target >= 0.70). Figures go to stdout and, if $OUT is set, to
$OUT/gpu_bench.json after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.pool import Pool

import numpy as np
import torch
import torchvision
from PIL import Image, ImageDraw
from torchvision.io import ImageReadMode, decode_jpeg

from embedder import actor
from embedder.actor import EmbedActor
from embedder.config import JobConfig
from embedder.gpu_decode import decode_batch_gpu, device_decodable
from embedder.model import build_state_dict, state_dict_sha256
from embedder.reader import decode_batch

# A timed model loop stops after this long even if images are left, so one slow section cannot eat the time limit.
SECTION_SECONDS = 30.0
# Images per CPU decode task.
DECODE_CHUNK = 16
# The GPU sections take well under a second a pass; timing several passes keeps one-off costs from deciding a rate.
PASSES = 3
EMBEDDED_LINE = re.compile(r"embedded (\d+) images .* in ([\d.]+) s")


def write_synthetic_jpeg(task: tuple[str, int, int, int]) -> int:
    """Write one photo-like JPEG (smooth gradient, shapes, a little noise; quality 90, ~60-100 KB); return its size."""
    path, width, height, seed = task
    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    corner = rng.uniform(0, 255, (4, 3)).astype(np.float32)
    base = corner[0] * (1 - ys) * (1 - xs) + corner[1] * (1 - ys) * xs + corner[2] * ys * (1 - xs) + corner[3] * ys * xs
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(4, 12)):
        x0, x1 = sorted(rng.integers(0, width, 2))
        y0, y1 = sorted(rng.integers(0, height, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0, 5, (height, width, 3)).astype(np.float32)
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def decode_paths(paths: list[str]) -> np.ndarray:
    """Pool task: decode a chunk of files with the pipeline's own batch function; (n, 224, 224, 3) uint8 (zeros if bad)."""
    return decode_batch({"id": np.arange(len(paths)), "path": np.array(paths, dtype=object)})["pixels"]


def chunks(items: list, size: int) -> list[list]:
    """`items` cut into consecutive runs of `size` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


def rebatch(parts: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Arrays regrouped along the first axis into arrays of `size` rows (the last one shorter)."""
    held: list[np.ndarray] = []
    count = 0
    for part in parts:
        held.append(part)
        count += len(part)
        while count >= size:
            joined = np.concatenate(held)
            yield joined[:size]
            held, count = [joined[size:]], count - size
    if count:
        yield np.concatenate(held)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host clock reading covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(steps: Iterable, work: Callable[[object], int], device: torch.device, cap: float | None) -> dict:
    """Run `work` over `steps` (each returns its image count) between device syncs, stopping after `cap` seconds."""
    sync(device)
    started = time.perf_counter()
    images = 0
    for step in steps:
        images += work(step)
        if cap is not None and time.perf_counter() - started > cap:
            break
    sync(device)
    seconds = time.perf_counter() - started
    return {"images": images, "seconds": round(seconds, 4), "images_per_s": round(images / seconds, 1)}


def actor_batch(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """A decoded batch as decode_batch hands it to EmbedActor."""
    n = len(pixels)
    return {"id": np.arange(n), "path": np.array([f"{i}.jpg" for i in range(n)], dtype=object), "pixels": pixels,
            "error": np.full(n, "", dtype=object)}


def encoded_batch(datas: list[bytes]) -> dict[str, np.ndarray]:
    """Encoded files as reader.read_batch hands them to EmbedActor with --decode gpu."""
    n = len(datas)
    data = np.empty(n, dtype=object)
    data[:] = datas
    return {"id": np.arange(n), "path": np.array([f"{i}.jpg" for i in range(n)], dtype=object), "data": data,
            "device": np.array([device_decodable(d) for d in datas]), "error": np.full(n, "", dtype=object)}


class Bench:
    """The sections, sharing the photos, the decoded pixels, the model and the figures written after each one."""

    def __init__(self, args: argparse.Namespace, device: torch.device, folder: str, pools: dict[str, tuple[Pool, int]]):
        self.args, self.device, self.folder, self.pools = args, device, folder, pools
        self.photos = os.path.join(folder, "photos")
        self.deadline = time.monotonic() + args.budget
        self.figures: dict = {}
        self.paths: list[str] = []
        self.datas: list[bytes] = []
        self.pixels = np.zeros((0, 224, 224, 3), dtype=np.uint8)
        self.actor: EmbedActor | None = None
        self.best_batch = args.batch_sizes[0]

    def record(self, name: str, value) -> None:
        """Keep a figure and rewrite $OUT/gpu_bench.json, so a run cut short still leaves its figures."""
        self.figures[name] = value
        out = os.environ.get("OUT")
        if out:
            with open(os.path.join(out, "gpu_bench.json"), "w", encoding="utf-8") as f:
                json.dump(self.figures, f, indent=2)

    def left(self) -> float:
        """Seconds left of --budget."""
        return self.deadline - time.monotonic()

    def cap(self) -> float:
        """Seconds a timed model loop may take now: SECTION_SECONDS, less as the budget runs out (7 such loops in all)."""
        return max(2.0, min(SECTION_SECONDS, self.left() / 8))

    def header(self) -> None:
        """GPU name, torch and torchvision versions, CPU count."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "none (CPU smoke run)"
        info = {"gpu": name, "torch": torch.__version__, "torchvision": torchvision.__version__, "cpus": os.cpu_count(),
                "device": str(self.device), "smoke": self.args.smoke}
        print(f"GPU: {name}\ntorch {torch.__version__}, torchvision {torchvision.__version__}, {os.cpu_count()} CPUs")
        self.record("machine", info)

    def generate(self) -> None:
        """Write the synthetic JPEGs with every core and read their bytes into memory (for the GPU decoder)."""
        n, (width, height) = self.args.images, self.args.size
        started = time.perf_counter()
        os.makedirs(self.photos, exist_ok=True)
        tasks = [(os.path.join(self.photos, f"synthetic-{i:05d}.jpg"), width, height, i) for i in range(n)]
        sizes = self.pools["all"][0].map(write_synthetic_jpeg, tasks, chunksize=8)
        self.paths = [t[0] for t in tasks]
        self.datas = [open(p, "rb").read() for p in self.paths]
        seconds = time.perf_counter() - started
        print(f"wrote {n} synthetic {width}x{height} JPEGs (mean {np.mean(sizes) / 1024:.0f} KB) in {seconds:.1f} s")
        self.record("photos", {"images": n, "width": width, "height": height, "mean_bytes": float(np.mean(sizes)), "seconds": round(seconds, 2)})

    def cpu_decode(self) -> None:
        """Decode every photo with decode_batch in a pool of one process per core; keep the pixels for later sections."""
        pool, processes = self.pools["all"]
        parts = chunks(self.paths, DECODE_CHUNK)
        pool.map(decode_paths, parts[:processes])  # warm-up: each worker decodes once before the clock starts
        decoded: list[np.ndarray] = []

        def keep(pixels: np.ndarray) -> int:
            decoded.append(pixels)
            return len(pixels)

        figures = timed(pool.imap(decode_paths, parts), keep, self.device, cap=None)
        self.pixels = np.concatenate(decoded)
        print(f"CPU decode, {processes} processes: {figures['images_per_s']:.0f} images/s")
        self.record("cpu_decode", figures | {"processes": processes})

    def gpu_decode(self) -> None:
        """decode_batch_gpu over every photo, after checking that the device decoder takes them and agrees with the CPU."""
        batch = self.args.decode_batch
        started = time.perf_counter()
        on_device = sum(device_decodable(d) for d in self.datas)
        header_rate = len(self.datas) / (time.perf_counter() - started)
        print(f"JPEG header checks (device_decodable, one core; the read tasks do them with --decode gpu): {header_rate:.0f} images/s")
        # decode_batch_gpu falls back to the CPU quietly; ask the device decoder directly whether it takes these files.
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in self.datas[:batch]]
        try:
            accepted = f"accepted all {len(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device))}"
        except RuntimeError as e:
            accepted = f"refused the batch: {str(e).splitlines()[0]}"
        print(f"torchvision decode_jpeg on {self.device}, one batch of {len(encoded)}: {accepted}")
        pixels, errors = decode_batch_gpu(self.datas[:batch], self.device)
        sync(self.device)
        check = min(len(self.datas), batch)
        diffs = np.abs(pixels[:check].cpu().numpy().astype(np.int16) - self.pixels[:check].astype(np.int16)).mean(axis=(1, 2, 3))
        figures = timed(chunks(self.datas, batch), lambda part: len(decode_batch_gpu(part, self.device)[1]), self.device, self.cap())
        print(f"GPU decode, batch {batch}: {figures['images_per_s']:.0f} images/s ({on_device}/{len(self.datas)} on the device; "
              f"vs CPU decode: mean abs diff {diffs.mean():.2f} levels, worst image {diffs.max():.2f}; errors {sum(bool(e) for e in errors)})")
        self.record("gpu_decode", figures | {"batch": batch, "on_device": on_device, "device_decoder": accepted, "mean_abs_diff_vs_cpu": round(float(diffs.mean()), 3), "header_checks_per_s_one_core": round(header_rate),
                                             "worst_image_abs_diff": round(float(diffs.max()), 3)})

    def build_actor(self) -> None:
        """Build the weights and one EmbedActor as a replica does (precision auto), timing each step."""
        started = time.perf_counter()
        state_dict = build_state_dict("random", 0)
        built = time.perf_counter()
        sha = state_dict_sha256(state_dict)
        hashed = time.perf_counter()
        config = JobConfig(inputs=(self.photos,), out=os.path.join(self.folder, "unused-out"), weights="random", precision="auto")
        self.actor = EmbedActor(config, state_dict, sha, threads=os.cpu_count() or 1, batch_size=256)
        sync(self.device)
        ready = time.perf_counter()
        print(f"weights built in {built - started:.1f} s, hashed in {hashed - built:.1f} s, actor ready in {ready - hashed:.1f} s "
              f"({self.actor.embedder.device}, {self.actor.embedder.precision})")
        self.record("startup", {"weights_build_s": round(built - started, 2), "sha256_s": round(hashed - built, 2),
                                "actor_init_s": round(ready - hashed, 2), "precision": self.actor.embedder.precision})

    def model_pixels(self, batch: int) -> list[np.ndarray]:
        """`--model-images` decoded pixels (the decoded photos repeated) cut into batches."""
        reps = -(-self.args.model_images // len(self.pixels))
        pool = np.concatenate([self.pixels] * reps)[: self.args.model_images]
        return chunks(pool, batch)

    def actor_path(self) -> None:
        """EmbedActor.__call__ on decoded numpy batches (host-to-device copy and back included) per batch size; keep the best."""
        results = {}
        for batch in self.args.batch_sizes:
            batches = [actor_batch(p) for p in self.model_pixels(batch)]
            self.actor(batches[0])
            figures = timed(batches, lambda b: len(self.actor(b)["id"]), self.device, self.cap())
            results[batch] = figures
            print(f"actor path (EmbedActor.__call__, numpy in/out), batch {batch}: {figures['images_per_s']:.0f} images/s")
        self.best_batch = max(results, key=lambda b: results[b]["images_per_s"])
        print(f"best batch size: {self.best_batch}")
        self.record("actor_path", {str(b): f for b, f in results.items()} | {"best_batch": self.best_batch})

    def model_only(self) -> None:
        """The same Embedder on pixel batches already on the device: the ceiling the embedding path is measured against."""
        embedder = self.actor.embedder
        on_device = [torch.from_numpy(p).to(self.device) for p in self.model_pixels(self.best_batch)]
        embedder.embed_tensor(on_device[0])
        figures = timed(on_device * PASSES, lambda x: len(embedder.embed_tensor(x)), self.device, self.cap())
        print(f"model only (pixels already on {self.device}), batch {self.best_batch}: {figures['images_per_s']:.0f} images/s")
        self.record("model_only", figures | {"batch": self.best_batch})

    def embedding_paths(self) -> None:
        """Decoding feeding the model: CPU pool overlapped with the actor, GPU decode in turn, the actor with --decode gpu."""
        batch, (pool, processes) = self.best_batch, self.pools["decode"]
        # Small decode tasks keep every process busy however few model batches there are; the model gets full batches.
        decoded = rebatch(pool.imap(decode_paths, chunks(self.paths, DECODE_CHUNK)), batch)
        via_cpu = timed(decoded, lambda p: len(self.actor(actor_batch(p))["id"]), self.device, cap=None)
        print(f"embedding path, CPU decode ({processes} processes, overlapped) -> actor, batch {batch}: "
              f"{via_cpu['images_per_s']:.0f} images/s")
        self.record("embedding_path_cpu_decode", via_cpu | {"batch": batch, "processes": processes})

        def gpu_serial(part: list[bytes]) -> int:
            pixels, _ = decode_batch_gpu(part, self.device)
            return len(self.actor.embedder.embed_tensor(pixels).cpu())

        via_gpu = timed(chunks(self.datas, batch) * PASSES, gpu_serial, self.device, self.cap())
        print(f"embedding path, GPU decode -> model, one after the other, batch {batch}: {via_gpu['images_per_s']:.0f} images/s")
        self.record("embedding_path_gpu_decode", via_gpu | {"batch": batch})
        # What the job runs with --decode gpu: EmbedActor.__call__ on encoded batches whose headers the read tasks
        # have checked (as read_batch does on the CPU cores, outside this loop); decode and model take turns per chunk.
        best: dict = {}
        for size, chunk in ((256, 128), (256, 256), (512, 256), (512, 512)):
            actor.DEVICE_DECODE_CHUNK = chunk
            batches = [encoded_batch(part) for part in chunks(self.datas, size)]
            self.actor(batches[0])
            figures = timed(batches * PASSES, lambda b: len(self.actor(b)["id"]), self.device, self.cap()) | {"batch": size, "chunk": chunk}
            print(f"embedding path, actor with --decode gpu, batch {size}, chunk {chunk}: {figures['images_per_s']:.0f} images/s")
            self.record(f"actor_decode_gpu_{size}_{chunk}", figures)
            if figures["images_per_s"] > best.get("images_per_s", 0):
                best = figures
        self.record("embedding_path_gpu_decode_actor", best)

        model = self.figures["model_only"]["images_per_s"]
        ratios = {name: round(self.figures[name]["images_per_s"] / model, 3)
                  for name in ("embedding_path_cpu_decode", "embedding_path_gpu_decode", "embedding_path_gpu_decode_actor")}
        for name, ratio in ratios.items():
            print(f"ratio {name} / model only: {ratio:.2f} (target >= 0.70)")
        self.record("ratios_vs_model_only", ratios)

    def ray_pipeline(self) -> None:
        """The full job (`python -m jobs.embed`) on the photos, if Ray is installed and time is left."""
        if importlib.util.find_spec("ray") is None:
            print("ray not installed: full pipeline (python -m jobs.embed) skipped")
            self.record("pipeline", {"skipped": "ray not installed"})
            return
        limit = self.left() - 10
        if limit < 60:
            print(f"only {self.left():.0f} s left: full pipeline skipped")
            self.record("pipeline", {"skipped": f"{self.left():.0f} s left"})
            return
        out = tempfile.mkdtemp(prefix="pipeline-out-", dir=self.folder)
        command = [sys.executable, "-m", "jobs.embed", self.photos, "--out", out, "--weights", "random"]
        started = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            print(f"full pipeline did not finish in {limit:.0f} s")
            self.record("pipeline", {"timed_out_s": round(limit)})
            return
        seconds = time.perf_counter() - started
        embedded = EMBEDDED_LINE.search(done.stderr)
        if done.returncode != 0 or embedded is None:
            print(f"full pipeline failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            self.record("pipeline", {"failed": done.returncode, "stderr_tail": done.stderr[-2000:]})
            return
        images, logged = int(embedded.group(1)), float(embedded.group(2))
        print(f"full pipeline (python -m jobs.embed): {images} images, whole process {seconds:.1f} s ({images / seconds:.0f} images/s), "
              f"logged embed time {logged:.1f} s ({images / logged:.0f} images/s)")
        self.record("pipeline", {"images": images, "whole_process_s": round(seconds, 2), "logged_s": logged})

    def summary(self) -> None:
        """The rates side by side, last in the output; the full figures are in $OUT/gpu_bench.json (or printed here)."""
        rows = [(name, self.figures[name]) for name in ("cpu_decode", "gpu_decode", "model_only", 
                                                        "embedding_path_cpu_decode", "embedding_path_gpu_decode",
                                                        "embedding_path_gpu_decode_actor") if name in self.figures]
        rows += [(f"actor_path batch {b}", f) for b, f in self.figures.get("actor_path", {}).items() if isinstance(f, dict)]
        print(f"\n{self.figures['machine']['gpu']}, precision {self.figures['startup']['precision']}")
        print("| section | images | seconds | images/s |\n| --- | ---: | ---: | ---: |")
        for name, f in rows:
            print(f"| {name} | {f['images']} | {f['seconds']:.2f} | {f['images_per_s']:.0f} |")
        for name, ratio in self.figures.get("ratios_vs_model_only", {}).items():
            print(f"{name} / model_only = {ratio:.2f} (target >= 0.70)")
        if not os.environ.get("OUT"):
            print(json.dumps(self.figures))


def parse_args() -> argparse.Namespace:
    """Options, with the section sizes for a GPU run or a --smoke run."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, 16 images, small batches: checks that every section runs")
    parser.add_argument("--images", type=int, default=2048, help="synthetic JPEGs to write and decode (default 2048: whole batches)")
    parser.add_argument("--model-images", type=int, default=2048, help="images per timed model loop (default 2048)")
    parser.add_argument("--budget", type=float, default=270, help="seconds this script may take; later sections shrink or skip")
    parser.add_argument("--data", help="folder for the synthetic JPEGs (default: a new temporary folder)")
    args = parser.parse_args()
    args.size = (640, 480)
    if args.smoke:
        args.images, args.model_images, args.batch_sizes, args.decode_batch = 16, 16, [4, 8], 8
    else:
        args.batch_sizes, args.decode_batch = [64, 128, 256], 128
    return args


def main() -> None:
    """Run every section in order on the GPU (or the CPU with --smoke)."""
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="gpu bench: %(message)s")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible to torch; run with --smoke for a CPU check")
    device = torch.device("cpu" if args.smoke else "cuda")
    folder = os.path.abspath(args.data) if args.data else tempfile.mkdtemp(prefix="imgindex-gpu-bench-")
    os.makedirs(folder, exist_ok=True)
    cpus = os.cpu_count() or 1
    # Fork the decode processes before CUDA starts in this process; they only ever run Pillow and numpy.
    context = multiprocessing.get_context("fork")
    beside = max(1, cpus - 1)
    with context.Pool(cpus) as every_core, context.Pool(beside) as beside_model:
        bench = Bench(args, device, folder, {"all": (every_core, cpus), "decode": (beside_model, beside)})
        bench.header()
        bench.generate()
        bench.cpu_decode()
        bench.gpu_decode()
        bench.build_actor()
        bench.actor_path()
        bench.model_only()
        bench.embedding_paths()
    bench.ray_pipeline()
    bench.summary()
    if not args.data:
        shutil.rmtree(folder)


if __name__ == "__main__":
    main()
