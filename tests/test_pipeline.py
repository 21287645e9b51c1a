"""The main job through a local Ray: the OUT contract, vectors against torchvision, weights shipped once, re-runs."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from conftest import cosine
from PIL import Image

from cluster.search import Index
from embedder import model, pipeline
from embedder.collection import shard_names
from embedder.config import JobConfig, UserError
from embedder.outdir import OutDir
from embedder.reader import image_id
from jobs.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = 10
BAD = {"empty.jpg": "empty file", "page.PNG": "not an image", "truncated.jpg": "truncated"}


def read_embeddings(out: str) -> pd.DataFrame:
    """The rows of OUT's committed shards."""
    return pd.concat([pq.read_table(f"{out}/{name}").to_pandas() for name in shard_names(OutDir(out))], ignore_index=True)


def sha256(path: str) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_run_writes_the_output_contract(run_out, input_dir):
    manifest = json.load(open(f"{run_out}/manifest.json"))
    assert manifest["format_version"] == 2 and manifest["model"] == "vgg16" and manifest["layer"] == "fc6"
    assert manifest["dimension"] == 4096 and manifest["metric"] == "cosine"
    assert manifest["weights"]["name"] == "random" and len(manifest["weights"]["sha256"]) == 64
    assert manifest["precision"]["used"] in (["bf16"], ["fp32"])
    assert manifest["counts"] == {"listed": GOOD + len(BAD), "images": GOOD, "errors": len(BAD)}
    assert manifest["changes"] == {"added": GOOD + len(BAD), "changed": 0, "removed": 0, "unchanged": 0}
    published = ["index.faiss", "index_ids.parquet", "index_paths.parquet", "clusters.csv", "centroids.npy", "cluster_ids.parquet"]
    assert manifest["checksums"] == {name: sha256(f"{run_out}/{name}") for name in published}
    assert "pending" not in manifest and manifest["status"] == "embedded"
    # One commit record per shard, naming the shard, its rows, size and sha256; no shard listed in the manifest.
    records = [json.load(open(p)) for p in sorted(glob.glob(f"{run_out}/commits/*.json"))]
    assert sorted(r["shard"] for r in records) == sorted(os.path.relpath(p, run_out) for p in glob.glob(f"{run_out}/embeddings/*.parquet"))
    for record in records:
        path = f"{run_out}/{record['shard']}"
        assert record["sha256"] == sha256(path) and record["bytes"] == os.path.getsize(path)
        assert record["rows"] == pq.read_metadata(path).num_rows and record["replaces"] == []
    assert {"torch", "torchvision", "ray", "faiss-cpu"} <= set(manifest["versions"])
    assert manifest["preprocessing"]["center_crop"] == 224 and manifest["created"]
    assert json.load(open(f"{run_out}/config.json"))["weights"] == "random"

    schema = pq.read_schema(glob.glob(f"{run_out}/embeddings/*.parquet")[0])
    assert str(schema.field("id").type) == "int64" and str(schema.field("path").type) == "string"
    assert str(schema.field("embedding").type) == "fixed_size_list<element: float>[4096]"
    assert all(str(schema.field(c).type) == "int64" for c in ("fingerprint", "size", "mtime_ns"))
    rows = read_embeddings(run_out)
    for path, size, mtime_ns in zip(rows["path"], rows["size"], rows["mtime_ns"]):
        assert (size, mtime_ns) == (os.stat(path).st_size, os.stat(path).st_mtime_ns)
    assert len(rows) == GOOD and rows["id"].is_unique
    assert all(os.path.isabs(p) and p.startswith(input_dir) for p in rows["path"])
    assert all(image_id(p) == i for p, i in zip(rows["path"], rows["id"]))

    errors = pd.read_csv(f"{run_out}/errors.csv")
    assert list(errors.columns) == ["path", "error"]
    for name, reason in BAD.items():
        (match,) = errors[errors["path"] == os.path.join(input_dir, name)]["error"]
        assert reason in match

    clusters = pd.read_csv(f"{run_out}/clusters.csv")
    assert list(clusters.columns) == ["id", "path", "cluster", "distance"]
    assert sorted(clusters["id"]) == sorted(rows["id"]) and set(clusters["cluster"]) <= {0, 1, 2}
    assert (clusters["distance"] >= 0).all()
    assert np.load(f"{run_out}/centroids.npy").shape == (3, 4096)
    log = open(f"{run_out}/run.log").read()
    assert "embedded 10 images" in log and "cluster sizes" in log


