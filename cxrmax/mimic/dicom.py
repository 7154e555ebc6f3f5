"""DICOM pixel data to an 8-bit grayscale picture, the way a reading room shows a chest film.

First frame only (a chest film is one frame; cine and enhanced objects show their first). The modality
LUT (rescale slope/intercept), then the VOI LUT Sequence, else the first Window Center/Width (LINEAR,
LINEAR_EXACT, SIGMOID), then stretched from the image's min..max to 0..255 (Pixel Padding Value pixels
left out of the range and shown black; a constant image keeps its windowed level); MONOCHROME1 (high
value = dark) is inverted so bone is always bright. Unusable rescale/VOI elements fall back to the
stored values. RGB / YBR (converted by pydicom) and PALETTE COLOR (palette applied) go to luma, scaled
by Bits Stored. Files without preamble or file meta, without or with a misspelled Photometric
Interpretation, decode.

Failures raise `ImageError` naming the path: no pixel data (SR, RT plan, DICOMDIR: the SOP class is
named), an invalid Image Pixel element (named), or compressed pixel data whose pydicom decoder plugin
is not installed (the message says which packages to pip install).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cxrmax.core.errors import ImageError, where

__all__ = ["decode_dicom", "dicom_to_uint8", "scale_to_uint8"]


def scale_to_uint8(array: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Stretch `array` from its min..max to 0..255. Only finite values (and, when given, those
    where `valid` is true) set the range; the rest become 0. A constant image becomes 0."""
    array = np.asarray(array, dtype=np.float64)
    usable = np.isfinite(array)
    if valid is not None:
        usable &= valid
    if not usable.any():
        return np.zeros(array.shape, dtype=np.uint8)
    low, high = float(array[usable].min()), float(array[usable].max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = np.clip(np.rint((array - low) * (255.0 / (high - low))), 0, 255)
    scaled[~usable] = 0
    return scaled.astype(np.uint8)


# Python packages that decode each compressed transfer syntax (pydicom plugins), for the hint of
# the error raised when none of them is installed. RLE and Deflate are decoded by pydicom itself.
# (pip packages, the modules they install): the first set whose modules are all missing is named.
_LIBJPEG = ("pylibjpeg pylibjpeg-libjpeg", ("pylibjpeg", "libjpeg"))
_GDCM = ("python-gdcm", ("gdcm",))
_JPEGLS = ("pyjpegls", ("jpeg_ls",))
_OPENJPEG = ("pylibjpeg pylibjpeg-openjpeg", ("pylibjpeg", "openjpeg"))
_DECODER_PACKAGES: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "1.2.840.10008.1.2.4.50": (_LIBJPEG, _GDCM),  # JPEG baseline 8-bit (Pillow reads most)
    "1.2.840.10008.1.2.4.51": (_LIBJPEG, _GDCM),  # JPEG extended, 12-bit: Pillow cannot
    "1.2.840.10008.1.2.4.57": (_LIBJPEG, _GDCM),  # JPEG lossless
    "1.2.840.10008.1.2.4.70": (_LIBJPEG, _GDCM),  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": (_JPEGLS, _LIBJPEG, _GDCM),  # JPEG-LS
    "1.2.840.10008.1.2.4.81": (_JPEGLS, _LIBJPEG, _GDCM),
    "1.2.840.10008.1.2.4.90": (_OPENJPEG, _GDCM),  # JPEG 2000
    "1.2.840.10008.1.2.4.91": (_OPENJPEG, _GDCM),
    "1.2.840.10008.1.2.4.201": (_OPENJPEG,),  # HTJ2K
    "1.2.840.10008.1.2.4.202": (_OPENJPEG,),
    "1.2.840.10008.1.2.4.203": (_OPENJPEG,),
}


def _missing_decoders(syntax: str) -> str | None:
    """'pip install A (or B)' for the decoder packages of `syntax` that are not installed here."""
    import importlib.util

    missing = [
        packages
        for packages, modules in _DECODER_PACKAGES.get(syntax, ())
        if not all(importlib.util.find_spec(module) for module in modules)
    ]
    if not missing:
        return None
    alternatives = f" (or {', '.join(missing[1:])})" if len(missing) > 1 else ""
    return f"pip install {missing[0]}{alternatives}"


_PIXEL_DATA_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_PHOTOMETRICS = (
    "MONOCHROME1",
    "MONOCHROME2",
    "PALETTE COLOR",
    "RGB",
    "YBR_FULL",
    "YBR_FULL_422",
    "YBR_PARTIAL_422",
    "YBR_PARTIAL_420",
    "YBR_ICT",
    "YBR_RCT",
)


