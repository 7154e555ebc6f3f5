"""Reading and validating MIMIC-CXR's CSVs, column by column.

CSVs are read with `pyarrow.csv` and checked with `pyarrow.compute`: a clean column is parsed
straight to its type, and only a column with a bad cell is read again as strings so that the error
names the row (1-based data row) and field. In lenient mode the offending rows are marked and
counted instead (`Validator`)."""

from __future__ import annotations

import csv
import gzip
import os
import re
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from cxrmax.core.errors import InputError, where
from cxrmax.core.formats import NOT_GZIP_TEXT

__all__ = ["Validator", "check_columns", "read_csv", "read_header", "read_subject_ids"]

_LABEL_PATTERN = r"^\s*-?[01](\.0*)?\s*$"
_BLANK_LABEL_PATTERN = r"^\s*((?i:nan|none|null))?\s*$"  # how pandas & co. write a blank cell
# "3056.0": pandas writes an int column with a gap as floats. At most 18 digits: longer ones do not
# fit an int64 (no real id is near that; a pasted checksum or a cell run together with another is).
_INT_PATTERN = r"^\s*\d{1,18}(\.0*)?\s*$"
_LABEL_VALUES = pa.array([1.0, 0.0, -1.0], pa.float32())
_FLOAT_PATTERN = r"^\s*-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_DOWNLOAD_HINT = " (a truncated or corrupt file? compare it with the release's SHA256SUMS.txt)"


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


_MAX_HEADER_BYTES = 1 << 20


def _refuse_other_containers(path: Path) -> None:
    """An InputError for a file that is an archive or another compression, not a (gzip) CSV."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
    except OSError:
        return  # the reader names the problem
    for magic, what in NOT_GZIP_TEXT.items():
        if head.startswith(magic):
            raise InputError(
                f"{where(path)}: {what}, not a CSV or a gzip-compressed CSV: extract the CSV "
                "(and gzip it or not) under this name"
            )


def _locate_non_utf8(path: Path, raw_columns: Sequence[str]) -> tuple[int, str, bytes] | None:
    """(1-based data row, column, the bad bytes) of the first cell of `raw_columns` that is not
    UTF-8; only called once pyarrow has refused the file, to name the row."""
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:  # type: ignore[operator]
            reader = csv.reader(handle)
            header = next(reader)
            wanted = [(index, name) for index, name in enumerate(header) if name in raw_columns]
            for number, row in enumerate(reader, start=1):
                for index, name in wanted:
                    cell = row[index] if index < len(row) else ""
                    if cell.isascii():
                        continue
                    try:
                        cell.encode("utf-8")
                    except UnicodeEncodeError as exc:
                        bad = cell[exc.start : exc.end].encode("utf-8", "surrogateescape")
                        return number, name.strip(), bad
    except (OSError, EOFError, csv.Error, zlib.error, StopIteration):
        return None
    return None


def _read_raw_header(path: Path) -> list[str]:
    """The header's column names as written (BOM dropped, surrounding spaces kept)."""
    _refuse_other_containers(path)
    opener = gzip.open if _is_gzip(path) else open
    try:
        # The first line only, as bytes: a text reader would decode a whole 8 KB chunk and blame
        # the header for a non-UTF-8 byte in a data row (those are named by row in `read_csv`).
        with opener(path, "rb") as handle:  # type: ignore[operator]
            first_bytes = handle.readline(_MAX_HEADER_BYTES)
        # A line ends at CR too (old Mac files, a stray CR), as in a text reader with newline="".
        first = re.split(rb"\r\n?|\n", first_bytes, maxsplit=1)[0].decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"{where(path)}: cannot read the CSV header: not UTF-8 text ({exc}); save it as UTF-8"
        ) from None
    except PermissionError as exc:
        raise InputError(f"{where(path)}: cannot read the CSV: {exc}") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{where(path)}: cannot read the CSV header: {exc}{_DOWNLOAD_HINT}") from None
    if not first.strip():
        raise InputError(f"{where(path, row=0)}: empty file (no CSV header)")
    if first.lstrip().lower().startswith(("<!doctype", "<html", "<?xml")):
        raise InputError(
            f"{where(path, row=0)}: an HTML/XML page, not a CSV (a download that got a login or error "
            "page? PhysioNet needs your credentials: wget --user USER --ask-password ...)"
        )
    return next(csv.reader([first]))


