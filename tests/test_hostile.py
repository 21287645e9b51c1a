"""Hostile and odd files: each is either embedded correctly or reported in errors.csv with its reason, and the job
goes on. One decode-level test per category, and one pipeline run over a folder holding all of them."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import jpeg_bytes
from embedder import pipeline, reader
from embedder.config import JobConfig
from embedder.reader import ImageError, decode_batch, decode_image, list_images, load_pixels, scan_images

PILLOW_PIXEL_LIMIT = 89_478_485


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels: what a decompression bomb looks like to Pillow."""
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (300, 300), c) for c in [(0, 255, 0), (255, 0, 0)]]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def exif_rotated_jpeg() -> bytes:
    array = np.zeros((300, 600, 3), dtype=np.uint8)
    array[:, :300] = 255  # left half white, landscape
    image = Image.fromarray(array)
    exif = image.getexif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    return encode(image, "JPEG", exif=exif.tobytes())


def palette_transparent_png() -> bytes:
    palette = Image.new("P", (300, 300), 1)
    palette.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 150, 300))  # left half: index 0, declared transparent
    return encode(palette, "PNG", transparency=0)


def fixture(name: str) -> bytes:
    """A file of tests/fixtures/decode/: inputs the decoder fuzz found."""
    with open(os.path.join(os.path.dirname(__file__), "fixtures", "decode", name), "rb") as f:
        return f.read()


def photo() -> bytes:
    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, (16, 21, 3), dtype=np.uint8)
    return jpeg_bytes(np.asarray(Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC)))


