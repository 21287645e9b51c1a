"""Keeper: which image of a near-duplicate group to keep, by an ordered list of tie-breakers, and why, in words.

The tie-breakers (`cluster.options.KEEP_RULES`): `pixels` (most pixels), `bytes` (largest file), `lossless` (PNG,
TIFF, BMP or lossless WebP over a lossy format), `oldest` (earliest modification time); the path decides last. Pixels
and format come from the file's header and size and time from the filesystem, read when the step runs (the shards do
not store pixels or format). A file that is gone or cannot be read has no facts and loses every tie-breaker.
"""

from __future__ import annotations

import io
import os
import struct
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from PIL import Image

from embedder.config import is_uri

LOSSLESS_FORMATS = frozenset({"PNG", "TIFF", "BMP"})  # WebP: lossless only with a VP8L image chunk
HEADER_BYTES = 1 << 16  # enough for Pillow to find the size of a JPEG behind a large EXIF block
# What each tie-breaker compares, as said when two images are equal on it ("same pixels, larger file").
SAME = {"pixels": "pixels", "bytes": "size", "lossless": "kind of format", "oldest": "age"}


@dataclass(frozen=True)
class ImageFacts:
    """What the keep rule compares, read from one file; None where the file did not say (`error` says why)."""

    width: int | None = None
    height: int | None = None
    bytes: int | None = None
    format: str | None = None
    lossless: bool | None = None
    mtime_ns: int | None = None
    error: str = ""

    @property
    def pixels(self) -> int | None:
        """Width x height, None when the header was not read."""
        return None if self.width is None or self.height is None else self.width * self.height


def _webp_lossless(header: bytes) -> bool:
    """True if a WebP file's image chunk is VP8L (lossless), walking the RIFF chunks in `header`."""
    position = 12
    while position + 8 <= len(header):
        fourcc, size = header[position : position + 4], struct.unpack("<I", header[position + 4 : position + 8])[0]
        if fourcc in (b"VP8 ", b"VP8L"):
            return fourcc == b"VP8L"
        position += 8 + size + (size & 1)
    return False


def read_facts(path: str) -> ImageFacts:
    """Size, modification time, dimensions and format of the image at a local path or URI (header only)."""
    try:
        if is_uri(path):
            from pyarrow import fs

            filesystem, inner = fs.FileSystem.from_uri(path)
            info = filesystem.get_file_info(inner)
            if info.type != fs.FileType.File:
                return ImageFacts(error="file missing")
            size, mtime = int(info.size), int(info.mtime_ns or 0)
            with filesystem.open_input_stream(inner) as f:
                header = f.read(HEADER_BYTES)
        else:
            st = os.stat(path)
            size, mtime = st.st_size, st.st_mtime_ns
            with open(path, "rb") as f:
                header = f.read(HEADER_BYTES)
    except (OSError, ValueError) as e:
        return ImageFacts(error=f"file missing or unreadable ({e.__class__.__name__})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(header)) as img:  # the header is enough for size and format
                width, height, kind = img.size[0], img.size[1], img.format
    # Broad on purpose, as embedder.reader.decode_rgb: Pillow's plugins raise whatever their parser meets on malformed
    # bytes, and a file changed since it was embedded is this file's missing facts, never the step's failure.
    except Exception as e:
        return ImageFacts(bytes=size, mtime_ns=mtime, error=f"header unreadable ({type(e).__name__})")
    lossless = _webp_lossless(header) if kind == "WEBP" else kind in LOSSLESS_FORMATS
    return ImageFacts(width, height, size, kind, lossless, mtime)


def read_all_facts(paths: Sequence[str], threads: int = 16) -> list[ImageFacts]:
    """`read_facts` of every path, in order (threads: the work is waiting on the filesystem)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(read_facts, paths))


def _value(facts: ImageFacts, rule: str) -> float | None:
    """The number a rule compares, larger = better; None when unknown."""
    if rule == "pixels":
        return facts.pixels
    if rule == "bytes":
        return facts.bytes
    if rule == "lossless":
        return None if facts.lossless is None else float(facts.lossless)
    return None if facts.mtime_ns is None else -float(facts.mtime_ns)


def keep_key(facts: ImageFacts, path: str, rules: Sequence[str]) -> tuple:
    """Sort key of an image under the keep rule, best first: each rule's value (unknown last), then the path."""
    key: list = []
    for rule in rules:
        value = _value(facts, rule)
        key += [1, 0.0] if value is None else [0, -value]
    return (*key, path)


def _describe(facts: ImageFacts, rule: str) -> str:
    if rule == "pixels":
        return f"{facts.width}×{facts.height}"
    if rule == "bytes":
        return f"{facts.bytes:,} bytes"
    if rule == "lossless":
        return facts.format or ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(facts.mtime_ns / 1e9))


WON = {"pixels": "largest image", "bytes": "larger file", "lossless": "lossless format", "oldest": "oldest file"}
LOST = {"pixels": "smaller image", "bytes": "smaller file", "lossless": "lossy format", "oldest": "newer file"}


def _deciding(a: ImageFacts, b: ImageFacts, rules: Sequence[str]) -> tuple[list[str], str | None]:
    """The rules on which a and b are equal before the first that tells them apart (None: the path decides)."""
    same = []
    for rule in rules:
        if _value(a, rule) != _value(b, rule):
            return same, rule
        same.append(rule)
    return same, None


def _prefix(same: list[str]) -> str:
    if not same:
        return ""
    words = [SAME[rule] for rule in same]
    return "same " + (words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]) + ", "


def kept_reason(keeper: ImageFacts, runner_up: ImageFacts, rules: Sequence[str], unreadable: int) -> str:
    """Why `keeper` is kept over the best other member `runner_up`, in words; `unreadable` other members are said."""
    if keeper.error:
        return f"no member could be read ({keeper.error}); first path"
    same, rule = _deciding(keeper, runner_up, rules)
    text = _prefix(same) + ("first path" if rule is None else f"{WON[rule]} ({_describe(keeper, rule)})")
    if unreadable:
        text += f"; {unreadable} other file{'s' if unreadable > 1 else ''} missing or unreadable"
    return text


def member_reason(member: ImageFacts, keeper: ImageFacts, rules: Sequence[str]) -> str:
    """Why `member` is not the keeper, in words."""
    if member.error and not keeper.error:
        return f"{member.error}: loses every tie-breaker"
    same, rule = _deciding(member, keeper, rules)
    if rule is None:
        return _prefix(same) + "later path"
    if _value(member, rule) is None:
        return _prefix(same) + f"{SAME[rule]} unknown ({member.error or 'not in the header'})"
    return _prefix(same) + f"{LOST[rule]} ({_describe(member, rule)})"
