"""What one uploaded image may cost a search replica: its bytes, its pixels, and the memory its decoding allocates.

A small file can decode into a large image (figures: docs/benchmarks.md, "Upload memory and stalled uploads"), so
each upload's decoding cost is read from its header before anything is decoded, an image that needs more than the
replica's whole budget is refused, and decodes wait for their share of the budget, so those running at once never
need more than it together. After a large decode the freed memory is handed back to the operating system.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import io
import warnings
from contextlib import asynccontextmanager

import numpy as np
from PIL import Image

from embedder.reader import ImageError, decode_image
from jobs.serve_options import ServeOptions

# Peak bytes decode_image allocates per pixel, by the mode Pillow opens the image in: the measurement that
# tests/test_serve.py::test_decode_cost_bounds_what_decoding_allocates repeats, rounded up with a byte to spare (it
# varies by about half a byte between runs). They are the decoded image, the copies that exif_transpose and the
# conversion to RGB make (Pillow keeps 3 channels in 4 bytes), alpha compositing's two more, and for 16- and 32-bit
# integer modes the int64 arrays of their rescaling to 8 bits.
MODE_BYTES_PER_PIXEL = {
    "1": 8, "L": 8, "P": 8,
    "RGB": 14, "YCbCr": 14, "LAB": 14, "HSV": 14, "CMYK": 14, "F": 15,
    "LA": 26, "La": 26, "PA": 26, "RGBA": 26, "RGBa": 26,
    "I;16": 27, "I;16L": 27, "I;16B": 27, "I;16N": 27, "I": 35,
}
# A paletted image with transparency is composited as RGBA.
PALETTE_WITH_ALPHA_BYTES_PER_PIXEL = 20
# Decoders that hold a full-size buffer of their own besides Pillow's image.
DECODER_BYTES_PER_PIXEL = {"WEBP": 10, "JPEG2000": 10, "AVIF": 6}
# Below this a decode leaves little behind: handing memory back is not worth the call.
GIVE_BACK_ABOVE = 64 * 1024**2


class UploadRejected(Exception):
    """An upload refused before the model sees it; carries the HTTP status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def decode_cost(img: Image.Image) -> int:
    """Bytes decode_image allocates at its peak for this opened (not yet decoded) image: pixels times its mode's and
    its decoder's bytes per pixel; an unknown mode counts as the most expensive one."""
    if img.mode == "P" and "transparency" in img.info:
        per_pixel = PALETTE_WITH_ALPHA_BYTES_PER_PIXEL
    else:
        per_pixel = MODE_BYTES_PER_PIXEL.get(img.mode, max(MODE_BYTES_PER_PIXEL.values()))
    per_pixel += DECODER_BYTES_PER_PIXEL.get(img.format or "", 0)
    return img.size[0] * img.size[1] * per_pixel


def inspect_upload(data: bytes, limits: ServeOptions) -> int:
    """The decoding cost in bytes of an upload, read from its header, after the byte, pixel and decode-memory limits
    are checked (UploadRejected 413 otherwise). 0 if Pillow cannot even open it: decoding then fails at once."""
    if len(data) > limits.max_upload_bytes:
        raise UploadRejected(413, f"upload of {len(data):,} bytes; the limit is {limits.max_upload_bytes:,}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                (width, height), cost = img.size, decode_cost(img)
    except Image.DecompressionBombError as e:
        raise UploadRejected(413, f"image too large: {e}") from None
    # Broad on purpose, as in decode_image: a Pillow plugin meeting malformed bytes raises whatever its parser meets
    # (NotImplementedError, AttributeError, ...). Nothing is allocated then, and decode_image says why it failed.
    except Exception:
        return 0
    if width * height > limits.max_upload_pixels:
        raise UploadRejected(413, f"image of {width}x{height} pixels; the limit is {limits.max_upload_pixels:,} pixels")
    if cost > limits.decode_memory_bytes:
        raise UploadRejected(
            413, f"decoding this {width}x{height} image needs about {cost / 1024**2:,.0f} MiB; "
            f"the limit is {limits.decode_memory_bytes / 1024**2:,.0f} MiB (--decode-memory)")
    return cost


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def decode_and_give_back(data: bytes, cost: int) -> np.ndarray:
    """decode_image, then, after a large decode, the freed memory handed back to the operating system.

    The decode runs in a worker thread, whose malloc arena keeps freed blocks for reuse: without malloc_trim a replica
    stays as large as its largest moment (docs/benchmarks.md, "Upload memory and stalled uploads").
    """
    try:
        return decode_image(data)
    except ImageError as e:
        raise UploadRejected(400, f"not a usable image: {e}") from None
    finally:
        if cost > GIVE_BACK_ABOVE and MALLOC_TRIM is not None:
            MALLOC_TRIM(0)


class DecodeBudget:
    """The bytes one replica's decodes may allocate together, handed out first come, first served (a large decode is
    not overtaken forever by small ones)."""

    def __init__(self, total: int):
        self.free = total
        self._waiting: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @asynccontextmanager
    async def hold(self, cost: int):
        """Wait until `cost` bytes of the budget are free, and hold them for the block."""
        await self._acquire(cost)
        try:
            yield
        finally:
            self._release(cost)

    async def _acquire(self, cost: int) -> None:
        if not self._waiting and cost <= self.free:
            self.free -= cost
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append((cost, turn))
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release(cost)  # granted just as the request went away
            else:
                self._waiting.remove((cost, turn))
                self._grant()
            raise

    def _release(self, cost: int) -> None:
        self.free += cost
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self._waiting[0][0] <= self.free:
            cost, turn = self._waiting.popleft()
            self.free -= cost
            turn.set_result(None)