def _one_line(text: str, limit: int = 300) -> str:
    """An exception message on one line (pydicom's span several, tab-indented), shortened."""
    parts = [part.strip() for part in str(text).splitlines() if part.strip()]
    text = " ".join(part if part.endswith(":") else part + ";" for part in parts).rstrip(";")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_number(value: object) -> float | None:
    """The first value of a numeric DICOM element (DS/IS, possibly multi-valued), or None when it
    is absent, empty or not a finite number."""
    if value is None or isinstance(value, (str, bytes)) and not value:
        return None
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _describe_dataset(dataset) -> str:  # noqa: ANN001 - a pydicom Dataset
    """What a DICOM object without pixel data is, for the error message."""
    sop_class = dataset.get("SOPClassUID") or getattr(
        getattr(dataset, "file_meta", None), "MediaStorageSOPClassUID", None
    )
    name = getattr(sop_class, "name", None) or (str(sop_class) if sop_class else None)
    modality = dataset.get("Modality")
    parts = [f"SOP class {name}" if name else "", f"modality {modality}" if modality else ""]
    described = ", ".join(part for part in parts if part)
    return f" ({described})" if described else ""


def _prepare_dataset(dataset, path: Path) -> None:  # noqa: ANN001 - a pydicom Dataset
    """Make a real-world data set decodable without changing its pixels: a transfer syntax from
    the encoding it was read with when the file meta lacks one, the Image Pixel elements that
    sloppy writers leave out set to their only sensible value, Photometric Interpretation
    spelled the standard way (missing or unknown: MONOCHROME2 for one sample per pixel)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if getattr(dataset, "file_meta", None) is None:
        dataset.file_meta = FileMetaDataset()
    if not dataset.file_meta.get("TransferSyntaxUID"):
        pixel_element = next(dataset[k] for k in _PIXEL_DATA_KEYWORDS if k in dataset)
        if pixel_element.is_undefined_length:
            raise ImageError(
                f"{where(path)}: compressed (encapsulated) pixel data but no Transfer Syntax UID "
                "saying how it is compressed"
            )
        implicit, little = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else ExplicitVRLittleEndian
            if little in (True, None)
            else ExplicitVRBigEndian
        )
    if "SamplesPerPixel" not in dataset:
        dataset.SamplesPerPixel = 1
    if "PixelData" in dataset:  # float pixel data has neither
        if "BitsStored" not in dataset and "BitsAllocated" in dataset:
            dataset.BitsStored = dataset.BitsAllocated
        if "PixelRepresentation" not in dataset:
            dataset.PixelRepresentation = 0
    raw = str(dataset.get("PhotometricInterpretation") or "").strip().upper().replace("_", " ")
    spelled = " ".join(raw.split()).replace(" ", "_")
    known = {name.replace(" ", "_"): name for name in _PHOTOMETRICS}
    photometric = known.get(spelled) or known.get(spelled.replace("_", ""))
    if photometric is None:
        compact = spelled.replace("_", "")
        if compact in ("MONOCHROME", "GRAY", "GREY", "GRAYSCALE"):
            photometric = "MONOCHROME2"
        elif compact == "PALETTECOLOR" or (not compact and "RedPaletteColorLookupTableData" in dataset):
            photometric = "PALETTE COLOR"
        elif int(dataset.SamplesPerPixel) == 1:
            photometric = "MONOCHROME2"
        else:
            photometric = "RGB"
    dataset.PhotometricInterpretation = photometric


_INTEGER_PIXEL_ELEMENTS = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "NumberOfFrames",
)


def _check_pixel_module(dataset, path: Path) -> None:  # noqa: ANN001 - a pydicom Dataset
    """Image Pixel elements the decoder needs, checked so that a bad one is named in the error
    (not a bare int() failure deep in pydicom), and the decompression-bomb guard Pillow applies to
    raster files, for DICOM frames."""
    values: dict[str, float] = {}
    for keyword in _INTEGER_PIXEL_ELEMENTS:
        if keyword not in dataset:
            continue
        try:
            raw = dataset[keyword].value
        except Exception:  # noqa: BLE001 - pydicom could not even convert the raw bytes
            raw = dataset.get_item(keyword).value
        number = _first_number(raw)
        if raw not in (None, "", b"") and (number is None or number != int(number) or number < 0):
            shown = raw.decode("latin-1", "replace") if isinstance(raw, bytes) else raw
            raise ImageError(f"{where(path, field=keyword)}: not a valid integer: {str(shown)[:40]!r}")
        if number is not None:
            values[keyword] = number
    rows, columns = values.get("Rows"), values.get("Columns")
    if not rows or not columns:
        raise ImageError(f"{where(path)}: DICOM image has no Rows/Columns (or they are 0)")
    limit = Image.MAX_IMAGE_PIXELS
    if limit and rows * columns > 2 * limit:
        raise ImageError(
            f"{where(path)}: DICOM frame is {int(columns)}x{int(rows)} = {int(rows * columns):,} pixels, "
            f"over the decompression-bomb limit of {2 * limit:,} (PIL.Image.MAX_IMAGE_PIXELS x 2); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted"
        )


def _padding_mask(pixels: np.ndarray, dataset) -> np.ndarray | None:  # noqa: ANN001
    """Pixels equal to Pixel Padding Value (or within it and Pixel Padding Range Limit): not part
    of the image, e.g. the corners outside a CT's field of view. None when there are none."""
    padding = _first_number(dataset.get("PixelPaddingValue"))
    if padding is None:
        return None
    limit = _first_number(dataset.get("PixelPaddingRangeLimit"))
    if limit is None:
        mask = pixels == padding
    else:
        mask = (pixels >= min(padding, limit)) & (pixels <= max(padding, limit))
    return mask if mask.any() and not mask.all() else None


