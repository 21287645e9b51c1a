"""Kill the job right after its N-th write to OUT, run the same command again, and compare with an uninterrupted run.

A "write" is one creation, replacement or deletion of a file of OUT (report/ and run.log aside); the test hook
IMGINDEX_TEST_KILL_AFTER_WRITE kills the driver (and the process that wrote) with SIGKILL right after write N,
whichever process made it (the writer tasks write the shards). Two jobs are cut: a first `imgindex run`, and a re-run
after images were added, changed and removed. After each kill the same command runs again; the OUT must then equal an
uninterrupted run's (ids, paths, vectors within cos 0.9999, the index's ids, clusters, errors) and `query` must accept
it. `make test` cuts each kind of write once; `make test-crash` (IMGINDEX_CRASH_EVERY_WRITE=1) cuts after every write.
All runs share one Ray instance (the session's), as separate drivers.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import faiss
import numpy as np
import pandas as pd
import pytest
from conftest import cosine
from PIL import Image

from embedder.collection import committed, iter_embeddings
from embedder.outdir import ERRORS, INDEX_FILE, KILL_HOOK_ENV, PENDING, OutDir
from jobs.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVERY_WRITE = os.environ.get("IMGINDEX_CRASH_EVERY_WRITE") == "1"


@dataclass(frozen=True)
class Job:
    """What every run of this module shares: the session's Ray and the file of the seeded random weights (loaded in
    a fraction of a second, where building them takes seconds in each of the dozens of runs)."""

    address: str
    weights: str


def run(job: Job, photos: str, out: str, hook: str | None = None, timeout: float = 300) -> tuple[int, str]:
    """`python -m jobs.run` over `photos` into `out` on the shared Ray; with `hook` ("N:JOURNAL") killed after write N."""
    env = {k: v for k, v in os.environ.items() if k != KILL_HOOK_ENV} | {"PYTHONPATH": REPO}
    if hook:
        env[KILL_HOOK_ENV] = hook
    command = [sys.executable, "-m", "jobs.run", photos, "--out", out, "--clusters", "2", "--weights", job.weights,
               "--rows-per-shard", "2", "--address", job.address]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout + done.stderr


def journal_of(job: Job, photos: str, out: str, work: str) -> list[str]:
    """An uninterrupted run that records its writes (with a limit it never reaches): one 'pid kind name' line each."""
    journal = os.path.join(work, "journal-reference")
    code, output = run(job, photos, out, f"1000000:{journal}")
    assert code == 0, output
    with open(journal, encoding="utf-8") as f:
        return [line.split(" ", 1)[1].strip() for line in f]


def kind_of(write: str) -> str:
    """What a write is, for choosing one of each kind: the manifest, another file of OUT's root (config.json,
    errors.csv), a shard, a commit record, a staged file, a move into place, a removal of a record or a shard."""
    operation, name = write.split(" ", 1)
    if operation == "move":
        return "move"
    if ".staged-" in name:
        return f"{operation} staged"
    if name == "manifest.json":
        return f"{operation} manifest"
    return f"{operation} {name.split('/', 1)[0] if '/' in name else 'root file'}"


def chosen(writes: list[str], covered: set[str]) -> list[int]:
    """The write numbers to cut after: every one, or the first of each kind not in `covered`."""
    if EVERY_WRITE:
        return list(range(1, len(writes) + 1))
    firsts: dict[str, int] = {}
    for number, write in enumerate(writes, start=1):
        if kind_of(write) not in covered:
            firsts.setdefault(kind_of(write), number)
    return sorted(firsts.values())


def state(out: str) -> dict:
    """What two OUTs must agree on: rows (path, vector), errors, the index's ids, clusters."""
    folder = OutDir(out)
    manifest = folder.read_manifest()
    assert PENDING not in manifest and manifest["status"] == "embedded"
    rows = {}
    for ids, paths, xb in iter_embeddings(folder):
        for key, path, vector in zip(ids.tolist(), paths, xb):
            assert key not in rows, f"id {key} twice in {out}"
            rows[key] = (path, vector)
    index = faiss.read_index(os.path.join(out, INDEX_FILE))
    index_ids = np.sort(faiss.vector_to_array(faiss.downcast_index(index).id_map)) if hasattr(faiss.downcast_index(index), "id_map") else None
    clusters = pd.read_csv(os.path.join(out, "clusters.csv")).sort_values("id")
    errors = pd.read_csv(os.path.join(out, ERRORS)).sort_values("path").reset_index(drop=True)
    leftovers = [f for _, _, files in os.walk(out) for f in files if ".tmp-" in f or ".staged-" in f]
    uncommitted = set(folder.list("embeddings", ".parquet")) - set(committed(folder))
    return {"rows": rows, "ntotal": index.ntotal, "index_ids": index_ids, "clusters": clusters, "errors": errors,
            "leftovers": leftovers, "uncommitted": uncommitted, "images": manifest["counts"]["images"]}


