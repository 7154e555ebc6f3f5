"""Image decoding and preprocessing: DICOM photometry/VOI, resize, JPEG draft path, encoding, cache."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from cxrmax.core.errors import InputError
from cxrmax.mimic import MimicCXR
from cxrmax.mimic.images import (
    ImageCache,
    ImageError,
    decode,
    encode_jpeg,
    preprocess,
    preprocess_many,
    target_size,
    to_data_url,
)
from cxrmax.testing.mini_mimic import _Study, _write_dicom, synthetic_chest


def region(image: Image.Image, x0: float, x1: float, y0: float, y1: float) -> float:
    array = np.asarray(image, dtype=np.float64)
    h, w = array.shape
    return float(array[int(h * y0) : int(h * y1), int(w * x0) : int(w * x1)].mean())


# ---------------------------------------------------------------------------------------------- DICOM


def test_real_monochrome1_chest_film() -> None:
    path = get_testdata_file("RG1_UNCI.dcm")
    dataset = pydicom.dcmread(path)
    assert dataset.PhotometricInterpretation == "MONOCHROME1" and dataset.BitsStored == 15
    image = preprocess(path, max_edge=None)
    assert image.mode == "L" and image.size == (dataset.Columns, dataset.Rows)
    right_lung = region(image, 0.15, 0.35, 0.15, 0.30)
    left_lung = region(image, 0.62, 0.80, 0.15, 0.30)
    mediastinum = region(image, 0.45, 0.55, 0.30, 0.60)
    assert right_lung < mediastinum - 40 and left_lung < mediastinum - 40
    array = np.asarray(image)
    assert array.min() <= 5 and array.max() >= 250  # 15-bit values spread over 0..255
    small = preprocess(path, max_edge=512)
    assert max(small.size) == 512 and region(small, 0.62, 0.8, 0.15, 0.3) < region(
        small, 0.45, 0.55, 0.3, 0.6
    )


def _study() -> _Study:
    return _Study(10000032, 50414267, "train", 21800506, 101010.5, {}, {}, {}, "standard", False)


@pytest.fixture(scope="module")
def chest_pixels() -> np.ndarray:
    return synthetic_chest(300, 360, seed=1, view="PA")


@pytest.mark.parametrize(
    "kind", [0, 1, 2], ids=["12bit-mono2-window", "12bit-mono1-window", "16bit-rescale-voilut"]
)
def test_fixture_dicoms_decode_to_the_same_picture(
    tmp_path: Path, chest_pixels: np.ndarray, kind: int
) -> None:
    path = tmp_path / "x.dcm"
    _write_dicom(path, chest_pixels, {"dicom_id": f"id-{kind}", "view": "PA"}, _study(), kind)
    dataset = pydicom.dcmread(path)
    assert dataset.PhotometricInterpretation == ("MONOCHROME1" if kind == 1 else "MONOCHROME2")
    decoded = np.asarray(preprocess(path, max_edge=None), dtype=np.float64)
    assert decoded.shape == chest_pixels.shape
    # The stored values are a linear map of the picture (inverted for MONOCHROME1): after decoding,
    # the picture comes back up to the min..max stretch.
    reference = chest_pixels.astype(np.float64)
    reference = (reference - reference.min()) * 255 / (reference.max() - reference.min())
    assert np.abs(decoded - reference).mean() < 3.0
    assert region(Image.fromarray(decoded.astype(np.uint8)), 0.25, 0.35, 0.35, 0.5) < region(
        Image.fromarray(decoded.astype(np.uint8)), 0.47, 0.53, 0.35, 0.5
    )


def test_window_is_applied(tmp_path: Path, chest_pixels: np.ndarray) -> None:
    path = tmp_path / "w.dcm"
    _write_dicom(path, chest_pixels, {"dicom_id": "w", "view": "PA"}, _study(), 0)
    dataset = pydicom.dcmread(path)
    stored = dataset.pixel_array.astype(np.float64)
    # A narrow window around the median: everything far below is black, far above is white.
    center = float(np.median(stored))
    dataset.WindowCenter, dataset.WindowWidth = f"{center:.0f}", "200"
    dataset.save_as(path)
    decoded = np.asarray(preprocess(path, max_edge=None))
    assert (decoded[stored < center - 150] == 0).all()
    assert (decoded[stored > center + 150] == 255).all()
    # Without any window the full range is used.
    del dataset.WindowCenter, dataset.WindowWidth
    dataset.save_as(path)
    plain = np.asarray(preprocess(path, max_edge=None))
    assert plain.min() == 0 and plain.max() == 255
    assert (plain[stored < center - 150] > 0).any()


def test_fixture_dicom_layout_decodes_with_lungs_dark(mini_mimic_dicom: Path) -> None:
    mimic = MimicCXR(mini_mimic_dicom)
    selection = mimic.select(views=["frontal"])
    seen = set()
    for relative in selection.column("image_path").to_pylist():
        path = mini_mimic_dicom / relative
        seen.add(pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation)
        image = preprocess(path, max_edge=256)
        assert max(image.size) == 256 and image.mode == "L"
        assert region(image, 0.25, 0.35, 0.35, 0.5) < region(image, 0.47, 0.53, 0.35, 0.5) - 60
    assert "MONOCHROME1" in seen


# ---------------------------------------------------------------------------------------------- resize


@pytest.mark.parametrize(
    ("size", "max_edge", "max_pixels", "expected"),
    [
        ((2544, 3056), 1024, None, (852, 1024)),
        ((3056, 2544), 1024, None, (1024, 852)),
        ((800, 600), 1024, None, (800, 600)),  # never upscaled
        ((2000, 1000), None, 500_000, (1000, 500)),
        ((2000, 1000), 1500, 500_000, (1000, 500)),
        ((2000, 1000), 800, 500_000, (800, 400)),
        ((10000, 3), 100, None, (100, 1)),  # at least one pixel
        ((1001, 1001), None, 1_000_000, (1000, 1000)),
    ],
)
def test_target_size(size, max_edge, max_pixels, expected) -> None:
    result = target_size(*size, max_edge=max_edge, max_pixels=max_pixels)
    assert result == expected
    if max_edge:
        assert max(result) <= max_edge
    if max_pixels:
        assert result[0] * result[1] <= max_pixels


def test_target_size_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        target_size(0, 10)
    with pytest.raises(ValueError):
        target_size(10, 10, max_edge=0)


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "big.jpg"
    Image.fromarray(synthetic_chest(2300, 2800, seed=4), "L").save(path, quality=95)
    return path


def test_jpeg_draft_path_matches_plain_resize(big_jpeg: Path) -> None:
    fast = preprocess(big_jpeg, max_edge=1024)
    with Image.open(big_jpeg) as source:
        plain = source.convert("L").resize(fast.size, Image.Resampling.LANCZOS)
    assert fast.size == (841, 1024) and fast.mode == "L"
    difference = np.abs(np.asarray(fast, dtype=np.float64) - np.asarray(plain, dtype=np.float64))
    assert difference.mean() < 1.5 and np.percentile(difference, 99) < 8
    # The decoder really works at reduced scale: draft picks 1/2 for this target.
    with Image.open(big_jpeg) as source:
        source.draft("L", fast.size)
        assert source.size == (1150, 1400)


def test_small_target_uses_deeper_draft_and_max_pixels(big_jpeg: Path) -> None:
    image = preprocess(big_jpeg, max_edge=None, max_pixels=100_000)
    assert image.width * image.height <= 100_000
    assert abs(image.width / image.height - 2300 / 2800) < 0.01
    tiny = preprocess(big_jpeg, max_edge=64)
    assert tiny.size == (53, 64)
    assert decode(big_jpeg).size == (2300, 2800)


def test_png_16bit_rgb_and_exif_orientation(tmp_path: Path) -> None:
    ramp = (np.arange(64 * 32, dtype=np.uint16).reshape(64, 32) * 16 + 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    deep = np.asarray(preprocess(tmp_path / "deep.png"))
    assert deep.dtype == np.uint8 and deep.min() == 0 and deep.max() == 255 and deep.shape == (64, 32)
    rgb = Image.fromarray(np.stack([synthetic_chest(100, 120, seed=2)] * 3, axis=-1), "RGB")
    rgb.save(tmp_path / "rgb.jpg")
    assert preprocess(tmp_path / "rgb.jpg").mode == "L"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(synthetic_chest(200, 100, seed=3), "L").save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert preprocess(tmp_path / "rot.jpg", max_edge=100).size == (50, 100)


# ---------------------------------------------------------------------------------------------- encode


def test_encode_jpeg_and_data_url(big_jpeg: Path) -> None:
    image = preprocess(big_jpeg, max_edge=512)
    data = encode_jpeg(image, quality=85)
    assert data[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(data)) as back:
        assert back.size == image.size and back.mode == "L"
    assert len(encode_jpeg(image, quality=40)) < len(data)
    url = to_data_url(data)
    assert url.startswith("data:image/jpeg;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == data
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert to_data_url(png.getvalue()).startswith("data:image/png;base64,")


def test_image_cache(tmp_path: Path, big_jpeg: Path) -> None:
    source = tmp_path / "src.jpg"
    source.write_bytes(big_jpeg.read_bytes())
    cache = ImageCache(tmp_path / "cache", max_edge=256)
    first = cache.jpeg(source)
    assert (cache.hits, cache.misses) == (0, 1)
    assert cache.path_for(source).read_bytes() == first
    assert cache.jpeg(source) == first and cache.hits == 1
    assert ImageCache(tmp_path / "cache", max_edge=256).jpeg(source) == first  # across instances
    with Image.open(io.BytesIO(first)) as image:
        assert max(image.size) == 256
    other = ImageCache(tmp_path / "cache", max_edge=128)
    assert other.path_for(source) != cache.path_for(source)
    # A changed source file is a new key.
    Image.fromarray(synthetic_chest(300, 200, seed=9), "L").save(source)
    os.utime(source, ns=(1, 1))
    assert cache.jpeg(source) != first and cache.misses == 2
    assert cache.data_url(source).startswith("data:image/jpeg;base64,")
    assert not list((tmp_path / "cache").rglob(".*.tmp"))  # core.io temp names: .NAME.PID-HEX.tmp


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns while reading the junk on purpose
def test_corrupt_and_missing_images(tmp_path: Path, big_jpeg: Path) -> None:
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(big_jpeg.read_bytes()[:5000])
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image at all" * 10)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    bad_dicom = tmp_path / "bad.dcm"
    bad_dicom.write_bytes(b"\x00" * 128 + b"DICM" + b"\x02\x00garbage")
    headless = tmp_path / "headless.dcm"
    dataset = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    del dataset.PixelData
    dataset.save_as(headless)
    for path in (truncated, garbage, empty, bad_dicom, headless, tmp_path / "absent.jpg"):
        with pytest.raises(ImageError, match=path.name) as info:
            preprocess(path)
        assert isinstance(info.value, InputError)
    with pytest.raises(ImageError, match="absent.jpg"):
        ImageCache(tmp_path / "c").jpeg(tmp_path / "absent.jpg")


def test_preprocess_many_keeps_order_bounds_memory_and_names_the_bad_file(tmp_path: Path) -> None:
    paths = []
    for index in range(9):
        path = tmp_path / f"film{index}.jpg"
        Image.fromarray(synthetic_chest(300 + 20 * index, 360, seed=index), "L").save(path, quality=90)
        paths.append(path)
    many = list(preprocess_many(paths, max_edge=128, workers=3))
    assert [image.size for image in many] == [preprocess(p, max_edge=128).size for p in paths]
    assert all(a.tobytes() == preprocess(p, max_edge=128).tobytes() for a, p in zip(many, paths, strict=True))

    # A generator of paths is consumed lazily: at most 2 x workers ahead of what was yielded.
    consumed = []

    def lazily():
        for path in paths:
            consumed.append(path)
            yield path

    images = preprocess_many(lazily(), max_edge=64, workers=2)
    next(images)
    assert len(consumed) <= 2 * 2 + 1
    images.close()  # abandoning the generator cancels what has not started

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:300])
    results = preprocess_many([paths[0], broken, paths[1]], max_edge=64, workers=2)
    assert next(results).size[1] == 64
    with pytest.raises(ImageError, match="broken.jpg"):
        next(results)
    with pytest.raises(ValueError, match="workers"):
        next(preprocess_many(paths, workers=-1))


def test_jpeg2000_compressed_dicom_decodes_like_the_uncompressed_film() -> None:
    compressed = get_testdata_file("RG1_J2KR.dcm")  # the same film, JPEG 2000 lossless
    assert pydicom.dcmread(compressed, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed
    image = preprocess(compressed, max_edge=None)
    reference = preprocess(get_testdata_file("RG1_UNCI.dcm"), max_edge=None)
    assert image.size == reference.size
    difference = np.abs(np.asarray(image, dtype=np.float64) - np.asarray(reference, dtype=np.float64))
    assert difference.mean() < 1.5
    assert region(image, 0.62, 0.80, 0.15, 0.30) < region(image, 0.45, 0.55, 0.30, 0.60) - 40
