"""decode_batch_gpu on a CPU device: JPEG pixels agree with decode_image, everything else takes the CPU path and its errors."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from embedder import gpu_decode
from embedder.gpu_decode import decode_batch_gpu, device_decodable
from conftest import cosine
from embedder.reader import ImageError, decode_batch, decode_image, image_id, read_batch
from jobs.demo import sample_photos

# torchvision 0.29 deprecates its image decoders (for TorchCodec) but still ships them; the warning says nothing here.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

CPU = torch.device("cpu")
# (width, height): landscape, a large odd size, portrait, smaller than the crop (upscaled), extreme aspect ratio.
SIZES = [(640, 480), (1000, 872), (480, 640), (100, 80), (2000, 150)]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("photos")
    paths = [p for n, size in enumerate(SIZES) for p in sample_photos(str(folder / str(n)), 2, size=size, offset=2 * n)]
    return [open(p, "rb").read() for p in paths]


def _jpeg(pixels: np.ndarray, **save_options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, **save_options)
    return buffer.getvalue()


def _mean_abs_diff(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.abs(a.numpy().astype(np.int16) - b.astype(np.int16)).mean())


def test_jpeg_photos_match_cpu_decode(photos: list[bytes]) -> None:
    assert all(device_decodable(data) for data in photos), "the photos must take the device path, not the fallback"
    pixels, errors = decode_batch_gpu(photos, CPU)
    assert pixels.shape == (len(photos), 224, 224, 3) and pixels.dtype == torch.uint8 and pixels.device == CPU
    assert errors == [""] * len(photos)
    for got, data in zip(pixels, photos):
        assert _mean_abs_diff(got, decode_image(data)) < 2.0


def test_grey_jpeg_matches_cpu_decode(photos: list[bytes]) -> None:
    with Image.open(io.BytesIO(photos[0])) as img:
        grey = _jpeg(np.asarray(img.convert("L")))
    assert device_decodable(grey)
    pixels, errors = decode_batch_gpu([grey], CPU)
    assert errors == [""]
    assert _mean_abs_diff(pixels[0], decode_image(grey)) < 2.0


def test_other_files_take_the_cpu_path(photos: list[bytes]) -> None:
    with Image.open(io.BytesIO(photos[0])) as img:
        rgb = np.asarray(img)
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: decode_jpeg would not turn it upright
    rotated = _jpeg(rgb, exif=exif.tobytes())
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    good = [png.getvalue(), rotated, cmyk.getvalue()]
    bad = [b"\xff\xd8 this is not a JPEG \xff\xd9", photos[0][: len(photos[0]) // 2], b"", b"plain text"]
    assert not any(device_decodable(data) for data in good + bad)

    pixels, errors = decode_batch_gpu([photos[0], *good, *bad], CPU)
    assert errors[: 1 + len(good)] == [""] * (1 + len(good))
    for got, data in zip(pixels[1 : 1 + len(good)], good):
        np.testing.assert_array_equal(got.numpy(), decode_image(data))
    for got, error, data in zip(pixels[1 + len(good) :], errors[1 + len(good) :], bad):
        with pytest.raises(ImageError) as expected:
            decode_image(data)
        assert error == str(expected.value)
        assert not got.any()


def test_images_the_decoder_refuses_are_decoded_on_the_cpu(photos: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    refused = photos[1]
    real_decode_jpeg = gpu_decode.decode_jpeg

    def picky_decode_jpeg(encoded, **kwargs):
        # Like nvJPEG meeting one image it does not support: the batched call fails as a whole.
        items = encoded if isinstance(encoded, list) else [encoded]
        if any(item.numpy().tobytes() == refused for item in items):
            raise RuntimeError("unsupported JPEG")
        return real_decode_jpeg(encoded, **kwargs)

    monkeypatch.setattr(gpu_decode, "decode_jpeg", picky_decode_jpeg)
    pixels, errors = decode_batch_gpu(photos[:3], CPU)
    assert errors == ["", "", ""]
    np.testing.assert_array_equal(pixels[1].numpy(), decode_image(refused))
    for i in (0, 2):
        assert _mean_abs_diff(pixels[i], decode_image(photos[i])) < 2.0


def test_any_exception_of_the_device_decoder_sends_the_image_to_the_cpu(photos: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    # Not only RuntimeError: whatever the device decoder raises on one file's bytes is that file's problem (issue 15).
    def failing_decode_jpeg(encoded, **kwargs):
        raise ValueError("a decoder that raises something else")

    monkeypatch.setattr(gpu_decode, "decode_jpeg", failing_decode_jpeg)
    pixels, errors = decode_batch_gpu(photos[:2], CPU)
    assert errors == ["", ""]
    for i in (0, 1):
        np.testing.assert_array_equal(pixels[i].numpy(), decode_image(photos[i]))


def test_empty_batch() -> None:
    pixels, errors = decode_batch_gpu([], CPU)
    assert pixels.shape == (0, 224, 224, 3) and errors == []


def test_header_checks_done_by_the_read_stage_give_the_same_pixels(photos: list[bytes]) -> None:
    datas = [photos[0], b"not an image", *photos[1:4]]
    checked = [device_decodable(d) for d in datas]
    assert checked == [True, False, True, True, True]
    pixels, errors = decode_batch_gpu(datas, CPU, checked)
    whole, whole_errors = decode_batch_gpu(datas, CPU)
    assert errors == whole_errors and errors[1] and not any(errors[:1] + errors[2:])
    torch.testing.assert_close(pixels, whole)


def test_decode_gpu_job_matches_the_cpu_decode_job(run_out, input_dir, tmp_path, local_ray) -> None:
    """`--decode gpu` (here on CPU replicas: torchvision's decoder and the same crop) gives the CPU job's rows and errors."""
    import pandas as pd

    from conftest import cosine
    from embedder.outdir import OutDir
    from embedder.collection import iter_embeddings
    from jobs.cli import main

    out = str(tmp_path / "out")
    assert main(["embed", input_dir, "--out", out, "--weights", "random", "--decode", "gpu", "--batch-size", "4"]) == 0

    def rows(folder: str) -> dict[int, np.ndarray]:
        return {int(i): v for ids, _, xb in iter_embeddings(OutDir(folder)) for i, v in zip(ids, xb)}

    gpu, cpu = rows(out), rows(run_out)
    assert sorted(gpu) == sorted(cpu) and len(gpu) == 10
    assert min(cosine(gpu[i], cpu[i]) for i in gpu) >= 0.9999
    errors = [pd.read_csv(os.path.join(folder, "errors.csv")).sort_values("path") for folder in (out, run_out)]
    assert errors[0]["path"].tolist() == errors[1]["path"].tolist() and len(errors[0]) == 3
    assert errors[0]["error"].tolist() == errors[1]["error"].tolist()


@pytest.fixture(scope="module")
def read_inputs(photos: list[bytes], tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    """A read_batch input: the photos, a PNG (CPU path), a text file and a missing file."""
    folder = tmp_path_factory.mktemp("read")
    paths = []
    for i, data in enumerate(photos):
        paths.append(str(folder / f"{i}.jpg"))
        open(paths[-1], "wb").write(data)
    Image.open(io.BytesIO(photos[0])).save(str(folder / "x.png"))
    (folder / "note.jpg").write_text("not an image")
    paths += [str(folder / "x.png"), str(folder / "note.jpg"), str(folder / "missing.jpg")]
    return {"id": np.array([image_id(p) for p in paths]), "path": np.array(paths, dtype=object)}


def test_read_batch_decodes_on_the_cpu_what_the_device_must_not(read_inputs) -> None:
    read = read_batch(read_inputs)
    jpegs = len(read_inputs["path"]) - 3
    assert read["device"].tolist() == [True] * jpegs + [False] * 3
    assert read["error"].tolist()[:-2] == [""] * (jpegs + 1) and all(read["error"][-2:])
    png = read_inputs["path"][jpegs]
    np.testing.assert_array_equal(np.frombuffer(read["data"][jpegs], np.uint8).reshape(224, 224, 3), decode_image(open(png, "rb").read()))


def test_actor_embeds_a_mixed_batch_as_the_cpu_path_does(read_inputs, random_weights) -> None:
    from embedder.actor import EmbedActor
    from embedder.config import JobConfig
    from embedder.model import state_dict_sha256

    config = JobConfig(inputs=("/x",), out="/o", weights="random", decode="gpu").validate()
    replica = EmbedActor(config, random_weights, state_dict_sha256(random_weights), threads=2, batch_size=16)
    mixed, on_cpu = replica(read_batch(read_inputs)), replica(decode_batch(dict(read_inputs)))
    assert mixed["error"].tolist() == on_cpu["error"].tolist()
    good = [i for i, e in enumerate(mixed["error"]) if not e]
    assert len(good) == len(read_inputs["path"]) - 2
    assert min(cosine(mixed["embedding"][i], on_cpu["embedding"][i]) for i in good) >= 0.9999
    assert not mixed["embedding"][-2:].any()