def read_header(path: Path) -> list[str]:
    """The header's column names, stripped of surrounding spaces ("dicom_id, subject_id")."""
    return [name.strip() for name in _read_raw_header(path)]


def _locate_ragged_row(path: Path) -> tuple[int, int, int] | None:
    """(1-based data row, fields expected, fields found) of the first row whose field count differs
    from the header's; only called once a parse has failed, to name the row."""
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as handle:  # type: ignore[operator]
            reader = csv.reader(handle)
            expected = len(next(reader))
            for number, row in enumerate(reader, start=1):
                if row and len(row) != expected:
                    return number, expected, len(row)
    except (OSError, EOFError, csv.Error, zlib.error):
        return None
    return None


def read_csv(
    path: Path,
    columns: Sequence[str],
    types: dict[str, pa.DataType] | None = None,
    skip_ragged: list | None = None,
) -> pa.Table:
    """Read `columns` (header names, matched with surrounding spaces stripped) of a CSV. With
    `types`, first try parsing those columns straight to their types (fast, little memory); if any
    cell does not parse, read everything as nullable strings so that validation can name the row
    and field. A row with the wrong number of fields is an error naming the row, or, when
    `skip_ragged` is a list, is skipped and appended to it (lenient mode)."""
    compression = "gzip" if _is_gzip(path) else None
    raw_names = {name.strip(): name for name in _read_raw_header(path)}
    raw_columns = [raw_names.get(name, name) for name in columns]
    missing = [name for name in columns if name not in raw_names]
    if missing:
        raise InputError(f"{where(path, field=missing[0])}: missing column")
    parse_options = pacsv.ParseOptions()
    if skip_ragged is not None:
        parse_options = pacsv.ParseOptions(invalid_row_handler=lambda row: skip_ragged.append(row) or "skip")
    attempts = [types, None] if types else [None]
    for attempt in attempts:
        column_types = {raw: pa.string() for raw in raw_columns} | {
            raw_names.get(name, name): kind for name, kind in (attempt or {}).items()
        }
        if skip_ragged is not None:
            skip_ragged.clear()  # a retry reads the file again
        try:
            with pa.input_stream(str(path), compression=compression) as stream:
                table = pacsv.read_csv(
                    stream,
                    read_options=pacsv.ReadOptions(block_size=1 << 24),
                    parse_options=parse_options,
                    convert_options=pacsv.ConvertOptions(
                        column_types=column_types,
                        include_columns=raw_columns,
                        strings_can_be_null=True,
                        null_values=[""],
                        quoted_strings_can_be_null=True,
                    ),
                )
            return table.rename_columns(list(columns)) if raw_columns != list(columns) else table
        except (pa.ArrowInvalid, pa.ArrowKeyError, OSError, EOFError) as exc:
            if attempt is not None and "conversion error" in str(exc):
                continue  # a cell that is not of its type: the string pass finds and names it
            if "invalid UTF8" in str(exc):
                located_cell = _locate_non_utf8(path, raw_columns)
                if located_cell is not None:
                    row, name, bad = located_cell
                    raise InputError(
                        f"{where(path, row=row, field=name)}: not UTF-8 text (bytes {bad!r}; "
                        "Latin-1 or Windows-1252?): save the file as UTF-8"
                    ) from None
            if "Expected" in str(exc) and "columns, got" in str(exc):
                located = _locate_ragged_row(path)
                if located is not None:
                    row, expected, found = located
                    raise InputError(
                        f"{where(path, row=row)}: {found} fields where the header has {expected} "
                        "(an unquoted comma, or a line cut short?)"
                    ) from None
            hint = _DOWNLOAD_HINT if isinstance(exc, (OSError, EOFError)) or "compress" in str(exc) else ""
            raise InputError(f"{where(path)}: cannot parse CSV: {exc}{hint}") from None
    raise AssertionError("unreachable")


