"""Reader: turn INPUT arguments into a sorted list of image paths with stable ids, and decode one image into model pixels.

Decoding computes the centre-crop box on the source image and resizes only that box, so the result equals
torchvision's Resize(256) + CenterCrop(224) while an image of extreme aspect ratio never gets blown up in memory.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from embedder.config import PREPROCESSING, UserError, absolute, is_uri

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".jfif"}
)
LIST_EXTENSIONS = (".txt", ".csv", ".parquet")
CROP = PREPROCESSING["center_crop"]
SHORT_SIDE = PREPROCESSING["resize_short_side"]


class ImageError(Exception):
    """An input file that cannot be turned into pixels; its message is what errors.csv records."""


def image_id(path: str) -> int:
    """Stable non-negative int64 id of an image: the first 8 bytes of sha256 of its absolute path or URI."""
    digest = hashlib.sha256(path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF


def _walk(root: str) -> Iterable[str]:
    """Image files under `root`, following directory symlinks but never the same real directory twice (no loops)."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in filenames:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.join(dirpath, name)


def _read_list(list_path: str) -> list[str]:
    """Paths named in a .txt (one per line), .csv or .parquet (a `path` column); relative ones resolved against its folder."""
    ext = os.path.splitext(list_path)[1].lower()
    if ext == ".txt":
        with open(list_path, encoding="utf-8") as f:
            entries = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    else:
        import pandas as pd  # only list files need it; decode workers start faster without it

        frame = pd.read_csv(list_path) if ext == ".csv" else pd.read_parquet(list_path)
        if "path" not in frame.columns:
            raise UserError(f"{list_path}: no 'path' column; a CSV or Parquet list needs one column named path")
        entries = [str(p) for p in frame["path"].dropna()]
    base = os.path.dirname(list_path)
    return [e if is_uri(e) or os.path.isabs(e) else os.path.join(base, e) for e in entries]


@dataclass(frozen=True)
class Listing:
    """The images INPUT names, one per file: sorted absolute paths or URIs, their ids and their version fingerprints.

    `sizes` and `mtimes_ns` are -1 and `fingerprints` 0 where the file could not be looked at (missing, unreadable
    folder): such a file is still listed, so decoding reports it in errors.csv.
    """

    paths: list[str]
    ids: np.ndarray
    sizes: np.ndarray
    mtimes_ns: np.ndarray
    fingerprints: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)


def fingerprint(size: int, mtime_ns: int) -> int:
    """Stable non-zero int64 naming one version of a file: a hash of its size and modification time (ns)."""
    digest = hashlib.sha256(f"{size}:{mtime_ns}".encode()).digest()
    return (int.from_bytes(digest[:8], "big") & 0x7FFF_FFFF_FFFF_FFFF) or 1


def _stat(path: str) -> tuple[int, int, tuple[int, int] | None]:
    """(size, mtime_ns, file identity) of a local path or URI; (-1, -1, None) if it cannot be looked at.

    The identity (device, inode) of a local file is what tells two paths to the same file apart from two files.
    """
    if is_uri(path):
        from pyarrow import fs

        try:
            filesystem, inner = fs.FileSystem.from_uri(path)
            info = filesystem.get_file_info(inner)
        except (OSError, ValueError):
            return -1, -1, None
        if info.type != fs.FileType.File:
            return -1, -1, None
        return int(info.size), int(info.mtime_ns or 0), None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return -1, -1, None
    return st.st_size, st.st_mtime_ns, (st.st_dev, st.st_ino)


def _list_uri(uri: str) -> dict[str, tuple[int, int]]:
    """The image files under a URI that pyarrow's filesystems open (recursively, for a folder or prefix), or the URI
    itself when it names one object; each as a full URI with the original query (e.g. `?endpoint_override=`), with its
    (size, mtime_ns) from the same listing: one request per prefix, not one per object."""
    from pyarrow import fs

    scheme, _, rest = uri.partition("://")
    query = "?" + rest.partition("?")[2] if "?" in rest else ""
    try:
        filesystem, root = fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(root)
        if info.type == fs.FileType.File:
            return {uri: (int(info.size), int(info.mtime_ns or 0))}
        if info.type == fs.FileType.NotFound:
            raise UserError(f"input {uri}: no such object or folder")
        entries = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    except (OSError, ValueError) as e:
        raise UserError(f"input {uri}: {e}") from None
    return {
        f"{scheme}://{entry.path}{query}": (int(entry.size), int(entry.mtime_ns or 0))
        for entry in entries
        if entry.type == fs.FileType.File and os.path.splitext(entry.path)[1].lower() in IMAGE_EXTENSIONS
    }


