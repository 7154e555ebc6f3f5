"""Real-world image inputs: every file pydicom-data ships, DICOM variants written the way scanners
and sloppy tools write them, and the raster files users actually have (progressive/CMYK/EXIF JPEGs,
PNG modes, TIFF, wrong extensions, truncated, empty, huge, 1x1, extreme aspect ratios).

Each input either decodes to a sane 8-bit "L" image or raises ImageError naming the path with a
reason, never a raw exception."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from cxrmax.core.errors import InputError
from cxrmax.mimic.images import ImageError, preprocess

# ------------------------------------------------------------------------------ pydicom-data sweep


def _pydicom_test_files() -> list[Path]:
    """Every file of pydicom's own test data and of the pydicom-data package, found on disk
    (pydicom.data.get_testdata_files would try to download the ones a version lacks)."""
    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent / "test_files"]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent / "data")
    except ImportError:
        pass
    return sorted(path for root in roots for path in root.rglob("*") if path.is_file())


_TEST_FILES = _pydicom_test_files()
# Files that are broken on purpose: their pixel data cannot decode whatever plugins are installed.
_BROKEN_ON_PURPOSE = {
    "MR_truncated.dcm",  # 62 bytes of pixel data missing
    "badVR.dcm",  # Number of Frames '1A'
    "JPEG2000-embedded-sequence-delimiter.dcm",
    "emri_small_jpeg_2k_lossless_too_short.dcm",
    "meta_missing_tsyntax.dcm",
    "nested_priv_SQ.dcm",
}
_NATIVE_SYNTAXES = {
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    "1.2.840.10008.1.2.5",  # RLE lossless, decoded by pydicom itself
}


def _expected_to_decode(path: Path) -> bool | None:
    """True: must decode here (pixel data in a syntax pydicom decodes without plugins); False: must
    raise (no pixel data, not DICOM, broken on purpose); None: depends on installed plugins."""
    if path.name in _BROKEN_ON_PURPOSE:
        return False
    try:
        dataset = pydicom.dcmread(path, force=True, stop_before_pixels=False)
    except Exception:  # noqa: BLE001 - not DICOM at all
        return False
    if not any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return False
    syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or syntax in _NATIVE_SYNTAXES:
        return True
    return None


@pytest.mark.parametrize("path", _TEST_FILES, ids=[f"{p.parent.name}/{p.name}" for p in _TEST_FILES])
def test_every_pydicom_data_file_decodes_or_raises_a_clear_error(path: Path) -> None:
    expected = _expected_to_decode(path)
    try:
        image = preprocess(path, max_edge=128)
    except ImageError as exc:
        message = str(exc)
        assert str(path) in message and "\n" not in message
        assert expected is not True, message
        if expected is None and "not installed" in message:
            assert "pip install" in message
        return
    assert expected is not False, f"{path.name} decoded but should not"
    assert image.mode == "L" and min(image.size) >= 1 and max(image.size) <= 128


def test_pydicom_data_counts() -> None:
    """Most of the corpus decodes; all the rest fail with ImageError (checked one by one above)."""
    decoded = 0
    for path in _TEST_FILES:
        try:
            preprocess(path, max_edge=32)
            decoded += 1
        except ImageError:
            pass
    if len(_TEST_FILES) > 200:  # pydicom 3 with pydicom-data: 244 files, 145 decode here
        assert decoded >= 140


def _data_file(name: str) -> Path:
    matches = [path for path in _TEST_FILES if path.name == name]
    if not matches:
        pytest.skip(f"{name} is not in this pydicom / pydicom-data")
    return matches[0]


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("rtplan.dcm", "no pixel data (SOP class RT Plan Storage"),
        ("test-SR.dcm", "no pixel data (SOP class Comprehensive SR Storage"),
        ("reportsi.dcm", "no pixel data (SOP class Basic Text SR Storage"),
        ("waveform_ecg.dcm", "no pixel data (SOP class 12-lead ECG Waveform"),
        ("DICOMDIR", "no pixel data (SOP class Media Storage Directory"),
        ("ExplVR_BigEndNoMeta.dcm", "no pixel data"),  # no meta, big endian: still read
        ("badVR.dcm", "field 'NumberOfFrames': not a valid integer: '1A'"),
        ("MR_truncated.dcm", "less than expected"),
        ("README.txt", "not a recognised image file"),
        ("no_meta.dcm", "not a DICOM file"),
    ],
)
def test_clear_reasons_for_files_that_are_not_images(name: str, reason: str) -> None:
    path = _data_file(name)
    with pytest.raises(ImageError) as caught:
        preprocess(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)
    assert isinstance(caught.value, InputError)


@pytest.mark.parametrize(
    ("name", "module"),
    [
        ("JPEG-LL.dcm", "libjpeg"),  # JPEG lossless
        ("MR_small_jpeg_ls_lossless.dcm", "jpeg_ls"),  # JPEG-LS
        ("JPGExtended.dcm", "libjpeg"),  # 12-bit JPEG extended: Pillow cannot
    ],
)
def test_missing_decoder_plugins_are_named(name: str, module: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed here")
    path = _data_file(name)
    with pytest.raises(ImageError) as caught:
        preprocess(path)
    message = str(caught.value)
    assert str(path) in message and "pip install" in message and "\n" not in message


def _luma(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb.astype(np.uint8), "RGB").convert("L"), dtype=np.float64)


def test_palette_color_is_shown_through_its_palette() -> None:
    from pydicom.pixels import apply_color_lut

    for name in ("OBXXXX1A.dcm", "OBXXXX1A_rle_2frame.dcm", "OT-PAL-8-face.dcm"):
        path = _data_file(name)
        dataset = pydicom.dcmread(path, force=True)
        if "TransferSyntaxUID" not in dataset.file_meta:
            dataset.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        indices = dataset.pixel_array
        indices = indices[0] if indices.ndim == 3 else indices
        rgb = apply_color_lut(indices, dataset)
        expected = _luma(rgb if rgb.dtype == np.uint8 else rgb >> 8)
        decoded = np.asarray(preprocess(path, max_edge=None), dtype=np.float64)
        assert np.abs(decoded - expected).mean() < 1.0, name


@pytest.mark.parametrize(
    ("multi", "single"),
    [
        ("SC_rgb_2frame.dcm", "SC_rgb.dcm"),
        ("SC_rgb_rle_2frame.dcm", "SC_rgb_rle.dcm"),
        ("SC_rgb_expb_32bit_2frame.dcm", "SC_rgb.dcm"),
        ("OBXXXX1A_2frame.dcm", "OBXXXX1A.dcm"),
        ("emri_small_big_endian.dcm", "emri_small.dcm"),
        ("emri_small_RLE.dcm", "emri_small.dcm"),
    ],
)
def test_multiframe_shows_the_first_frame(multi: str, single: str) -> None:
    first = np.asarray(preprocess(_data_file(multi), max_edge=None))
    reference = np.asarray(preprocess(_data_file(single), max_edge=None))
    assert first.shape == reference.shape and np.array_equal(first, reference)


def test_colour_multiframe_jpeg_and_ybr() -> None:
    for name in ("color3d_jpeg_baseline.dcm", "examples_ybr_color.dcm", "SC_ybr_full_422_uncompressed.dcm"):
        image = np.asarray(preprocess(_data_file(name), max_edge=None))
        assert image.ndim == 2 and image.std() > 5, name
    ybr = np.asarray(preprocess(_data_file("SC_ybr_full_uncompressed.dcm")), dtype=float)
    rgb = np.asarray(preprocess(_data_file("SC_rgb.dcm")), dtype=float)
    assert np.abs(ybr - rgb).max() <= 2


@pytest.mark.parametrize("name", ["RG1_UNCI.dcm", "RG1_UNCR.dcm", "RG1_J2KI.dcm", "RG1_J2KR.dcm"])
def test_the_real_chest_film_is_upright_with_dark_lungs_in_every_encoding(name: str) -> None:
    """pydicom-data's chest PA (MONOCHROME1, 15 bits stored) raw, big-endian and JPEG 2000."""
    image = np.asarray(preprocess(_data_file(name), max_edge=256), dtype=np.float64)
    height, width = image.shape
    lungs = image[int(0.15 * height) : int(0.3 * height), int(0.15 * width) : int(0.35 * width)].mean()
    spine = image[int(0.3 * height) : int(0.6 * height), int(0.45 * width) : int(0.55 * width)].mean()
    assert lungs < spine - 40
    # Upright: the diaphragm and abdomen (bright) are below the lungs (dark).
    lower = image[int(0.85 * height) :, int(0.15 * width) : int(0.35 * width)].mean()
    assert lower > lungs + 40


