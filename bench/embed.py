"""Embedding throughput on this machine, every method in one run on the same photos (not part of `make test`).

    python bench/embed.py [--images 300] [--size 640x480] [--precision auto] [--repeats 1] [--data bench-data] [--out-dir DIR]
                          [--weights random|imagenet]

Methods: (a) `imgindex embed` (the Ray Data pipeline) as a subprocess; (b) the Embedder alone on preloaded batches of 16;
(c) the original recipe, one image at a time in fp32 (PIL -> torchvision transforms -> model(x[None])), on at most 60
images; (d) bench/plain_dataloader.py (one process, DataLoader workers, same Embedder) as a subprocess. Random weights
throughout (same speed as ImageNet's); with --weights imagenet, (a) takes the default path: a file under the ImageNet
weights' name in a torch cache stands in for the download (its hash is only checked on download). Prints a markdown table (medians over --repeats) and the project's two ratios:
pipeline steady state / one-image loop (target >= 1.8), pipeline whole process / DataLoader whole process (target <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from embedder.config import PRECISIONS, PREPROCESSING
from embedder.model import Embedder, build_state_dict, resolve_precision
from embedder.reader import list_images, load_pixels
from jobs.demo import sample_photos

log = logging.getLogger("bench")

HERE = os.path.dirname(os.path.abspath(__file__))
BATCH = 16
LOOP_IMAGES = 60
# Set for the pipeline subprocess: each model replica writes a JSON report when built, whose mtime marks it ready.
REPORT_DIR_ENV = "IMGINDEX_REPLICA_REPORT_DIR"
EMBEDDED_LINE = re.compile(r"embedded (\d+) images .* in ([\d.]+) s")


def parse_size(text: str) -> tuple[int, int]:
    """'640x480' -> (640, 480)."""
    width, _, height = text.lower().partition("x")
    return int(width), int(height)


def photo_folder(data: str, count: int, size: tuple[int, int]) -> str:
    """A folder of `count` sample JPEGs of `size`, reused when a previous run left it complete."""
    folder = os.path.join(os.path.abspath(data), f"photos-{count}-{size[0]}x{size[1]}")
    if os.path.isdir(folder) and len(list_images([folder])) == count:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    log.info("writing %d sample photos of %dx%d to %s", count, *size, folder)
    sample_photos(folder, count, size=size)
    return folder


def startup_seconds() -> float:
    """Wall time of a Python process that imports the model code and exits: what in-process timings leave out."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", "import embedder.model, embedder.reader"], check=True)
    return time.monotonic() - started


def log_time(line: str) -> float:
    """Epoch seconds of a run.log line ('2026-01-31 12:00:00,123 INFO ...', local time)."""
    stamp, millis = line[:23].split(",")
    return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000


def cached_imagenet_home(folder: str) -> str:
    """A TORCH_HOME whose torch.hub cache holds a file under the ImageNet weights' name (seeded random weights of the
    same shapes, written once): `--weights imagenet` then takes the default path, the cached file instead of a download."""
    from embedder.config import IMAGENET_URL

    home = os.path.join(os.path.abspath(folder), "torch-home")
    cached = os.path.join(home, "hub", "checkpoints", os.path.basename(IMAGENET_URL))
    if not os.path.isfile(cached):
        os.makedirs(os.path.dirname(cached), exist_ok=True)
        torch.save({k: torch.from_numpy(v) for k, v in build_state_dict("random", 0).items()}, cached + ".tmp")
        os.replace(cached + ".tmp", cached)
    return home


def run_pipeline(folder: str, out: str, precision: str, torch_home: str | None = None) -> dict:
    """(a) `imgindex embed` as a subprocess: whole-process time, its own logged embed time, rate after a replica is ready.
    With `torch_home`, the default `--weights imagenet` from that cache; else `--weights random`."""
    imgindex = shutil.which("imgindex", path=os.path.dirname(sys.executable))
    if imgindex is None:
        raise SystemExit(f"no imgindex command beside {sys.executable}; run `make install` first")
    reports = os.path.join(out, "replica-reports")
    os.makedirs(reports)
    weights = "imagenet" if torch_home else "random"
    command = [imgindex, "embed", folder, "--out", os.path.join(out, "vectors"), "--weights", weights, "--precision", precision]
    env = os.environ | {REPORT_DIR_ENV: reports} | ({"TORCH_HOME": torch_home} if torch_home else {})
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"imgindex embed failed ({done.returncode}):\n{done.stderr[-3000:]}")
    embedded = EMBEDDED_LINE.search(done.stderr)
    if embedded is None:
        raise SystemExit(f"no 'embedded N images ... in X s' line in the output of imgindex embed:\n{done.stderr[-3000:]}")
    with open(os.path.join(out, "vectors", "run.log"), encoding="utf-8") as f:
        finished = log_time([line for line in f if " embedded " in line][-1])
    ready = min(os.path.getmtime(os.path.join(reports, name)) for name in os.listdir(reports) if name.endswith(".json"))
    images = int(embedded.group(1))
    return {
        "images": images,
        "seconds": seconds,
        "logged_seconds": float(embedded.group(2)),
        "steady_seconds": finished - ready,
    }


