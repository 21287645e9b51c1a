"""Reader: listing INPUT arguments (one path per file, fingerprints), stable ids, and decoding against torchvision's own transforms.

Hostile and odd files are in test_hostile.py."""

from __future__ import annotations

import glob
import io
import json
import logging
import os

import numpy as np
import pandas as pd
import pytest
import torchvision
from PIL import Image

from conftest import jpeg_bytes
from embedder.config import UserError
from embedder.reader import (
    IMAGE_EXTENSIONS, crop_box, decode_batch, decode_image, fingerprint, image_id, list_images, scan_images,
)
from jobs.cli import main


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for rel in ["x.jpg", "a/y.PNG", "a/b/z.jpeg", "a/notes.txt", "a/b/w.webp"]:
        (tmp_path / rel).write_bytes(b"data")
    return tmp_path


def test_directory_is_walked_recursively_for_image_extensions_any_case(tree):
    found = list_images([str(tree)])
    assert found == sorted(str(tree / p) for p in ["x.jpg", "a/y.PNG", "a/b/z.jpeg", "a/b/w.webp"])


def test_glob_txt_csv_and_parquet_lists_resolve_relative_entries(tree, tmp_path, monkeypatch):
    monkeypatch.chdir(tree / "a")
    assert list_images(["*.PNG"]) == [str(tree / "a/y.PNG")]
    (tree / "list.txt").write_text("x.jpg\n# a comment\n\na/y.PNG\n")
    assert list_images([str(tree / "list.txt")]) == [str(tree / "a/y.PNG"), str(tree / "x.jpg")]
    pd.DataFrame({"path": ["a/b/z.jpeg", str(tree / "x.jpg")]}).to_csv(tree / "list.csv", index=False)
    assert list_images([str(tree / "list.csv")]) == [str(tree / "a/b/z.jpeg"), str(tree / "x.jpg")]
    pd.DataFrame({"path": ["a/b/w.webp"]}).to_parquet(tree / "list.parquet")
    assert list_images([str(tree / "list.parquet")]) == [str(tree / "a/b/w.webp")]


def test_list_without_path_column_and_missing_input_are_user_errors(tree):
    pd.DataFrame({"file": ["x.jpg"]}).to_csv(tree / "bad.csv", index=False)
    with pytest.raises(UserError, match="path"):
        list_images([str(tree / "bad.csv")])
    with pytest.raises(UserError, match="no such file"):
        list_images([str(tree / "missing")])


def test_symlink_loop_is_not_followed_and_with_follow_links_walked_once(tree):
    os.symlink(tree / "a", tree / "a" / "b" / "loop")
    listing = scan_images([str(tree)])
    assert listing.paths == list_images([str(tree)], follow_links=False) and listing.links_skipped == 1
    assert listing.paths == sorted(str(tree / p) for p in ["x.jpg", "a/y.PNG", "a/b/z.jpeg", "a/b/w.webp"])
    followed = scan_images([str(tree)], follow_links=True)
    assert len(followed.paths) == len(set(followed.paths)) == 4 and followed.links_skipped == 0


@pytest.fixture
def linked(tmp_path):
    """An input folder with a directory symlink out of it, one inside it, and a symlinked file from outside."""
    (tmp_path / "elsewhere" / "deep").mkdir(parents=True)
    (tmp_path / "elsewhere" / "deep" / "far.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere" / "single.png").write_bytes(b"x")
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(b"x")
    (photos / "sub" / "b.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", photos / "out-link")
    os.symlink(photos / "sub", photos / "sub-again")
    os.symlink(tmp_path / "elsewhere" / "single.png", photos / "file-link.png")
    return photos


def test_directory_symlinks_are_not_followed_by_default_and_counted(linked):
    plain = [str(linked / n) for n in ("a.jpg", "file-link.png", "sub/b.jpg")]
    listing = scan_images([str(linked)])
    assert listing.paths == plain and listing.links_skipped == 2
    for pattern in ("**/*.*", "**", "*/*.jpg", "*"):
        globbed = scan_images([str(linked / pattern)])
        assert str(linked / "out-link" / "deep" / "far.jpg") not in globbed.paths, pattern
        assert globbed.links_skipped >= 1, pattern
    assert scan_images([str(linked / "**" / "*.jpg")]).paths == [str(linked / "a.jpg"), str(linked / "sub" / "b.jpg")]


def test_follow_links_walks_into_them_each_real_folder_once(linked):
    listing = scan_images([str(linked)], follow_links=True)
    # sub-again is the real folder sub: listed once, under its first path in sorted order.
    assert listing.paths == [str(linked / n) for n in ("a.jpg", "file-link.png", "out-link/deep/far.jpg", "sub/b.jpg")]
    assert listing.links_skipped == 0
    assert str(linked / "out-link" / "deep" / "far.jpg") in scan_images([str(linked / "**" / "*.jpg")], follow_links=True).paths