def _candidates(inputs: Sequence[str]) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Every path INPUT names (directories walked, globs expanded, lists read), absolute, deduplicated, sorted; and
    the (size, mtime_ns) of the URIs that a listing already returned."""
    found: list[str] = []
    listed: dict[str, tuple[int, int]] = {}
    for raw in inputs:
        arg = absolute(raw)
        if is_uri(arg):
            uris = _list_uri(arg)
            listed.update(uris)
            found.extend(uris)
        elif os.path.isdir(arg):
            found.extend(_walk(arg))
        elif os.path.isfile(arg) and arg.lower().endswith(LIST_EXTENSIONS):
            found.extend(_read_list(arg))
        elif os.path.isfile(arg):
            found.append(arg)
        elif glob.has_magic(raw):
            matches = sorted(glob.glob(arg, recursive=True))
            found.extend(m for m in matches if os.path.isfile(m))
            for d in (m for m in matches if os.path.isdir(m)):
                found.extend(_walk(d))
        else:
            raise UserError(f"input {raw}: no such file, directory or glob match")
    return sorted({absolute(p) for p in found}), listed


def scan_images(inputs: Sequence[str]) -> Listing:
    """List the images INPUT names and look at each once: size, modification time, and which file it really is.

    A file reached through several paths (symlinks, hard links) is listed once, under the first of its paths in
    sorted order; identical bytes in two different files are two images.
    """
    paths: list[str] = []
    stats: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    candidates, listed = _candidates(inputs)
    for path in candidates:
        size, mtime_ns, identity = (*listed[path], None) if path in listed else _stat(path)
        if identity is not None:
            if identity in seen:
                continue
            seen.add(identity)
        paths.append(path)
        stats.append((size, mtime_ns))
    sizes = np.array([s for s, _ in stats], dtype=np.int64)
    mtimes = np.array([m for _, m in stats], dtype=np.int64)
    fingerprints = np.array([fingerprint(s, m) if s >= 0 else 0 for s, m in stats], dtype=np.int64)
    ids = np.array([image_id(p) for p in paths], dtype=np.int64)
    return Listing(paths, ids, sizes, mtimes, fingerprints)


def list_images(inputs: Sequence[str]) -> list[str]:
    """All images named by INPUT arguments (directories, globs, list files, files), absolute, one path per file, sorted."""
    return scan_images(inputs).paths


def crop_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The source-image box that torchvision's Resize(256) followed by CenterCrop(224) keeps."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = SHORT_SIDE, int(SHORT_SIDE * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    top = int(round((new_h - CROP) / 2.0))
    left = int(round((new_w - CROP) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (left * sx, top * sy, (left + CROP) * sx, (top + CROP) * sy)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: 16-bit scaled (not clipped), transparency composited on white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        wide = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _describe(error: Exception) -> str:
    """`Type: message` of an exception, as errors.csv records a file's failure (the type alone if it has no message)."""
    message = str(error).strip()
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> (224, 224, 3) uint8 pixels, as torchvision's VGG-16 transforms would crop them.

    Raises ImageError, and nothing else, for anything that is not a complete, sane image (empty, truncated, not an
    image, over Pillow's pixel limit, or bytes a Pillow plugin chokes on whatever it raises). Pillow's
    decompression-bomb limit stays on: its warning is raised as an error.
    """
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except Image.DecompressionBombError as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except Image.DecompressionBombWarning as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (unrecognised format)") from None
    # Broad on purpose: Pillow's format plugins raise whatever their parser meets on malformed bytes (NotImplementedError
    # for a DDS pixel format, AttributeError from a SPIDER header, RuntimeError from AVIF, ...), and any of them is this
    # file's error, never the job's. Only the decoding is inside the try; our own geometry below stays outside it.
    except Exception as e:
        raise ImageError(f"cannot decode: {_describe(e)}") from None
    box = crop_box(*rgb.size)
    return np.array(rgb.resize((CROP, CROP), Image.Resampling.BILINEAR, box=box), dtype=np.uint8)


def read_bytes(path: str) -> bytes:
    """The bytes of a local file or a URI that pyarrow's filesystems can open (s3://, gs://)."""
    if is_uri(path):
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(path)
        with filesystem.open_input_stream(inner) as f:
            return f.read()
    # O_NONBLOCK: a FIFO named like an image must not hang the job; only regular files are read (not /dev/zero).
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"not a regular file: {path}")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def read_image_file(path: str) -> bytes:
    """The bytes of one image file; any failure to read becomes an ImageError naming its type and reason."""
    try:
        return read_bytes(path)
    # Broad on purpose: whatever the filesystem or pyarrow raises for one path (OSError, a NUL in a listed path,
    # pyarrow's own errors for a URI) is that file's error, recorded in errors.csv, not the job's.
    except Exception as e:
        raise ImageError(f"cannot read: {_describe(e)}") from None


