"""What `ray job submit --working-dir .` uploads, packaged by Ray's own code while a large .venv and outputs sit in the repo."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
from ray._private import ray_constants
from ray._private.runtime_env.packaging import create_package
from ray._private.runtime_env.working_dir import upload_working_dir_if_needed
from ray.dashboard.modules.dashboard_sdk import parse_runtime_env_args

from localcluster import copy_checkout

BIG = 200 * 1024**2
NEVER_UPLOADED = (".venv/", "venv/", "demo-out/", "demo-data/", "bench-data/", "out/", ".pytest_cache/", ".cache/", ".git/")
NEEDED = ("jobs/run.py", "jobs/cli.py", "embedder/pipeline.py", "cluster/index.py", "pyproject.toml", "README.md")


def sparse(path: Path, size: int) -> None:
    """A file of `size` bytes taking no disk space."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


@pytest.fixture(scope="module")
def cluttered_repo(tmp_path_factory) -> Path:
    """The repo's files (tracked and new, as a fresh clone plus this change has them) and what a working copy gathers."""
    root = copy_checkout(tmp_path_factory.mktemp("clone") / "imgindex")
    sparse(root / ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cuda.so", BIG)
    sparse(root / "venv/bin/python", 1024**2)
    sparse(root / ".git/objects/pack/pack-0.pack", 20 * 1024**2)
    sparse(root / "demo-out/embeddings/part-0.parquet", 30 * 1024**2)
    sparse(root / "demo-out/index.faiss", 10 * 1024**2)
    sparse(root / "demo-out/clusters.csv", 3 * 1024**2)
    sparse(root / "demo-out/run.log", 1024**2)
    sparse(root / "demo-data/photo-00.jpg", 2 * 1024**2)
    sparse(root / "bench-data/jpegs/000001.jpg", 2 * 1024**2)
    sparse(root / "out/centroids.npy", 2 * 1024**2)
    sparse(root / "vgg16-397923af.pth", 50 * 1024**2)
    sparse(root / ".cache/torch/hub/checkpoints/vgg16-397923af.pth", 50 * 1024**2)
    sparse(root / ".pytest_cache/v/cache/nodeids", 1024**2)
    sparse(root / "embedder/__pycache__/pipeline.cpython-311.pyc", 1024**2)
    return root


def package(root: Path, runtime_env: dict, target: Path) -> zipfile.ZipFile:
    """The zip `ray job submit` would upload for `runtime_env`, made by the functions its SDK calls."""
    include_gitignore = os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"

    def upload(working_dir: str, excludes: list[str], is_file: bool = False) -> None:
        assert not is_file
        create_package(working_dir, target, include_gitignore=include_gitignore, excludes=excludes)

    upload_working_dir_if_needed(dict(runtime_env), include_gitignore=include_gitignore, upload_fn=upload)
    return zipfile.ZipFile(target)


def assert_small_and_complete(archive: zipfile.ZipFile, target: Path) -> None:
    names = archive.namelist()
    assert target.stat().st_size < 2 * 1024**2, f"{target.stat().st_size} bytes"
    assert sum(info.file_size for info in archive.infolist()) < 2 * 1024**2
    assert set(NEEDED) <= set(names)
    assert not [n for n in names if n.startswith(NEVER_UPLOADED) or "__pycache__/" in n]
    assert not [n for n in names if n.endswith((".parquet", ".faiss", ".npy", ".pth"))]


def test_submit_with_the_working_dir_alone_uploads_only_the_source(cluttered_repo, tmp_path):
    runtime_env = parse_runtime_env_args(working_dir=str(cluttered_repo))
    assert_small_and_complete(package(cluttered_repo, runtime_env, tmp_path / "pkg.zip"), tmp_path / "pkg.zip")


def test_the_runtime_env_file_keeps_the_upload_small_without_gitignore_and_ray_defaults(cluttered_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    # Ray now ignores .gitignore and has no default excludes: only the file's `excludes` stand between .venv and the upload.
    assert ray_constants.get_runtime_env_default_excludes() == []

    runtime_env = parse_runtime_env_args(
        runtime_env=str(cluttered_repo / "deploy" / "runtime_env.yaml"), working_dir=str(cluttered_repo)
    )
    assert_small_and_complete(package(cluttered_repo, runtime_env, tmp_path / "pkg.zip"), tmp_path / "pkg.zip")
