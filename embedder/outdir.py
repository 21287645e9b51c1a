"""OUT: the output folder's contract — the name of every file in it, atomic writes, reading and updating the manifest.

Every module that reads or writes OUT takes the file names from here, so docs/out-format.md has one place to be checked
against. Every file is written to a temporary name first and moved into place (atomic on a local filesystem; on
object stores a PUT is only visible once complete), so no reader sees a half-written file. OUT may be a local path or
a URI that pyarrow's filesystems open (s3://, gs://).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence

import pandas as pd
from pyarrow import fs

from embedder.config import UserError, absolute

log = logging.getLogger("imgindex")

FORMAT_VERSION = 1

MANIFEST = "manifest.json"
CONFIG = "config.json"
ERRORS = "errors.csv"
RUN_LOG = "run.log"
EMBEDDINGS_DIR = "embeddings"
INDEX_FILE = "index.faiss"
INDEX_IDS_FILE = "index_ids.parquet"
CLUSTERS_FILE = "clusters.csv"
CENTROIDS_FILE = "centroids.npy"
CLUSTER_IDS_FILE = "cluster_ids.parquet"
K_SWEEP_FILE = "k_sweep.csv"
REPORT_DIR = "report"
# Every name above that is a file or folder of OUT, as docs/out-format.md lists them.
OUT_FILES = (
    MANIFEST, CONFIG, ERRORS, RUN_LOG, EMBEDDINGS_DIR, INDEX_FILE, INDEX_IDS_FILE, CLUSTERS_FILE, CENTROIDS_FILE,
    CLUSTER_IDS_FILE, K_SWEEP_FILE, REPORT_DIR,
)
# Manifest key: {file name relative to OUT: sha256 hex} for the shards and index.faiss.
CHECKSUMS = "checksums"
# Where `query` remembers files it has verified, by size and modification time (hashing a large index takes seconds).
VERIFIED_CACHE_ENV = "IMGINDEX_VERIFIED_CACHE"


def now_iso() -> str:
    """The current UTC time as the manifest records it."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class OutDir:
    """The output location of a job: atomic writes, reads and listings relative to its root."""

    def __init__(self, location: str):
        self.location = absolute(location)
        self.fs, self.root = fs.FileSystem.from_uri(self.location)

    def path(self, name: str) -> str:
        """Filesystem path of `name` (relative to the root)."""
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str = "") -> bool:
        """True if `name` (or the root itself) exists."""
        return self.fs.get_file_info(self.path(name) if name else self.root).type != fs.FileType.NotFound

    def read_bytes(self, name: str) -> bytes:
        """The whole content of `name`."""
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write `name` atomically (a temporary sibling first, then a move onto the final name); return its sha256."""
        final = self.path(name)
        folder = final.rsplit("/", 1)[0]
        try:
            self.fs.create_dir(folder, recursive=True)
        except OSError as e:  # a missing bucket, no permission: nothing a retry would fix
            raise UserError(f"cannot create {folder} for --out {self.location}: {e}") from None
        temporary = f"{final}.tmp-{uuid.uuid4().hex[:12]}"
        with self.fs.open_output_stream(temporary) as f:
            f.write(data)
        self.fs.move(temporary, final)
        return hashlib.sha256(data).hexdigest()

    def delete(self, name: str) -> None:
        """Remove `name`."""
        self.fs.delete_file(self.path(name))

    def list(self, folder: str, suffix: str) -> list[str]:
        """Names (relative to the root) of the finished files in `folder` ending in `suffix`, sorted."""
        selector = fs.FileSelector(self.path(folder), allow_not_found=True)
        prefix = self.root.rstrip("/") + "/"
        names = [
            info.path[len(prefix):]
            for info in self.fs.get_file_info(selector)
            if info.type == fs.FileType.File and info.path.endswith(suffix)
        ]
        return sorted(names)

    def read_json(self, name: str) -> dict:
        """A JSON file as a dict; one that does not parse is a UserError."""
        try:
            return json.loads(self.read_bytes(name))
        except ValueError as e:
            raise UserError(f"{self.location}/{name} is not valid JSON ({e}); it was damaged or replaced") from None

    def write_json(self, name: str, value: dict) -> None:
        """A dict as an indented JSON file, atomically."""
        self.write_bytes(name, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def read_csv(self, name: str, columns: Sequence[str] | None = None) -> pd.DataFrame | None:
        """A CSV file of OUT as a DataFrame (only `columns`, if given); None when the file does not exist."""
        if not self.exists(name):
            return None
        return pd.read_csv(io.BytesIO(self.read_bytes(name)), usecols=list(columns) if columns else None)

    def write_csv(self, name: str, frame: pd.DataFrame) -> None:
        """A DataFrame as CSV without its index, atomically."""
        self.write_bytes(name, frame.to_csv(index=False).encode())

    def read_manifest(self) -> dict:
        """manifest.json as a dict."""
        return self.read_json(MANIFEST)

    def update_manifest(self, checksums: dict[str, str] | None = None, **sections) -> dict:
        """Read manifest.json, replace the given top-level `sections`, add `checksums`, stamp `updated`, write it back."""
        manifest = self.read_manifest()
        manifest.update(sections, updated=now_iso())
        if checksums:
            manifest.setdefault(CHECKSUMS, {}).update(checksums)
        self.write_json(MANIFEST, manifest)
        return manifest


def open_out(location: str, need: Sequence[str] = (MANIFEST,)) -> OutDir:
    """OUT, checked to hold the files a command needs; a one-line UserError otherwise."""
    out = OutDir(location)
    if not out.exists():
        raise UserError(f"{location}: no such output folder; run `imgindex run INPUT --out {location}` first")
    for name in need:
        if not out.exists(name):
            raise UserError(f"{location}: no {name}; run `imgindex run` (or the step that writes it) on this folder first")
    return out


def is_out_folder(location: str) -> bool:
    """True if `location` (a local folder or a URI) is an imgindex OUT: an embeddings/ folder and a manifest.json that an
    imgindex run wrote (a JSON object with its format_version and identity), so a listing never takes outputs for
    inputs."""
    out = OutDir(location)
    try:
        if out.fs.get_file_info(out.path(EMBEDDINGS_DIR)).type != fs.FileType.Directory:
            return False
        manifest = json.loads(out.read_bytes(MANIFEST))
    except (OSError, ValueError):  # unreadable, no manifest, or not JSON: not an OUT
        return False
    return isinstance(manifest, dict) and "format_version" in manifest and "identity" in manifest


def _verified_cache_path() -> str:
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "imgindex", "verified.json")
    return os.environ.get(VERIFIED_CACHE_ENV, default)


def _read_verified() -> dict:
    try:
        with open(_verified_cache_path(), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _remember_verified(key: str, stamp: list) -> None:
    """Record a verified file in the cache; a cache that cannot be written only costs a re-hash next time."""
    path = _verified_cache_path()
    cache = _read_verified()
    cache[key] = stamp
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        temporary = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump(cache, f)
        os.replace(temporary, path)
    except OSError as e:
        log.debug("verification cache %s not written: %s", path, e)


def verify_checksum(out: OutDir, name: str, manifest: dict, data: bytes | None = None, cached: bool = False) -> None:
    """Check `name` (or its already-read `data`) against the sha256 the manifest records; UserError if it differs.

    Files the manifest has no checksum for (outputs written before checksums were recorded) are not checked.
    With `cached`, a file verified before with the same size and modification time is not hashed again.
    """
    expected = manifest.get(CHECKSUMS, {}).get(name)
    if expected is None:
        return
    key = f"{out.location}/{name}"
    stamp: list = []
    if cached:
        info = out.fs.get_file_info(out.path(name))
        stamp = [info.size, info.mtime_ns, expected]
        if _read_verified().get(key) == stamp:
            return
    if data is None:
        digest = hashlib.sha256()
        with out.fs.open_input_stream(out.path(name)) as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
        actual = digest.hexdigest()
    else:
        actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise UserError(
            f"{key} does not match the sha256 recorded in {MANIFEST} (truncated, replaced or corrupted); "
            "rebuild it (delete it and run the same `imgindex run` again)"
        )
    if cached:
        _remember_verified(key, stamp)