def load_pixels(path: str) -> np.ndarray:
    """Read and decode one image file; any failure becomes an ImageError naming the reason."""
    return decode_image(read_image_file(path))


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data stage: {id, path} rows -> {id, path, pixels, error}; a bad file only fails its own row."""
    n = len(batch["path"])
    pixels = np.zeros((n, CROP, CROP, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            pixels[i] = load_pixels(str(path))
        except ImageError as e:
            errors[i] = str(e) or type(e).__name__
    return {"id": batch["id"], "path": batch["path"], "pixels": pixels, "error": errors}


def read_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data stage of `--decode gpu`: {id, path} rows -> {id, path, data, device, error}.

    `device` True: `data` is a JPEG for the replica's device decoder. False: `data` holds the 224x224x3 uint8 pixels
    decoded here, for every file the device must not decode (device_decodable), so the CPU cores do that work, not the
    GPU's process. The header checks cost about as much as nvJPEG's decoding (50 us an image): they run here too.
    """
    n = len(batch["path"])
    datas = np.full(n, b"", dtype=object)
    on_device = np.zeros(n, dtype=bool)
    errors = np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            data = read_image_file(str(path))
            on_device[i] = device_decodable(data)
            datas[i] = data if on_device[i] else decode_image(data).tobytes()
        except ImageError as e:
            errors[i] = str(e) or type(e).__name__
    return {"id": batch["id"], "path": batch["path"], "data": datas, "device": on_device, "error": errors}


JPEG_START = b"\xff\xd8"
JPEG_END = b"\xff\xd9"
EXIF_ORIENTATION = 0x0112
# Modes the decoder turns into the same RGB as Pillow; CMYK/YCCK JPEGs (often Adobe-inverted) are left to Pillow.
DEVICE_MODES = frozenset({"RGB", "L"})


def device_decodable(data: bytes) -> bool:
    """True for a JPEG the device may decode as the CPU path would: complete, upright, RGB or grey, within the pixel limit.

    Reads the header only. False for anything else; decode_image then decodes it or names what is wrong with it.
    """
    # Pillow rejects a JPEG cut short, while a GPU decoder may fill in the missing part: a complete one ends in EOI.
    if not (data.startswith(JPEG_START) and data.endswith(JPEG_END)):
        return False
    try:
        with warnings.catch_warnings():
            # Image.open applies Pillow's decompression-bomb limit to the header's size: over it, decode on the CPU.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                # An Adobe transform of 0 means RGB stored without YCbCr conversion, which not every decoder honours.
                # getexif() also reads an XMP orientation, as ImageOps.exif_transpose does in decode_image.
                return (
                    img.mode in DEVICE_MODES
                    and img.info.get("adobe_transform") != 0
                    and img.getexif().get(EXIF_ORIENTATION, 1) == 1
                )
    # Broad on purpose: whatever Pillow raises on this file's header, decode_image meets it too and records it as the
    # image's error; here it only means "not for the device".
    except Exception:
        return False