def test_skipped_links_and_left_out_outputs_are_each_one_log_line(linked, caplog, monkeypatch):
    fake_out(linked / "index")
    logger = logging.getLogger("imgindex")
    # setup_logging (run by other tests) stops propagation to the root logger: catch the records on ours, once.
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="imgindex")
    try:
        scan_images([str(linked)], out=str(linked / "index"))
    finally:
        logger.removeHandler(caplog.handler)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        f"left out 1 output folder ({linked / 'index'}): imgindex outputs are never inputs",
        "did not follow 2 directory symlinks (pass --follow-links to follow them)",
    ]


def fake_out(folder, manifest: dict | None = None):
    """An OUT as `imgindex run` leaves it, with the images its report holds (thumbnails and the map)."""
    (folder / "embeddings").mkdir(parents=True)
    (folder / "report" / "thumbs").mkdir(parents=True)
    (folder / "embeddings" / "part-00000.parquet").write_bytes(b"x")
    for name in ("report/map.png", "report/thumbs/1.jpg", "report/thumbs/2.jpg"):
        (folder / name).write_bytes(b"x")
    default = {"format_version": 1, "identity": {"model": "vgg16"}, "model": "vgg16"}
    (folder / "manifest.json").write_text(json.dumps(default if manifest is None else manifest))
    return folder


def test_out_inside_the_input_is_never_listed_however_named(tree):
    out = fake_out(tree / "a" / "index")
    thumb = str(out / "report" / "thumbs" / "1.jpg")
    (tree / "list.txt").write_text(f"x.jpg\n{thumb}\n")
    images = sorted(str(tree / p) for p in ["x.jpg", "a/y.PNG", "a/b/z.jpeg", "a/b/w.webp"])
    walked = scan_images([str(tree)], out=str(out))
    assert walked.paths == images and walked.output_folders == (str(out),)
    globbed = scan_images([str(tree / "**" / "*")], out=str(out))
    assert [p for p in globbed.paths if "index" in p] == [] and set(images) <= set(globbed.paths)
    named = scan_images([str(tree / "list.txt"), thumb, str(out / "report" / "*.png")], out=str(out))
    assert named.paths == [str(tree / "x.jpg")] and named.output_files == 3


def test_the_jobs_own_out_is_left_out_before_any_manifest_is_written(tree):
    out = tree / "a" / "fresh-out"
    (out / "report" / "thumbs").mkdir(parents=True)
    (out / "report" / "thumbs" / "1.jpg").write_bytes(b"x")
    assert not any("fresh-out" in p for p in list_images([str(tree)], out=str(out)))
    assert any("fresh-out" in p for p in list_images([str(tree)]))


def test_another_imgindex_out_inside_the_input_is_left_out_a_look_alike_is_not(tree):
    fake_out(tree / "a" / "old-index")
    fake_out(tree / "a" / "webapp", manifest={"name": "a web app manifest", "icons": []})
    found = list_images([str(tree)], out=str(tree.parent / "elsewhere"))
    assert not any("old-index" in p for p in found)
    assert str(tree / "a" / "webapp" / "report" / "thumbs" / "1.jpg") in found


def test_outputs_under_an_input_uri_are_never_listed(tree):
    # file:// goes through pyarrow's filesystems, as s3:// and gs:// do.
    fake_out(tree / "a" / "index")
    fake_out(tree / "a" / "b" / "old-index")
    images = [f"file://{tree}/{p}" for p in ["a/b/w.webp", "a/b/z.jpeg", "a/y.PNG", "x.jpg"]]
    listing = scan_images([f"file://{tree}"], out=f"file://{tree}/a/index")
    assert listing.paths == images
    assert listing.output_folders == (f"file://{tree}/a/b/old-index", f"file://{tree}/a/index")
    fake_out(tree)
    assert list_images([f"file://{tree}"], out=f"file://{tree}") == images


def test_input_folder_that_is_out_lists_the_photos_beside_outs_own_files(tree):
    fake_out(tree)
    listing = scan_images([str(tree)], out=str(tree))
    assert listing.paths == sorted(str(tree / p) for p in ["x.jpg", "a/y.PNG", "a/b/z.jpeg", "a/b/w.webp"])
    assert listing.output_folders == (str(tree / "embeddings"), str(tree / "report"))


