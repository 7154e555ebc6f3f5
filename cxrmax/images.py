"""Chest X-ray image decoding and preprocessing: JPEG / PNG / DICOM to 8-bit grayscale, resize,
JPEG bytes and data URLs, with an on-disk cache.

* JPEG: when the target is at most half the source size, the decoder is asked for a DCT-domain
  downscale first (`PIL.Image.draft`, scale 1/2, 1/4 or 1/8, never below the target), then the
  image is resized exactly to the target. Decoding fewer coefficients is where the speed comes from.
* PNG: 8-bit as is; 16-bit scaled by its own min..max to 0..255.
* DICOM: modality LUT (rescale slope/intercept), then the VOI LUT or window (pydicom's
  `apply_voi_lut`, which prefers a VOI LUT Sequence over Window Center/Width), then scaled from the
  image's value range to 0..255; MONOCHROME1 (high value = dark) is inverted so bone is always bright.
* Resize keeps the aspect ratio: longest edge <= `max_edge` and/or width*height <= `max_pixels`;
  images are never upscaled. Resampling is Lanczos (antialiased).
* Many images: `preprocess_many` runs `preprocess` on a thread pool (Pillow releases the GIL while it
  decodes and resamples, so threads use every core), in input order, with a bounded number in flight.

Unreadable, truncated or corrupt files raise `ImageError` (an InputError) naming the path.
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import tempfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrmax.errors import InputError, where

__all__ = [
    "ImageError",
    "ImageCache",
    "decode",
    "decode_dicom",
    "dicom_to_uint8",
    "encode_jpeg",
    "preprocess",
    "preprocess_many",
    "target_size",
    "to_data_url",
    "verify",
]

RESAMPLE = Image.Resampling.LANCZOS
_CACHE_VERSION = "1"


class ImageError(InputError):
    """An image file that cannot be read or decoded."""


def target_size(
    width: int, height: int, max_edge: int | None = 1024, max_pixels: int | None = None
) -> tuple[int, int]:
    """The (width, height) to resize to: aspect kept, longest edge <= max_edge, area <= max_pixels,
    never larger than the source, at least 1x1."""
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is empty")
    scale = 1.0
    if max_edge is not None:
        if max_edge < 1:
            raise ValueError(f"max_edge must be >= 1, got {max_edge}")
        scale = min(scale, max_edge / max(width, height))
    if max_pixels is not None:
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        scale = min(scale, math.sqrt(max_pixels / (width * height)))
    if scale >= 1.0:
        return width, height
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    # Rounding may overshoot a limit by one pixel: step down until both hold.
    while max_edge is not None and max(new_w, new_h) > max_edge:
        new_w, new_h = max(1, new_w - (new_w >= new_h)), max(1, new_h - (new_h > new_w))
    while max_pixels is not None and new_w * new_h > max_pixels and (new_w > 1 or new_h > 1):
        if new_w >= new_h:
            new_w -= 1
        else:
            new_h -= 1
    return new_w, new_h


def _kind(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except FileNotFoundError:
        raise ImageError(f"{where(path)}: image file not found") from None
    except OSError as exc:
        raise ImageError(f"{where(path)}: cannot read image: {exc}") from None
    if not head:
        raise ImageError(f"{where(path)}: image file is empty")
    if head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        return "dicom"
    return "raster"


def _to_l(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit "L"; 16/32-bit integer images are scaled by their own min..max."""
    if image.mode == "L":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        return Image.fromarray(_scale_to_uint8(array), "L")
    if image.mode in ("LA", "RGBA", "PA", "P"):
        image = image.convert("RGBA" if image.mode in ("P", "PA") else image.mode)
    return image.convert("L")


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    low, high = float(np.min(array)), float(np.max(array))
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.clip(np.rint((array - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)


def dicom_to_uint8(dataset) -> np.ndarray:  # noqa: ANN001 - a pydicom Dataset
    """Pixel data of a DICOM dataset as uint8 (rows, columns), display-ready: modality LUT, VOI LUT
    or window, scaling of 12-16 bit values to 0..255, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    pixels = dataset.pixel_array
    if pixels.ndim == 3 and dataset.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]  # multi-frame: the first frame
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if pixels.ndim == 3:  # colour: luminance
        return np.asarray(Image.fromarray(pixels.astype(np.uint8)).convert("L"))
    values = apply_modality_lut(pixels, dataset)
    if values.dtype.kind == "f" and np.array_equal(values, np.round(values)):
        # An integer rescale (slope 1, integer intercept): keep integers, which a VOI LUT indexes.
        values = values.astype(np.int64)
    if "VOILUTSequence" in dataset or "WindowCenter" in dataset:
        values = apply_voi_lut(values, dataset, index=0)
    scaled = _scale_to_uint8(values)
    if photometric == "MONOCHROME1":
        scaled = 255 - scaled
    return scaled


def decode_dicom(path: str | os.PathLike) -> Image.Image:
    """Decode a DICOM file to an 8-bit "L" image (see `dicom_to_uint8`)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    dataset = None
    try:
        dataset = pydicom.dcmread(path)
        array = dicom_to_uint8(dataset)
    except (
        InvalidDicomError,
        AttributeError,
        KeyError,
        ValueError,
        EOFError,
        OSError,
        RuntimeError,
        TypeError,
        NotImplementedError,
    ) as exc:
        hint = ""
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        if syntax is not None and getattr(syntax, "is_compressed", False):
            hint = (
                f" (compressed transfer syntax {syntax.name}: install a pydicom pixel-data plugin such as "
                "pylibjpeg with pylibjpeg-libjpeg/pylibjpeg-openjpeg)"
            )
        raise ImageError(f"{where(path)}: cannot decode DICOM: {type(exc).__name__}: {exc}{hint}") from None
    return Image.fromarray(array, "L")


def verify(path: str | os.PathLike) -> None:
    """Check that an image decodes, as cheaply as possible (JPEG: entropy-decoded at 1/8 scale,
    which still reads every byte). Raises ImageError naming the path otherwise."""
    preprocess(path, max_edge=32)


def decode(path: str | os.PathLike) -> Image.Image:
    """Decode an image file at full size to 8-bit grayscale "L"."""
    return preprocess(path, max_edge=None, max_pixels=None)


def preprocess(
    path: str | os.PathLike, max_edge: int | None = 1024, max_pixels: int | None = None
) -> Image.Image:
    """Decode `path` (JPEG, PNG or DICOM) to 8-bit grayscale "L", resized to fit `max_edge` /
    `max_pixels` with the aspect ratio kept. Raises ImageError naming the path when the file is
    missing, truncated or corrupt."""
    path = Path(path)
    if _kind(path) == "dicom":
        image = decode_dicom(path)
        size = target_size(image.width, image.height, max_edge, max_pixels)
        return image if size == image.size else image.resize(size, RESAMPLE)
    try:
        with Image.open(path) as source:
            size = target_size(source.width, source.height, max_edge, max_pixels)
            if source.format == "JPEG" and (size != source.size or source.mode == "RGB"):
                # DCT-domain downscale to the smallest power-of-two reduction that is still >= size;
                # colour JPEGs are decoded straight to luma.
                source.draft("L" if source.mode in ("L", "RGB") else source.mode, size)
            source.load()
            image = _to_l(source)
            orientation = source.getexif().get(0x0112) if source.format == "JPEG" else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{where(path)}: cannot decode image: {exc}") from None
    if orientation in _TRANSPOSE:
        image = image.transpose(_TRANSPOSE[orientation])
        if orientation >= 5:  # rotated by 90 degrees: the target swaps too
            size = (size[1], size[0])
    if image.size != size:
        image = image.resize(size, RESAMPLE)
    return image


def preprocess_many(
    paths: Iterable[str | os.PathLike],
    max_edge: int | None = 1024,
    max_pixels: int | None = None,
    workers: int | None = None,
) -> Iterator[Image.Image]:
    """`preprocess` every path on `workers` threads (default: one per core), yielding the images in
    input order.

    Pillow releases the GIL inside the JPEG decoder and the resampler, so threads scale with cores
    without the pickling cost of processes. At most 2 x workers images are in flight: memory stays
    flat however long `paths` is (it may be a generator). The first unreadable file raises its
    ImageError when its turn comes; images after it are not yielded.

    >>> for image in preprocess_many(paths, max_edge=1024):  # doctest: +SKIP
    ...     image.save(...)
    """
    workers = workers or os.cpu_count() or 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    pending: deque[Future[Image.Image]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="preprocess") as pool:
        try:
            for path in paths:
                pending.append(pool.submit(preprocess, path, max_edge, max_pixels))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # an error or an abandoned generator: drop what has not started
            for future in pending:
                future.cancel()


# EXIF orientation -> the transpose that makes the image upright.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    """Encode a PIL image as baseline JPEG bytes (grayscale stays one channel)."""
    if image.mode not in ("L", "RGB"):
        image = image.convert("L")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def to_data_url(jpeg_bytes: bytes) -> str:
    """A ``data:image/jpeg;base64,...`` URL for an OpenAI-style image_url content part (PNG bytes
    get ``image/png``)."""
    mime = "image/png" if jpeg_bytes[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(jpeg_bytes).decode('ascii')}"


class ImageCache:
    """Preprocessed JPEG bytes cached on disk, keyed by the source file (path, size, mtime) and the
    preprocessing settings, so each image is decoded and resized once across runs and workers.

    Files are written atomically (temporary file + os.replace): concurrent writers are safe."""

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        max_edge: int | None = 1024,
        max_pixels: int | None = None,
        quality: int = 90,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.max_edge = max_edge
        self.max_pixels = max_pixels
        self.quality = quality
        self.hits = 0
        self.misses = 0

    def key(self, path: str | os.PathLike) -> str:
        """The cache key of an image under the current settings."""
        path = Path(path)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise ImageError(f"{where(path)}: image file not found") from None
        parts = [
            _CACHE_VERSION,
            str(path.resolve()),
            str(stat.st_size),
            str(stat.st_mtime_ns),
            str(self.max_edge),
            str(self.max_pixels),
            str(self.quality),
        ]
        return hashlib.sha256("\x00".join(parts).encode()).hexdigest()

    def path_for(self, path: str | os.PathLike) -> Path:
        """Where the cached JPEG of `path` lives (whether or not it exists yet)."""
        key = self.key(path)
        return self.cache_dir / key[:2] / f"{key}.jpg"

    def jpeg(self, path: str | os.PathLike) -> bytes:
        """The preprocessed JPEG bytes of `path`, from the cache or made now and cached."""
        cached = self.path_for(path)
        try:
            data = cached.read_bytes()
            self.hits += 1
            return data
        except FileNotFoundError:
            pass
        data = encode_jpeg(preprocess(path, self.max_edge, self.max_pixels), self.quality)
        cached.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".jpg", dir=cached.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(tmp, cached)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.misses += 1
        return data

    def data_url(self, path: str | os.PathLike) -> str:
        """`to_data_url` of the cached JPEG."""
        return to_data_url(self.jpeg(path))
