"""decode_image under fuzzing: whatever bytes a file named like an image holds, the decoder returns (224, 224, 3) uint8
pixels or raises ImageError, nothing else, so one file can only ever fail itself (issue 15).

The corpus is generated here (seeded): small images in the formats INPUT's extensions name and in the other formats
Pillow opens whatever the file is called, each mutated a few thousand times. Inputs that once escaped the decoder are
kept, minimised, in tests/fixtures/decode/ and tested one by one.
"""

from __future__ import annotations

import io
import os
import struct
import time
import warnings

import numpy as np
import pytest
from PIL import Image, features

from embedder import reader
from embedder.reader import ImageError, decode_batch, decode_image, read_batch

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "decode")
MUTATIONS = 3000
SEED = 15
# Bytes mutations like to set: the edges of signed and unsigned bytes.
EDGE_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)

# Each fixture: an input that escaped decode_image before issue 15 (mutation i of this test's fuzz, format, the
# exception the decoder let through), minimised by deleting bytes while that exception stayed, and named like an image,
# as the job meets it. {file name: what its ImageError must say}.
FOUND = {
    # i=103, DDS: pixel-format flags Pillow does not know (NotImplementedError), the file of the issue.
    "dds-unknown-pixel-format.png": "NotImplementedError",
    # i=2696, SPIDER: stack fields that disagree; Pillow reads an attribute it never set (AttributeError).
    "spider-no-stack-offset.jpg": "AttributeError",
    # i=496, BLP: an unknown encoding (BLPFormatError, a NotImplementedError).
    "blp-unknown-encoding.gif": "BLPFormatError",
    # i=1551, AVIF: no image item (RuntimeError from libavif); a Pillow without AVIF support does not recognise it.
    "avif-missing-image-item.webp": "RuntimeError|not an image",
}


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _save_deprecated(image: Image.Image, fmt: str) -> bytes:
    """A format Pillow still reads but warns it will stop writing (IM); the job still meets such files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _save(image, fmt)


def _hand_made() -> dict[str, bytes]:
    """Formats Pillow opens but cannot write, built by hand: XPM, FITS, Sun raster, GIMP brush."""
    xpm = b'/* XPM */\nstatic char *x[] = {\n"4 2 2 1",\n"a c #ff0000",\n"b c #0000ff",\n"abab",\n"baba"\n};\n'
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
             "NAXIS1  =                    4", "NAXIS2  =                    4", "END"]
    fits = "".join(c.ljust(80) for c in cards).ljust(2880).encode() + bytes(range(16)).ljust(2880, b"\0")
    sun = struct.pack(">8I", 0x59A66A95, 4, 3, 24, 36, 1, 0, 0) + bytes(range(36))
    gbr = struct.pack(">7I", 30, 2, 4, 4, 1, 0x47494D50, 10) + b"x\0" + bytes(range(16))
    return {"xpm": xpm, "fits": fits, "sun": sun, "gbr": gbr}


def corpus(seed: int = SEED) -> dict[str, bytes]:
    """Small seeded images: every format INPUT's extensions name, and the other formats Pillow reads in this build.

    Left out: EPS and PDF (Pillow hands EPS to Ghostscript when installed; it cannot read PDF), and ICNS (megabytes).
    """
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (17, 24, 3), dtype=np.uint8))
    made = {
        "jpeg": _save(rgb, "JPEG"),
        "jpeg-progressive": _save(rgb, "JPEG", progressive=True),
        "jpeg-cmyk": _save(rgb.convert("CMYK"), "JPEG"),
        "png": _save(rgb, "PNG"),
        "png-palette": _save(rgb.convert("P"), "PNG"),
        "png-rgba": _save(rgb.convert("RGBA"), "PNG"),
        "gif": _save(rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.rotate(90).convert("P")]),
        "tiff": _save(rgb, "TIFF"),
        "tiff-lzw": _save(rgb, "TIFF", compression="tiff_lzw"),
        "bmp": _save(rgb, "BMP"),
        "bmp-palette": _save(rgb.convert("P"), "BMP"),
        "ppm": _save(rgb, "PPM"),
        "dds": _save(rgb, "DDS"),
        "dds-rgba": _save(rgb.convert("RGBA"), "DDS"),
        "spider": _save(rgb.convert("F"), "SPIDER"),
        "ico": _save(rgb.convert("RGBA"), "ICO"),
        "tga": _save(rgb, "TGA"),
        "tga-rle": _save(rgb, "TGA", compression="tga_rle"),
        "pcx": _save(rgb, "PCX"),
        "im": _save_deprecated(rgb, "IM"),
        "sgi": _save(rgb, "SGI"),
        "blp": _save(rgb.convert("P"), "BLP"),
        "xbm": _save(rgb.convert("1"), "XBM"),
        "msp": _save(rgb.convert("1"), "MSP"),
    } | _hand_made()
    optional = {"webp": ("webp", "WEBP", {}), "webp-lossless": ("webp", "WEBP", {"lossless": True}),
                "jpeg2000": ("jpg_2000", "JPEG2000", {}), "avif": ("avif", "AVIF", {}), "qoi": (None, "QOI", {})}
    for name, (feature, fmt, options) in optional.items():
        if (feature is None and fmt in Image.SAVE) or (feature is not None and features.check(feature)):
            made[name] = _save(rgb, fmt, **options)
    return made


def mutate(rng: np.random.Generator, data: bytes) -> bytes:
    """One to four edits, mostly in the first 128 bytes where the headers are: a bit flipped, an edge byte set, four
    random bytes written, a run deleted or inserted, or the file cut short."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 5))):
        pos = int(rng.integers(0, min(len(out), 128))) if rng.random() < 0.7 else int(rng.integers(0, len(out)))
        edit = int(rng.integers(0, 6))
        if edit == 0:
            out[pos] ^= 1 << int(rng.integers(0, 8))
        elif edit == 1:
            out[pos] = int(rng.choice(EDGE_BYTES))
        elif edit == 2:
            out[pos : pos + 4] = rng.bytes(4)
        elif edit == 3:
            del out[pos : pos + int(rng.integers(1, 16))]
        elif edit == 4:
            out[pos:pos] = rng.bytes(int(rng.integers(1, 16)))
        else:
            del out[pos + int(rng.integers(0, len(out) - pos + 1)) :]
        if not out:
            out = bytearray(b"\0")
    return bytes(out)


