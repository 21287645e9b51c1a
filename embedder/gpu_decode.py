"""GPU JPEG decoding for `--decode gpu`: encoded bytes -> (N, 224, 224, 3) uint8 pixels on the model's device.

JPEGs are decoded by nvJPEG (torchvision.io.decode_jpeg, batched) and cropped and resized on the device with the
geometry and filter of embedder.reader.decode_image (antialiased bilinear over the Resize(256) + CenterCrop(224) box),
so the pixels agree with the CPU path to within a level. Files the device must not decode (not a JPEG, truncated,
EXIF-rotated, CMYK, over Pillow's pixel limit) or cannot (nvJPEG refuses them) go through decode_image on the CPU, so
every file passes the CPU path's checks and gets its error messages. Imports neither Ray nor FAISS; also runs on a CPU
device (torchvision's CPU decoder), which is how it is tested.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from embedder.reader import CROP, ImageError, crop_box, decode_image, device_decodable

log = logging.getLogger("imgindex")

# Output pixels the resize may compute before the box, so that its sampling grid can land on the box's grid.
MAX_LEAD = 256
# Largest misalignment (in source pixels) between that grid and the box's accepted; beyond it the CPU path decodes.
MAX_SHIFT = 0.05
# Float copies of the crop windows resized in one call stay under this, even for batches of large photos.
WINDOW_BYTES = 256 * 1024**2


def _axis_window(length: int, start: float, scale: float) -> tuple[int, int, int] | None:
    """Source window [lo, hi) and output offset k on one axis: resizing the window by 1/scale puts output pixel k + i
    where decode_image samples box pixel i. None if no window aligns to within MAX_SHIFT (images a few pixels wide).

    decode_image resamples the box from its fractional start; interpolate starts at the window's first pixel, so the
    window starts k output pixels (k * scale source pixels) before the box, at the integer nearest such a point.
    """
    # The bilinear filter reads up to max(scale, 1) source pixels either side of a sample; one more absorbs rounding.
    reach = max(scale, 1.0) + 1.0
    best: tuple[float, int, int] | None = None
    for k in range(MAX_LEAD + 1):
        lo = round(start - k * scale)
        if lo < 0:
            break
        # Inside the image the window must hold all that the first sample reads; at the edge both sides clamp alike.
        if lo > 0 and (k + 0.5) * scale < reach:
            continue
        shift = abs(lo + k * scale - start)
        if best is None or shift < best[0]:
            best = (shift, lo, k)
    if best is None or best[0] > MAX_SHIFT:
        return None
    _, lo, k = best
    # Past the box by `reach` (or up to the image edge, 15+ output pixels past the box), so the output covers k + CROP.
    return lo, min(length, math.ceil(start + CROP * scale + reach)), k


def _crop_resize(images: torch.Tensor) -> torch.Tensor | None:
    """(G, 3, H, W) uint8 images of one size -> (G, 3, 224, 224) float pixels, or None where no window aligns."""
    height, width = images.shape[-2:]
    x0, y0, x1, y1 = crop_box(width, height)
    sx, sy = (x1 - x0) / CROP, (y1 - y0) / CROP
    across, down = _axis_window(width, x0, sx), _axis_window(height, y0, sy)
    if across is None or down is None:
        return None
    (xlo, xhi, kx), (ylo, yhi, ky) = across, down
    window = images[:, :, ylo:yhi, xlo:xhi].float()
    # The scale is given, not recomputed from the window's size, so the sampling step equals the box's exactly.
    resized = F.interpolate(
        window, scale_factor=(1 / sy, 1 / sx), mode="bilinear", antialias=True, align_corners=False,
        recompute_scale_factor=False,
    )
    return resized[:, :, ky : ky + CROP, kx : kx + CROP]


def _decode_jpegs(datas: list[bytes], indices: list[int], device: torch.device) -> dict[int, torch.Tensor]:
    """(3, H, W) uint8 images on `device` for those of `indices` the decoder accepts: one batched call, else one by one."""
    if not indices:
        return {}
    # bytearray: torch.frombuffer wants a writable buffer; the copy is small next to the decode.
    encoded = [torch.frombuffer(bytearray(datas[i]), dtype=torch.uint8) for i in indices]
    # Broad on purpose in both calls: whatever the device decoder raises on one file's bytes, that file goes to
    # decode_image on the CPU, which decodes it or records its error; it never stops the batch.
    try:
        return dict(zip(indices, decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)))
    except Exception as e:
        # The batched call returns nothing if any image fails, so find which ones by decoding each alone.
        log.debug("batched JPEG decode failed (%s); decoding %d images one by one", _first_line(e), len(indices))
    decoded: dict[int, torch.Tensor] = {}
    for i, data in zip(indices, encoded):
        try:
            decoded[i] = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except Exception as e:
            log.debug("device JPEG decoder refused image %d (%s); decoding it on the CPU", i, _first_line(e))
    return decoded


def _first_line(error: Exception) -> str:
    """`Type: first line of the message`, for a log line about a refused image."""
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


def decode_batch_gpu(
    datas: list[bytes], device: torch.device, decodable: Sequence[bool] | None = None
) -> tuple[torch.Tensor, list[str]]:
    """Encoded images -> ((N, 224, 224, 3) uint8 pixels on `device`, per-image error, "" where the image decoded).

    JPEGs are decoded on `device` (nvJPEG on CUDA); the rest, and JPEGs it refuses, by decode_image on the CPU.
    A failed image's pixels are zeros, as in reader.decode_batch. All decoded JPEGs of the batch are on the device at
    once, so the batch size bounds its memory (128 photos of 12 Mpx: 4.6 GB). `decodable` is device_decodable of each
    image when the caller has it already: reader.read_batch checks the headers in CPU tasks, off the GPU's process.
    """
    pixels = torch.zeros((len(datas), CROP, CROP, 3), dtype=torch.uint8, device=device)
    errors = [""] * len(datas)
    if decodable is None:
        decodable = [device_decodable(data) for data in datas]
    decoded = _decode_jpegs(datas, [i for i, ok in enumerate(decodable) if ok], device)
    by_size: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in decoded.items():
        by_size[tuple(image.shape)].append(i)
    on_host = [i for i in range(len(datas)) if i not in decoded]
    for (_, height, width), same in by_size.items():
        per_call = max(1, WINDOW_BYTES // (3 * height * width * 4))
        for start in range(0, len(same), per_call):
            chunk = same[start : start + per_call]
            resized = _crop_resize(torch.stack([decoded[i] for i in chunk]))
            if resized is None:
                on_host.extend(chunk)
                continue
            rows = torch.tensor(chunk, device=device)
            pixels[rows] = resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    host_rows, host_pixels = [], []
    for i in sorted(on_host):
        try:
            host_pixels.append(decode_image(datas[i]))
            host_rows.append(i)
        except ImageError as e:
            errors[i] = str(e) or type(e).__name__
    if host_rows:
        pixels[torch.tensor(host_rows, device=device)] = torch.from_numpy(np.stack(host_pixels)).to(device)
    return pixels, errors