def test_pillow_pixel_limit_stays_on():
    assert Image.MAX_IMAGE_PIXELS == PILLOW_PIXEL_LIMIT


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty file"),
        (b"<!DOCTYPE html><html><body>404 not found</body></html>", "not an image"),
        (b"just some text that happens to be called photo.jpg\n", "not an image"),
        (bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not an image"),
        (b"\xff\xd8\xff\xe0" + bytes(200), "cannot decode|not an image"),  # a JPEG signature and nothing sane
    ],
    ids=["zero-byte", "html", "text", "random-bytes", "jpeg-signature-only"],
)
def test_not_an_image_is_reported_with_its_reason(content, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(content)


def test_truncated_jpeg_is_reported_not_half_decoded():
    data = jpeg_bytes(np.full((480, 640, 3), 128, dtype=np.uint8))
    with pytest.raises(ImageError, match="truncated|cannot decode"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("size", [(10_000, 10_000), (100_000, 100_000)], ids=["over-the-limit", "over-twice-the-limit"])
def test_decompression_bomb_is_refused_before_decoding(size):
    # Over the limit Pillow warns (raised as an error here); over twice the limit it raises DecompressionBombError,
    # which is not an OSError.
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(png_claiming(*size))


def test_extreme_aspect_ratio_decodes_in_bounded_memory(tmp_path):
    path = tmp_path / "tall.png"
    Image.new("RGB", (1, 200_000), (200, 30, 30)).save(path)
    # A plain Resize(256) would allocate 256 x 51,200,000 RGB pixels (39 GB); we resize only the kept box.
    script = (
        "import json, resource; from embedder.reader import load_pixels; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        f"pixels = load_pixels({str(path)!r}); "
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
        "print(json.dumps([list(pixels.shape), pixels[0, 0].tolist(), (after - before) / 1024]))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    shape, pixel, grown_mb = json.loads(result.stdout)
    assert shape == [224, 224, 3] and pixel == [200, 30, 30]
    assert grown_mb < 50


def test_one_by_one_image_is_embedded_as_its_colour():
    pixels = decode_image(encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    assert pixels.shape == (224, 224, 3) and pixels.reshape(-1, 3).tolist() == [[10, 200, 30]] * 224 * 224


def test_animated_gif_gives_its_first_frame():
    first = decode_image(animated_gif())[150, 150]
    assert first[1] > 200 and first[0] < 60


def test_cmyk_jpeg_is_converted_to_rgb():
    red = decode_image(encode(Image.new("CMYK", (300, 300), (0, 255, 255, 0)), "JPEG"))[150, 150]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def test_palette_and_transparent_images_are_composited_on_white():
    rgba = Image.new("RGBA", (300, 300), (255, 0, 0, 0))
    assert decode_image(encode(rgba, "PNG"))[100, 100].tolist() == [255, 255, 255]
    pixels = decode_image(palette_transparent_png())
    assert pixels[112, 10].tolist() == [255, 255, 255] and pixels[112, 200].tolist() == [255, 0, 0]
    gray = decode_image(encode(Image.new("L", (300, 300), 77), "PNG"))
    assert abs(int(gray[5, 5, 0]) - 77) <= 1


def test_sixteen_bit_images_are_scaled_not_clipped():
    wide = np.full((300, 300), 32896, dtype=np.uint16)  # 32896 / 257 = 128; clipping would give 255
    wide[:, 150:] = 65535
    pixels = decode_image(encode(Image.fromarray(wide), "PNG"))
    assert pixels[112, 10].tolist() == [128] * 3 and pixels[112, 200].tolist() == [255] * 3


def test_exif_rotated_photo_is_rotated_as_a_viewer_shows_it():
    pixels = decode_image(exif_rotated_jpeg())
    # Shown rotated clockwise, the white half is on top.
    assert pixels[20, 112].mean() > 200 and pixels[200, 112].mean() < 50


def test_upper_case_extensions_spaces_and_non_ascii_paths(tmp_path):
    folder = tmp_path / "vacances d'été 2024"
    folder.mkdir()
    for name in ["PLAGE.JPG", "Sonnenuntergang über dem Meer.jpeg", "海.Png"]:
        (folder / name).write_bytes(encode(Image.new("RGB", (8, 8)), "PNG"))
    found = list_images([str(tmp_path)])
    assert [os.path.basename(p) for p in found] == sorted(["PLAGE.JPG", "Sonnenuntergang über dem Meer.jpeg", "海.Png"])
    assert all(load_pixels(p).shape == (224, 224, 3) for p in found)


def test_symlinked_files_are_listed_once_directory_links_followed_only_when_asked_loops_detected(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "a.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "real", tmp_path / "real" / "loop")
    os.symlink(tmp_path / "real" / "a.jpg", tmp_path / "alias.jpg")
    assert list_images([str(tmp_path)]) == [str(tmp_path / "alias.jpg")]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "other", tmp_path / "real" / "to-other")
    assert list_images([str(tmp_path / "real")]) == [str(tmp_path / "real" / "a.jpg")]
    followed = list_images([str(tmp_path / "real")], follow_links=True)
    assert followed == [str(tmp_path / "real" / "a.jpg"), str(tmp_path / "real" / "to-other" / "b.jpg")]


def test_a_link_to_the_root_of_the_disk_lists_nothing_from_it(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x")
    os.symlink("/", tmp_path / "everything")
    listing = scan_images([str(tmp_path)])
    assert listing.paths == [str(tmp_path / "a.jpg")] and listing.links_skipped == 1
    assert scan_images([str(tmp_path / "**" / "*.png")]).paths == []


def test_unreadable_fifo_and_device_files_are_reported_without_hanging(tmp_path, monkeypatch):
    (tmp_path / "locked.jpg").write_bytes(photo())
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("/dev/zero", tmp_path / "zero.jpg")
    real_open = os.open

    def refuse_locked(path, *args, **kwargs):
        # Tests run as root, where chmod 000 blocks nothing: simulate the permission error instead.
        if str(path).endswith("locked.jpg"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(reader.os, "open", refuse_locked)
    paths = [str(tmp_path / n) for n in ("locked.jpg", "pipe.jpg", "zero.jpg")]
    batch = decode_batch({"id": np.arange(3), "path": np.array(paths, dtype=object)})
    assert "cannot read" in batch["error"][0] and "Permission denied" in batch["error"][0]
    assert "not a regular file" in batch["error"][1] and "not a regular file" in batch["error"][2]


def hostile_folder(root) -> tuple[list[str], dict[str, str]]:
    """Every category in one folder: (names that must be embedded, {name: reason expected in errors.csv})."""
    good = {
        "photo.jpg": photo(),
        "one-by-one.png": encode(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"),
        "animated.gif": animated_gif(),
        "cmyk.jpg": encode(Image.new("CMYK", (300, 300), (0, 255, 255, 0)), "JPEG"),
        "palette-transparent.png": palette_transparent_png(),
        "sixteen-bit.png": encode(Image.fromarray(np.full((300, 300), 32896, dtype=np.uint16)), "PNG"),
        "exif-rotated.jpg": exif_rotated_jpeg(),
        "tall.png": encode(Image.new("RGB", (1, 20_000), (200, 30, 30)), "PNG"),
        "UPPER CASE.JPG": photo()[:-2] + b"\xff\xd9",
        "dir ü/海 non-ascii.jpeg": encode(Image.new("RGB", (50, 40), (5, 5, 5)), "JPEG"),
    }
    truncated = photo()
    bad = {
        "zero-byte.jpg": (b"", "empty file"),
        "truncated.jpg": (truncated[: len(truncated) // 2], "truncated"),
        "page.png": (b"<html><body>not an image</body></html>", "not an image"),
        "random.webp": (bytes(np.random.default_rng(1).integers(0, 256, 2048, dtype=np.uint8)), "not an image"),
        "bomb.png": (png_claiming(100_000, 100_000), "decompression bomb"),
        # Pillow raises neither OSError nor ValueError on these two (tests/test_decode_fuzz.py found them).
        "dds-named-png.png": (fixture("dds-unknown-pixel-format.png"), "NotImplementedError"),
        "malformed-spider.jpg": (fixture("spider-no-stack-offset.jpg"), "AttributeError"),
    }
    for name, data in [*good.items(), *((n, d) for n, (d, _) in bad.items())]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    os.symlink(root / "photo.jpg", root / "z-link-to-photo.jpg")  # embedded once, as photo.jpg
    os.symlink(root, root / "dir ü" / "loop")  # not followed
    os.symlink("/", root / "disk")  # not followed: the disk's images are not the input's
    os.symlink(root / "missing.jpg", root / "dangling.jpg")
    os.mkfifo(root / "fifo.jpg")
    reasons = {n: r for n, (_, r) in bad.items()} | {"dangling.jpg": "cannot read", "fifo.jpg": "not a regular file"}
    return sorted(good), reasons


def test_a_job_over_every_hostile_category_embeds_the_good_and_reports_the_bad(tmp_path, local_ray):
    root = tmp_path / "hostile"
    root.mkdir()
    good, reasons = hostile_folder(root)
    # OUT inside the input, holding what an earlier run's report left there: outputs are never inputs.
    thumbs = root / "out" / "report" / "thumbs"
    thumbs.mkdir(parents=True)
    (thumbs / "1.jpg").write_bytes(photo())
    config = JobConfig(inputs=(str(root),), out=str(root / "out"), weights="random").validate()
    summary = pipeline.embed(config)
    assert (summary.embedded, summary.errors) == (len(good), len(reasons))
    shards = [pq.read_table(os.path.join(config.out, "embeddings", f)) for f in os.listdir(os.path.join(config.out, "embeddings"))]
    embedded = sorted(os.path.relpath(p, root) for t in shards for p in t.column("path").to_pylist())
    assert embedded == good
    errors = pd.read_csv(os.path.join(config.out, "errors.csv"))
    got = dict(zip((os.path.relpath(p, root) for p in errors["path"]), errors["error"]))
    assert set(got) == set(reasons)
    for name, reason in reasons.items():
        assert reason in got[name], (name, got[name])
