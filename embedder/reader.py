"""Reader: turn INPUT arguments into a sorted list of image paths with stable ids, and decode one image into model pixels.

Decoding computes the centre-crop box on the source image and resizes only that box, so the result equals
torchvision's Resize(256) + CenterCrop(224) while an image of extreme aspect ratio never gets blown up in memory.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import io
import logging
import os
import stat
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from embedder.config import PREPROCESSING, UserError, absolute, is_uri

log = logging.getLogger("imgindex")

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


class _Guard:
    """What a listing must not look into, and the count of what it left out.

    Outputs are never inputs: a folder that is OUT, or any other folder an imgindex run wrote (its manifest.json and
    embeddings/), is not entered when a walk or a glob finds it inside an input folder; and no path inside an OUT's
    own files and folders (embeddings/, report/ with its thumbnails, ...) is listed however it was named (the input
    folder being OUT itself, a glob, a list, a file), so `--out .` or `--out photos` still list the photos beside OUT.
    Directory symlinks are followed only with `follow_links`, as find, fd and ripgrep do: one link to / would list the
    whole disk.
    """

    def __init__(self, out: str | None, follow_links: bool):
        self.out = None if out is None or is_uri(out) else os.path.realpath(absolute(out))
        self.out_uri = _without_query(out) if out is not None and is_uri(out) else None
        self.follow_links = follow_links
        self.folders: list[str] = []
        self.files = 0
        self.links: set[str] = set()
        self._is_output: dict[str, bool] = {}
        self._under_output: dict[str, bool] = {}
        self._through_link: dict[str, bool] = {}

    def is_output(self, real_dir: str) -> bool:
        """True for OUT and for any folder an imgindex run wrote (by real path)."""
        if real_dir not in self._is_output:
            from embedder.outdir import is_out_folder  # pandas and pyarrow: the listing's driver only, not decode workers

            self._is_output[real_dir] = real_dir == self.out or is_out_folder(real_dir)
        return self._is_output[real_dir]

    def in_output(self, path: str) -> bool:
        """True if the local `path` lies inside the own files and folders of OUT or of another imgindex OUT."""
        parent = os.path.dirname(path)
        if parent not in self._under_output:
            self._under_output[parent] = self._inside_output(os.path.realpath(parent))
        if self._under_output[parent]:
            return True
        return os.path.basename(path) in _out_entries() and self.is_output(os.path.realpath(parent))

    def _inside_output(self, real_dir: str) -> bool:
        node = real_dir
        while (up := os.path.dirname(node)) != node:
            if os.path.basename(node) in _out_entries() and self.is_output(up):
                return True
            node = up
        return False

    def through_link(self, path: str, base: str) -> bool:
        """True (and the link counted) if `path` is reached from `base` through a directory symlink, when links are
        not followed; `path` itself counts if it is a directory."""
        if self.follow_links:
            return False
        rel = os.path.relpath(path, base)
        if rel == "." or rel.startswith(os.pardir):
            return False
        node = base
        for part in rel.split(os.sep):
            node = os.path.join(node, part)
            if node not in self._through_link:
                self._through_link[node] = os.path.islink(node) and os.path.isdir(node)
            if self._through_link[node]:
                self.links.add(node)
                return True
        return False

    def keep_uri(self, uri: str, root: str, outputs: Sequence[str]) -> bool:
        """False for a URI listed under `root` that lies inside OUT or one of the other `outputs` found in the listing
        (URIs without query): anywhere in one found below `root`, else in its own files and folders."""
        bare, root = _without_query(uri), _without_query(root).rstrip("/")
        for output in [*outputs, *([self.out_uri.rstrip("/")] if self.out_uri else [])]:
            if not bare.startswith(output + "/"):
                continue
            if output.startswith(root + "/"):
                if output not in self.folders:
                    self.folders.append(output)
                return False
            if bare[len(output) + 1 :].split("/", 1)[0] in _out_entries():
                self.files += 1
                return False
        return True

    def report(self) -> None:
        """One log line for the outputs left out, one for the directory symlinks not followed."""
        parts = []
        if self.folders:
            shown = ", ".join(sorted(self.folders)[:3]) + (", ..." if len(self.folders) > 3 else "")
            parts.append(f"{len(self.folders)} output folder{'s' * (len(self.folders) != 1)} ({shown})")
        if self.files:
            parts.append(f"{self.files} file{'s' * (self.files != 1)} inside output folders")
        if parts:
            log.info("left out %s: imgindex outputs are never inputs", " and ".join(parts))
        if self.links:
            log.info(
                "did not follow %d directory symlink%s (pass --follow-links to follow them)",
                len(self.links), "s" * (len(self.links) != 1),
            )


@functools.cache
def _out_entries() -> frozenset[str]:
    """The names of OUT's own files and folders (embedder/outdir.py owns them)."""
    from embedder.outdir import OUT_FILES

    return frozenset(OUT_FILES)