@pytest.mark.parametrize(
    "pattern",
    ["**", "**/*", "**/*.jpg", "**/b", "**/.h/**", "*/**/*.txt", "**/*.jpg*", "a/**/", "*", ".*/*", "**/**/*.png", "[a.]*/**"],
)
def test_globs_name_what_python_glob_names_in_a_tree_without_links(tmp_path, pattern):
    for rel in ["1.jpg", "2.txt", ".3.jpg", "a/4.PNG", "a/b/5.jpeg", "a/b/6.txt", ".h/7.jpg", ".h/c/8.jpg", "a/.d/9.jpg",
                "x.jpg.dir/10.gif", "a/b/.11.png"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    arg = os.path.abspath(str(tmp_path / pattern))
    # The rule before `**` was walked by the listing itself: glob.glob's files, and the images under its folders.
    matches = glob.glob(arg, recursive=True)
    expected = {m for m in matches if os.path.isfile(m)}
    for folder in (m for m in matches if os.path.isdir(m)):
        expected |= {os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS}
    assert list_images([arg]) == sorted(expected)


def test_dry_run_lists_as_the_job_does(capsys, linked):
    fake_out(linked / "index")
    assert main(["embed", str(linked), "--out", str(linked / "index"), "--dry-run"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["config"]["follow_links"] is False
    assert main(["embed", str(linked), "--out", str(linked / "index"), "--dry-run", "--follow-links"]) == 0
    assert json.loads(capsys.readouterr().out)["images"] == 4


def test_a_file_reached_by_several_paths_is_listed_once_under_its_first_path(tmp_path):
    (tmp_path / "b.jpg").write_bytes(b"one file")
    os.symlink(tmp_path / "b.jpg", tmp_path / "a.jpg")
    os.link(tmp_path / "b.jpg", tmp_path / "c.jpg")
    (tmp_path / "d.jpg").write_bytes(b"one file")  # the same bytes in another file: another image
    os.symlink(tmp_path / "gone.jpg", tmp_path / "e.jpg")  # dangling: listed, decoding reports it
    for name in ("b.jpg", "d.jpg"):
        os.utime(tmp_path / name, ns=(0, 1_700_000_000_123_456_789))
    listing = scan_images([str(tmp_path), str(tmp_path / "c.jpg")])
    assert listing.paths == [str(tmp_path / n) for n in ("a.jpg", "d.jpg", "e.jpg")]
    assert listing.ids.tolist() == [image_id(p) for p in listing.paths]
    assert listing.sizes.tolist() == [8, 8, -1] and listing.mtimes_ns[0] == 1_700_000_000_123_456_789
    assert listing.fingerprints.tolist() == [fingerprint(8, 1_700_000_000_123_456_789)] * 2 + [0]


def test_fingerprint_changes_with_size_or_modification_time(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"12345")
    os.utime(path, ns=(0, 10**18))
    first = scan_images([str(path)]).fingerprints[0]
    os.utime(path, ns=(0, 10**18 + 1))
    touched = scan_images([str(path)]).fingerprints[0]
    path.write_bytes(b"123456")
    os.utime(path, ns=(0, 10**18))
    grown = scan_images([str(path)]).fingerprints[0]
    assert len({first, touched, grown}) == 3 and 0 not in (first, touched, grown)


def test_ids_are_stable_positive_int64_from_the_path():
    a = image_id("/data/cat.jpg")
    assert a == image_id("/data/cat.jpg") and 0 <= a < 2**63
    assert a != image_id("/data/cat2.jpg")


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 451), (1000, 872), (200, 150), (224, 224)])
def test_decode_matches_torchvision_resize_then_crop(size):
    rng = np.random.default_rng(sum(size))
    # Smooth image: a real-photo-like spectrum, so the comparison is about geometry, not aliasing of noise.
    small = rng.integers(0, 256, (size[1] // 16 + 1, size[0] // 16 + 1, 3), dtype=np.uint8)
    array = np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC))
    data = jpeg_bytes(array)
    ours = decode_image(data).astype(np.float32)
    transform = torchvision.transforms.Compose([torchvision.transforms.Resize(256), torchvision.transforms.CenterCrop(224)])
    reference = np.asarray(transform(Image.open(io.BytesIO(data)).convert("RGB")), dtype=np.float32)
    assert ours.shape == reference.shape == (224, 224, 3)
    assert np.abs(ours - reference).max() <= 2.0
    assert np.abs(ours - reference).mean() < 0.1


def test_crop_box_is_centered_on_the_source():
    left, top, right, bottom = crop_box(640, 480)
    assert (left + right) / 2 == pytest.approx(320, abs=1) and (top + bottom) / 2 == pytest.approx(240, abs=1)
    assert bottom - top == pytest.approx(480 * 224 / 256, rel=0.01)


def test_decode_batch_fails_only_the_bad_row(tmp_path, photo_dir):
    good = os.path.join(photo_dir, sorted(os.listdir(photo_dir))[0])
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    batch = decode_batch({"id": np.array([1, 2, 3]), "path": np.array([good, str(bad), str(tmp_path / "gone.jpg")], dtype=object)})
    assert batch["error"][0] == "" and "not an image" in batch["error"][1] and "cannot read" in batch["error"][2]
    with open(good, "rb") as f:
        assert np.array_equal(batch["pixels"][0], decode_image(f.read()))