def check_columns(path: Path, header: list[str], required: Iterable[str]) -> None:
    missing = [name for name in required if name not in header]
    if missing:
        numeric = sum(bool(re.fullmatch(r"-?\d+(\.\d*)?", name)) for name in header)
        hint = "; the first line looks like data: the header line is missing" if numeric >= 2 else ""
        raise InputError(
            f"{where(path, field=missing[0])}: missing column (missing: {', '.join(missing)}; header: "
            f"{', '.join(header)}){hint}"
        )


def _first_true(mask: pa.Array | pa.ChunkedArray) -> int | None:
    values = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
    hits = np.flatnonzero(values)
    return int(hits[0]) if hits.size else None


@dataclass
class Validator:
    """Collects bad rows of one CSV: raises on the first in strict mode, marks them in lenient mode."""

    path: Path
    table: pa.Table
    lenient: bool
    skipped: Counter
    bad: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.bad = np.zeros(self.table.num_rows, dtype=bool)

    def flag(self, mask: pa.Array | pa.ChunkedArray, field_name: str, problem: str, reason: str) -> None:
        """Mark the rows where `mask` is true: an InputError naming the first (strict) or counted skips."""
        values = np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)
        if not values.any():
            return
        first = int(np.flatnonzero(values)[0])
        if not self.lenient:
            value = (
                self.table.column(field_name)[first].as_py()
                if field_name in self.table.column_names
                else None
            )
            raise InputError(
                f"{where(self.path, row=first + 1, field=field_name)}: {problem} (value {value!r})"
            )
        fresh = int((values & ~self.bad).sum())
        if fresh:
            self.skipped[f"{self.path.name}: {reason}"] += fresh
        self.bad |= values

    def integer(self, name: str, required: bool = True) -> pa.ChunkedArray:
        """Column `name` as int64 ids ("3056.0" accepted); negative or non-integer cells are flagged."""
        column = self.table.column(name)
        if pa.types.is_integer(column.type):
            bad = pc.less(column, 0)
            if required:
                bad = pc.or_(pc.fill_null(bad, True), pc.is_null(column))
            self.flag(bad, name, "not a positive integer id", f"bad {name}")
            return column.cast(pa.int64())
        # Fast path: a clean column casts directly; only a failing one is scanned with a regex.
        try:
            values = pc.cast(column, pa.int64())
            bad = pc.less(values, 0)
            if required:
                bad = pc.or_(pc.fill_null(bad, True), pc.is_null(values))
            if not pc.any(bad).as_py():
                return values
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        valid = pc.match_substring_regex(column, _INT_PATTERN)
        if required:
            self.flag(pc.invert(pc.fill_null(valid, False)), name, "not a positive integer id", f"bad {name}")
        else:
            self.flag(pc.invert(pc.fill_null(valid, True)), name, "not an integer", f"bad {name}")
        digits = pc.replace_substring_regex(pc.utf8_trim_whitespace(column), r"\.0*$", "")
        cleaned = pc.if_else(pc.fill_null(valid, False), digits, None)
        return pc.cast(cleaned, pa.int64())

    def number(self, name: str) -> pa.ChunkedArray:
        """Column `name` as float64; cells that are not numbers are flagged."""
        column = self.table.column(name)
        if pa.types.is_floating(column.type) or pa.types.is_integer(column.type):
            return column.cast(pa.float64())
        try:
            return pc.cast(column, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        valid = pc.match_substring_regex(column, _FLOAT_PATTERN)
        self.flag(pc.invert(pc.fill_null(valid, True)), name, "not a number", f"bad {name}")
        cleaned = pc.if_else(pc.fill_null(valid, False), pc.utf8_trim_whitespace(column), None)
        return pc.cast(cleaned, pa.float64())

    def label(self, name: str) -> pa.ChunkedArray:
        """Column `name` as float32 labels 1 / 0 / -1 / null ("nan", "None" are blank); others flagged."""
        column = self.table.column(name)
        if pa.types.is_floating(column.type):
            column = pc.if_else(pc.is_nan(column), pa.scalar(None, column.type), column)  # "nan": blank
            self.flag(
                pc.and_(pc.is_valid(column), pc.invert(pc.is_in(column.cast(pa.float32()), _LABEL_VALUES))),
                name,
                "label value is not one of 1, 0, -1 or blank",
                "label value outside 1/0/-1/blank",
            )
            return column.cast(pa.float32())
        try:
            values = pc.cast(column, pa.float32())
            if not pc.any(pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, _LABEL_VALUES)))).as_py():
                return values
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
        blank = pc.fill_null(pc.match_substring_regex(column, _BLANK_LABEL_PATTERN), False)
        column = pc.if_else(blank, pa.scalar(None, pa.string()), column)
        valid = pc.match_substring_regex(column, _LABEL_PATTERN)
        self.flag(
            pc.invert(pc.fill_null(valid, True)),
            name,
            "label value is not one of 1, 0, -1 or blank",
            "label value outside 1/0/-1/blank",
        )
        cleaned = pc.if_else(pc.fill_null(valid, False), pc.utf8_trim_whitespace(column), None)
        return pc.cast(cleaned, pa.float32())

    def text(self, name: str, required: bool = True, trim: bool = False) -> pa.ChunkedArray:
        """Column `name` as strings; with `required`, empty cells are flagged."""
        column = self.table.column(name)  # empty cells are already null (read with null_values [""])
        if trim:  # ids copied from "a, b, c" files carry the space: it would end up in image paths
            column = pc.ascii_trim_whitespace(column)
            column = pc.if_else(pc.equal(column, ""), pa.scalar(None, pa.string()), column)
        if required:
            self.flag(pc.is_null(column), name, "empty", f"empty {name}")
        return column

    def duplicates(self, column: pa.ChunkedArray, field_name: str, what: str) -> None:
        """Flag rows whose (non-null) value already appeared in an earlier row."""
        valid = column.drop_null()
        if len(pc.unique(valid)) == len(valid):
            return  # the common case, without building row indices
        keys = pa.table({"key": column, "_i": pa.array(np.arange(len(column)))})
        firsts = keys.group_by(["key"], use_threads=False).aggregate([("_i", "min")])
        is_first = np.zeros(len(column), dtype=bool)
        is_first[firsts.column("_i_min").to_numpy()] = True
        nulls = np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        self.flag(pa.array(~is_first & ~nulls), field_name, f"duplicate {what}", f"duplicate {what}")

    def keep(self) -> np.ndarray:
        """The mask of rows nothing was flagged in."""
        return ~self.bad


