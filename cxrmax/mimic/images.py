"""Chest X-ray image decoding and preprocessing: JPEG / PNG / TIFF / DICOM to 8-bit grayscale,
resize, JPEG bytes and data URLs, with an on-disk cache.

* The kind comes from the file's first bytes ('DICM' at 128, raster magic numbers, a DICOM header
  without preamble); the name only breaks a tie, so a DICOM named .jpg or a PNG named .dcm decode.
* JPEG: when the target is at most half the source size, the decoder is asked for a DCT-domain
  downscale first (`PIL.Image.draft`, scale 1/2, 1/4 or 1/8, never below the target), then the
  image is resized exactly to the target. Decoding fewer coefficients is where the speed comes from.
* PNG / TIFF / other rasters: 8-bit as is; 16/32-bit and float scaled by their own finite min..max;
  colour, palette and alpha modes to luma. EXIF / TIFF orientation is applied (any format).
* DICOM: `cxrmax.mimic.dicom` (first frame; modality LUT, VOI LUT or window, MONOCHROME1 inverted, colour
  and palette to luma).
* Resize keeps the aspect ratio: longest edge <= `max_edge` and/or width*height <= `max_pixels`;
  images are never upscaled, never below 1x1. Resampling is Lanczos (antialiased).
* Many images: `preprocess_many` runs `preprocess` on a thread pool (Pillow releases the GIL while it
  decodes and resamples, so threads use every core), in input order, with a bounded number in flight.

Every failure raises `ImageError` (an InputError) naming the path and the reason: missing, empty,
a directory, not an image, truncated or corrupt, over the decompression-bomb limit (raster and DICOM
alike), a DICOM without pixel data (SR, RT plan, DICOMDIR: the SOP class is named), an invalid Image
Pixel element (named), or compressed pixel data whose pydicom decoder plugin is not installed (the
message says which packages to pip install).
"""

from __future__ import annotations

import base64
import hashlib
import io
import math
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxrmax.core.errors import ImageError, where
from cxrmax.core.formats import raster_format
from cxrmax.core.io import atomic_write_bytes
from cxrmax.mimic.dicom import decode_dicom, scale_to_uint8

__all__ = [
    "ImageError",
    "ImageCache",
    "decode",
    "encode_jpeg",
    "preprocess",
    "preprocess_many",
    "target_size",
    "to_data_url",
    "verify",
]

RESAMPLE = Image.Resampling.LANCZOS
_CACHE_VERSION = "1"


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


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble and 'DICM' marker (older or
    hand-made files): it starts with an element of group 0x0002 or 0x0008."""
    if head[0:2] in (b"\x02\x00", b"\x08\x00"):  # little endian
        return True
    vr = head[4:6]
    return head[0:2] in (b"\x00\x02", b"\x00\x08") and vr.isalpha() and vr.isupper()  # big endian


def _kind(path: Path) -> str:
    """ "dicom" or "raster", from the file's first bytes (its name only breaks a tie)."""
    try:
        if path.is_dir():
            raise ImageError(f"{where(path)}: is a directory, not an image file")
        with open(path, "rb") as handle:
            head = handle.read(132)
    except FileNotFoundError:
        raise ImageError(f"{where(path)}: image file not found") from None
    except OSError as exc:
        raise ImageError(f"{where(path)}: cannot read image: {exc.strerror or exc}") from None
    if not head:
        raise ImageError(f"{where(path)}: image file is empty (0 bytes)")
    if head[128:132] == b"DICM":
        return "dicom"
    if raster_format(head):
        return "raster"
    if path.suffix.lower() in (".dcm", ".dicom", ".dic") or _looks_like_bare_dicom(head):
        return "dicom"
    return "raster"


