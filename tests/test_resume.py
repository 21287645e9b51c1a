"""Nothing lost, nothing twice: a driver killed with SIGKILL mid-run and resumed, and a model actor killed mid-job.

The crash test follows faiss's `test_checkpoint`: crash a run on purpose, resume it, and compare with a clean run.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import psutil
import pyarrow.parquet as pq
from conftest import cosine

from embedder import pipeline
from embedder.collection import shard_names
from embedder.config import JobConfig
from embedder.outdir import KILL_HOOK_ENV, OutDir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = 10


def read_rows(out: str) -> pd.DataFrame:
    """The rows of OUT's committed shards."""
    shards = shard_names(OutDir(out))
    return pd.concat([pq.read_table(f"{out}/{s}").to_pandas() for s in shards], ignore_index=True) if shards else pd.DataFrame()


class ProcessTree:
    """A subprocess in its own session, with every descendant it starts recorded while it runs (Ray started in-process
    spawns the GCS, the raylet and workers), so that all of them can be killed by pid afterwards."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.popen = subprocess.Popen(
            args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        self.seen: dict[int, float] = {}
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        root = psutil.Process(self.popen.pid)
        while self.popen.poll() is None:
            try:
                for child in root.children(recursive=True):
                    self.seen.setdefault(child.pid, child.create_time())
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    def wait(self, timeout: float) -> tuple[int, str]:
        output, _ = self.popen.communicate(timeout=timeout)
        self._watcher.join()
        return self.popen.returncode, output

    def survivors(self) -> list[psutil.Process]:
        """Recorded descendants still alive (same pid and start time), and anything left in the session's group."""
        alive = []
        for pid, created in self.seen.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() == created:
                    alive.append(process)
            except psutil.NoSuchProcess:
                continue
        for process in psutil.process_iter():
            try:
                if process.pid not in self.seen and os.getpgid(process.pid) == self.popen.pid:
                    alive.append(process)
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
        return alive

    def kill(self) -> list[int]:
        """kill -9 the process group, then every recorded descendant still alive, by pid; return the pids killed."""
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=30)
        left = self.survivors()
        for process in left:
            process.kill()
        psutil.wait_procs(left, timeout=30)
        return [p.pid for p in left]


def run_job(out: str, input_dir: str, extra_env: dict[str, str], timeout: float = 240) -> tuple[int, str, ProcessTree]:
    env = dict(os.environ, PYTHONPATH=REPO, **extra_env)
    args = [sys.executable, "-m", "jobs.run", input_dir, "--out", out, "--clusters", "3", "--weights", "random",
            "--rows-per-shard", "2", "--batch-size", "2"]
    tree = ProcessTree(args, env)
    try:
        code, output = tree.wait(timeout)
    finally:
        tree.kill()
    assert tree.survivors() == []
    return code, output, tree


def test_killed_driver_resumes_to_the_same_outputs_as_a_clean_run(tmp_path, input_dir, run_out):
    """The driver of a job with its own (embedded) Ray is killed after the first shard is committed; every process
    it started is found and ended by pid; the same command then finishes the job."""
    out = str(tmp_path / "out")
    journal = str(tmp_path / "journal")
    # Writes 1-2 are manifest.json and config.json; the 13 files make one block, whose writer task writes the 5 shards
    # (writes 3-7) before the driver commits them one by one (8-12): after write 9, two shards are committed.
    code, output, tree = run_job(out, input_dir, {KILL_HOOK_ENV: f"9:{journal}"})
    assert code == -signal.SIGKILL, output
    assert len(tree.seen) >= 2, "Ray's processes were not seen: the test would not prove they are cleaned up"
    assert glob.glob(f"{out}/embeddings/*.tmp-*") == []
    crashed = read_rows(out)
    assert 2 <= len(crashed) < GOOD and crashed["id"].is_unique
    # The writer task had written every shard; those the driver had not committed yet are adopted by the next run.
    written = sum(pq.read_metadata(p).num_rows for p in glob.glob(f"{out}/embeddings/*.parquet"))
    assert len(crashed) < written <= GOOD
    manifest = json.load(open(f"{out}/manifest.json"))
    assert manifest["status"] == "embedding"

    code, output, _ = run_job(out, input_dir, {})
    assert code == 0, output
    manifest = json.load(open(f"{out}/manifest.json"))
    # Work already written is not redone: the resumed run embeds exactly what the crashed one had not written.
    assert manifest["changes"]["unchanged"] == written
    assert manifest["counts"] == {"listed": GOOD + 3, "images": GOOD, "errors": 3}
    assert f"embedded {GOOD - written} images ({written} already there" in output

    resumed, clean = (read_rows(o).set_index("id").sort_index() for o in (out, run_out))
    assert resumed.index.is_unique and resumed.index.tolist() == clean.index.tolist()
    assert resumed["path"].tolist() == clean["path"].tolist()
    for i in clean.index:
        assert cosine(resumed.loc[i, "embedding"], clean.loc[i, "embedding"]) >= 0.9999
    pd.testing.assert_frame_equal(pd.read_csv(f"{out}/errors.csv"), pd.read_csv(f"{run_out}/errors.csv"))
    assert sorted(pd.read_csv(f"{out}/clusters.csv")["id"]) == clean.index.tolist()


def test_a_killed_model_actor_is_restarted_and_every_image_embedded_once(tmp_path, photo_dir, local_ray, report_dir):
    for stale in os.listdir(report_dir):
        os.remove(os.path.join(report_dir, stale))
    killed: list[int] = []
    stop = threading.Event()

    def kill_first_replica() -> None:
        while not stop.is_set() and not killed:
            reports = [f for f in os.listdir(report_dir) if f.endswith(".json")]
            if reports:
                pid = int(reports[0].removeprefix("replica-").removesuffix(".json"))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_first_replica, daemon=True)
    killer.start()
    config = JobConfig(inputs=(photo_dir,), out=str(tmp_path / "out"), weights="random", batch_size=2, rows_per_shard=3).validate()
    try:
        summary = pipeline.embed(config)
    finally:
        stop.set()
        killer.join()
    assert len(killed) == 1 and not psutil.pid_exists(killed[0])
    replicas = {json.load(open(os.path.join(report_dir, f)))["pid"] for f in os.listdir(report_dir) if f.endswith(".json")}
    assert len(replicas) >= 2, "no replacement replica started after the kill"
    rows = read_rows(config.out)
    assert summary.embedded == GOOD and summary.errors == 0
    assert len(rows) == GOOD and rows["id"].is_unique
    assert sorted(rows["path"]) == sorted(os.path.join(photo_dir, n) for n in os.listdir(photo_dir))