def read_subject_ids(path: str | os.PathLike) -> set[int]:
    """Subject ids from a file: a CSV with a subject_id column (e.g. the MS-CXR-T CSV), or one id
    per line (blank lines and lines starting with # ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where(path)}: subject list not found")
    header = read_header(path)
    if "subject_id" in header:
        table = read_csv(path, ["subject_id"])
        column = table.column("subject_id")
        valid = pc.fill_null(pc.match_substring_regex(column, _INT_PATTERN), False)
        bad = _first_true(pc.invert(valid))
        if bad is not None:
            raise InputError(
                f"{where(path, row=bad + 1, field='subject_id')}: not an integer id ({column[bad].as_py()!r})"
            )
        digits = pc.replace_substring_regex(pc.utf8_trim_whitespace(column), r"\.0*$", "")  # "10000032.0"
        return set(pc.cast(digits, pa.int64()).to_pylist())
    ids: set[int] = set()
    opener = gzip.open if _is_gzip(path) else open
    number = 0
    try:
        with opener(path, "rb") as handle:  # type: ignore[operator]
            for number, raw in enumerate(handle, start=1):
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                value = line.strip()
                if not value or value.startswith("#"):
                    continue
                value = value.lstrip("p")  # accept folder names like p10000032
                if not (value.isascii() and value.isdigit()) or len(value) > 18:
                    raise InputError(f"{where(path, row=number)}: not a subject id ({line.strip()!r})")
                ids.add(int(value))
    except UnicodeDecodeError as exc:
        raise InputError(f"{where(path, row=number)}: not UTF-8 text ({exc}); save it as UTF-8") from None
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(f"{where(path)}: cannot read the subject list: {exc}{_DOWNLOAD_HINT}") from None
    return ids