def run_model_alone(pixels: np.ndarray, precision: str) -> dict:
    """(b) Embedder on preloaded batches of 16, all cores: weights build + model + batches; steady after one batch."""
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.monotonic()
    embedder = Embedder(build_state_dict("random", 0), "fc6", precision, "cpu")
    embedder(pixels[:BATCH])
    warm = time.monotonic()
    for start in range(BATCH, len(pixels), BATCH):
        embedder(pixels[start : start + BATCH])
    finished = time.monotonic()
    rest = len(pixels) - BATCH
    return {"images": len(pixels), "seconds": finished - started, "steady_seconds": (finished - warm) * len(pixels) / rest if rest > 0 else None}


def run_one_image_loop(paths: list[str]) -> dict:
    """(c) The original recipe: fp32, one image at a time, PIL -> VGG16_Weights.IMAGENET1K_V1-style transforms -> model."""
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.monotonic()
    vgg = torchvision.models.vgg16(weights=None)
    vgg.load_state_dict({k: torch.from_numpy(v) for k, v in build_state_dict("random", 0).items()})
    vgg.classifier = vgg.classifier[:1]
    vgg.eval()
    preprocess = transforms.Compose([
        transforms.Resize(PREPROCESSING["resize_short_side"]),
        transforms.CenterCrop(PREPROCESSING["center_crop"]),
        transforms.ToTensor(),
        transforms.Normalize(PREPROCESSING["mean"], PREPROCESSING["std"]),
    ])
    first_done = None
    with torch.no_grad():
        for path in paths:
            vgg(preprocess(Image.open(path).convert("RGB"))[None])
            first_done = first_done or time.monotonic()
    finished = time.monotonic()
    rest = len(paths) - 1
    return {"images": len(paths), "seconds": finished - started, "steady_seconds": (finished - first_done) * len(paths) / rest if rest > 0 else None}


def run_plain_dataloader(folder: str, out: str, precision: str) -> dict:
    """(d) bench/plain_dataloader.py as a subprocess: whole-process time and its own steady-state rate."""
    command = [sys.executable, os.path.join(HERE, "plain_dataloader.py"), folder, "--precision", precision,
               "--batch-size", str(BATCH), "--out", os.path.join(out, "vectors.npy")]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"plain_dataloader.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    steady = figures["steady_images_per_s"]
    return {
        "images": figures["images"],
        "seconds": seconds,
        "steady_seconds": figures["images"] / steady if steady else None,
        "workers": figures["workers"],
    }


