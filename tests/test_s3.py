"""The main job with s3:// INPUT and OUT against a local S3 server (moto), credentials only in the environment."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import urllib.request

import boto3
import faiss
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from localcluster import VENV_BIN, cluster_env, free_ports, kill_marked

from cluster.search import Index
from embedder.collection import shard_names
from embedder.config import UserError
from embedder.outdir import OutDir
from embedder.reader import image_id, list_images

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "imgindex-test"
# Distinctive values, so the test can tell whether they leaked into anything the job wrote or printed.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "AKIAIMGINDEXTESTKEY", "AWS_SECRET_ACCESS_KEY": "imgindex-test-secret-never-recorded"}


def s3_env(endpoint: str) -> tuple[dict[str, str], str]:
    """(environment, marker) of a process that talks to the test's S3: endpoint, region and credentials, nothing else."""
    return cluster_env(**CREDENTIALS, AWS_ENDPOINT_URL=endpoint, AWS_DEFAULT_REGION="us-east-1", PYTHONPATH=REPO)


@pytest.fixture(scope="module")
def s3(tmp_path_factory, photo_dir):
    """A moto S3 server on 127.0.0.1 holding the photos (one in a sub-prefix) and a text file under s3://BUCKET/photos/."""
    (port,) = free_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    env, marker = s3_env(endpoint)
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as f:
        server = subprocess.Popen([os.path.join(VENV_BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"], aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=BUCKET)
        names = sorted(os.listdir(photo_dir))
        keys = [f"photos/{'more/' if i == 0 else ''}{name}" for i, name in enumerate(names)]
        for name, key in zip(names, keys):
            client.upload_file(os.path.join(photo_dir, name), BUCKET, key)
        client.put_object(Bucket=BUCKET, Key="photos/notes.txt", Body=b"not an image, not listed")
        yield {"endpoint": endpoint, "photos": sorted(f"s3://{BUCKET}/{key}" for key in keys)}
    finally:
        server.kill()
        server.wait(timeout=10)
        kill_marked(marker)


def run_job(s3) -> subprocess.CompletedProcess:
    """`python -m jobs.run s3://.../photos --out s3://.../out`, starting its own Ray, credentials only in its environment."""
    env, marker = s3_env(s3["endpoint"])
    command = [sys.executable, "-m", "jobs.run", f"s3://{BUCKET}/photos", "--out", f"s3://{BUCKET}/out", "--clusters", "3", "--weights", "random"]
    try:
        return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    finally:
        kill_marked(marker)


@pytest.fixture(scope="module")
def s3_out(s3):
    """(the job's CompletedProcess, OUT opened from this process through the same environment variables)."""
    done = run_job(s3)
    assert done.returncode == 0, done.stderr[-4000:]
    env, _ = s3_env(s3["endpoint"])
    with pytest.MonkeyPatch.context() as patch:
        for key in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", *CREDENTIALS):
            patch.setenv(key, env[key])
        yield done, OutDir(f"s3://{BUCKET}/out")


def test_the_job_reads_and_writes_s3(s3, s3_out):
    _, out = s3_out
    photos = s3["photos"]
    manifest = out.read_json("manifest.json")
    assert manifest["counts"] == {"listed": len(photos), "images": len(photos), "errors": 0}
    rows = pq.read_table(f"{BUCKET}/out/embeddings", filesystem=out.fs).to_pandas()
    assert sorted(rows["path"]) == photos and rows["id"].is_unique
    assert set(rows["id"]) == {image_id(p) for p in photos}
    assert pd.read_csv(io.BytesIO(out.read_bytes("errors.csv"))).empty
    clusters = pd.read_csv(io.BytesIO(out.read_bytes("clusters.csv")))
    assert sorted(clusters["path"]) == photos and clusters["cluster"].between(0, 2).all()
    index = faiss.deserialize_index(np.frombuffer(out.read_bytes("index.faiss"), dtype=np.uint8))
    assert index.ntotal == len(photos)
    hits = Index.load(out.location).like([photos[0]], k=3)[0]
    assert len(hits) == 3 and {h.path for h in hits} < set(photos) - {photos[0]}


def test_credentials_are_never_recorded_or_printed(s3_out):
    done, out = s3_out
    written = [out.read_bytes(name) for name in ("manifest.json", "config.json", "errors.csv", "clusters.csv")]
    for secret in CREDENTIALS.values():
        assert all(secret.encode() not in data for data in written)
        assert secret not in done.stdout + done.stderr


def test_a_second_run_on_s3_embeds_nothing_and_duplicates_nothing(s3, s3_out):
    _, out = s3_out
    shards = shard_names(out)
    again = run_job(s3)
    assert again.returncode == 0, again.stderr[-4000:]
    n = len(s3["photos"])
    assert f"{n} images listed: {n} unchanged, 0 new, 0 changed, 0 removed" in again.stderr
    assert shard_names(out) == shards
    rows = pq.read_table(f"{BUCKET}/out/embeddings", filesystem=out.fs).to_pandas()
    assert len(rows) == n and rows["id"].is_unique


def test_a_missing_input_or_bucket_is_a_user_error(s3_out):
    with pytest.raises(UserError, match="no such object or folder"):
        list_images([f"s3://{BUCKET}/nothing-here"])
    # (Through OutDir, not `main`: an embed would start Ray in this process, beside the session's local_ray.)
    with pytest.raises(UserError, match="cannot create no-such-bucket/out for --out s3://no-such-bucket/out: Bucket"):
        OutDir("s3://no-such-bucket/out").write_json("manifest.json", {})