def _window(values: np.ndarray, dataset) -> np.ndarray | None:  # noqa: ANN001
    """The first Window Center/Width applied (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT or SIGMOID)
    mapping to 0..255 floats; None when the data set has no usable window."""
    center = _first_number(dataset.get("WindowCenter"))
    width = _first_number(dataset.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    function = str(dataset.get("VOILUTFunction") or "LINEAR").strip().upper()
    values = np.asarray(values, dtype=np.float64)
    if function == "SIGMOID":
        with np.errstate(over="ignore"):
            return 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip(((values - center) / width + 0.5) * 255.0, 0.0, 255.0)
    if width <= 1:  # LINEAR: a width of 1 is a threshold at the center (PS3.3 needs >= 1)
        return np.where(values > center - 0.5, 255.0, 0.0)
    return np.clip(((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0, 0.0, 255.0)


def _voi_lut(values: np.ndarray, dataset) -> np.ndarray | None:  # noqa: ANN001
    """The first VOI LUT Sequence item applied, scaled from the LUT's own output range to
    0..255 floats; None when there is no usable VOI LUT."""
    from pydicom.pixels import apply_voi

    sequence = dataset.get("VOILUTSequence")
    if not sequence or sequence[0].get("LUTDescriptor") is None or sequence[0].get("LUTData") is None:
        return None
    integers = np.asarray(values)
    if integers.dtype.kind == "f":
        integers = np.rint(integers).astype(np.int64)
    mapped = apply_voi(integers, dataset, index=0).astype(np.float64)
    # The LUT's own min..max is its output range: some writers declare 16 bits per entry but store
    # 12-bit values, so the nominal depth cannot be trusted.
    lut = apply_voi(np.arange(-(2**16), 2**16, dtype=np.int64), dataset, index=0)
    low, high = float(lut.min()), float(lut.max())
    if high <= low:
        return None
    return (mapped - low) * (255.0 / (high - low))


def _luminance(rgb: np.ndarray, full_scale: float) -> np.ndarray:
    """ITU-R 601 luma (the weights Pillow's convert("L") uses) of an RGB(A) array, 0..255."""
    rgb = np.asarray(rgb[..., :3], dtype=np.float64) * (255.0 / full_scale)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    return np.clip(np.rint(luma), 0, 255).astype(np.uint8)


def dicom_to_uint8(dataset) -> np.ndarray:  # noqa: ANN001 - a pydicom Dataset
    """The first frame of a DICOM data set as uint8 (rows, columns), display-ready.

    Grayscale: modality LUT (rescale slope/intercept or LUT) -> VOI LUT Sequence, else the first
    Window Center/Width -> stretched from the image's min..max to 0..255 (Pixel Padding Value
    pixels are left out of the range and shown black; a constant image keeps its windowed level)
    -> MONOCHROME1 inverted. Colour (RGB, YBR_* converted to RGB by pydicom) and PALETTE COLOR
    (the palette applied): luma, scaled from the stored bit depth. Multi-frame: only frame 0 is
    decoded (a chest film is one frame; cine and enhanced objects show their first)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

    pixels = pixel_array(dataset, index=0)
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR" and pixels.ndim == 2:
        rgb = apply_color_lut(pixels, dataset)
        # 16-bit palettes that hold 8-bit entries are common: scale by what the entries reach.
        full_scale = 255.0 if rgb.dtype == np.uint8 or rgb.max() <= 255 else 65535.0
        return _luminance(rgb, full_scale)
    if pixels.ndim == 3:  # colour
        bits = int(_first_number(dataset.get("BitsStored")) or pixels.dtype.itemsize * 8)
        return _luminance(pixels, float(2 ** min(bits, pixels.dtype.itemsize * 8) - 1))

    padding = _padding_mask(pixels, dataset)
    values = pixels
    # A zero slope would flatten the image to one value: like a malformed rescale, it is ignored
    # (the stored values show the same picture up to the stretch).
    if _first_number(dataset.get("RescaleSlope")) != 0:
        try:
            values = apply_modality_lut(pixels, dataset)
        except Exception:  # noqa: BLE001 - an unusable rescale or modality LUT
            values = pixels
    display = None
    for voi in (_voi_lut, _window):
        try:
            display = voi(values, dataset)
        except Exception:  # noqa: BLE001 - a malformed VOI module: fall back to the next, then none
            display = None
        if display is not None:
            break
    if display is None:
        display = np.asarray(values, dtype=np.float64)
        level = _stored_level(pixels, dataset)
    else:
        level = display
    valid = None if padding is None else ~padding
    scaled = scale_to_uint8(display, valid)
    if not scaled.any():  # constant (after VOI): keep its level instead of showing it black
        finite = np.isfinite(level) if valid is None else np.isfinite(level) & valid
        if finite.any():
            constant = float(np.clip(np.rint(np.median(level[finite])), 0, 255))
            scaled = np.full(scaled.shape, constant, dtype=np.uint8)
            if padding is not None:
                scaled[padding] = 0
    if photometric == "MONOCHROME1":
        scaled = 255 - scaled
        if padding is not None:
            scaled[padding] = 0
    return scaled


def _stored_level(pixels: np.ndarray, dataset) -> np.ndarray:  # noqa: ANN001
    """Stored values as 0..255 levels of their bit depth (for a constant image with no VOI)."""
    if pixels.dtype.kind == "f":
        return np.zeros(pixels.shape)
    bits = int(_first_number(dataset.get("BitsStored")) or pixels.dtype.itemsize * 8)
    low = -(2 ** (bits - 1)) if pixels.dtype.kind == "i" else 0
    return (pixels.astype(np.float64) - low) * (255.0 / (2**bits - 1))


def _read_dicom(path: Path):  # noqa: ANN202 - a pydicom Dataset
    """Read a DICOM file; without the preamble/'DICM' marker (older files) read it anyway."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        pass
    try:
        dataset = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - whatever a malformed file makes the parser raise
        raise ImageError(
            f"{where(path)}: not a readable DICOM file: {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    # Forced, the parser reads any bytes as elements: a real header has standard ones.
    if not any(tag.group in (0x0008, 0x0010, 0x0020, 0x0028) for tag in dataset.keys()):
        raise ImageError(
            f"{where(path)}: not a DICOM file (no 'DICM' marker and no DICOM elements at its start)"
        )
    return dataset


def decode_dicom(path: str | os.PathLike) -> Image.Image:
    """Decode the first frame of a DICOM file to an 8-bit "L" image (see `dicom_to_uint8`).

    Raises ImageError naming the path: no pixel data (structured reports, RT plans, DICOMDIRs,
    a non-DICOM file named .dcm), compressed pixel data whose decoder plugin is not installed (the
    message names the pip packages), truncated or otherwise undecodable pixel data."""
    path = Path(path)
    try:
        dataset = _read_dicom(path)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - a header the parser chokes on
        raise ImageError(
            f"{where(path)}: cannot read DICOM: {type(exc).__name__}: {_one_line(exc)}"
        ) from None
    present = [keyword for keyword in _PIXEL_DATA_KEYWORDS if keyword in dataset]
    if not present:
        raise ImageError(
            f"{where(path)}: DICOM file has no pixel data{_describe_dataset(dataset)}: not an image"
        )
    if not dataset.get_item(present[0]).value:
        raise ImageError(f"{where(path, field=present[0])}: the pixel data element is empty")
    syntax = None
    try:
        _check_pixel_module(dataset, path)
        _prepare_dataset(dataset, path)
        syntax = dataset.file_meta.TransferSyntaxUID
        array = dicom_to_uint8(dataset)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - user data: every decoder failure becomes an ImageError
        raise ImageError(f"{where(path)}: cannot decode DICOM: {_decode_failure(exc, syntax)}") from None
    return Image.fromarray(array, "L")


def _decode_failure(exc: Exception, syntax) -> str:  # noqa: ANN001 - a pydicom UID or None
    """The reason a DICOM did not decode, with the pip packages that would decode its transfer
    syntax when that is the cause."""
    from pydicom.pixels import get_decoder

    reason = f"{type(exc).__name__}: {_one_line(exc)}"
    if syntax is None or not getattr(syntax, "is_compressed", False):
        return reason
    name = getattr(syntax, "name", str(syntax))
    install = _missing_decoders(str(syntax))
    try:
        available = get_decoder(syntax).is_available
    except Exception:  # noqa: BLE001 - pydicom knows no decoder for this syntax at all (e.g. video)
        return f"{name} pixel data: pydicom has no decoder for this transfer syntax ({reason})"
    if not available and install:
        return f"{name} pixel data needs a decoder plugin that is not installed: {install}"
    if install:
        return f"{name} pixel data: {reason} (another decoder may read it: {install})"
    return f"{name} pixel data: {reason}"