def _to_l(image: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit "L"; 16/32-bit integer and float images are scaled by their own
    min..max; colour, palette and alpha modes go through RGB(A) luminance."""
    if image.mode == "L":
        return image
    if image.mode.startswith(("I", "F")):  # I, I;16, I;16B, I;16L, I;16S, I;32..., F
        try:
            array = np.asarray(image, dtype=np.float64)
        except (TypeError, ValueError):  # a raw mode numpy cannot view: let Pillow widen it
            array = np.asarray(image.convert("I"), dtype=np.float64)
        return Image.fromarray(scale_to_uint8(array), "L")
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    try:
        return image.convert("L")
    except ValueError:  # LAB, HSV and the like convert to L only through RGB
        return image.convert("RGB").convert("L")


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
            if source.format == "TIFF":
                _take_over_tiff_orientation(source)
            size = target_size(source.width, source.height, max_edge, max_pixels)
            if source.format == "JPEG" and (size != source.size or source.mode == "RGB"):
                # DCT-domain downscale to the smallest power-of-two reduction that is still >= size;
                # colour JPEGs are decoded straight to luma.
                source.draft("L" if source.mode in ("L", "RGB") else source.mode, size)
            source.load()
            if source.format != "JPEG":
                # Some decoders (TIFF) apply the orientation tag while loading, which swaps the
                # size; the target follows the loaded image (JPEG: no draft-free size to read).
                size = target_size(source.width, source.height, max_edge, max_pixels)
            image = _to_l(source)
            orientation = getattr(source, "_cxrmax_orientation", None) or source.getexif().get(0x0112)
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{where(path)}: image too large to decode safely: {exc} "
            "(raise PIL.Image.MAX_IMAGE_PIXELS if the file is trusted)"
        ) from None
    except UnidentifiedImageError:
        with open(path, "rb") as handle:
            announced = raster_format(handle.read(16))
        if announced == "JPEG":  # Pillow reads 8-bit baseline and progressive JPEG only
            raise ImageError(
                f"{where(path)}: a JPEG that Pillow cannot decode: a 12-bit, lossless or arithmetic-"
                "coded variant, or a corrupt header"
            ) from None
        if announced:
            raise ImageError(
                f"{where(path)}: a {announced} file that Pillow cannot decode (unsupported variant "
                "or corrupt header)"
            ) from None
        raise ImageError(
            f"{where(path)}: not a recognised image file (JPEG, PNG, TIFF or DICOM expected)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - user data: whatever a decoder raises on a bad file
        raise ImageError(f"{where(path)}: cannot decode image: {type(exc).__name__}: {exc}") from None
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


def _take_over_tiff_orientation(source: Image.Image) -> None:
    """Stop Pillow from applying a TIFF's orientation tag itself: Pillow 13 garbles uncompressed
    TIFFs rotated by 90 degrees (orientation 5-8) when it does. The tag is kept on the image for
    `preprocess` to apply, like a JPEG's."""
    exif = source.getexif()
    orientation = exif.get(0x0112)
    if orientation not in _TRANSPOSE:
        return
    exif.pop(0x0112, None)
    getattr(source, "tag_v2", {}).pop(0x0112, None)
    tile_size = getattr(source, "_tile_size", None)
    if tile_size is not None:  # the size Pillow swapped in advance goes back to the stored one
        source._size = tuple(tile_size)
    source._cxrmax_orientation = orientation


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

    Files are written atomically (`cxrmax.core.io.atomic_write_bytes`): concurrent writers are safe."""

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
            resolved = path.resolve()
        except FileNotFoundError:
            raise ImageError(f"{where(path)}: image file not found") from None
        except (OSError, RuntimeError) as exc:  # a symlink loop, a name too long, no permission
            raise ImageError(
                f"{where(path)}: cannot read image: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        parts = [
            _CACHE_VERSION,
            str(resolved),
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
        # Not fsynced: a cache entry lost in a power cut is simply made again.
        atomic_write_bytes(cached, data, durable=False)
        self.misses += 1
        return data

    def data_url(self, path: str | os.PathLike) -> str:
        """`to_data_url` of the cached JPEG."""
        return to_data_url(self.jpeg(path))