def test_index_loads_with_plain_faiss_and_holds_the_parquet_ids(run_out):
    index = faiss.read_index(f"{run_out}/index.faiss")
    rows = read_embeddings(run_out)
    assert index.ntotal == GOOD
    xq = np.stack(rows["embedding"].to_numpy()).astype(np.float32)
    faiss.normalize_L2(xq)
    D, I = index.search(xq, 1)
    assert I[:, 0].tolist() == rows["id"].tolist()
    np.testing.assert_allclose(D[:, 0], 1.0, atol=1e-5)


def test_query_vector_equals_stored_vector_and_direct_torchvision(run_out, random_weights):
    rows = read_embeddings(run_out)
    index = Index.load(run_out)
    vgg = torchvision.models.vgg16()
    vgg.load_state_dict({k: torch.from_numpy(v) for k, v in random_weights.items()})
    vgg.eval()
    transform = torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms()
    query = index.embed(list(rows["path"][:3]))
    for i in range(3):
        stored = np.asarray(rows["embedding"][i], dtype=np.float32)
        with torch.no_grad():
            x = transform(Image.open(rows["path"][i]).convert("RGB"))[None]
            direct = vgg.classifier[0](torch.flatten(vgg.avgpool(vgg.features(x)), 1))[0].numpy()
        assert cosine(query[i], stored) >= 0.9999
        assert cosine(stored, direct) >= 0.9999


def test_query_results_are_the_exact_neighbours(run_out):
    rows = read_embeddings(run_out)
    xb = np.stack(rows["embedding"].to_numpy()).astype(np.float64)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    hits = Index.load(run_out).like([rows["path"][0]], k=4)[0]
    expected = np.argsort(1 - xb[1:] @ xb[0])[:4] + 1
    assert [h.id for h in hits] == rows["id"][expected].tolist()
    assert [h.rank for h in hits] == [1, 2, 3, 4]
    np.testing.assert_allclose([h.distance for h in hits], np.sort(1 - xb[1:] @ xb[0])[:4], atol=1e-4)
    clusters = pd.read_csv(f"{run_out}/clusters.csv").set_index("id")["cluster"]
    assert all(h.cluster == clusters[h.id] for h in hits)


def test_weights_are_built_once_and_every_replica_holds_the_same_bytes(tmp_path, photo_dir, local_ray, report_dir, monkeypatch):
    for stale in os.listdir(report_dir):
        os.remove(os.path.join(report_dir, stale))
    calls = []
    real_build = model.build_state_dict

    def counting_build(*args, **kwargs):
        calls.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(model, "build_state_dict", counting_build)
    config = JobConfig(inputs=(photo_dir,), out=str(tmp_path / "out"), weights="random", actors=2, batch_size=2).validate()
    summary = pipeline.embed(config)
    assert summary.embedded == GOOD and len(calls) == 1
    reports = [json.load(open(os.path.join(report_dir, f))) for f in os.listdir(report_dir) if f.endswith(".json")]
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert len(reports) == 2 and len({r["pid"] for r in reports}) == 2
    assert {r["weights_sha256"] for r in reports} == {manifest["weights"]["sha256"]}


def test_rerun_embeds_only_what_is_new_or_changed_and_drops_what_is_gone(tmp_path, photo_dir, local_ray):
    folder = tmp_path / "grows"
    shutil.copytree(photo_dir, folder)
    names = sorted(os.listdir(folder))
    os.remove(folder / names[0])
    config = JobConfig(inputs=(str(folder),), out=str(tmp_path / "out"), weights="random").validate()
    assert pipeline.embed(config).embedded == GOOD - 1
    before = read_embeddings(config.out).set_index("id")

    again = pipeline.embed(config)
    assert (again.embedded, again.skipped, again.added, again.changed, again.removed) == (0, GOOD - 1, 0, 0, 0)

    shutil.copy(os.path.join(photo_dir, names[0]), folder / names[0])
    os.remove(folder / names[1])
    # names[2] now holds names[3]'s bytes: same path, new content (and a new modification time).
    shutil.copyfile(folder / names[3], folder / names[2])
    os.utime(folder / names[2], ns=(os.stat(folder / names[2]).st_atime_ns, os.stat(folder / names[2]).st_mtime_ns + 10**9))
    grown = pipeline.embed(config)
    assert (grown.embedded, grown.skipped, grown.added, grown.changed, grown.removed) == (2, GOOD - 3, 1, 1, 1)
    manifest = json.load(open(f"{config.out}/manifest.json"))
    assert manifest["changes"] == {"added": 1, "changed": 1, "removed": 1, "unchanged": GOOD - 3}
    after = read_embeddings(config.out).set_index("id")
    assert after.index.is_unique
    assert sorted(after.index) == sorted(image_id(str(folder / n)) for n in names if n != names[1])
    kept = after.index.intersection(before.index).drop(image_id(str(folder / names[2])))
    assert all(np.array_equal(after.loc[i, "embedding"], before.loc[i, "embedding"]) for i in kept)
    changed, source = (after.loc[image_id(str(folder / n)), "embedding"] for n in (names[2], names[3]))
    assert cosine(changed, source) >= 0.9999