def test_corpus_holds_the_formats_of_the_image_extensions():
    assert {"jpeg", "png", "gif", "tiff", "webp", "bmp", "dds", "spider"} <= set(corpus())


def test_mutated_images_decode_or_raise_image_error_only():
    seeds = corpus()
    names = sorted(seeds)
    escaped: dict[tuple[str, str], list[int]] = {}
    started = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF and the like; only exceptions count here
        for i in range(MUTATIONS):
            name = names[i % len(names)]
            data = mutate(np.random.default_rng([SEED, i]), seeds[name])
            try:
                pixels = decode_image(data)
            except ImageError:
                continue
            except Exception as e:  # what the test is for: list every escape, with how to reproduce it
                escaped.setdefault((name, type(e).__name__), []).append(i)
                continue
            assert pixels.shape == (224, 224, 3) and pixels.dtype == np.uint8, (name, i)
    seconds = time.monotonic() - started
    print(f"{MUTATIONS} mutations of {len(names)} formats in {seconds:.1f} s ({MUTATIONS / seconds:.0f}/s)")
    assert not escaped, f"escaped decode_image (format, exception): mutation indices {escaped} (mutate(default_rng([{SEED}, i])))"
    assert seconds < 60


@pytest.mark.parametrize("name", sorted(FOUND))
def test_inputs_the_fuzz_found_are_the_files_own_errors(name):
    with open(os.path.join(FIXTURES, name), "rb") as f:
        data = f.read()
    with pytest.raises(ImageError, match=FOUND[name]):
        decode_image(data)


def test_fixtures_are_the_ones_listed_and_small():
    assert sorted(os.listdir(FIXTURES)) == sorted(FOUND)
    assert all(os.path.getsize(os.path.join(FIXTURES, n)) <= 2048 for n in FOUND)


def test_every_per_file_stage_records_them_as_row_errors():
    paths = np.array([os.path.join(FIXTURES, n) for n in sorted(FOUND)], dtype=object)
    batch = {"id": np.arange(len(paths)), "path": paths}
    for stage in (decode_batch, read_batch):
        errors = stage(dict(batch))["error"]
        for name, error in zip(sorted(FOUND), errors):
            assert error.startswith(("cannot decode: ", "not an image")), (stage.__name__, name, error)
    decoded = decode_batch(dict(batch))
    assert not decoded["pixels"].any()


def test_errors_name_the_exception_type_and_message():
    with open(os.path.join(FIXTURES, "dds-unknown-pixel-format.png"), "rb") as f:
        data = f.read()
    with pytest.raises(ImageError) as caught:
        decode_image(data)
    assert str(caught.value).startswith("cannot decode: NotImplementedError: Unknown pixel format flags ")


def test_a_bug_of_the_job_itself_is_not_hidden_as_a_file_error(monkeypatch):
    # Only what reading and decoding one file raises is that file's error; the crop after it is our code.
    def broken_crop_box(width, height):
        raise TypeError("a bug in the job")

    monkeypatch.setattr(reader, "crop_box", broken_crop_box)
    with pytest.raises(TypeError, match="a bug in the job"):
        decode_image(_save(Image.new("RGB", (8, 8)), "PNG"))
