"""The command line: one-line errors with a non-zero exit, --dry-run, `python -m jobs.run` = `imgindex run`, the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from jobs import arguments
from jobs.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("imgindex: error: ") and err.count("\n") == 1, err
    return err


def test_missing_out_is_one_line(capsys, tmp_path):
    assert main(["query", str(tmp_path / "nothing"), "a.jpg"]) == 2
    assert "no such output folder" in one_line_error(capsys)


def test_empty_input_folder_is_one_line(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main(["embed", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--weights", "random"]) == 2
    assert "no images found" in one_line_error(capsys)


def test_missing_input_and_missing_weights_file_are_one_line(capsys, tmp_path):
    assert main(["run", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--clusters", "2", "--weights", "random"]) == 2
    assert "no such file, directory or glob" in one_line_error(capsys)
    assert main(["run", str(tmp_path), "--out", str(tmp_path / "o"), "--clusters", "2", "--weights", "w.pth"]) == 2
    assert "--weights" in one_line_error(capsys)


def test_out_naming_an_existing_file_is_one_line(capsys, photo_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    assert main(["embed", photo_dir, "--out", str(tmp_path / "notes.txt"), "--weights", "random"]) == 2
    assert "is a file" in one_line_error(capsys)
    assert main(["embed", photo_dir, "--out", str(tmp_path / "notes.txt" / "out"), "--weights", "random"]) == 2
    assert "Not a directory" in one_line_error(capsys)


def test_out_in_a_read_only_folder_is_one_line(capsys, photo_dir, tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        # Tests run as root, where a read-only mode blocks nothing: simulate the refusal run.log met.
        real_handler = arguments.logging.FileHandler

        def refuse_locked(filename, *args, **kwargs):
            if str(filename).startswith(str(locked)):
                raise PermissionError(13, "Permission denied", str(filename))
            return real_handler(filename, *args, **kwargs)

        monkeypatch.setattr(arguments.logging, "FileHandler", refuse_locked)
    try:
        assert main(["embed", photo_dir, "--out", str(locked), "--weights", "random"]) == 2
    finally:
        locked.chmod(0o755)
    assert "cannot write run.log there (Permission denied)" in one_line_error(capsys)


def test_bad_query_image_is_one_line(capsys, run_out, tmp_path):
    (tmp_path / "q.jpg").write_bytes(b"GIF89a but not really")
    assert main(["query", run_out, str(tmp_path / "q.jpg")]) == 2
    assert "q.jpg" in one_line_error(capsys)
    assert main(["query", run_out, "--like", str(tmp_path / "q.jpg")]) == 2
    assert "is not in this index" in one_line_error(capsys)


def test_imagenet_weights_offline_fail_fast_with_the_fix(capsys, tmp_path, monkeypatch, photo_dir):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-cache"))
    monkeypatch.setenv("IMGINDEX_TEST_DOWNLOAD", "offline")
    assert main(["embed", photo_dir, "--out", str(tmp_path / "o")]) == 2
    err = one_line_error(capsys)
    assert "ImageNet weights" in err and "--weights /path/to/vgg16-397923af.pth" in err


def test_dry_run_counts_bytes_and_time_without_starting_anything(capsys, photo_dir, tmp_path):
    assert main(["run", photo_dir, "--out", str(tmp_path / "o"), "--clusters", "2", "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 10 and report["vector_bytes"] == 10 * 4096 * 4
    assert report["estimated_seconds_on_this_machine_cpu"] > report["estimated_seconds_on_one_gpu"] > 0
    assert not (tmp_path / "o").exists()


def test_python_m_jobs_run_takes_exactly_the_run_arguments(photo_dir, tmp_path):
    """`python -m jobs.run` (what `ray job submit` runs) and the `imgindex run` console script resolve every option the
    same, and as given: each option below differs from its default, so a dropped or misrouted one shows."""
    args = [photo_dir, "--out", str(tmp_path / "o"), "--clusters", "4:8:2", "--keep", "6", "--niter", "7", "--weights", "random",
            "--layer", "fc7", "--metric", "l2", "--precision", "fp32", "--batch-size", "5", "--actors", "2", "--seed", "3",
            "--rows-per-shard", "99", "--max-errors", "5%", "--index", "ivf", "--max-memory", "1G", "--pca", "64",
            "--whiten", "--target-recall", "0.9", "--recluster", "--follow-links", "--tasks", "3", "--dry-run"]
    imgindex = os.path.join(os.path.dirname(sys.executable), "imgindex")
    via_module = subprocess.run([sys.executable, "-m", "jobs.run", *args], capture_output=True, text=True, cwd=REPO, check=True)
    via_script = subprocess.run([imgindex, "run", *args], capture_output=True, text=True, cwd=REPO, check=True)
    resolved = json.loads(via_module.stdout)
    assert resolved == json.loads(via_script.stdout)
    assert resolved["images"] == 10
    assert resolved["config"] | {"inputs": None} == {
        "inputs": None, "out": str(tmp_path / "o"), "weights": "random", "layer": "fc7", "metric": "l2", "precision": "fp32",
        "decode": "cpu", "batch_size": 5, "actors": 2, "num_gpus_per_actor": None, "seed": 3, "rows_per_shard": 99,
        "address": None, "max_errors": "5%", "follow_links": True,
    }
    ray = {"tasks": 3, "address": None}
    assert resolved["index"] == {"index": "ivf", "max_memory": "1G", "pca": 64, "whiten": True, "target_recall": 0.9, "seed": 3, "ray": ray}
    assert resolved["cluster"] == {"clusters": [4, 6, 8], "keep": 6, "niter": 7, "seed": 3, "recluster": True, "ray": ray}


def test_relative_paths_are_refused_inside_a_ray_job(capsys, monkeypatch):
    monkeypatch.setenv(arguments.RAY_JOB_ENV, "{}")
    assert main(["run", "images", "--out", "/abs/out", "--clusters", "2", "--weights", "random"]) == 2
    assert "temporary copy" in one_line_error(capsys)


def test_demo_runs_offline_and_prints_a_query(capsys, tmp_path, local_ray, monkeypatch):
    from jobs.demo import demo

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-cache"))
    monkeypatch.setenv("IMGINDEX_TEST_DOWNLOAD", "offline")
    demo(out=str(tmp_path / "demo-out"), data=str(tmp_path / "demo-data"), clusters=3, count=12)
    printed = capsys.readouterr().out
    assert "example: imgindex query" in printed and "rank" in printed
    manifest = json.load(open(tmp_path / "demo-out" / "manifest.json"))
    assert manifest["weights"]["name"] == "random" and "ImageNet weights unavailable" in manifest["weights"]["note"]
    assert manifest["counts"]["images"] == 12 and manifest["counts"]["errors"] == 1
    first_hit = printed.split("rank")[1].splitlines()[1].split()[-1]
    assert first_hit.startswith(str(tmp_path / "demo-data" / "images")) and os.path.isfile(first_hit)


@pytest.mark.parametrize("argv", [["run", "x", "--out", "o"], ["query"], ["run", "x", "--out", "o", "--clusters", "2", "--layer", "fc8"]])
def test_usage_errors_exit_2(argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2


def test_query_refuses_weights_that_differ_from_the_manifest(capsys, run_out, photo_dir, tmp_path):
    copy = tmp_path / "out"
    shutil.copytree(run_out, copy)
    manifest = json.load(open(copy / "manifest.json"))
    manifest["weights"]["sha256"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert main(["query", str(copy), os.path.join(photo_dir, sorted(os.listdir(photo_dir))[0])]) == 2
    assert "differ from the ones this index was built with" in one_line_error(capsys)