def as_format_1(out: str, checksums: bool) -> None:
    """Turn a format-2 OUT into the format-1 layout: shard checksums (or none, as before checksums) in the manifest,
    no commit records."""
    manifest = json.load(open(f"{out}/manifest.json"))
    manifest["format_version"] = 1
    shards = {os.path.relpath(p, out): sha256(p) for p in glob.glob(f"{out}/embeddings/*.parquet")}
    manifest["checksums"] = (shards if checksums else {}) | {k: v for k, v in manifest.get("checksums", {}).items() if k == "index.faiss"}
    json.dump(manifest, open(f"{out}/manifest.json", "w"))
    shutil.rmtree(f"{out}/commits")


def test_shards_from_before_fingerprints_are_read_and_their_images_embedded_again(tmp_path, photo_dir, local_ray):
    few = [os.path.join(photo_dir, n) for n in sorted(os.listdir(photo_dir))[:3]]
    config = JobConfig(inputs=tuple(few), out=str(tmp_path / "out"), weights="random").validate()
    pipeline.embed(config)
    for shard in glob.glob(f"{config.out}/embeddings/*.parquet"):
        table = pq.read_table(shard)
        pq.write_table(table.select(["id", "path", "embedding"]), shard)
    as_format_1(config.out, checksums=False)
    summary = pipeline.embed(config)
    assert (summary.skipped, summary.changed, summary.embedded) == (0, 3, 3)
    rows = read_embeddings(config.out)
    assert len(rows) == 3 and rows["id"].is_unique and (rows["fingerprint"] != 0).all()