def assert_same(out: str, reference: dict, note: str) -> None:
    got = state(out)
    assert got["leftovers"] == [] and got["uncommitted"] == set(), note
    assert sorted(got["rows"]) == sorted(reference["rows"]), note
    for key, (path, vector) in reference["rows"].items():
        assert got["rows"][key][0] == path, note
        assert cosine(got["rows"][key][1], vector) >= 0.9999, note
    assert got["ntotal"] == reference["ntotal"] == len(reference["rows"]) == got["images"], note
    if reference["index_ids"] is not None:
        assert np.array_equal(got["index_ids"], reference["index_ids"]), note
    assert got["clusters"]["id"].tolist() == reference["clusters"]["id"].tolist(), note
    assert got["clusters"]["cluster"].tolist() == reference["clusters"]["cluster"].tolist(), note
    pd.testing.assert_frame_equal(got["errors"], reference["errors"], obj=note)


def cut_and_resume(job: Job, photos: str, start: str | None, reference: dict, writes: list[str], work: str,
                   covered: set[str]) -> list[str]:
    """For each chosen N: from the `start` OUT (None: empty), run killed after write N, run again, compare."""
    checked = []
    for number in chosen(writes, covered):
        out = os.path.join(work, f"out-{number}")
        shutil.rmtree(out, ignore_errors=True)
        if start:
            shutil.copytree(start, out)
        journal = os.path.join(work, f"journal-{number}")
        code, output = run(job, photos, out, f"{number}:{journal}")
        with open(journal, encoding="utf-8") as f:
            cut = f.readlines()[number - 1].split(" ", 1)[1].strip()
        note = f"killed after write {number} ({cut})"
        assert code == -signal.SIGKILL, f"{note}: the run was not killed ({code}):\n{output[-2000:]}"
        code, output = run(job, photos, out)
        assert code == 0, f"{note}: the re-run failed:\n{output[-3000:]}"
        assert_same(out, reference, note)
        like = reference["rows"][min(reference["rows"])][0]
        assert main(["query", out, "--like", like, "-k", "2"]) == 0, note
        checked.append(cut)
        shutil.rmtree(out)
    return checked


@pytest.fixture(scope="module")
def job(local_ray, random_weights_file) -> Job:
    return Job(local_ray.get_runtime_context().gcs_address, random_weights_file)


def photos_into(folder: str, photo_dir: str, names: list[str]) -> None:
    os.makedirs(folder, exist_ok=True)
    for name in names:
        shutil.copy(os.path.join(photo_dir, name), os.path.join(folder, name))


# What the first job's cuts covered; the re-run's cut only the kinds it adds (unless every write is cut).
COVERED: set[str] = set()


@pytest.mark.timeout(3600 if EVERY_WRITE else 900)
def test_a_run_killed_after_any_write_resumes_to_the_uninterrupted_result(tmp_path, job, photo_dir):
    started = time.monotonic()
    names = sorted(os.listdir(photo_dir))[:4]
    photos = str(tmp_path / "photos")
    photos_into(photos, photo_dir, names)
    (tmp_path / "photos" / "broken.jpg").write_bytes(b"not a picture")
    writes = journal_of(job, photos, str(tmp_path / "reference"), str(tmp_path))
    reference = state(str(tmp_path / "reference"))
    checked = cut_and_resume(job, photos, None, reference, writes, str(tmp_path), set())
    assert {kind_of(w) for w in checked} == {kind_of(w) for w in writes}
    COVERED.update(kind_of(w) for w in checked)
    print(f"first run: {len(writes)} writes, cut after {len(checked)} of them in {time.monotonic() - started:.0f} s")


@pytest.mark.timeout(3600 if EVERY_WRITE else 900)
def test_a_rerun_with_added_changed_and_removed_images_killed_after_any_write_resumes(tmp_path, job, photo_dir):
    started = time.monotonic()
    names = sorted(os.listdir(photo_dir))
    photos = str(tmp_path / "photos")
    photos_into(photos, photo_dir, names[:5])
    before = str(tmp_path / "before")
    code, output = run(job, photos, before)
    assert code == 0, output
    os.remove(os.path.join(photos, names[0]))  # removed
    changed = os.path.join(photos, names[1])  # changed: new pixels, new size and mtime
    Image.open(changed).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(changed, quality=70)
    photos_into(photos, photo_dir, names[5:7])  # added
    reference_out = str(tmp_path / "reference")
    shutil.copytree(before, reference_out)
    writes = journal_of(job, photos, reference_out, str(tmp_path))
    assert any(w.startswith("delete embeddings/") for w in writes), "the re-run must replace or retire a shard"
    reference = state(reference_out)
    checked = cut_and_resume(job, photos, before, reference, writes, str(tmp_path), COVERED)
    assert {kind_of(w) for w in checked} | COVERED >= {kind_of(w) for w in writes}
    print(f"re-run: {len(writes)} writes, cut after {len(checked)} of them in {time.monotonic() - started:.0f} s")