# ------------------------------------------------------------------------------ DICOM variants

_ROWS, _COLS = 48, 40


def _phantom(low: int = 200, high: int = 3800) -> np.ndarray:
    """A body-like phantom: a disc of graded values on a darker field."""
    y, x = np.mgrid[0:_ROWS, 0:_COLS]
    ramp = low + (high - low) * (x + y) / (_ROWS + _COLS - 2)
    return ramp.astype(np.int64)


def _write(
    path: Path,
    stored: np.ndarray,
    *,
    syntax: str = ExplicitVRLittleEndian,
    bits_allocated: int = 16,
    bits_stored: int | None = 12,
    signed: bool = False,
    photometric: str | None = "MONOCHROME2",
    bare: bool = False,
    **elements: object,
) -> Path:
    """Write a DICOM DX/CT image the way scanners do; `bare` leaves out preamble and file meta."""
    dataset = Dataset()
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage
    dataset.SOPInstanceUID = generate_uid()
    dataset.Modality = "DX"
    dataset.Rows, dataset.Columns = stored.shape[-2], stored.shape[-1]
    dataset.SamplesPerPixel = 1
    dataset.BitsAllocated = bits_allocated
    if bits_stored is not None:
        dataset.BitsStored, dataset.HighBit = bits_stored, bits_stored - 1
    dataset.PixelRepresentation = int(signed)
    if photometric is not None:
        dataset.PhotometricInterpretation = photometric
    if stored.ndim == 3:
        dataset.NumberOfFrames = stored.shape[0]
    dtype = {8: np.uint8, 16: np.uint16, 32: np.uint32}[bits_allocated]
    if signed:
        dtype = {8: np.int8, 16: np.int16, 32: np.int32}[bits_allocated]
    big = syntax == ExplicitVRBigEndian
    dataset.PixelData = stored.astype(np.dtype(dtype).newbyteorder(">" if big else "<")).tobytes()
    for keyword, value in elements.items():
        setattr(dataset, keyword, value)
    if bare:
        pydicom.dcmwrite(path, dataset, implicit_vr=syntax == ImplicitVRLittleEndian)
        return path
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.save_as(path, enforce_file_format=True)
    return path


