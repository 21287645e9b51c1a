"""OUT: the output folder's contract — the name of every file in it, atomic writes, reading and updating the manifest.

Every module that reads or writes OUT takes the file names from here, so docs/out-format.md has one place to be checked
against. Every file is written to a temporary name first and moved into place (atomic on a local filesystem; on
object stores a PUT is only visible once complete), so no reader sees a half-written file. OUT may be a local path or
a URI that pyarrow's filesystems open (s3://, gs://).
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence

import pandas as pd
from pyarrow import fs

from embedder.config import UserError, absolute

log = logging.getLogger("imgindex")

# 2: shard checksums in one commit record per shard (COMMITS_DIR), not in manifest.json; updates of the other files
# published through the manifest's pending record. Format 1 is read, and migrated by the next embed run.
FORMAT_VERSION = 2

MANIFEST = "manifest.json"
CONFIG = "config.json"
ERRORS = "errors.csv"
RUN_LOG = "run.log"
EMBEDDINGS_DIR = "embeddings"
COMMITS_DIR = "commits"
INDEX_FILE = "index.faiss"
INDEX_IDS_FILE = "index_ids.parquet"
# id -> path (and shard) of every indexed image, sorted by id, for lookups on demand (cluster/paths.py).
PATHS_FILE = "index_paths.parquet"
CLUSTERS_FILE = "clusters.csv"
CENTROIDS_FILE = "centroids.npy"
CLUSTER_IDS_FILE = "cluster_ids.parquet"
K_SWEEP_FILE = "k_sweep.csv"
DUPLICATES_FILE = "duplicates.csv"
OUTLIERS_FILE = "outliers.csv"
DUPLICATE_IDS_FILE = "duplicate_ids.parquet"
# The duplicates step's scratch copy of the vectors (cluster/duplicates.py RowStore), always under a TEMPORARY name:
# in a local OUT, so that the next step removes it if the step was killed; never part of a finished OUT.
DUPLICATES_SCRATCH = "duplicates-vectors.f32"
REPORT_DIR = "report"
# Every name above that is a file or folder of OUT, as docs/out-format.md lists them.
OUT_FILES = (
    MANIFEST, CONFIG, ERRORS, RUN_LOG, EMBEDDINGS_DIR, COMMITS_DIR, INDEX_FILE, INDEX_IDS_FILE, PATHS_FILE, CLUSTERS_FILE,
    CENTROIDS_FILE, CLUSTER_IDS_FILE, K_SWEEP_FILE, DUPLICATES_FILE, OUTLIERS_FILE, DUPLICATE_IDS_FILE, REPORT_DIR,
)
# Manifest key: {file name relative to OUT: sha256 hex} of every file a step published (index.faiss, clusters.csv, ...).
CHECKSUMS = "checksums"
# Manifest key of an update committed but not yet applied: the staged files, their sha256, the sections (`publish`).
PENDING = "pending"
# Name parts of files that are not (yet) part of OUT: a write in progress, and a file staged for `publish`.
TEMPORARY = ".tmp-"
STAGED = ".staged-"
# Test hook (not an option): "N:LOG" kills the job right after its N-th write to OUT (report/ and run.log aside), in
# whichever process makes it; every write is appended to the file LOG, and the driver's pid is read from LOG.driver.
KILL_HOOK_ENV = "IMGINDEX_TEST_KILL_AFTER_WRITE"
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
        if self.is_local:
            temporary = f"{final}{TEMPORARY}{uuid.uuid4().hex[:12]}"
            with self.fs.open_output_stream(temporary) as f:
                f.write(data)
            self.fs.move(temporary, final)
        else:  # an object store shows an object only once its PUT is complete
            with self.fs.open_output_stream(final) as f:
                f.write(data)
        _written("write", name)
        return hashlib.sha256(data).hexdigest()

    def write_file(self, name: str, write: Callable[[str], None]) -> tuple[int, str]:
        """Write `name` atomically with `write(local_path)` (e.g. `faiss.write_index`), which never holds the whole file
        in memory on a local OUT; return its size and sha256."""
        with tempfile.TemporaryDirectory(prefix="imgindex-") as scratch:
            if self.is_local:
                final = self.path(name)
                self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
                local = f"{final}{TEMPORARY}{uuid.uuid4().hex[:12]}"
            else:
                local = os.path.join(scratch, "file")
            write(local)
            digest = hashlib.sha256()
            with open(local, "rb") as f:
                # Small reads: the caller's peak memory (an index being saved) must not grow by the file's size.
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
            size = os.path.getsize(local)
            if self.is_local:
                self.fs.move(local, final)
                _written("write", name)
            else:
                with open(local, "rb") as f:
                    self.write_bytes(name, f.read())
        return size, digest.hexdigest()

    def move(self, source: str, name: str) -> None:
        """Rename `source` to `name` (replacing it), one write."""
        self.fs.move(self.path(source), self.path(name))
        _written("move", name)

    def delete(self, name: str) -> None:
        """Remove `name`, one write."""
        self.fs.delete_file(self.path(name))
        _written("delete", name)

    @property
    def is_local(self) -> bool:
        """True for a local folder, where a rename is atomic."""
        return isinstance(self.fs, fs.LocalFileSystem)

    def list(self, folder: str, suffix: str = "") -> list[str]:
        """Names (relative to the root) of the files in `folder` ending in `suffix`, sorted; files being written or
        staged (TEMPORARY, STAGED in the name) are not listed."""
        selector = fs.FileSelector(self.path(folder) if folder else self.root, allow_not_found=True)
        prefix = self.root.rstrip("/") + "/"
        names = [
            info.path[len(prefix):]
            for info in self.fs.get_file_info(selector)
            if info.type == fs.FileType.File and info.path.endswith(suffix)
            and TEMPORARY not in info.path and STAGED not in info.path
        ]
        return sorted(names)

    def leftovers(self, folder: str) -> list[str]:
        """Names of the files in `folder` that a killed write or update left behind (TEMPORARY or STAGED)."""
        selector = fs.FileSelector(self.path(folder) if folder else self.root, allow_not_found=True)
        prefix = self.root.rstrip("/") + "/"
        return sorted(
            info.path[len(prefix):] for info in self.fs.get_file_info(selector)
            if info.type == fs.FileType.File and (TEMPORARY in info.path or STAGED in info.path)
        )

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

    def update_manifest(self, **sections) -> dict:
        """Read manifest.json, replace the given top-level `sections`, stamp `updated`, write it back."""
        manifest = self.read_manifest()
        manifest.update(sections, updated=now_iso())
        self.write_json(MANIFEST, manifest)
        return manifest

    def update(self) -> "Update":
        """A new update of OUT: stage its files one by one, then commit them together with manifest sections."""
        return Update(self)

    def publish(self, files: Mapping[str, bytes | Callable[[str], None]], sections: dict, delete: Sequence[str] = ()) -> dict[str, tuple[int, str]]:
        """Replace `files`, remove `delete` and update the manifest's top-level `sections` as one update of OUT (see
        `Update`); returns {name: (size, sha256)}."""
        update = self.update()
        for name, content in files.items():
            update.write(name, content)
        update.commit(sections, delete)
        return update.files

    def _apply(self, manifest: dict) -> None:
        """Carry out the pending update `manifest` records (each step idempotent), then record it as done."""
        pending = manifest.pop(PENDING)
        for name in pending["files"]:
            staged = f"{name}{STAGED}{pending['token']}"
            if self.exists(staged):
                self.move(staged, name)
        for name in pending["delete"]:
            if self.exists(name):
                self.delete(name)
        checksums = manifest.setdefault(CHECKSUMS, {})
        for name in pending["delete"]:
            checksums.pop(name, None)
        checksums.update(pending["files"])
        manifest.update(pending["sections"], updated=now_iso())
        self.write_json(MANIFEST, manifest)

    def recover(self, folders: Sequence[str] = ("",)) -> None:
        """Finish or discard what a killed run left: apply a committed update, remove staged and half-written files
        in `folders` (relative to the root; "" is the root)."""
        if self.exists(MANIFEST):
            manifest = self.read_manifest()
            if PENDING in manifest:
                log.info("finishing the update a stopped run committed (%s)", ", ".join(manifest[PENDING]["files"]) or "removals")
                self._apply(manifest)
        for folder in folders:
            for name in self.leftovers(folder):
                self.delete(name)


class Update:
    """One update of OUT's published files (index.faiss, clusters.csv, ...), so that a killed run never leaves a file
    that its record does not name.

    The protocol: each new file is written under a staged name (`write`); then the manifest records the update as
    pending (`commit`: from here on the update happens whatever stops the process); then the staged files are moved
    onto their names and the files to delete removed; then the manifest applies the sections and the files' sha256
    and drops the pending record. `OutDir.recover` finishes an update that a killed process committed and removes
    what it had staged before committing, so every state between two writes is one the next run finishes from.
    """

    def __init__(self, out: OutDir):
        self.out = out
        self.token = uuid.uuid4().hex[:12]
        self.files: dict[str, tuple[int, str]] = {}

    def write(self, name: str, content: bytes | Callable[[str], None]) -> tuple[int, str]:
        """Stage `name`: `content` is its bytes, or a function that writes it to a local path; returns (size, sha256)."""
        staged = f"{name}{STAGED}{self.token}"
        if callable(content):
            self.files[name] = self.out.write_file(staged, content)
        else:
            self.files[name] = (len(content), self.out.write_bytes(staged, content))
        return self.files[name]

    def commit(self, sections: dict, delete: Sequence[str] = ()) -> None:
        """Record the update in the manifest (the commit), then carry it out."""
        manifest = self.out.read_manifest()
        files = {name: sha256 for name, (_, sha256) in self.files.items()}
        manifest[PENDING] = {"token": self.token, "files": files, "delete": list(delete), "sections": sections}
        self.out.write_json(MANIFEST, manifest)
        self.out._apply(manifest)


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
    """Check a published file `name` (or its already-read `data`) against the sha256 the manifest records; UserError
    if it differs.

    A file the manifest's pending update names may also have that update's sha256 (a run stopped while moving the
    update's files into place). Files the manifest has no checksum for (outputs written before checksums were
    recorded) are not checked. With `cached`, see `check_sha256`.
    """
    accepted = {manifest.get(CHECKSUMS, {}).get(name), manifest.get(PENDING, {}).get("files", {}).get(name)} - {None}
    check_sha256(out, name, accepted, MANIFEST, data, cached)


def check_sha256(out: OutDir, name: str, accepted: set[str], record: str, data: bytes | None = None, cached: bool = False) -> None:
    """Check `name` (or its already-read `data`) against the sha256 values `accepted` (none: nothing to check), which
    `record` holds; UserError if it has another. With `cached`, a file verified before with the same size and
    modification time is not hashed again."""
    if not accepted:
        return
    expected = "/".join(sorted(accepted))
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
    if actual not in accepted:
        raise UserError(
            f"{key} does not match the sha256 recorded in {record} (truncated, replaced or corrupted); "
            "rebuild it (delete it and run the same `imgindex run` again)"
        )
    if cached:
        _remember_verified(key, stamp)


def _written(kind: str, name: str) -> None:
    """Count one write to OUT for the kill test hook (KILL_HOOK_ENV); kill the job after the chosen one."""
    hook = os.environ.get(KILL_HOOK_ENV)
    if not hook or name.startswith(f"{REPORT_DIR}/") or name == RUN_LOG:
        return
    limit, journal = hook.split(":", 1)
    with open(journal, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(f"{os.getpid()} {kind} {name}\n")
        f.flush()
        f.seek(0)
        count = len(f.readlines())
    if count == int(limit):
        with open(f"{journal}.driver", encoding="utf-8") as f:
            driver = int(f.read())
        log.warning("test hook %s: killing the job after write %d (%s %s)", KILL_HOOK_ENV, count, kind, name)
        os.kill(driver, signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def kill_hook_driver() -> dict:
    """In the driver, with the kill test hook set: record this process as the one to kill; returns the environment
    variables Ray workers need to count their writes too (empty without the hook)."""
    hook = os.environ.get(KILL_HOOK_ENV)
    if not hook:
        return {}
    with open(f"{hook.split(':', 1)[1]}.driver", "w", encoding="utf-8") as f:
        f.write(str(os.getpid()))
    return {KILL_HOOK_ENV: hook}
