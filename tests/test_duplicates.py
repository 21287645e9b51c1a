"""Near-duplicates and outliers (issue 13): groups against exact all-pairs ground truth on every index type, no chains,
the keep rule and its reasons, calibration, incremental group ids, bad input, the write protocol; then on generated
scenes embedded by VGG-16 (random weights): `run --duplicates` with `auto`, its threshold scored on other near-copies,
the report's sections and the two endpoints.

Fast tests use hand-written OUTs and, where near-copies must be embedded, a stand-in model (block colour means) that
separates the generated scenes from their copies the way a real model does, in milliseconds.
"""

from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import cosine
from PIL import Image, ImageDraw

from cluster.calibration import CopySpec, choose_threshold, copy_distances, precision_recall
from cluster.index import prepare
from cluster.keeper import read_facts
from cluster.options import DuplicateOptions, IndexOptions
from embedder import outdir
from embedder.outdir import DUPLICATE_IDS_FILE, DUPLICATES_FILE, OUTLIERS_FILE, PENDING, OutDir
from embedder.reader import decode_image, image_id
from embedder.writer import embedding_schema, write_shard
from jobs.cli import main
from jobs.duplicates import duplicates
from jobs.index import index


def scene(rng: np.random.Generator, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """A generated scene: a two-colour gradient and 4-8 filled ellipses and rectangles, all drawn from `rng`."""
    w, h = size
    a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, w)[None, :, None] if rng.random() < 0.5 else np.linspace(0, 1, h)[:, None, None]
    img = Image.fromarray(((a * (1 - t) + b * t) * np.ones((h, w, 3))).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(w // 8, w // 2)), y0 + int(rng.integers(h // 8, h // 2))]
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return img


def stand_in_model(pixels: np.ndarray) -> np.ndarray:
    """(n, 224, 224, 3) uint8 -> (n, 192): mean colour of each of 8 x 8 blocks, centred."""
    x = pixels.reshape(len(pixels), 8, 28, 8, 28, 3).mean(axis=(2, 4)) / 255.0
    return (x - 0.5).reshape(len(pixels), -1).astype(np.float32)


def write_out(folder: str, paths: list[str], xb: np.ndarray, metric: str, spec: str = "flat", pca: int | None = None,
              fingerprints: np.ndarray | None = None, rows_per_shard: int = 64) -> str:
    """An OUT by hand (as `imgindex embed` leaves it, ids from the paths) and its index built by `imgindex index`."""
    out = OutDir(folder)
    if not out.exists("manifest.json"):
        out.write_json("manifest.json", {"format_version": 1, "metric": metric, "dimension": xb.shape[1]})
    for name in out.list("embeddings", ".parquet"):
        out.delete(name)
    ids = np.array([image_id(p) for p in paths], dtype=np.int64)
    fingerprints = np.ones(len(paths), dtype=np.int64) if fingerprints is None else fingerprints
    schema = embedding_schema(xb.shape[1])
    for start in range(0, len(paths), rows_per_shard):
        part = slice(start, start + rows_per_shard)
        n = len(ids[part])
        columns = [pa.array(ids[part]), pa.array(paths[part]),
                   pa.FixedSizeListArray.from_arrays(pa.array(xb[part].astype(np.float32).ravel()), xb.shape[1]),
                   pa.array(fingerprints[part]), pa.array(np.full(n, -1)), pa.array(np.full(n, -1))]
        write_shard(out, f"embeddings/part-{start:06d}.parquet", pa.table(columns, schema=schema))
    index(folder, IndexOptions(index=spec, pca=pca, max_memory="1G"))
    return folder


def exact_distances(xb: np.ndarray, metric: str) -> np.ndarray:
    """All pairs, in float64: 1 - cosine or Euclidean."""
    x = prepare(xb, metric).astype(np.float64)
    if metric == "cosine":
        return np.clip(1 - x @ x.T, 0, 2)
    return np.sqrt(np.maximum((x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2 * x @ x.T, 0))


def reference_groups(D: np.ndarray, threshold: float, order: list[int]) -> dict[int, set[int]]:
    """The grouping rule on exact all-pairs distances: walk `order`; an unclaimed image keeps, claiming the
    unclaimed within the threshold. {keeper: members with the keeper}, groups of two or more."""
    owner: dict[int, int] = {}
    for row in order:
        if row in owner:
            continue
        owner[row] = row
        for other in np.flatnonzero(D[row] <= threshold):
            if other != row and other not in owner:
                owner[int(other)] = row
    groups: dict[int, set[int]] = {}
    for member, keeper in owner.items():
        groups.setdefault(keeper, set()).add(member)
    return {k: v for k, v in groups.items() if len(v) > 1}


def planted(n_distinct: int, sizes: list[int], d: int, noise: float, seed: int) -> tuple[np.ndarray, list[str]]:
    """Distinct standard-normal vectors, then groups of near-copies (base + noise) of the given sizes; paths are
    /images/NNNNN.jpg in row order (no files: the path decides the keeper)."""
    rng = np.random.default_rng(seed)
    parts = [rng.standard_normal((n_distinct, d))]
    for size in sizes:
        base = rng.standard_normal(d)
        parts.append(base + noise * rng.standard_normal((size, d)))
    xb = np.concatenate(parts).astype(np.float32)
    return xb, [f"/images/{i:05d}.jpg" for i in range(len(xb))]


def groups_of(out: str) -> dict[str, set[str]]:
    """duplicates.csv as {keeper path: member paths with the keeper}."""
    table = pd.read_csv(os.path.join(out, DUPLICATES_FILE))
    return {rows.loc[rows["keep"], "path"].iloc[0]: set(rows["path"]) for _, rows in table.groupby("group")}


@pytest.mark.parametrize("metric,spec,pca", [("cosine", "flat", None), ("l2", "flat", None), ("cosine", "IVF16,Flat", None),
                                             ("cosine", "HNSW32", None), ("l2", "IVF8,SQ8", 16)])
def test_groups_equal_the_rule_on_exact_all_pairs_for_every_index_type(tmp_path, metric, spec, pca):
    xb, paths = planted(400, [2, 3, 4, 6, 12], 32, 0.02, seed=1)
    threshold = 0.02 if metric == "cosine" else 0.6
    out = write_out(str(tmp_path / "out"), paths, xb, metric, spec, pca)
    record = duplicates(out, DuplicateOptions(threshold=threshold))
    D = exact_distances(xb, metric)
    order = sorted(range(len(paths)), key=lambda i: paths[i])
    expected = {paths[k]: {paths[m] for m in members} for k, members in reference_groups(D, threshold, order).items()}
    assert groups_of(out) == expected
    assert record["groups"] == 5 and record["images_in_groups"] == 27 and record["largest_group"] == 12
    assert record["widened"] >= 12 and record["capped"] == 0  # the 12: more than the 8 first asked for
    table = pd.read_csv(os.path.join(out, DUPLICATES_FILE))
    row = {p: i for i, p in enumerate(paths)}
    for _, rows in table.groupby("group"):
        keeper = row[rows.loc[rows["keep"], "path"].iloc[0]]
        assert rows["keep"].sum() == 1
        for path, distance in zip(rows["path"], rows["distance"]):
            assert distance == pytest.approx(D[keeper, row[path]], abs=1e-5)  # exact, whatever the index stores
    # Outliers: the exact distance to the 5th nearest other image (an approximate index can only miss neighbours).
    outliers = pd.read_csv(os.path.join(out, OUTLIERS_FILE))
    np.fill_diagonal(D, np.inf)
    kth = np.sort(D, axis=1)[:, 4]
    got = outliers.set_index("path")["distance"].loc[paths].to_numpy()
    assert outliers["rank"].tolist() == list(range(1, len(paths) + 1))
    assert (np.diff(outliers["distance"]) <= 0).all()
    assert (got >= kth - 1e-4).all()
    if spec == "flat":
        np.testing.assert_allclose(got, kth, rtol=1e-4, atol=1e-5)
    elif pca is None:
        assert np.mean(np.isclose(got, kth, rtol=1e-4, atol=1e-5)) > 0.8


def test_a_group_larger_than_the_neighbours_cap_is_reported(tmp_path, monkeypatch, caplog):
    import cluster.duplicates

    monkeypatch.setattr(cluster.duplicates, "MAX_NEIGHBOURS", 16)
    xb, paths = planted(40, [20], 16, 0.01, seed=12)
    out = write_out(str(tmp_path / "out"), paths, xb, "l2")
    record = duplicates(out, DuplicateOptions(threshold=0.5))
    assert record["capped"] == 20 and record["largest_group"] < 20  # the group of 20 is not found whole
    assert "may be incomplete" in caplog.text


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_pair_distances_read_in_blocks_equal_numpy(tmp_path, monkeypatch, metric):
    """Blocks of 64 rows, scans of 16: dense pairs (spans read whole), sparse ones (rows read alone), repeats, both
    orders, a pair of a row with itself; every distance as numpy computes it from the rows."""
    import cluster.duplicates

    monkeypatch.setattr(cluster.duplicates, "BLOCK_BYTES", 64 * 4 * 24)
    monkeypatch.setattr(cluster.duplicates, "SCAN_ROWS", 16)
    rng = np.random.default_rng(13)
    x = prepare(rng.standard_normal((300, 24)).astype(np.float32), metric)
    store = cluster.duplicates.RowStore(str(tmp_path / "rows.f32"), 24)
    store.append(x[:100])
    store.append(x[100:])
    dense = rng.integers(0, 300, (2, 2000))
    sparse = np.array([[5, 299, 7, 150, 42], [290, 3, 7, 151, 260]])
    for src, dst in (dense, sparse, np.empty((2, 0), dtype=np.int64)):
        got = cluster.duplicates.pair_distances(store, src, dst, metric)
        if metric == "cosine":
            expected = np.clip(1 - (x[src] * x[dst]).sum(1), 0, 2)
        else:
            expected = np.sqrt(((x[src] - x[dst]) ** 2).sum(1))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    store.close()


def test_a_chain_does_not_become_one_group(tmp_path):
    """A ~ B ~ C ~ D ~ E, each 0.6 t from the next: A keeps B; C, within t of B only, keeps D; E is left alone."""
    t = 1.0
    rng = np.random.default_rng(2)
    u = rng.standard_normal(16)
    u /= np.linalg.norm(u)
    chain = np.stack([np.full(16, 5.0) + 0.6 * t * i * u for i in range(5)])
    others = 50 * rng.standard_normal((30, 16))
    xb = np.concatenate([chain, others]).astype(np.float32)
    paths = [f"/c/{name}.jpg" for name in "abcde"] + [f"/o/{i:02d}.jpg" for i in range(30)]
    out = write_out(str(tmp_path / "out"), paths, xb, "l2")
    duplicates(out, DuplicateOptions(threshold=t))
    assert groups_of(out) == {"/c/a.jpg": {"/c/a.jpg", "/c/b.jpg"}, "/c/c.jpg": {"/c/c.jpg", "/c/d.jpg"}}


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_the_keep_rule_decides_each_case_and_says_why(tmp_path):
    rng = np.random.default_rng(3)
    folder = tmp_path / "images"
    folder.mkdir()
    big = scene(rng, (320, 240))
    files = {
        "pixels-big.jpg": jpeg(big), "pixels-small.jpg": jpeg(big.resize((160, 120))),
        "bytes-q95.jpg": jpeg(big, 95), "bytes-q60.jpg": jpeg(big, 60),
        "oldest-1.jpg": jpeg(big), "oldest-2.jpg": jpeg(big),
        "path-b.jpg": jpeg(big), "path-a.jpg": jpeg(big),
        "gone-big.jpg": jpeg(big), "gone-small.jpg": jpeg(big.resize((160, 120))),
    }
    png = io.BytesIO()
    big.save(png, "PNG")
    size = max(len(png.getvalue()), len(jpeg(big)))  # both padded after their end marker to one size: the format decides
    files["lossless.png"] = png.getvalue().ljust(size, b"\0")
    files["lossless.jpg"] = jpeg(big).ljust(size, b"\0")
    for name, data in files.items():
        (folder / name).write_bytes(data)
    for name in files:  # one time for all; the oldest case: 2020 against 2021
        os.utime(folder / name, ns=(1_600_000_000 * 10**9,) * 2)
    os.utime(folder / "oldest-2.jpg", ns=(1_630_000_000 * 10**9,) * 2)
    cases = sorted({name.split("-")[0].split(".")[0] for name in files})
    base = {case: 100 * rng.standard_normal(8) for case in cases}
    names = sorted(files)
    paths = [str(folder / name) for name in names]
    xb = np.stack([base[name.split("-")[0].split(".")[0]] + 1e-3 * rng.standard_normal(8) for name in names])
    out = write_out(str(tmp_path / "out"), paths, xb, "l2")
    os.remove(folder / "gone-big.jpg")  # moved away after embedding: it loses every tie-breaker
    duplicates(out, DuplicateOptions(threshold=1.0))
    table = pd.read_csv(os.path.join(out, DUPLICATES_FILE))
    table["name"] = table["path"].map(os.path.basename)
    reason = dict(zip(table["name"], table["reason"]))
    kept = set(table.loc[table["keep"], "name"])
    assert kept == {"pixels-big.jpg", "bytes-q95.jpg", "lossless.png", "oldest-1.jpg", "path-a.jpg", "gone-small.jpg"}
    assert reason["pixels-big.jpg"] == "largest image (320×240)" and reason["pixels-small.jpg"] == "smaller image (160×120)"
    assert reason["bytes-q95.jpg"] == f"same pixels, larger file ({len(files['bytes-q95.jpg']):,} bytes)"
    assert reason["lossless.png"] == "same pixels and size, lossless format (PNG)"
    assert reason["lossless.jpg"] == "same pixels and size, lossy format (JPEG)"
    assert reason["oldest-1.jpg"] == "same pixels, size and kind of format, oldest file (2020-09-13 12:26:40 UTC)"
    assert reason["path-a.jpg"] == "same pixels, size, kind of format and age, first path"
    assert reason["path-b.jpg"] == "same pixels, size, kind of format and age, later path"
    assert reason["gone-small.jpg"] == "largest image (160×120); 1 other file missing or unreadable"
    assert reason["gone-big.jpg"].startswith("file missing or unreadable") and reason["gone-big.jpg"].endswith("loses every tie-breaker")
    # Another order: the oldest first.
    duplicates(out, DuplicateOptions(threshold=1.0, keep_rule=("oldest", "pixels")))
    table = pd.read_csv(os.path.join(out, DUPLICATES_FILE))
    kept = set(table.loc[table["keep"], "path"].map(os.path.basename))
    assert "oldest-1.jpg" in kept and "pixels-big.jpg" in kept
    assert json.load(open(os.path.join(out, "manifest.json")))["duplicates"]["keep_rule"] == ["oldest", "pixels"]


def test_webp_lossless_is_read_from_its_header(tmp_path):
    image = scene(np.random.default_rng(4))
    image.save(tmp_path / "lossless.webp", lossless=True)
    image.save(tmp_path / "lossy.webp", quality=80)
    assert read_facts(str(tmp_path / "lossless.webp")).lossless is True
    assert read_facts(str(tmp_path / "lossy.webp")).lossless is False
    assert read_facts(str(tmp_path / "none.webp")).error.startswith("file missing")


@pytest.fixture(scope="module")
def scenes_out(tmp_path_factory) -> str:
    """30 distinct generated scenes as JPEG files, embedded by the stand-in model, cosine, flat index."""
    work = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(5)
    paths = []
    for i in range(30):
        path = str(work / f"scene-{i:02d}.jpg")
        scene(rng).save(path, quality=90)
        paths.append(path)
    xb = stand_in_model(np.stack([decode_image(open(p, "rb").read()) for p in paths]))
    return write_out(str(work / "out"), paths, xb, "cosine")


def test_auto_reaches_its_target_and_measure_reports_the_same_figures(scenes_out, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(scenes_out, out)
    record = duplicates(out, DuplicateOptions(sample=8), embed=stand_in_model)
    calibration = record["calibration"]
    assert record["threshold_from"] == "auto" and record["groups"] == 0
    assert calibration["precision"] >= 0.99 and calibration["recall"] >= 0.9
    assert calibration["images"] == 8 and calibration["positives"] == 40 and calibration["negatives"] == 80
    assert calibration["suggested_threshold"] == record["threshold"]
    measured = duplicates(out, DuplicateOptions(threshold=record["threshold"], measure=True, sample=8), embed=stand_in_model)
    assert measured["threshold_from"] == "--threshold"
    assert {k: measured["calibration"][k] for k in ("precision", "recall", "suggested_threshold")} == \
        {k: calibration[k] for k in ("precision", "recall", "suggested_threshold")}


def test_the_threshold_is_the_largest_distance_at_the_target_precision():
    positives = np.linspace(0.01, 0.05, 100)
    negatives = np.linspace(0.2, 0.9, 50)
    # 100 true positives allow one false one at 0.99: the first negative is admitted, the second is not.
    assert choose_threshold(positives, negatives) == pytest.approx((negatives[0] + negatives[1]) / 2)
    # A real duplicate among the negatives counts against the precision: with one, the first negative is not admitted.
    assert choose_threshold(positives, np.append(negatives, 0.001)) == pytest.approx((0.05 + 0.2) / 2)
    assert choose_threshold(positives, np.append(negatives, [0.001, 0.002])) is None
    # Negatives among the positives: the largest observed distance that holds 0.99, and none above it does.
    for extra in ([0.03, 0.045], [0.02, 0.021, 0.049]):
        mixed = np.append(negatives, extra)
        t = choose_threshold(positives, mixed)
        assert precision_recall(positives, mixed, t)[0] >= 0.99
        above = np.unique(np.concatenate([positives, mixed]))
        assert all(precision_recall(positives, mixed, v)[0] < 0.99 for v in above[above > t])


def test_near_copies_are_made_as_specified():
    image = scene(np.random.default_rng(6), (200, 100))
    copies = dict(CopySpec().copies(image, np.random.default_rng(0)))
    assert list(copies) == ["resized to 0.5", "JPEG quality 50", "cropped to 90%", "10% brighter", "10% darker"]
    assert copies["resized to 0.5"].size == (100, 50) and copies["cropped to 90%"].size == (180, 90)
    mean = np.asarray(image, dtype=float).mean()
    assert np.asarray(copies["10% brighter"], dtype=float).mean() > mean > np.asarray(copies["10% darker"], dtype=float).mean()
    unreadable = copy_distances(["/no/such.jpg"], np.zeros((1, 192), np.float32), stand_in_model, "cosine")
    assert unreadable.unreadable == 1 and unreadable.distance.size == 0


def test_a_rerun_keeps_the_ids_of_groups_that_did_not_change(tmp_path):
    rng = np.random.default_rng(7)
    names = {"a": 2, "b": 3, "c": 2, "d": 2}
    bases = {g: rng.standard_normal(16) * 10 for g in names}
    vectors = {f"/g/{g}{i}.jpg": bases[g] + 0.01 * rng.standard_normal(16) for g, n in names.items() for i in range(n)}
    vectors |= {f"/o/{i:02d}.jpg": rng.standard_normal(16) * 10 for i in range(20)}

    def run(paths: list[str]) -> dict[frozenset, int]:
        write_out(str(tmp_path / "out"), paths, np.stack([vectors[p] for p in paths]), "l2")
        duplicates(str(tmp_path / "out"), DuplicateOptions(threshold=0.5))
        table = pd.read_csv(tmp_path / "out" / DUPLICATES_FILE)
        return {frozenset(rows["path"].map(lambda p: os.path.basename(p)[:-4])): int(g) for g, rows in table.groupby("group")}

    first = [p for p in vectors if not p.startswith("/g/d")]
    assert run(first) == {frozenset({"b0", "b1", "b2"}): 0, frozenset({"a0", "a1"}): 1, frozenset({"c0", "c1"}): 2}
    assert run(first) == {frozenset({"b0", "b1", "b2"}): 0, frozenset({"a0", "a1"}): 1, frozenset({"c0", "c1"}): 2}
    # a removed, b2 removed (b keeps its keeper b0, so its id), c unchanged, d added: a new id, never a reused one.
    second = [p for p in vectors if not p.startswith("/g/a") and p != "/g/b2.jpg"]
    assert run(second) == {frozenset({"b0", "b1"}): 0, frozenset({"c0", "c1"}): 2, frozenset({"d0", "d1"}): 3}
    record = json.load(open(tmp_path / "out" / "manifest.json"))["duplicates"]
    assert record["update"] == {"kept_ids": 2, "new_ids": 1, "gone": 1}


def snapshot(folder: str) -> dict:
    return {os.path.relpath(os.path.join(d, f), folder): os.stat(os.path.join(d, f)).st_mtime_ns
            for d, _, files in os.walk(folder) for f in files}


def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    xb, paths = planted(20, [2], 8, 0.01, seed=8)
    out = write_out(str(tmp_path / "out"), paths, xb, "cosine")
    before = snapshot(out)
    cases = [
        ([str(tmp_path / "missing")], "no such output folder"),
        ([out, "--threshold", "2.5"], "in (0, 2] for the cosine metric"),
        ([out, "--threshold", "-0.1"], "greater than 0"),
        ([out, "--threshold", "near"], "expected auto or a distance"),
        ([out, "--keep-rule", "pixels,colour"], "--keep-rule"),
        ([out, "--keep-rule", "pixels,pixels"], "at most once"),
    ]
    for argv, words in cases:
        assert main(["duplicates", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("imgindex: error: ") and err.count("\n") == 1 and words in err, err
    os.remove(os.path.join(out, "index.faiss"))
    assert main(["duplicates", out, "--threshold", "0.1"]) == 2
    assert "no index.faiss" in capsys.readouterr().err
    write_out(str(tmp_path / "out"), paths, xb, "cosine")
    stale = write_out(str(tmp_path / "stale"), paths[:-1], xb[:-1], "cosine")
    shutil.copy(os.path.join(stale, "index.faiss"), os.path.join(out, "index.faiss"))
    shutil.copy(os.path.join(stale, "index_ids.parquet"), os.path.join(out, "index_ids.parquet"))
    before = snapshot(out)
    assert main(["duplicates", out, "--threshold", "0.1"]) == 2
    assert "does not hold the current embeddings" in capsys.readouterr().err
    assert snapshot(out) == before


class Killed(BaseException):
    """Stands for SIGKILL: nothing catches it, and no cleanup writes to OUT."""


def test_killed_after_any_write_the_next_run_finishes_the_same(tmp_path, monkeypatch):
    import cluster.duplicates

    xb, paths = planted(30, [2, 3], 8, 0.01, seed=9)
    start = write_out(str(tmp_path / "start"), paths, xb, "cosine")
    writes: list[str] = []
    monkeypatch.setattr(outdir, "_written", lambda kind, name: writes.append(f"{kind} {name}"))
    reference = str(tmp_path / "reference")
    shutil.copytree(start, reference)
    duplicates(reference, DuplicateOptions(threshold=0.01))
    assert len(writes) == 8 and sum(w.startswith("write manifest.json") for w in writes) == 2
    expected = {name: open(os.path.join(reference, name), "rb").read() for name in (DUPLICATES_FILE, OUTLIERS_FILE)}
    for number in range(1, len(writes) + 1):
        out = str(tmp_path / f"cut-{number}")
        shutil.copytree(start, out)
        count = [0]

        def cut(kind: str, name: str) -> None:
            count[0] += 1
            if count[0] == number:
                raise Killed(f"after write {number}: {kind} {name}")

        monkeypatch.setattr(outdir, "_written", cut)
        # As under SIGKILL, the killed step does not remove its scratch copy of the vectors.
        monkeypatch.setattr(cluster.duplicates.RowStore, "close", lambda store: store.file.close())
        with pytest.raises(Killed):
            duplicates(out, DuplicateOptions(threshold=0.01))
        assert [f for f in os.listdir(out) if f.startswith(outdir.DUPLICATES_SCRATCH + outdir.TEMPORARY)], "no scratch left"
        monkeypatch.undo()
        duplicates(out, DuplicateOptions(threshold=0.01))
        for name, data in expected.items():
            assert open(os.path.join(out, name), "rb").read() == data, f"cut after write {number}"
        manifest = json.load(open(os.path.join(out, "manifest.json")))
        assert PENDING not in manifest and manifest["duplicates"]["groups"] == 2
        assert [f for f in os.listdir(out) if ".staged-" in f or ".tmp-" in f] == []
        assert os.path.exists(os.path.join(out, DUPLICATE_IDS_FILE))


# On VGG-16 (seeded random weights) through the whole job.

@pytest.fixture(scope="module")
def vgg_out(tmp_path_factory, local_ray, random_weights_file) -> tuple[str, str, dict]:
    """12 distinct generated scenes through `imgindex run --duplicates` (auto, 3 sampled images; the seeded random
    weights from a file); returns the input
    folder, OUT and the first run's duplicates record."""
    work = tmp_path_factory.mktemp("vgg")
    images = work / "images"
    images.mkdir()
    rng = np.random.default_rng(10)
    for i in range(12):
        scene(rng, (320, 240)).save(images / f"s{i:02d}.jpg", quality=90)
        os.utime(images / f"s{i:02d}.jpg", ns=(1_600_000_000 * 10**9,) * 2)
    out = str(work / "out")
    argv = ["run", str(images), "--out", out, "--clusters", "2", "--weights", random_weights_file, "--duplicates", "--sample", "3"]
    assert main(argv) == 0
    return str(images), out, json.load(open(os.path.join(out, "manifest.json")))["duplicates"]


def test_auto_on_vgg_holds_on_near_copies_made_another_way(vgg_out):
    from cluster.search import collection_model
    from jobs.duplicates import copy_embedder

    images, out, record = vgg_out
    assert record["threshold_from"] == "auto" and record["calibration"]["precision"] >= 0.99 and record["groups"] == 0
    assert "calibration: near-copies embedded on the job's model replicas" in open(os.path.join(out, "run.log")).read()
    threshold = record["threshold"]
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    # A second set: other scenes of the collection, other seed, other parameters, embedded on the job's replicas (Ray
    # runs in this process); two of the copies checked against the collection's model run here directly.
    on_replicas, in_process = copy_embedder(OutDir(out), manifest, DuplicateOptions()), collection_model(manifest)

    def embed(pixels: np.ndarray) -> np.ndarray:
        vectors, direct = on_replicas(pixels), in_process(pixels[[0, -1]])
        assert vectors.shape == (len(pixels), 4096)
        assert min(cosine(a, b) for a, b in zip(vectors[[0, -1]], direct)) >= 0.9999
        return vectors

    from embedder.collection import iter_embeddings

    stored = {p: x for _, paths, xb in iter_embeddings(OutDir(out)) for p, x in zip(paths, xb)}
    names = sorted(p for p in stored if len(os.path.basename(p)) == len("s00.jpg"))  # the scenes, not copies added later
    chosen = [names[i] for i in (1, 5, 10)]
    copies = copy_distances(chosen, prepare(np.stack([stored[p] for p in chosen]), "cosine"), embed, "cosine",
                            CopySpec(scale=0.4, quality=40, crop=0.92, brightness=0.08), seed=11)
    positives = copies.distance.ravel()
    # Negatives: every pair of images of different scenes among the collection (exact all-pairs).
    D = exact_distances(np.stack([stored[p] for p in names]), "cosine")
    negatives = D[np.triu_indices(len(names), 1)]
    precision, recall = precision_recall(positives, negatives, threshold)
    assert precision >= 0.95 and recall >= 0.9, (threshold, positives, np.sort(negatives)[:5])


@pytest.fixture(scope="module")
def vgg_groups(vgg_out, random_weights_file) -> str:
    """vgg_out after exact copies, a PNG, re-encodings, an upscale and a half-size copy of three scenes were added and
    `imgindex run --duplicates` ran again with the threshold `auto` chose; returns OUT."""
    images, out, record = vgg_out
    first = Image.open(os.path.join(images, "s00.jpg")).convert("RGB")
    shutil.copy(os.path.join(images, "s00.jpg"), os.path.join(images, "s00-copy.jpg"))  # same bytes, newer
    first.save(os.path.join(images, "s00.png"))  # same pixels, larger file
    first.save(os.path.join(images, "s00-q60.jpg"), quality=60)
    second = Image.open(os.path.join(images, "s01.jpg")).convert("RGB")
    second.resize((640, 480), Image.Resampling.BICUBIC).save(os.path.join(images, "s01-big.jpg"), quality=90)
    second.resize((160, 120), Image.Resampling.LANCZOS).save(os.path.join(images, "s01-half.jpg"), quality=90)
    Image.open(os.path.join(images, "s02.jpg")).save(os.path.join(images, "s02-q70.jpg"), quality=70)
    argv = ["run", images, "--out", out, "--clusters", "2", "--weights", random_weights_file, "--duplicates",
            "--threshold", str(record["threshold"])]
    assert main(argv) == 0
    return out


def test_copies_and_re_encodings_group_around_the_right_keeper(vgg_groups):
    out = vgg_groups
    named = {os.path.basename(k): {os.path.basename(p) for p in v} for k, v in groups_of(out).items()}
    assert named == {"s00.png": {"s00.png", "s00.jpg", "s00-copy.jpg", "s00-q60.jpg"},
                     "s01-big.jpg": {"s01-big.jpg", "s01.jpg", "s01-half.jpg"},
                     "s02.jpg": {"s02.jpg", "s02-q70.jpg"}}
    table = pd.read_csv(os.path.join(out, DUPLICATES_FILE))
    table.index = table["path"].map(os.path.basename)
    assert table.loc["s00.png", "reason"].startswith("same pixels, larger file")
    assert table.loc["s00-copy.jpg", "distance"] < 1e-5  # the same pixels: the same vector
    assert table.loc["s01-big.jpg", "reason"] == "largest image (640×480)"
    assert table.loc["s02.jpg", "reason"].startswith("same pixels, larger file")
    # The report shows both sections, keeper first, with thumbnails.
    page = open(os.path.join(out, "report", "index.html"), encoding="utf-8").read()
    assert '<section id="duplicates">' in page and '<section id="outliers">' in page
    group = page[page.index('<section id="duplicates">'):page.index('<section id="outliers">')]
    assert group.index("s00.png") < group.index("s00-q60.jpg") and "largest image (640×480)" in group
    outliers = pd.read_csv(os.path.join(out, OUTLIERS_FILE))
    assert len(outliers) == 18
    for key in table["id"].tolist() + outliers["id"].head(3).tolist():
        assert os.path.exists(os.path.join(out, "report", "thumbs", f"{key}.jpg"))


@pytest.fixture(scope="module")
def groups_service(vgg_groups, local_ray):
    """The search service on vgg_groups' OUT, run by Serve on the session's Ray (no token); yields its URL."""
    import socket

    from ray import serve

    from embedder.runtime import cluster_cpus, cluster_gpus
    from jobs.serve_options import ServeOptions
    from jobs.service import serve_app

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    quiet = {"enable_access_log": False, "log_level": "WARNING"}
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=quiet)
    try:
        serve.run(serve_app(vgg_groups, None, ServeOptions(port=port), cluster_cpus(), cluster_gpus()),
                  name="duplicates-test", route_prefix="/", logging_config=quiet)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_the_duplicates_endpoint_pages_through_the_groups(groups_service, vgg_groups):
    import requests

    table = pd.read_csv(os.path.join(vgg_groups, DUPLICATES_FILE))
    answer = requests.get(f"{groups_service}/duplicates", params={"offset": 1, "limit": 2}, timeout=30)
    assert answer.status_code == 200, answer.text
    page = answer.json()
    assert page["total"] == 3 and page["offset"] == 1 and page["threshold"] > 0
    groups = sorted(table["group"].unique())
    assert [g["group"] for g in page["groups"]] == groups[1:3]
    for entry in page["groups"]:
        rows = table[table["group"] == entry["group"]]
        assert entry["size"] == len(rows) and [m["id"] for m in entry["images"]] == rows["id"].tolist()
        assert entry["images"][0]["keep"] and entry["images"][0]["reason"] == rows["reason"].iloc[0]
    for params in ({"limit": 0}, {"limit": 1001}, {"offset": -1}):
        bad = requests.get(f"{groups_service}/duplicates", params=params, timeout=30)
        assert bad.status_code == 400 and "error" in bad.json()


def test_search_within_a_distance_answers_is_this_already_in_the_collection(groups_service, vgg_groups):
    import requests

    images = os.path.dirname(pd.read_csv(os.path.join(vgg_groups, DUPLICATES_FILE))["path"].iloc[0])
    data = open(os.path.join(images, "s00.jpg"), "rb").read()
    threshold = json.load(open(os.path.join(vgg_groups, "manifest.json")))["duplicates"]["threshold"]

    def search(**params):
        return requests.post(f"{groups_service}/search", params=params, files={"file": ("q.jpg", data)}, timeout=120)

    [near] = search(k=10, max_distance=threshold).json()
    names = {os.path.basename(h["path"]) for h in near["results"]}
    assert names == {"s00.jpg", "s00.png", "s00-copy.jpg", "s00-q60.jpg"}
    assert all(h["distance"] <= threshold for h in near["results"])
    [two] = search(k=2, max_distance=threshold).json()
    assert len(two["results"]) == 2
    [far] = search(k=5).json()
    assert len(far["results"]) == 5
    assert search(k=5, max_distance=2.5).status_code == 400
    assert search(k=5, max_distance=-1).status_code == 400