def _decoded(path: Path) -> np.ndarray:
    return np.asarray(preprocess(path, max_edge=None), dtype=np.float64)


def _stretch(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return (values - values.min()) * 255.0 / (values.max() - values.min())


def test_bare_dicom_without_preamble_and_meta(tmp_path: Path) -> None:
    stored = _phantom()
    reference = _decoded(_write(tmp_path / "ref.dcm", stored))
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        for name in ("bare.dcm", "IM000001"):  # the second has no extension at all
            path = _write(tmp_path / name, stored, syntax=syntax, bare=True)
            assert path.read_bytes()[128:132] != b"DICM"
            assert np.array_equal(_decoded(path), reference), (syntax, name)


def test_dicom_and_raster_files_with_the_wrong_extension(tmp_path: Path) -> None:
    stored = _phantom()
    as_jpg = _write(tmp_path / "film.jpg", stored)  # a DICOM named .jpg
    assert np.array_equal(_decoded(as_jpg), _decoded(_write(tmp_path / "film.dcm", stored)))
    pixels = _stretch(stored).astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "really_png.dcm", format="PNG")
    assert np.array_equal(_decoded(tmp_path / "really_png.dcm"), pixels)
    Image.fromarray(pixels).save(tmp_path / "really_jpeg.dcm", format="JPEG", quality=95)
    assert np.abs(_decoded(tmp_path / "really_jpeg.dcm") - pixels).mean() < 2


def test_pixel_padding_is_left_out_of_the_range_and_shown_black(tmp_path: Path) -> None:
    hounsfield = _phantom(-1000, 1500) + 1024  # stored = HU + 1024
    stored = hounsfield.copy()
    corners = np.zeros(stored.shape, dtype=bool)
    corners[:8, :8] = corners[-8:, -8:] = True
    stored[corners] = -2000  # outside the field of view
    path = _write(
        tmp_path / "ct.dcm",
        stored,
        bits_stored=16,
        signed=True,
        RescaleSlope="1",
        RescaleIntercept="-1024",
        PixelPaddingValue=-2000,
    )
    decoded = _decoded(path)
    assert (decoded[corners] == 0).all()
    inside = decoded[~corners]
    assert inside.min() == 0 and inside.max() == 255  # the body uses the whole range
    assert np.abs(inside - _stretch(hounsfield[~corners])).max() <= 1


