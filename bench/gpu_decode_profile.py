"""Where the time of GPU decoding goes on one NVIDIA GPU: header checks, nvJPEG, crop+resize, and their overlap with
the model. Run from the repository root: `PYTHONPATH=. python bench/gpu_decode_profile.py` (needs torch, torchvision,
Pillow, numpy; about a minute)."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

sys.path.insert(0, os.path.dirname(__file__))
from gpu import write_synthetic_jpeg  # noqa: E402

from embedder import gpu_decode  # noqa: E402
from embedder.model import Embedder, build_state_dict  # noqa: E402


def clock(fn, repeats: int = 3) -> float:
    """Median seconds of fn() between CUDA syncs."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    device = torch.device("cuda")
    folder = "/tmp/prof-jpegs"
    os.makedirs(folder, exist_ok=True)
    n, chunk = 1024, 128
    for i in range(n):
        write_synthetic_jpeg((f"{folder}/{i}.jpg", 640, 480, i))
    datas = [open(f"{folder}/{i}.jpg", "rb").read() for i in range(n)]
    parts = [datas[i : i + chunk] for i in range(0, n, chunk)]
    fig: dict[str, float] = {}
    fig["header_checks"] = n / clock(lambda: [gpu_decode.device_decodable(d) for d in datas])
    enc = [[torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in p] for p in parts]
    fig["nvjpeg_batched"] = n / clock(lambda: [decode_jpeg(e, mode=ImageReadMode.RGB, device=device) for e in enc])
    fig["nvjpeg_one_by_one"] = n / clock(lambda: [decode_jpeg(x, mode=ImageReadMode.RGB, device=device) for e in enc for x in e])
    decoded = [torch.stack(decode_jpeg(e, mode=ImageReadMode.RGB, device=device)) for e in enc]
    fig["crop_resize"] = n / clock(lambda: [gpu_decode._crop_resize(d) for d in decoded])
    fig["decode_batch_gpu"] = n / clock(lambda: [gpu_decode.decode_batch_gpu(p, device) for p in parts])
    with ThreadPoolExecutor(4) as pool:
        fig["decode_batch_gpu_4_threads"] = n / clock(lambda: list(pool.map(lambda p: gpu_decode.decode_batch_gpu(p, device), parts)))
        fig["nvjpeg_batched_4_threads"] = n / clock(lambda: list(pool.map(lambda e: decode_jpeg(e, mode=ImageReadMode.RGB, device=device), enc)))
    embedder = Embedder(build_state_dict("random", 0), "fc6", "auto", "cuda")
    pixels = [torch.zeros((chunk, 224, 224, 3), dtype=torch.uint8, device=device) for _ in parts]
    embedder.embed_tensor(pixels[0])
    fig["model_only"] = n / clock(lambda: [embedder.embed_tensor(p) for p in pixels])

    def model_while_decoding() -> None:
        side = threading.Thread(target=lambda: [decode_jpeg(e, mode=ImageReadMode.RGB, device=device) for e in enc])
        side.start()
        for p in pixels:
            embedder.embed_tensor(p)
        side.join()

    fig["model_plus_nvjpeg_concurrent_pairs_per_s"] = n / clock(model_while_decoding)
    fig["decoded_chunks_plus_model"] = n / clock(
        lambda: [embedder.embed_tensor(px).cpu() for _, px, _ in gpu_decode.decoded_chunks(datas, device, chunk)])
    for name, value in fig.items():
        print(f"{name}: {value:.0f} images/s")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_decode_profile.json"), "w") as f:
            json.dump(fig, f, indent=2)


if __name__ == "__main__":
    main()