def _without_query(uri: str) -> str:
    """A URI without its `?query` (pyarrow options such as endpoint_override)."""
    return uri.partition("?")[0]


def _walk_tree(root: str, guard: _Guard, named: bool = True) -> Iterable[tuple[str, list[str]]]:
    """(folder, file names) of every folder under `root` the listing may enter, in sorted order: not into what `guard`
    leaves out (outputs, unfollowed directory symlinks), and when links are followed, never into the same real folder
    twice (no loops). A `root` INPUT names itself (`named`) that is an OUT loses only OUT's own files and folders; one a
    glob found is left out whole, as a folder found by walking is."""
    seen: set[str] = set()
    entries = _out_entries()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=guard.follow_links):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        maybe_output = dirpath == root or real == guard.out or _looks_like_out(filenames, dirnames)
        if maybe_output and guard.is_output(real):
            if dirpath != root or not named:
                guard.folders.append(dirpath)
                dirnames[:] = []
                continue
            # The input folder is an OUT itself: leave out its own files and folders, list the rest.
            guard.folders.extend(os.path.join(dirpath, d) for d in sorted(dirnames) if d in entries)
            dirnames[:] = [d for d in dirnames if d not in entries]
            filenames = [f for f in filenames if f not in entries]
        if not guard.follow_links:
            links = {d for d in dirnames if os.path.islink(os.path.join(dirpath, d))}
            guard.links.update(os.path.join(dirpath, d) for d in links)
            dirnames[:] = [d for d in dirnames if d not in links]
        dirnames.sort()
        yield dirpath, filenames


def _walk(root: str, guard: _Guard, named: bool = True) -> Iterable[str]:
    """Image files under `root` (by extension, any case), as _walk_tree enters its folders; absolute and normalised
    when `root` is."""
    for dirpath, filenames in _walk_tree(root, guard, named):
        prefix = dirpath + os.sep if dirpath != os.sep else dirpath
        for name in filenames:
            dot = name.rfind(".")
            if dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS:
                yield prefix + name


def _glob(pattern: str, guard: _Guard) -> list[str]:
    """What glob.glob(pattern, recursive=True) names, as the old listing took it (matching files whatever their
    extension, and the image files under matching folders), but walked by _walk_tree when the pattern holds `**`:
    Python's `**` follows directory symlinks, without loop detection."""
    base = _glob_base(pattern)
    if "**" not in pattern.split(os.sep):
        matches = [m for m in sorted(glob.glob(pattern)) if not guard.through_link(m, base)]
        found = [m for m in matches if os.path.isfile(m)]
        for d in (m for m in matches if os.path.isdir(m)):
            found.extend(_walk(d, guard, named=False))
        return found
    wanted = os.path.relpath(pattern, base).split(os.sep)
    found = []
    matching_folder: dict[str, bool] = {}
    for dirpath, filenames in _walk_tree(base, guard):
        rel = [] if dirpath == base else os.path.relpath(dirpath, base).split(os.sep)
        parent = os.path.dirname(dirpath)
        # A folder the pattern matches is listed whole (its image files), as a walked folder is.
        matching_folder[dirpath] = matching_folder.get(parent, False) or _glob_match(rel, wanted)
        for name in filenames:
            path = os.path.join(dirpath, name)
            image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            if (matching_folder[dirpath] and image) or (_glob_match([*rel, name], wanted) and os.path.isfile(path)):
                found.append(path)
    return found


