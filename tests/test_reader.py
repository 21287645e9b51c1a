"""Reader: listing INPUT arguments (one path per file, fingerprints), stable ids, and decoding against torchvision's own transforms.

Hostile and odd files are in test_hostile.py."""

from __future__ import annotations

import io
import os

import numpy as np
import pandas as pd
import pytest
import torchvision
from PIL import Image

from conftest import jpeg_bytes
from embedder.config import UserError
from embedder.reader import crop_box, decode_batch, decode_image, fingerprint, image_id, list_images, scan_images


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


def test_symlink_loop_is_walked_once(tree):
    os.symlink(tree / "a", tree / "a" / "b" / "loop")
    found = list_images([str(tree)])
    assert len(found) == len(set(found))
    assert str(tree / "x.jpg") in found


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