@pytest.mark.parametrize(
    ("elements", "expected"),
    [
        # A narrow window: far below black, far above white, the ramp in between.
        ({"WindowCenter": "2000", "WindowWidth": "400"}, "narrow"),
        # Multi-valued window (scanner presets): the first is used.
        ({"WindowCenter": ["2000", "1000"], "WindowWidth": ["400", "4000"]}, "narrow"),
        ({"WindowCenter": "2000", "WindowWidth": "400", "VOILUTFunction": "LINEAR_EXACT"}, "narrow"),
        ({"WindowCenter": "2000", "WindowWidth": "400", "VOILUTFunction": "SIGMOID"}, "monotonic"),
        # Unusable windows fall back to the full range instead of failing.
        ({"WindowCenter": "2000", "WindowWidth": "0"}, "full"),
        ({"WindowCenter": "2000", "WindowWidth": "-5"}, "full"),
        ({"WindowCenter": "2000"}, "full"),  # width missing
        ({"WindowCenter": "", "WindowWidth": ""}, "full"),
        ({"WindowCenter": "2000", "WindowWidth": "400", "VOILUTFunction": "BOGUS"}, "narrow"),
        # A window entirely below the data: everything white, not a black image.
        ({"WindowCenter": "-500", "WindowWidth": "100"}, "white"),
        ({"WindowCenter": "9000", "WindowWidth": "100"}, "black"),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else value,
)
def test_windows(tmp_path: Path, elements: dict, expected: str) -> None:
    stored = _phantom()
    decoded = _decoded(_write(tmp_path / "w.dcm", stored, **elements))
    if expected == "narrow":
        assert (decoded[stored < 1750] == 0).all() and (decoded[stored > 2250] == 255).all()
        middle = (stored > 1850) & (stored < 2150)
        assert 0 < decoded[middle].min() and decoded[middle].max() < 255
    elif expected == "monotonic":
        order = np.argsort(stored, axis=None)
        assert (np.diff(decoded.ravel()[order]) >= 0).all()
        assert decoded.min() <= 5 and decoded.max() >= 250
    elif expected == "full":
        assert np.abs(decoded - _stretch(stored)).max() <= 1
    else:
        assert (decoded == (255 if expected == "white" else 0)).all()


def test_monochrome1_with_a_window_is_inverted(tmp_path: Path) -> None:
    stored = _phantom()
    mono2 = _decoded(_write(tmp_path / "m2.dcm", stored, WindowCenter="2000", WindowWidth="2000"))
    mono1 = _decoded(
        _write(
            tmp_path / "m1.dcm",
            stored,
            photometric="MONOCHROME1",
            WindowCenter="2000",
            WindowWidth="2000",
        )
    )
    assert np.array_equal(mono1, 255 - mono2)


def _voi_lut(first: int, entries: int, values: np.ndarray, bits: int = 16) -> Sequence:
    item = Dataset()
    item.LUTDescriptor = [entries, first, bits]
    item.LUTData = values.astype(np.uint16).tobytes()
    item["LUTData"].VR = "OW"
    return Sequence([item])


def test_voi_lut_sequence_is_preferred_and_a_broken_one_falls_back(tmp_path: Path) -> None:
    stored = _phantom()
    # A square-root VOI LUT over 0..4095 whose entries only reach 12 bits although the descriptor
    # says 16 (a common writer quirk): the curve shows, over the whole 0..255 range.
    curve = np.sqrt(np.arange(4096) / 4095) * 4095
    path = _write(
        tmp_path / "lut.dcm",
        stored,
        VOILUTSequence=_voi_lut(0, 4096, curve),
        WindowCenter="2000",
        WindowWidth="10",
    )
    decoded = _decoded(path)
    expected = _stretch(np.sqrt(stored / 4095))
    assert np.abs(decoded - expected).max() <= 2
    # Descriptor promising 4096 entries with 10 present: the window is used instead.
    broken = _write(
        tmp_path / "broken.dcm",
        stored,
        VOILUTSequence=_voi_lut(0, 4096, np.arange(10)),
        WindowCenter="2000",
        WindowWidth="400",
    )
    decoded = _decoded(broken)
    assert (decoded[stored < 1750] == 0).all() and (decoded[stored > 2250] == 255).all()


@pytest.mark.parametrize(
    ("photometric", "inverted"),
    [
        (None, False),  # missing: one sample per pixel is MONOCHROME2
        ("", False),
        ("MONOCHROME", False),
        ("monochrome2", False),
        ("MONOCHROME 1", True),
        ("MONOCHROME_1", True),
        ("monochrome1", True),
        ("GRAYSCALE", False),
        ("RGB", False),  # contradicts one sample per pixel: shown as the grayscale it is
    ],
)
def test_photometric_interpretation_missing_or_misspelled(
    tmp_path: Path, photometric: str | None, inverted: bool | None
) -> None:
    stored = _phantom()
    path = _write(tmp_path / "pi.dcm", stored, photometric=photometric)
    if inverted is None:
        with pytest.raises(ImageError, match="cannot decode DICOM"):
            preprocess(path)
        return
    expected = _stretch(stored)
    decoded = _decoded(path)
    assert np.abs(decoded - (255 - expected if inverted else expected)).max() <= 1


@pytest.mark.parametrize(
    ("bits_stored", "signed", "garbage"),
    [(12, False, 0xF000), (10, False, 0xFC00), (12, True, 0xF000), (14, False, 0xC000)],
)
def test_high_bits_above_bits_stored_are_ignored(
    tmp_path: Path, bits_stored: int, signed: bool, garbage: int
) -> None:
    stored = _phantom(0, 2 ** (bits_stored - 1) - 1)
    clean = _decoded(_write(tmp_path / "clean.dcm", stored, bits_stored=bits_stored, signed=signed))
    dirty_values = (stored.astype(np.uint16) | garbage).astype(np.int64)
    if signed:
        dirty_values = dirty_values.astype(np.uint16).view(np.int16).astype(np.int64)
    dirty = _write(tmp_path / "dirty.dcm", dirty_values, bits_stored=bits_stored, signed=signed)
    assert np.array_equal(_decoded(dirty), clean)


@pytest.mark.parametrize(
    ("syntax", "slope", "intercept"),
    [
        (ExplicitVRLittleEndian, "1", "-1024"),
        (ExplicitVRBigEndian, "0.5", "-100.25"),
        (ImplicitVRLittleEndian, "2.5", "0"),
        (DeflatedExplicitVRLittleEndian, "1", "0"),
        (ExplicitVRLittleEndian, "", ""),  # present but empty
    ],
)
def test_syntaxes_and_rescale_keep_the_picture(
    tmp_path: Path, syntax: str, slope: str, intercept: str
) -> None:
    stored = _phantom()
    path = _write(tmp_path / "r.dcm", stored, syntax=syntax, RescaleSlope=slope, RescaleIntercept=intercept)
    assert np.abs(_decoded(path) - _stretch(stored)).max() <= 1


def test_float_and_double_pixel_data(tmp_path: Path) -> None:
    values = _phantom().astype(np.float64) / 1000.0
    values[0, :5] = np.nan  # not-a-number samples do not break the range
    for keyword, dtype in (("FloatPixelData", np.float32), ("DoubleFloatPixelData", np.float64)):
        dataset = Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
        dataset.SOPInstanceUID = generate_uid()
        dataset.Rows, dataset.Columns = values.shape
        dataset.SamplesPerPixel = 1
        dataset.BitsAllocated = 32 if dtype is np.float32 else 64
        dataset.PhotometricInterpretation = "MONOCHROME2"
        setattr(dataset, keyword, values.astype(dtype).tobytes())
        path = tmp_path / f"{keyword}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        decoded = _decoded(path)
        finite = np.isfinite(values)
        assert (decoded[~finite] == 0).all()
        assert np.abs(decoded[finite] - _stretch(values[finite])).max() <= 1


def test_multiframe_grayscale_shows_frame_zero(tmp_path: Path) -> None:
    frames = np.stack([_phantom(), 4000 - _phantom(), np.full((_ROWS, _COLS), 7)])
    decoded = _decoded(_write(tmp_path / "mf.dcm", frames))
    assert np.abs(decoded - _stretch(frames[0])).max() <= 1


def test_colour_dicom_scales_by_bits_stored(tmp_path: Path) -> None:
    gray = _stretch(_phantom()).astype(np.uint8)
    rgb12 = np.dstack([gray, gray, gray]).astype(np.uint16) * 16  # 12 bits stored in 16
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.SOPInstanceUID = generate_uid()
    dataset.Rows, dataset.Columns = gray.shape
    dataset.SamplesPerPixel, dataset.PlanarConfiguration = 3, 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelRepresentation = 0
    dataset.PhotometricInterpretation = "RGB"
    dataset.PixelData = rgb12.astype("<u2").tobytes()
    path = tmp_path / "rgb12.dcm"
    dataset.save_as(path, enforce_file_format=True)
    assert np.abs(_decoded(path) - gray * (4080 / 4095)).max() <= 1


@pytest.mark.parametrize(
    ("elements", "reason"),
    [
        ({"Rows": 60000, "Columns": 60000}, "decompression-bomb limit"),
        ({"Rows": 0}, "no Rows/Columns"),
        ({"Columns": 64}, "less than expected"),  # pixel data shorter than the header says
    ],
)
def test_dicom_headers_that_lie(tmp_path: Path, elements: dict, reason: str) -> None:
    path = _write(tmp_path / "lie.dcm", _phantom(), **elements)
    with pytest.raises(ImageError) as caught:
        preprocess(path)
    assert str(path) in str(caught.value) and reason in str(caught.value)


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_dicom(tmp_path: Path, keep: float) -> None:
    whole = _write(tmp_path / "whole.dcm", _phantom()).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(ImageError) as caught:
        preprocess(path)
    assert str(path) in str(caught.value)


def _compressed(path: Path, stored: np.ndarray, how: str) -> Path:
    """An 8-bit DICOM whose pixel data is JPEG-baseline (encapsulated), RLE, or damaged."""
    import io

    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, RLELossless

    path = _write(path, stored, bits_allocated=8, bits_stored=8)
    dataset = pydicom.dcmread(path)
    if how == "rle":
        dataset.compress(RLELossless)
    else:
        buffer = io.BytesIO()
        Image.fromarray(stored.astype(np.uint8)).save(buffer, format="JPEG", quality=95)
        data = buffer.getvalue()
        data = {"jpeg": data, "jpeg_truncated": data[: len(data) // 2], "jpeg_garbage": b"x" * 64}[how]
        dataset.PixelData = encapsulate([data])
        dataset["PixelData"].VR = "OB"
        dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("how", ["jpeg", "rle", "jpeg_truncated", "jpeg_garbage"])
def test_compressed_pixel_data(tmp_path: Path, how: str) -> None:
    stored = _phantom(20, 230)
    path = _compressed(tmp_path / f"{how}.dcm", stored, how)
    if how in ("jpeg", "rle"):
        assert np.abs(_decoded(path) - _stretch(stored)).mean() < (3 if how == "jpeg" else 0.5)
        return
    with pytest.raises(ImageError) as caught:
        preprocess(path)
    assert str(path) in str(caught.value) and "JPEG Baseline" in str(caught.value)


def test_empty_pixel_data_and_zero_slope(tmp_path: Path) -> None:
    stored = _phantom()
    empty = _write(tmp_path / "empty.dcm", stored)
    dataset = pydicom.dcmread(empty)
    dataset.PixelData = b""
    dataset.save_as(empty)
    with pytest.raises(ImageError, match="field 'PixelData': the pixel data element is empty"):
        preprocess(empty)
    # Rescale Slope 0 would flatten the film to one value: it is ignored.
    flat = _write(tmp_path / "slope0.dcm", stored, RescaleSlope="0", RescaleIntercept="0")
    assert np.abs(_decoded(flat) - _stretch(stored)).max() <= 1


def test_planar_rgb(tmp_path: Path) -> None:
    gray = _stretch(_phantom()).astype(np.uint8)
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    dataset.SOPInstanceUID = generate_uid()
    dataset.Rows, dataset.Columns = gray.shape
    dataset.SamplesPerPixel, dataset.PlanarConfiguration = 3, 1  # RRR...GGG...BBB...
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 8, 8, 7
    dataset.PixelRepresentation = 0
    dataset.PhotometricInterpretation = "RGB"
    dataset.PixelData = np.stack([gray, gray, gray]).tobytes()
    path = tmp_path / "planar.dcm"
    dataset.save_as(path, enforce_file_format=True)
    assert np.array_equal(_decoded(path), gray)


# ------------------------------------------------------------------------------ raster files

_GRAY = (np.add.outer(np.arange(120), np.arange(90) * 2) % 256).astype(np.uint8)  # 90x120


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def _make_raster(kind: str, folder: Path) -> Path:
    """One real-world raster file of `kind` made with Pillow (or by hand for broken ones)."""
    gray = Image.fromarray(_GRAY)
    rgb = Image.merge("RGB", [gray, gray, gray])
    path = folder / kind
    if kind == "progressive.jpg":
        gray.save(path, progressive=True, quality=92)
    elif kind == "cmyk.jpg":
        rgb.convert("CMYK").save(path, quality=95)
    elif kind == "rgb.jpg":
        rgb.save(path, quality=95)
    elif kind == "palette.png":
        gray.convert("P").save(path)
    elif kind == "palette_transparent.png":
        gray.convert("P").save(path, transparency=0)
    elif kind == "la.png":
        gray.convert("LA").save(path)
    elif kind == "rgba.png":
        rgb.convert("RGBA").save(path)
    elif kind == "bilevel.png":
        gray.point(lambda v: 255 if v >= 128 else 0).convert("1").save(path)
    elif kind == "gray16.png":
        Image.fromarray(_GRAY.astype(np.uint16) * 257).save(path)
    elif kind == "gray16_small_range.png":  # 12-bit detector values in a 16-bit PNG
        Image.fromarray(_GRAY.astype(np.uint16) // 8 + 1000).save(path)
    elif kind == "gray.tif":
        gray.save(path)
    elif kind == "gray16.tif":
        Image.fromarray(_GRAY.astype(np.uint16) * 100).save(path)
    elif kind == "float.tif":
        Image.fromarray(_GRAY.astype(np.float32) / 3.0).save(path)
    elif kind == "lab.tif":
        rgb.convert("LAB").save(path)
    elif kind == "multipage.tif":
        gray.save(path, save_all=True, append_images=[Image.fromarray(255 - _GRAY)])
    elif kind in ("png_named.jpg", "png_named.dcm"):
        gray.save(path, format="PNG")
    elif kind in ("jpeg_named.png", "jpeg_named.dcm"):
        gray.save(path, format="JPEG", quality=95)
    elif kind in ("gray.bmp", "gray.gif", "gray.webp"):
        gray.save(path, **({"lossless": True} if kind.endswith("webp") else {}))
    else:
        raise ValueError(kind)
    return path


_RASTER_KINDS = [
    "progressive.jpg",
    "cmyk.jpg",
    "rgb.jpg",
    "palette.png",
    "palette_transparent.png",
    "la.png",
    "rgba.png",
    "bilevel.png",
    "gray16.png",
    "gray16_small_range.png",
    "gray.tif",
    "gray16.tif",
    "float.tif",
    "lab.tif",
    "multipage.tif",
    "png_named.jpg",
    "png_named.dcm",
    "jpeg_named.png",
    "jpeg_named.dcm",
    "gray.bmp",
    "gray.gif",
    "gray.webp",
]


@pytest.mark.parametrize("kind", _RASTER_KINDS)
@pytest.mark.parametrize("max_edge", [None, 60])
def test_raster_kinds_decode_to_the_same_picture(tmp_path: Path, kind: str, max_edge: int | None) -> None:
    path = _make_raster(kind, tmp_path)
    image = preprocess(path, max_edge=max_edge)
    assert image.mode == "L"
    assert image.size == ((90, 120) if max_edge is None else (45, 60))
    expected = Image.fromarray(_GRAY)
    if max_edge is not None:
        expected = expected.resize(image.size, Image.Resampling.LANCZOS)
    expected = np.asarray(expected, dtype=np.float64)
    decoded = np.asarray(image, dtype=np.float64)
    if kind == "bilevel.png":  # two levels only
        expected = Image.fromarray(np.where(_GRAY >= 128, 255, 0).astype(np.uint8))
        if max_edge is not None:
            expected = expected.resize(image.size, Image.Resampling.LANCZOS)
        expected = np.asarray(expected, dtype=np.float64)
        tolerance = 1.5
    elif kind == "gray16_small_range.png":  # stretched from its own min..max
        expected = _stretch(_GRAY.astype(np.uint16) // 8)
        if max_edge is not None:
            expected = np.asarray(
                Image.fromarray(expected.astype(np.uint8)).resize(image.size, Image.Resampling.LANCZOS),
                dtype=np.float64,
            )
        tolerance = 6
    elif "jpg" in kind or "jpeg" in kind or kind == "cmyk.jpg":
        tolerance = 4
    else:
        tolerance = 1.5
    assert np.abs(decoded - expected).mean() <= tolerance, kind


@pytest.mark.parametrize("orientation", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("extension", ["jpg", "png", "tif"])
def test_exif_orientation_is_applied_like_a_viewer(tmp_path: Path, orientation: int, extension: str) -> None:
    asymmetric = np.zeros((40, 60), dtype=np.uint8)
    asymmetric[:10, :20] = 255  # a bright block top-left
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.{extension}"
    Image.fromarray(asymmetric).save(path, exif=exif, **({"quality": 98} if extension == "jpg" else {}))
    # The upright picture, as Pillow's reference transpose makes it from the pixels and the tag.
    tagged = Image.fromarray(asymmetric)
    tagged.getexif()[0x0112] = orientation
    expected = np.asarray(ImageOps.exif_transpose(tagged), dtype=np.float64)
    decoded = np.asarray(preprocess(path, max_edge=None), dtype=np.float64)
    assert decoded.shape == expected.shape
    assert np.abs(decoded - expected).mean() < 3
    small = preprocess(path, max_edge=30)
    assert max(small.size) == 30 and (small.size[0] > small.size[1]) == (orientation < 5)


@pytest.mark.parametrize(
    ("size", "max_edge", "max_pixels"),
    [
        ((1, 1), 1024, None),
        ((1, 1), 1, 1),
        ((10000, 10), 1024, None),
        ((10, 10000), 100, None),
        ((10000, 10), None, 500),
        ((10000, 10), 7, None),
    ],
)
@pytest.mark.parametrize("extension", ["jpg", "png"])
def test_tiny_and_extreme_aspect_images(
    tmp_path: Path, size: tuple[int, int], max_edge: int | None, max_pixels: int | None, extension: str
) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    path = tmp_path / f"x.{extension}"
    Image.fromarray(pixels).save(path)
    image = preprocess(path, max_edge=max_edge, max_pixels=max_pixels)
    width, height = image.size
    assert width >= 1 and height >= 1 and image.mode == "L"
    if max_edge is not None:
        assert max(width, height) <= max_edge
    if max_pixels is not None:
        assert width * height <= max_pixels
    assert (width >= height) == (size[0] >= size[1])


def _broken(kind: str, folder: Path) -> Path:
    """A file that cannot decode, made the way it happens in practice."""
    path = folder / kind
    good = folder / "good.jpg"
    Image.fromarray(_GRAY).save(good, quality=90, progressive=kind.startswith("progressive"))
    if kind == "empty.jpg":
        path.write_bytes(b"")
    elif kind in ("truncated.jpg", "progressive_truncated.jpg"):
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif kind == "header_only.jpg":
        path.write_bytes(good.read_bytes()[:20])
    elif kind == "truncated.png":  # noise, so that the PNG is large enough to cut in half
        noise = np.random.default_rng(0).integers(0, 256, _GRAY.shape, dtype=np.uint8)
        Image.fromarray(noise).save(folder / "good.png")
        path.write_bytes((folder / "good.png").read_bytes()[: (folder / "good.png").stat().st_size // 2])
    elif kind == "bad_crc.png":
        Image.fromarray(_GRAY).save(folder / "good.png")
        data = bytearray((folder / "good.png").read_bytes())
        data[60] ^= 0xFF
        path.write_bytes(bytes(data))
    elif kind == "truncated.tif":
        Image.fromarray(_GRAY).save(folder / "good.tif")
        path.write_bytes((folder / "good.tif").read_bytes()[:300])
    elif kind == "html_error_page.jpg":  # a download that saved the server's error page
        path.write_text("<!DOCTYPE html><html><body>403 Forbidden</body></html>\n")
    elif kind == "text.dcm":
        path.write_text("PatientName,StudyDate\nDOE^JOHN,20190101\n" * 5)
    elif kind == "zero_size.png":
        path.write_bytes(_png_header_only(0, 0))
    elif kind == "bomb.png":
        path.write_bytes(_png_header_only(100_000, 100_000))
    elif kind == "directory.jpg":
        path.mkdir()
    elif kind == "missing.png":
        pass
    else:
        raise ValueError(kind)
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty.jpg", "empty (0 bytes)"),
        ("truncated.jpg", "truncated"),
        ("progressive_truncated.jpg", ""),
        ("header_only.jpg", "a JPEG that Pillow cannot decode"),
        ("truncated.png", "cannot decode image"),
        ("bad_crc.png", "cannot decode image"),
        ("truncated.tif", "truncated"),
        ("html_error_page.jpg", "not a recognised image file"),
        ("text.dcm", "not a DICOM file"),
        ("zero_size.png", "a PNG file that Pillow cannot decode"),
        ("bomb.png", "too large to decode safely"),
        ("directory.jpg", "is a directory"),
        ("missing.png", "not found"),
    ],
)
def test_broken_raster_files_raise_image_error_naming_the_path(
    tmp_path: Path, kind: str, reason: str
) -> None:
    path = _broken(kind, tmp_path)
    for max_edge in (None, 32):  # the draft path and the full decode
        try:
            image = preprocess(path, max_edge=max_edge)
        except ImageError as exc:
            assert str(path) in str(exc) and reason in str(exc)
        else:  # only a progressive JPEG cut after a complete scan may decode (coarsely)
            assert kind == "progressive_truncated.jpg" and image.mode == "L"


@pytest.mark.parametrize(
    ("source", "name", "decodes"),
    [
        ("JPGExtended.dcm", "12bit.jpg", False),  # JPEG extended, 12-bit samples
        ("JPEG-LL.dcm", "lossless.jpg", False),  # JPEG lossless (process 14)
        ("MR_small_jpeg_ls_lossless.dcm", "jpeg_ls.jpg", False),  # JPEG-LS
        ("RG1_J2KR.dcm", "chest.j2k", True),  # a JPEG 2000 codestream of a chest film
        ("SC_rgb_jpeg.dcm", "colour.jpg", True),
    ],
)
def test_jpeg_variants_pillow_cannot_read(tmp_path: Path, source: str, name: str, decodes: bool) -> None:
    """Real compressed streams taken out of DICOM files, saved as plain image files."""
    from pydicom.encaps import generate_fragmented_frames

    dataset = pydicom.dcmread(_data_file(source))
    path = tmp_path / name
    path.write_bytes(b"".join(next(generate_fragmented_frames(dataset.PixelData, number_of_frames=1))))
    if decodes:
        image = preprocess(path, max_edge=64)
        assert image.mode == "L" and max(image.size) == 64 and np.asarray(image).std() > 0
        return
    with pytest.raises(ImageError, match="a JPEG that Pillow cannot decode: a 12-bit, lossless"):
        preprocess(path)


def test_unreadable_file_is_an_image_error(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads every file")
    path = tmp_path / "locked.jpg"
    Image.fromarray(_GRAY).save(path)
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="cannot read image"):
            preprocess(path)
    finally:
        path.chmod(0o644)