def _glob_match(parts: list[str], wanted: list[str]) -> bool:
    """True if path components `parts` match the glob components `wanted` as glob.glob(recursive=True) does: `**`
    spans any number of folders, and no wildcard matches a name starting with a dot unless the pattern's does."""
    if not wanted:
        return not parts
    head, rest = wanted[0], wanted[1:]
    if head == "**":
        return any(_glob_match(parts[i:], rest) for i in range(len(parts) + 1) if not any(p.startswith(".") for p in parts[:i]))
    if not parts:
        return False
    name = parts[0]
    if glob.has_magic(head):
        matched = fnmatch.fnmatchcase(name, head) and (head.startswith(".") or not name.startswith("."))
    else:
        matched = name == head
    return matched and _glob_match(parts[1:], rest)


def _looks_like_out(filenames: list[str], dirnames: list[str]) -> bool:
    """A folder holding a manifest.json and an embeddings/ folder: worth reading the manifest to tell if it is an OUT."""
    from embedder.outdir import EMBEDDINGS_DIR, MANIFEST

    return MANIFEST in filenames and EMBEDDINGS_DIR in dirnames


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
    """The images INPUT names, one per file: sorted absolute paths or URIs, their ids, sizes and modification times.

    `sizes` and `mtimes_ns` are -1 where the file could not be looked at (missing, unreadable folder): such a file is
    still listed, and goes to errors.csv without being read. `output_folders` (not walked into) and
    `output_files` (named inside an OUT) are what the listing left out as imgindex outputs; `links_skipped` counts the
    directory symlinks it did not follow.
    """

    paths: list[str]
    ids: np.ndarray
    sizes: np.ndarray
    mtimes_ns: np.ndarray
    output_folders: tuple[str, ...] = ()
    output_files: int = 0
    links_skipped: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def fingerprints(self) -> np.ndarray:
        """The fingerprint of every listed file (0 where it could not be looked at)."""
        return fingerprints(self.sizes, self.mtimes_ns)


def fingerprint(size: int, mtime_ns: int) -> int:
    """Stable non-zero int64 naming one version of a file: a hash of its size and modification time (ns)."""
    return int(_hash64([f"{size}:{mtime_ns}"])[0])


def fingerprints(sizes: np.ndarray, mtimes_ns: np.ndarray) -> np.ndarray:
    """`fingerprint` of every (size, mtime_ns) pair, 0 where the size is -1 (the file could not be looked at)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    return np.where(sizes >= 0, _hash64([f"{s}:{m}" for s, m in zip(sizes.tolist(), np.asarray(mtimes_ns).tolist())]), 0)


def _hash64(texts: Sequence[str]) -> np.ndarray:
    """image_id of every text at once (the first 8 bytes of its sha256, as a non-negative int64), and never 0: the
    listing's hashes, done in one pass instead of one Python integer per file."""
    digests = b"".join([hashlib.sha256(text.encode("utf-8")).digest()[:8] for text in texts])
    values = np.frombuffer(digests, dtype=">i8").astype(np.int64) & 0x7FFF_FFFF_FFFF_FFFF
    return np.where(values == 0, 1, values)


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


def _list_uri(uri: str, guard: _Guard) -> dict[str, tuple[int, int]]:
    """The image files under a URI that pyarrow's filesystems open (recursively, for a folder or prefix), or the URI
    itself when it names one object; each as a full URI with the original query (e.g. `?endpoint_override=`), with its
    (size, mtime_ns) from the same listing: one request per prefix, not one per object. Objects inside OUT are left
    out (`guard`)."""
    from pyarrow import fs

    from embedder.outdir import EMBEDDINGS_DIR, MANIFEST, is_out_folder

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
    files = [entry for entry in entries if entry.type == fs.FileType.File]
    # Other imgindex OUTs under the prefix: folders with a manifest.json beside an embeddings/ folder, manifest checked.
    with_manifest = {e.path.rpartition("/")[0] for e in files if e.path.rpartition("/")[2] == MANIFEST}
    with_shards = {e.path.rsplit("/", 2)[0] for e in files if e.path.count("/") >= 2 and e.path.rsplit("/", 2)[1] == EMBEDDINGS_DIR}
    outputs = [f"{scheme}://{d}" for d in sorted(with_manifest & with_shards) if is_out_folder(f"{scheme}://{d}{query}")]
    return {
        f"{scheme}://{entry.path}{query}": (int(entry.size), int(entry.mtime_ns or 0))
        for entry in files
        if os.path.splitext(entry.path)[1].lower() in IMAGE_EXTENSIONS and guard.keep_uri(f"{scheme}://{entry.path}", uri, outputs)
    }