def test_a_format_1_out_is_queried_as_it_is_and_migrated_by_the_next_run_without_embedding_again(tmp_path, run_out, input_dir, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(run_out, out)
    as_format_1(out, checksums=True)
    image = read_embeddings(run_out)["path"][0]
    assert main(["query", out, "--like", image, "-k", "2"]) == 0  # read as it is
    assert main(["run", input_dir, "--out", out, "--clusters", "3", "--weights", "random"]) == 0
    err = capsys.readouterr().err
    assert "migrated" in err and f"embedded 0 images ({GOOD} already there, {len(BAD)} failed" in err
    manifest = json.load(open(f"{out}/manifest.json"))
    assert manifest["format_version"] == 2 and manifest["changes"]["unchanged"] == GOOD
    assert not any(k.startswith("embeddings/") for k in manifest["checksums"])
    assert sorted(read_embeddings(out)["id"]) == sorted(read_embeddings(run_out)["id"])


def test_out_made_differently_is_refused(run_out, input_dir, capsys):
    assert main(["embed", input_dir, "--out", run_out, "--weights", "random", "--layer", "fc7"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "different layer" in err and "new --out" in err


def test_query_k_out_of_range_is_one_line(run_out, photo_dir, capsys):
    image = os.path.join(photo_dir, sorted(os.listdir(photo_dir))[0])
    assert main(["query", run_out, image, "-k", "11"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "must be between 1 and the 10 indexed images" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["query", run_out, image, "-k", "0"])
    assert exit_info.value.code == 2


def test_query_json_shape(run_out, photo_dir, capsys):
    image = os.path.join(photo_dir, sorted(os.listdir(photo_dir))[0])
    assert main(["query", run_out, image, "-k", "3", "--json"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert result["query"] == image and len(result["results"]) == 3
    assert set(result["results"][0]) == {"rank", "id", "path", "distance", "cluster"}
    assert [r["rank"] for r in result["results"]] == [1, 2, 3]


def test_swapped_or_truncated_index_and_shards_are_refused(run_out, photo_dir, tmp_path, capsys):
    image = os.path.join(photo_dir, sorted(os.listdir(photo_dir))[0])
    truncated, swapped = tmp_path / "truncated", tmp_path / "swapped"
    for copy in (truncated, swapped):
        shutil.copytree(run_out, copy)
    data = (truncated / "index.faiss").read_bytes()
    (truncated / "index.faiss").write_bytes(data[: len(data) // 2])
    assert main(["query", str(truncated), image]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "index.faiss does not match the sha256" in err

    other = faiss.IndexIDMap2(faiss.IndexFlatIP(4096))
    other.add_with_ids(np.ones((1, 4096), dtype=np.float32), np.array([1]))
    faiss.write_index(other, str(swapped / "index.faiss"))
    assert main(["query", str(swapped), image]) == 2
    assert "index.faiss does not match the sha256" in capsys.readouterr().err
    (shard,) = glob.glob(f"{swapped}/embeddings/*.parquet")
    table = pq.read_table(shard)
    pq.write_table(table.slice(0, 5), shard)
    assert main(["index", str(swapped)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "Traceback" not in "\n".join(err) and ".parquet does not match the sha256" in err[-1]
    assert err[-1].startswith("imgindex: error: ") and not any(line.startswith("imgindex: error") for line in err[:-1])


def test_max_errors_fails_the_job_and_keeps_its_outputs(tmp_path, photo_dir, local_ray, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in sorted(os.listdir(photo_dir))[:2]:
        shutil.copy(os.path.join(photo_dir, name), folder / name)
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (folder / name).write_bytes(b"not an image")
    out = str(tmp_path / "out")
    assert main(["embed", str(folder), "--out", out, "--weights", "random", "--batch-size", "1", "--max-errors", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("imgindex: error: 3 files could not be embedded, more than --max-errors 2 allows")
    manifest = json.load(open(f"{out}/manifest.json"))
    assert manifest["status"] == "failed: too many bad files" and manifest["counts"]["errors"] == 3
    assert len(pd.read_csv(f"{out}/errors.csv")) == 3
    kept = glob.glob(f"{out}/embeddings/*.parquet")
    assert len(kept) == len(glob.glob(f"{out}/commits/*.json"))
    assert manifest["counts"]["images"] == sum(pq.read_metadata(k).num_rows for k in kept)


@pytest.mark.parametrize("value, listed, limit", [(None, 10, None), ("0", 10, 0), ("7", 10, 7), ("5%", 1000, 50), ("2.5%", 100, 2)])
def test_max_errors_values(value, listed, limit):
    assert JobConfig(inputs=("x",), out="/o", weights="random", max_errors=value).validate().error_limit(listed) == limit


def test_max_errors_bad_value_is_refused():
    with pytest.raises(UserError, match="--max-errors"):
        JobConfig(inputs=("x",), out="/o", weights="random", max_errors="five").validate()


def test_query_errors_are_one_line_without_traceback(run_out, tmp_path):
    """Missing OUT, a bad query image, k larger than the collection: one line on stderr, exit 2 (a real process)."""
    (tmp_path / "bad.jpg").write_bytes(b"<html>")
    image = read_embeddings(run_out)["path"][0]
    cases = [
        ([str(tmp_path / "nothing"), image], "no such output folder"),
        ([run_out, str(tmp_path / "bad.jpg")], "bad.jpg"),
        ([run_out, str(tmp_path)], "not a regular file"),
        ([run_out, image, "-k", "11"], "must be between 1 and the 10 indexed images"),
    ]
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", "jobs.query", *args], capture_output=True, text=True, cwd=REPO)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_files_missing_when_listed_go_to_errors_without_a_task_and_nothing_embedded_is_one_line(tmp_path, capsys, monkeypatch):
    """A list of paths that do not exist: every one in errors.csv without Ray being asked for anything, one line, exit 2."""
    listed = tmp_path / "list.txt"
    listed.write_text("".join(f"/nowhere/missing-{i}.jpg\n" for i in range(2000)))
    out = tmp_path / "out"
    monkeypatch.setattr(pipeline, "start_ray", lambda address: pytest.fail("Ray was started for files that do not exist"))
    assert main(["embed", str(listed), "--out", str(out), "--weights", "random"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("imgindex: error: no image could be embedded: all 2000 listed files failed")
    errors = pd.read_csv(out / "errors.csv")
    assert len(errors) == 2000 and errors["error"].str.contains("missing or not accessible when listed").all()
    manifest = json.load(open(out / "manifest.json"))
    assert manifest["counts"] == {"listed": 2000, "images": 0, "errors": 2000}


def test_a_run_reports_progress_even_when_no_shard_is_written(tmp_path, local_ray, monkeypatch, capsys):
    """Only bad files: no shard is ever written, and the progress line still comes."""
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(6):
        (folder / f"bad-{i}.jpg").write_bytes(b"not an image")
    monkeypatch.setattr(pipeline, "PROGRESS_SECONDS", 0.0)
    assert main(["embed", str(folder), "--out", str(tmp_path / "out"), "--weights", "random", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "of 6 images done (" in err and "no image could be embedded" in err