def median(runs: list[dict], key: str) -> float | None:
    """Median of `key` over the runs that have it."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def rate(images: int, seconds: float | None) -> float | None:
    """Images per second, or None without a time."""
    return images / seconds if seconds else None


def fmt(value: float | None, digits: int = 2) -> str:
    """A table cell: the number rounded, or '-'."""
    return "-" if value is None else f"{value:.{digits}f}"


def report(results: dict[str, list[dict]], startup: float, precision: str, size: tuple[int, int]) -> tuple[str, dict]:
    """The markdown table and ratios, and the same figures as a dict."""
    rows, figures = [], {}
    labels = {
        "pipeline": f"(a) `imgindex embed` ({precision}, Ray Data)",
        "model": f"(b) model alone, Embedder batch {BATCH} ({precision})",
        "loop": "(c) original one-image loop (fp32)",
        "dataloader": f"(d) plain DataLoader, batch {BATCH}, {results['dataloader'][0]['workers']} workers ({precision})",
    }
    for key, runs in results.items():
        images = runs[0]["images"]
        seconds = median(runs, "seconds")
        # In-process methods get the measured interpreter start-up added, to compare with the subprocesses.
        whole = seconds + startup if key in ("model", "loop") else seconds
        steady = rate(images, median(runs, "steady_seconds"))
        figures[key] = {"images": images, "whole_seconds": whole, "whole_images_per_s": rate(images, whole), "steady_images_per_s": steady}
        rows.append(f"| {labels[key]} | {images} | {fmt(whole, 1)} | {fmt(rate(images, whole))} | {fmt(steady)} |")
    pipeline, logged = figures["pipeline"], median(results["pipeline"], "logged_seconds")
    pipeline["logged_seconds"] = logged
    lines = [
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {size[0]}x{size[1]} JPEGs, medians of {len(results['pipeline'])} run(s)",
        "",
        "| method | images | whole-process s | images/s whole-process | images/s steady state |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"steady state: (a) from the first model replica ready to the end; (b) after one warm-up batch; (c) after the "
        f"first image; (d) after its first batch. (b) and (c) run in this process: their whole-process time adds "
        f"{startup:.1f} s, the measured start-up of a Python process importing the model code.",
        f"(a) logs 'embedded {pipeline['images']} images in {fmt(logged, 1)} s' ({fmt(rate(pipeline['images'], logged))} images/s; "
        f"its clock starts after the imports and includes weights build and Ray start).",
    ]
    ratios = {}
    loop_steady = figures["loop"]["steady_images_per_s"]
    if pipeline["steady_images_per_s"] and loop_steady:
        ratios["pipeline_steady_over_loop"] = pipeline["steady_images_per_s"] / loop_steady
        ratios["pipeline_logged_over_loop"] = rate(pipeline["images"], logged) / loop_steady
        lines.append(
            f"pipeline steady state / one-image loop: {ratios['pipeline_steady_over_loop']:.2f} (target >= 1.8); "
            f"with the pipeline's logged embed time instead: {ratios['pipeline_logged_over_loop']:.2f}"
        )
    ratios["pipeline_whole_over_dataloader_whole"] = pipeline["whole_seconds"] / figures["dataloader"]["whole_seconds"]
    lines.append(f"pipeline whole process / DataLoader whole process: {ratios['pipeline_whole_over_dataloader_whole']:.2f} (target <= 1.2)")
    figures["ratios"] = ratios
    figures["startup_seconds"] = startup
    return "\n".join(lines), figures


def main() -> None:
    """Write the photos, run every method --repeats times, print the table and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="sample photos to embed (default 300)")
    parser.add_argument("--size", type=parse_size, default=(640, 480), help="photo size WIDTHxHEIGHT (default 640x480)")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="for (a), (b), (d), resolved as the job resolves it (bf16 only where the CPU runs it natively: "
                             "emulated it is many times slower than fp32); (c) is always fp32")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each method; the table shows medians")
    parser.add_argument("--data", default="bench-data", help="where the sample photos are written (reused if complete)")
    parser.add_argument("--out-dir", help="keep the runs' outputs and results.json/results.md here (default: a temporary folder)")
    parser.add_argument("--weights", default="random", choices=["random", "imagenet"],
                        help="(a)'s --weights: random, or imagenet from a torch cache this script fills with a file of that name")
    args = parser.parse_args()
    args.precision = resolve_precision(args.precision, torch.device("cpu"))
    logging.basicConfig(level=logging.INFO, format="bench: %(message)s")

    folder = photo_folder(args.data, args.images, args.size)
    paths = list_images([folder])
    out_dir = os.path.abspath(args.out_dir) if args.out_dir else tempfile.mkdtemp(prefix="imgindex-bench-")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and args.out_dir:
        raise SystemExit(f"--out-dir {args.out_dir} is not empty; give a new folder")
    os.makedirs(out_dir, exist_ok=True)
    pixels = np.stack([load_pixels(p) for p in paths])
    startup = startup_seconds()
    results: dict[str, list[dict]] = {"pipeline": [], "model": [], "loop": [], "dataloader": []}
    torch_home = cached_imagenet_home(args.data) if args.weights == "imagenet" else None
    for r in range(args.repeats):
        log.info("repeat %d/%d: (a) imgindex embed --weights %s", r + 1, args.repeats, args.weights)
        results["pipeline"].append(run_pipeline(folder, os.path.join(out_dir, f"pipeline-{r}"), args.precision, torch_home))
        log.info("repeat %d/%d: (b) model alone", r + 1, args.repeats)
        results["model"].append(run_model_alone(pixels, args.precision))
        log.info("repeat %d/%d: (c) one-image loop on %d images", r + 1, args.repeats, min(len(paths), LOOP_IMAGES))
        results["loop"].append(run_one_image_loop(paths[:LOOP_IMAGES]))
        log.info("repeat %d/%d: (d) plain DataLoader", r + 1, args.repeats)
        dataloader_out = os.path.join(out_dir, f"dataloader-{r}")
        os.makedirs(dataloader_out)
        results["dataloader"].append(run_plain_dataloader(folder, dataloader_out, args.precision))
    table, figures = report(results, startup, args.precision, args.size)
    print(table)
    if args.out_dir:
        with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
            json.dump({"args": vars(args) | {"size": list(args.size)}, "figures": figures, "runs": results}, f, indent=2)
        with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
            f.write(table + "\n")
    else:
        shutil.rmtree(out_dir)


if __name__ == "__main__":
    main()