def _glob_base(pattern: str) -> str:
    """The folder a glob pattern starts from: its components before the first one with a wildcard."""
    parts = pattern.split(os.sep)
    first_wildcard = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    return os.sep.join(parts[:first_wildcard]) or os.sep


def _candidates(inputs: Sequence[str], guard: _Guard) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """Every path INPUT names (directories walked, globs expanded, lists read) that `guard` does not leave out,
    absolute, deduplicated, sorted; and the (size, mtime_ns) of the URIs that a listing already returned."""
    found: list[str] = []  # absolute and normalised already
    named: list[str] = []  # local paths named one by one (list entries, files, glob matches): checked against OUT
    listed: dict[str, tuple[int, int]] = {}
    for raw in inputs:
        arg = absolute(raw)
        if is_uri(arg):
            uris = _list_uri(arg, guard)
            listed.update(uris)
            found.extend(uris)
        elif os.path.isdir(arg):
            found.extend(_walk(arg, guard))
        elif os.path.isfile(arg) and arg.lower().endswith(LIST_EXTENSIONS):
            entries = _read_list(arg)
            uris = [e for e in entries if is_uri(e)]
            found.extend(e for e in uris if guard.keep_uri(e, e, []))
            named.extend(e for e in entries if not is_uri(e))
        elif os.path.isfile(arg):
            named.append(arg)
        elif glob.has_magic(raw):
            named.extend(_glob(arg, guard))
        else:
            raise UserError(f"input {raw}: no such file, directory or glob match")
    for path in map(absolute, named):
        if guard.in_output(path):
            guard.files += 1
        else:
            found.append(path)
    return sorted(set(found)), listed


def scan_images(inputs: Sequence[str], out: str | None = None, follow_links: bool = False) -> Listing:
    """List the images INPUT names and look at each once: size, modification time, and which file it really is.

    Nothing inside OUT (`out`) or another imgindex OUT is listed, and directory symlinks are followed only with
    `follow_links` (see _Guard); what was left out is logged and counted in the Listing. A file reached through several
    paths (symlinks, hard links) is listed once, under the first of its paths in sorted order; identical bytes in two
    different files are two images.
    """
    paths: list[str] = []
    stats: list[tuple[int, int]] = []
    seen: set[tuple[int, int]] = set()
    guard = _Guard(out, follow_links)
    candidates, listed = _candidates(inputs, guard)
    guard.report()
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
    ids = _hash64(paths)
    return Listing(paths, ids, sizes, mtimes, tuple(sorted(guard.folders)), guard.files, len(guard.links))


def list_images(inputs: Sequence[str], out: str | None = None, follow_links: bool = False) -> list[str]:
    """All images named by INPUT arguments (directories, globs, list files, files), absolute, one path per file, sorted;
    `out` and `follow_links` as in scan_images."""
    return scan_images(inputs, out, follow_links).paths


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
    return model_pixels(decode_rgb(data))


def decode_rgb(data: bytes) -> Image.Image:
    """Encoded image bytes -> the whole image as 8-bit RGB, EXIF orientation applied (ImageError as `decode_image`)."""
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
    # file's error, never the job's. Only the decoding is inside the try; our own geometry (model_pixels) stays outside.
    except Exception as e:
        raise ImageError(f"cannot decode: {_describe(e)}") from None
    return rgb


def model_pixels(rgb: Image.Image) -> np.ndarray:
    """An RGB image -> the (224, 224, 3) uint8 pixels the model sees (Resize(256) + CenterCrop(224))."""
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
    """Ray Data stage: {id, path, ...} rows -> {id, path, ..., pixels, error}; a bad file only fails its own row."""
    n = len(batch["path"])
    pixels = np.zeros((n, CROP, CROP, 3), dtype=np.uint8)
    errors = np.full(n, "", dtype=object)
    for i, path in enumerate(batch["path"]):
        try:
            pixels[i] = load_pixels(str(path))
        except ImageError as e:
            errors[i] = str(e) or type(e).__name__
    return batch | {"pixels": pixels, "error": errors}


def read_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data stage of `--decode gpu`: {id, path, ...} rows -> {id, path, ..., data, device, error}.

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
    return batch | {"data": datas, "device": on_device, "error": errors}


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
