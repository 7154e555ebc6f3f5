"""The one format sniffer: what a user's file holds, decided from its first bytes.

Content wins over the name (gzip data is decompressed whatever the suffix, Parquet is Parquet whatever
the suffix); the suffix decides only between text formats. Text is UTF-8 (a byte-order mark dropped) or
UTF-16 or UTF-32 with its byte-order mark; other encodings are never guessed, and the error says where the first
bad byte is."""

from __future__ import annotations

import gzip
import io
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cxrmax.core.errors import InputError, where

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")


def detect_format(path: Path) -> str:
    """Format name from the suffix (``.gz`` stripped)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    suffix = suffixes[-1].lstrip(".") if suffixes else ""
    if suffix == "ndjson":
        return "jsonl"
    if suffix == "pq":
        return "parquet"
    if suffix not in FORMATS:
        raise InputError(
            f"{where(path)}: unknown submission format {suffix!r}; use one of .csv, .tsv, .jsonl, .json, .parquet"
        )
    return suffix


GZIP_MAGIC = b"\x1f\x8b"
#: Compressions the standard library reads, by their magic bytes.
COMPRESSIONS = {GZIP_MAGIC: "gzip", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
PARQUET_MAGIC = b"PAR1"
ZIP_MAGIC = b"PK\x03\x04"
#: What a file is, by its magic bytes, when it is an archive or a compression other than gzip: for
#: errors that name it (a CSV reader that takes plain or gzip text only).
NOT_GZIP_TEXT = {
    ZIP_MAGIC: "a ZIP archive (an Excel .xlsx workbook is one too)",
    b"BZh": "bzip2-compressed",
    b"\xfd7zXZ\x00": "xz-compressed",
    ZSTD_MAGIC: "zstd-compressed",
    PARQUET_MAGIC: "a Parquet file",
}
# Leading bytes of the raster formats Pillow reads: a file that starts with one of them is decoded
# as a raster image whatever its name says (a PNG saved as .dcm, a JPEG saved as .png).
RASTER_MAGIC = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",  # little-endian
    b"MM\x00*": "TIFF",  # big-endian
    b"BM": "BMP",
    b"\x00\x00\x00\x0cjP  \r\n": "JPEG 2000",  # JP2
    b"\xffO\xffQ": "JPEG 2000",  # codestream
}


def raster_format(head: bytes) -> str | None:
    """The raster image format a file's first bytes announce, or None."""
    for magic, name in RASTER_MAGIC.items():
        if head.startswith(magic):
            return name
    return "WebP" if head.startswith(b"RIFF") and head[8:12] == b"WEBP" else None


#: Largest single CSV field / JSON entry accepted (a longer one is almost always an unbalanced quote).
MAX_FIELD_CHARS = 64 << 20


@dataclass(frozen=True)
class FileKind:
    """What a submission file holds, from its first bytes (and its name where the bytes do not say)."""

    format: str
    compression: str | None  # gzip | bz2 | xz | None
    encoding: str = "utf-8-sig"

    @property
    def compressed(self) -> bool:
        """True when the bytes are decompressed while reading."""
        return self.compression is not None


def open_binary(path: Path, compression: str | None) -> IO[bytes]:
    """Open ``path`` for reading bytes, decompressing gzip/bz2/xz data."""
    if compression == "gzip":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if compression == "bz2":
        import bz2

        return bz2.open(path, "rb")  # type: ignore[return-value]
    if compression == "xz":
        return lzma.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def sniff(path: Path) -> FileKind:
    """Decide the format from the content first: gzip data is decompressed whatever the suffix,
    Parquet is Parquet whatever the suffix; otherwise the suffix (``.gz`` stripped) decides. Text
    is UTF-8 (a byte-order mark dropped), or UTF-16 (Excel's "Unicode text") or UTF-32 with its
    byte-order mark."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
        compression = next((name for magic, name in COMPRESSIONS.items() if head.startswith(magic)), None)
        if compression:
            with open_binary(path, compression) as fh:
                head = fh.read(4096)
    except PermissionError:
        raise InputError(f"{where(path)}: permission denied (cannot read the submission file)") from None
    except (OSError, EOFError, lzma.LZMAError) as exc:  # a compressed stream cut inside its first block
        raise InputError(f"{where(path)}: cannot read the file (truncated or corrupt?): {exc}") from None
    if head.startswith(PARQUET_MAGIC):
        if compression:
            raise InputError(f"{where(path)}: a {compression}-compressed Parquet file; decompress it first")
        return FileKind("parquet", None)
    if head.startswith(ZIP_MAGIC):
        raise InputError(
            f"{where(path)}: this is a ZIP archive (an Excel .xlsx workbook?); export it as CSV (UTF-8) or unzip it"
        )
    if head.startswith(ZSTD_MAGIC):
        raise InputError(f"{where(path)}: zstd-compressed; decompress it (or use gzip, bzip2 or xz)")
    fmt = detect_format(path)
    if fmt == "parquet":
        return FileKind(fmt, compression)
    # UTF-32's little-endian mark begins with UTF-16's: test it first.
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return FileKind(fmt, compression, "utf-32")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return FileKind(fmt, compression, "utf-16")
    if b"\x00" in head:
        if head[1::2].count(0) > len(head) // 4 or head[0::2].count(0) > len(head) // 4:
            raise InputError(
                f"{where(path)}: UTF-16 text without a byte-order mark; save the file as UTF-8 (Excel: 'CSV UTF-8')"
            )
        line = head.count(b"\n", 0, head.index(0)) + 1
        raise InputError(f"{where(path)} line {line}: binary data, not a text submission")
    return FileKind(fmt, compression)


def open_text(path: Path, kind: FileKind | None = None) -> IO[str]:
    """Open as text in the sniffed encoding (a byte-order mark is dropped), gzip data decompressed."""
    kind = kind or sniff(path)
    return io.TextIOWrapper(open_binary(path, kind.compression), encoding=kind.encoding, newline="")


def decode_error_message(path: Path, kind: FileKind) -> str:
    """Find the first line that is not UTF-8 (a second pass, only after decoding failed) and say
    where it is and what to do."""
    if kind.encoding != "utf-8-sig":
        return f"{where(path)}: not valid {kind.encoding} text (it starts with a {kind.encoding} byte-order mark)"
    with open_binary(path, kind.compression) as raw:
        for line_number, line in enumerate(raw, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = line[exc.start : exc.start + 1]
                if b"\x00" in line or sum(b < 9 for b in line[:512]) > 2:
                    return f"{where(path)} line {line_number}: binary data, not a text submission"
                return (
                    f"{where(path)} line {line_number}: not UTF-8 text (byte 0x{bad.hex()} at character "
                    f"{exc.start + 1}); cxrmax reads UTF-8 only and does not guess encodings: re-save the file "
                    "as UTF-8 (Excel: 'CSV UTF-8'; it was probably written as Latin-1/Windows-1252)"
                )
    return f"{where(path)}: not UTF-8 text"
