"""Reader for the MIMIC-CXR releases: MIMIC-CXR-JPG 2.0.0/2.1.0 and the MIMIC-CXR DICOM layout.

What it reads (gzipped or plain CSVs at the root, found by name):

* ``mimic-cxr-2.0.0-metadata.csv``  one row per image (dicom_id, subject_id, study_id, ViewPosition,
  Rows, Columns, StudyDate, StudyTime, ...)
* ``mimic-cxr-2.0.0-split.csv``     dicom_id, study_id, subject_id, split (train | validate | test)
* ``mimic-cxr-2.0.0-chexpert.csv`` / ``mimic-cxr-2.0.0-negbio.csv``  one row per study: subject_id,
  study_id and the 14 observations coded 1 / 0 / -1 / blank (kept as float32 1.0 / 0.0 / -1.0 / null)
* ``mimic-cxr-2.1.0-test-set-labeled.csv`` (2.1.0) radiologist labels of the test studies: no
  subject_id, "Airspace Opacity" for "Lung Opacity" (names are mapped through
  `pathologies.canonical_name`, never by position)
* ``cxr-record-list.csv`` (DICOM release; marks the DICOM layout)
* reports ``files/pXX/pSUBJECT/sSTUDY.txt`` (under the root, or under ``reports_root``), split into
  sections by `cxrmax.mimic.reports.parse_report`
* images ``files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg`` (or ``.dcm``)

Everything tabular stays columnar: CSVs are read with `pyarrow.csv`, validated with `pyarrow.compute`
and joined with Arrow joins; selecting from the full 377,110-image metadata opens no image and reads
only the reports of the selected studies.

Bad input raises `cxrmax.core.errors.InputError` naming the file, row (1-based data row) and field; with
``lenient=True`` the offending row is skipped instead and counted in `MimicCXR.skipped`.

Selection rules (`MimicCXR.select`):

* ``views``: ViewPosition values (case-insensitive), or the groups ``frontal`` (PA, AP) and
  ``lateral`` (LATERAL, LL, XTABLE LATERAL); other values (LAO, RAO, AP AXIAL,
  SWIMMERS, LPO, empty...) are kept and selectable by name.
* ``require_positive``: the study has at least one of the 13 findings (not "No Finding") labelled 1
  in the chosen label source.
* ``one_per_study``: one image per study, preferring PA, then AP, then other views, then the lowest
  dicom_id.
* ``k`` with ``seed``: the k studies with the smallest splitmix64 hash of (study_id, seed): the same
  sample on every machine and for any row order, and the sample for a smaller k is a subset of the
  sample for a larger k.
* ``shard=(i, n)``: studies whose splitmix64 hash of study_id is i modulo n, applied after sampling,
  so the n shards partition the selection exactly and every image of a study lands in one shard.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import os
import re
import tempfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from cxrmax.core.errors import InputError, where
from cxrmax.core.pathologies import FINDINGS, MS_CXR_T_FINDINGS, OBSERVATIONS, canonical_name, is_observation
from cxrmax.core.schemas import LABELS_TYPE, SELECTION_SCHEMA
from cxrmax.core.shards import parse_shard
from cxrmax.mimic.reports import ReportSections, decode_report, parse_report

__all__ = [
    "SPLITS",
    "FRONTAL_VIEWS",
    "LATERAL_VIEWS",
    "LABEL_SOURCES",
    "MimicCXR",
    "read_ms_cxr_t",
    "read_selection",
    "write_selection",
    "read_subject_ids",
    "detect_layout",
    "report_relpath",
    "image_relpath",
]

SPLITS: tuple[str, ...] = ("train", "validate", "test")
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP")
LATERAL_VIEWS: tuple[str, ...] = ("LATERAL", "LL", "XTABLE LATERAL")  # cross-table lateral too
LABEL_SOURCES: dict[str, str] = {
    "chexpert": "mimic-cxr-2.0.0-chexpert.csv",
    "negbio": "mimic-cxr-2.0.0-negbio.csv",
    "test-set-labeled": "mimic-cxr-2.1.0-test-set-labeled.csv",
}
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
RECORD_LIST_CSV = "cxr-record-list.csv"
#: How the DICOM release ships its reports (files/pXX/pSUBJECT/sSTUDY.txt inside); read in place.
REPORTS_ZIP = "mimic-cxr-reports.zip"
_SPLIT_ALIASES = {"val": "validate", "valid": "validate", "validation": "validate", "dev": "validate"}
_VIEW_RANK = {"PA": 0, "AP": 1}
_LABEL_PATTERN = r"^\s*-?[01](\.0*)?\s*$"
_BLANK_LABEL_PATTERN = r"^\s*((?i:nan|none|null))?\s*$"  # how pandas & co. write a blank cell
_INT_PATTERN = r"^\s*\d+(\.0*)?\s*$"  # "3056.0": pandas writes an int column with a gap as floats
_LABEL_VALUES = pa.array([1.0, 0.0, -1.0], pa.float32())
_FLOAT_PATTERN = r"^\s*-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"


# --------------------------------------------------------------------------------------------------
# Paths and layout
# --------------------------------------------------------------------------------------------------


def report_relpath(subject_id: int, study_id: int) -> str:
    """Relative path of a study's report: ``files/pXX/pSUBJECT/sSTUDY.txt``."""
    return f"files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}.txt"


def image_relpath(subject_id: int, study_id: int, dicom_id: str, extension: str = ".jpg") -> str:
    """Relative path of an image: ``files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg``."""
    return f"files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}/{dicom_id}{extension}"


def _find_csv(root: Path, name: str) -> Path | None:
    """The gzipped or plain CSV called `name` (``x.csv``) under root, or None.

    Copies are often renamed or moved: when the release name is absent, the same file under
    another version prefix or none ("mimic-cxr-2.1.0-metadata.csv", "metadata.csv.gz") is accepted,
    at the root or in one folder below it (not files/ or a pXX folder). Several such candidates are
    an error, and so is one inside a folder that has its own files/: that folder is the release root
    (the root given is the folder above it)."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    stem = re.sub(r"^mimic-cxr-\d+(\.\d+)*-", "", name)
    pattern = re.compile(rf"(mimic-cxr-(\d+(\.\d+)*-)?)?{re.escape(stem)}(\.gz)?", re.IGNORECASE)
    try:
        folders = [root] + sorted(
            (
                entry
                for entry in root.iterdir()
                if entry.is_dir() and entry.name != "files" and not re.fullmatch(r"p\d\d", entry.name)
            ),
            key=lambda entry: entry.name,
        )
    except OSError:
        return None
    for folder in folders:
        try:
            found = sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_file())
        except OSError:
            continue
        if len(found) > 1:
            raise InputError(
                f"{where(root / name)}: missing, and several files could stand for it: "
                f"{', '.join(str(p) for p in found)} (keep one, or give it the release name)"
            )
        if found and folder != root and (folder / "files").is_dir() and not (root / "files").is_dir():
            raise InputError(
                f"{where(root)}: not the release root, but {folder} is (it has {found[0].name} and files/): "
                "pass that folder"
            )
        if found:
            return found[0]
    return None


def detect_layout(root: str | os.PathLike) -> str:
    """ "jpg" (MIMIC-CXR-JPG) or "dicom" (MIMIC-CXR): the first image file found under files/
    decides (stops there: cheap on the full release); without images, the DICOM release's
    cxr-record-list.csv(.gz) means DICOM. Images come first because a common copy is
    MIMIC-CXR-JPG's images with the DICOM release's record lists and reports dropped beside them.
    Raises InputError for a root with neither CSVs nor images."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{where(root)}: MIMIC-CXR root is not a directory")
    files = root / "files"
    if files.is_dir():
        stack = [files]
        while stack:
            folder = stack.pop()
            try:
                entries = sorted(os.scandir(folder), key=lambda e: e.name)
            except OSError:
                continue
            for entry in entries:
                if entry.is_dir():
                    stack.append(Path(entry.path))
                elif entry.name.endswith(".dcm"):
                    return "dicom"
                elif entry.name.endswith((".jpg", ".jpeg")):
                    return "jpg"
    if _find_csv(root, RECORD_LIST_CSV) is not None:
        return "dicom"
    if _find_csv(root, METADATA_CSV) is not None:
        return "jpg"
    hint = ""
    if root.name == "files" or re.fullmatch(r"p\d\d", root.name):
        hint = "; this looks like a folder inside the release: pass the folder that holds files/"
    raise InputError(
        f"{where(root)}: not a MIMIC-CXR root: no {METADATA_CSV}(.gz), no {RECORD_LIST_CSV}(.gz) and no "
        f"images under files/{hint}"
    )


# --------------------------------------------------------------------------------------------------
# CSV reading and columnar validation
# --------------------------------------------------------------------------------------------------


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == b"\x1f\x8b"


def _read_raw_header(path: Path) -> list[str]:
    """The header's column names as written (BOM dropped, surrounding spaces kept)."""
    opener = gzip.open if _is_gzip(path) else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:  # type: ignore[operator]
            first = handle.readline()
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


def _read_header(path: Path) -> list[str]:
    """The header's column names, stripped of surrounding spaces ("dicom_id, subject_id")."""
    return [name.strip() for name in _read_raw_header(path)]


_DOWNLOAD_HINT = " (a truncated or corrupt file? compare it with the release's SHA256SUMS.txt)"


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


def _read_csv(
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


def _check_columns(path: Path, header: list[str], required: Iterable[str]) -> None:
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
class _Validator:
    """Collects bad rows of one CSV: raises on the first in strict mode, marks them in lenient mode."""

    path: Path
    table: pa.Table
    lenient: bool
    skipped: Counter
    bad: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.bad = np.zeros(self.table.num_rows, dtype=bool)

    def flag(self, mask: pa.Array | pa.ChunkedArray, field_name: str, problem: str, reason: str) -> None:
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
        return ~self.bad


# --------------------------------------------------------------------------------------------------
# Hashing, sharding, subject lists
# --------------------------------------------------------------------------------------------------


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64: a fixed, platform-independent hash of integer ids."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _seeded_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    salt = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return _mix64(ids.astype(np.uint64) ^ salt)


def read_subject_ids(path: str | os.PathLike) -> set[int]:
    """Subject ids from a file: a CSV with a subject_id column (e.g. the MS-CXR-T CSV), or one id
    per line (blank lines and lines starting with # ignored)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where(path)}: subject list not found")
    header = _read_header(path)
    if "subject_id" in header:
        table = _read_csv(path, ["subject_id"])
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
    with opener(path, "rt") as handle:  # type: ignore[operator]
        for number, line in enumerate(handle, start=1):
            value = line.strip()
            if not value or value.startswith("#"):
                continue
            value = value.lstrip("p")  # accept folder names like p10000032
            if not value.isdigit():
                raise InputError(f"{where(path, row=number)}: not a subject id ({line.strip()!r})")
            ids.add(int(value))
    return ids


# --------------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------------


class MimicCXR:
    """A MIMIC-CXR(-JPG) root. CSVs are read lazily on first use and kept as Arrow tables.

    >>> mimic = MimicCXR("/data/mimic-cxr-jpg/2.1.0")            # doctest: +SKIP
    >>> table = mimic.select(splits=["train"], views=["frontal"], k=1000, seed=0)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike,
        lenient: bool = False,
        *,
        reports_root: str | os.PathLike | None = None,
        layout: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.lenient = lenient
        self.reports_root = Path(reports_root) if reports_root is not None else self.root
        if self.reports_root.name == "files" and not (self.reports_root / "files").is_dir():
            self.reports_root = self.reports_root.parent  # "--reports-root .../files": the folder above
        self.layout = layout or detect_layout(self.root)
        if self.layout not in ("jpg", "dicom"):
            raise InputError(f"unknown layout {self.layout!r}; expected jpg or dicom")
        self.image_extension = ".dcm" if self.layout == "dicom" else ".jpg"
        self.version = "2.1.0" if _find_csv(self.root, LABEL_SOURCES["test-set-labeled"]) else "2.0.0"
        #: Lenient-mode skips: "<file>: <reason>" -> rows skipped.
        self.skipped: Counter = Counter()
        self._images: pa.Table | None = None
        self._index: pa.Table | None = None
        self._labels: dict[str, pa.Table] = {}
        self._label_reads: dict[str, Future] = {}
        self._reports_in_zip = self.reports_root.is_file()  # reports_root may be the reports zip
        self._reports_zip: zipfile.ZipFile | None = None
        self._reports_zip_index: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"MimicCXR({str(self.root)!r}, layout={self.layout!r}, version={self.version!r})"

    def _read_table(
        self, path: Path, columns: Sequence[str], types: dict[str, pa.DataType] | None = None
    ) -> pa.Table:
        """`_read_csv`; when lenient, rows with a wrong number of fields are skipped and counted."""
        ragged: list | None = [] if self.lenient else None
        table = _read_csv(path, columns, types, ragged)
        if ragged:
            self.skipped[f"{path.name}: wrong number of fields"] += len(ragged)
        return table

    def _require_csv(self, name: str) -> Path:
        path = _find_csv(self.root, name)
        if path is None:
            hint = ""
            if self.layout == "dicom" and name in (METADATA_CSV, SPLIT_CSV):
                hint = "; the DICOM release has no view/split CSVs: copy MIMIC-CXR-JPG's CSVs next to files/"
            raise InputError(f"{where(self.root / name)}: missing (looked for {name}.gz and {name}){hint}")
        return path

    # ---- images ------------------------------------------------------------------------------

    def images(self) -> pa.Table:
        """One row per image: dicom_id, subject_id, study_id, split, view, study_date, study_time,
        rows, columns, image_path (relative to the root). Metadata joined with the split CSV; ids
        that disagree between the two are errors (or counted skips when lenient)."""
        if self._images is None:
            index = self._image_index()
            self._images = index.append_column("image_path", self._image_paths(index))
        return self._images

    def _image_index(self) -> pa.Table:
        """`images()` without image_path (built only for the rows a selection keeps)."""
        if self._index is None:
            self._index = self._load_images()
        return self._index

    def _image_paths(self, table: pa.Table) -> pa.ChunkedArray:
        subject = pc.cast(table.column("subject_id"), pa.string())
        return pc.binary_join_element_wise(
            "files/p",
            pc.utf8_slice_codeunits(subject, 0, 2),
            "/p",
            subject,
            "/s",
            pc.cast(table.column("study_id"), pa.string()),
            "/",
            table.column("dicom_id"),
            self.image_extension,
            "",
        )

    def _load_images(self) -> pa.Table:
        meta_path = self._require_csv(METADATA_CSV)
        header = _read_header(meta_path)
        needed = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
        _check_columns(meta_path, header, needed)
        split_path = self._require_csv(SPLIT_CSV)
        split_header = _read_header(split_path)
        _check_columns(split_path, split_header, ["dicom_id", "study_id", "subject_id", "split"])
        # Gzip decompression is single-threaded: read the split CSV on a second core meanwhile.
        with ThreadPoolExecutor(max_workers=1) as pool:
            split_future = pool.submit(
                self._read_table,
                split_path,
                ["dicom_id", "study_id", "subject_id", "split"],
                {"study_id": pa.int64(), "subject_id": pa.int64()},
            )
            self._prefetch_labels(pool)  # queued after the split CSV: selections attach labels
            return self._join_images(meta_path, header, split_path, split_future)

    def _join_images(
        self, meta_path: Path, header: list[str], split_path: Path, split_future: Future
    ) -> pa.Table:
        needed = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
        optional = [c for c in ("StudyDate", "StudyTime", "Rows", "Columns") if c in header]
        raw = self._read_table(
            meta_path,
            needed + optional,
            {
                "subject_id": pa.int64(),
                "study_id": pa.int64(),
                "StudyDate": pa.int64(),
                "StudyTime": pa.float64(),
                "Rows": pa.int64(),
                "Columns": pa.int64(),
            },
        )
        if raw.num_rows == 0:
            raise InputError(f"{where(meta_path)}: no data rows")
        check = _Validator(meta_path, raw, self.lenient, self.skipped)
        dicom_id = check.text("dicom_id", trim=True)
        subject_id = check.integer("subject_id")
        study_id = check.integer("study_id")
        view = pc.utf8_upper(pc.utf8_trim_whitespace(raw.column("ViewPosition")))
        view = pc.if_else(pc.equal(view, ""), pa.scalar(None, pa.string()), view)  # " " is empty too
        nulls = pa.nulls(raw.num_rows)
        study_date = (
            check.integer("StudyDate", required=False) if "StudyDate" in optional else nulls.cast(pa.int64())
        )
        study_time = check.number("StudyTime") if "StudyTime" in optional else nulls.cast(pa.float64())
        rows = check.integer("Rows", required=False) if "Rows" in optional else nulls.cast(pa.int64())
        columns = (
            check.integer("Columns", required=False) if "Columns" in optional else nulls.cast(pa.int64())
        )
        check.duplicates(dicom_id, "dicom_id", "dicom_id")
        meta_clean = not check.bad.any()
        meta = pa.table(
            {
                "dicom_id": dicom_id,
                "subject_id": subject_id,
                "study_id": study_id,
                "view": view,
                "study_date": study_date,
                "study_time": study_time,
                "rows": rows,
                "columns": columns,
                "_meta_row": pa.array(np.arange(1, raw.num_rows + 1)),
            }
        ).filter(pa.array(check.keep()))
        # A study belongs to one subject.
        studies_np = meta.column("study_id").to_numpy()
        subjects_np = meta.column("subject_id").to_numpy()
        order = np.lexsort((subjects_np, studies_np))
        same_study = studies_np[order][1:] == studies_np[order][:-1]
        clash = same_study & (subjects_np[order][1:] != subjects_np[order][:-1])
        if clash.any():
            conflict_ids = np.unique(studies_np[order][1:][clash])
            bad_study = int(conflict_ids[0])
            bad_rows = meta.filter(pc.equal(meta.column("study_id"), bad_study))
            if not self.lenient:
                raise InputError(
                    f"{where(meta_path, row=max(bad_rows.column('_meta_row').to_pylist()), field='subject_id')}: "
                    f"study {bad_study} appears with subjects {sorted(set(bad_rows.column('subject_id').to_pylist()))}"
                )
            conflict = pa.table({"study_id": pa.array(conflict_ids)})
            dropped = pc.is_in(meta.column("study_id"), conflict.column("study_id"))
            self.skipped[f"{meta_path.name}: study with several subjects"] += int(pc.sum(dropped).as_py())
            meta = meta.filter(pc.invert(dropped))

        raw_split = split_future.result()
        check = _Validator(split_path, raw_split, self.lenient, self.skipped)
        split_values = pc.utf8_lower(pc.utf8_trim_whitespace(check.text("split")))
        for alias, split_name in _SPLIT_ALIASES.items():  # "val", "valid", "validation", "dev"
            split_values = pc.if_else(pc.equal(split_values, alias), split_name, split_values)
        check.flag(
            pc.invert(pc.is_in(split_values, pa.array(SPLITS))),
            "split",
            f"split is not one of {', '.join(SPLITS)}",
            "unknown split",
        )
        split_dicom = check.text("dicom_id", trim=True)
        if not (meta_clean and split_dicom.equals(dicom_id)):  # same ids, same order as clean metadata
            check.duplicates(split_dicom, "dicom_id", "dicom_id")
        split = pa.table(
            {
                "dicom_id": split_dicom,
                "split_study_id": check.integer("study_id"),
                "split_subject_id": check.integer("subject_id"),
                "split": split_values,
                "_split_row": pa.array(np.arange(1, raw_split.num_rows + 1)),
            }
        ).filter(pa.array(check.keep()))

        if meta.num_rows == split.num_rows and meta.column("dicom_id").equals(split.column("dicom_id")):
            # The release lists images in the same order in both files: no hash join needed.
            joined = meta
            for name in ("split_study_id", "split_subject_id", "split", "_split_row"):
                joined = joined.append_column(name, split.column(name))
        else:
            joined = meta.join(split, keys="dicom_id", join_type="full outer", use_threads=True)
        no_meta = pc.is_null(joined.column("_meta_row"))
        no_split = pc.is_null(joined.column("_split_row"))
        disagree_study = pc.fill_null(
            pc.not_equal(joined.column("study_id"), joined.column("split_study_id")), False
        )
        disagree_subject = pc.fill_null(
            pc.not_equal(joined.column("subject_id"), joined.column("split_subject_id")), False
        )
        problems = [
            (
                no_meta,
                split_path,
                "_split_row",
                "dicom_id",
                f"image not listed in {meta_path.name}",
                "image not in metadata",
            ),
            (
                no_split,
                meta_path,
                "_meta_row",
                "dicom_id",
                f"image has no row in {split_path.name}",
                "image without split",
            ),
            (
                disagree_study,
                split_path,
                "_split_row",
                "study_id",
                f"study_id disagrees with {meta_path.name}",
                "ids disagree",
            ),
            (
                disagree_subject,
                split_path,
                "_split_row",
                "subject_id",
                f"subject_id disagrees with {meta_path.name}",
                "ids disagree",
            ),
        ]
        drop = np.zeros(joined.num_rows, dtype=bool)
        for mask, path, row_column, field_name, problem, reason in problems:
            values = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
            if not values.any():
                continue
            first = int(np.flatnonzero(values)[0])
            if not self.lenient:
                row = joined.column(row_column)[first].as_py()
                raise InputError(
                    f"{where(path, row=row, field=field_name)}: {problem} (dicom_id {joined.column('dicom_id')[first].as_py()})"
                )
            self.skipped[f"{path.name}: {reason}"] += int((values & ~drop).sum())
            drop |= values
        if drop.any():
            joined = joined.filter(pa.array(~drop))
        if not _sorted_by_subject_study_dicom(joined):  # the release is; a copy is only made when not
            joined = joined.sort_by(
                [("subject_id", "ascending"), ("study_id", "ascending"), ("dicom_id", "ascending")]
            )
        joined = self._check_one_split_per_study(joined, split_path)
        return pa.table(
            {
                "dicom_id": joined.column("dicom_id"),
                "subject_id": joined.column("subject_id"),
                "study_id": joined.column("study_id"),
                "split": joined.column("split"),
                "view": joined.column("view"),
                "study_date": joined.column("study_date"),
                "study_time": joined.column("study_time"),
                "rows": joined.column("rows"),
                "columns": joined.column("columns"),
            }
        )

    def _check_one_split_per_study(self, joined: pa.Table, split_path: Path) -> pa.Table:
        """A study's images share one split (the release splits by patient). A hand-made split CSV
        that puts a study's PA in train and its lateral in test would leak the study across splits:
        an error naming the split row, or (lenient) all of that study's images are dropped."""
        if joined.num_rows < 2:
            return joined
        study = joined.column("study_id").to_numpy()
        split = joined.column("split")
        same_study = study[1:] == study[:-1]
        if not same_study.any():
            return joined
        differs = pc.fill_null(pc.not_equal(split.slice(1), split.slice(0, len(split) - 1)), False)
        clash = same_study & np.asarray(differs.to_numpy(zero_copy_only=False), dtype=bool)
        if not clash.any():
            return joined
        first = int(np.flatnonzero(clash)[0]) + 1
        if not self.lenient:
            bad_study = int(study[first])
            splits = sorted(set(split.filter(pc.equal(joined.column("study_id"), bad_study)).to_pylist()))
            raise InputError(
                f"{where(split_path, row=joined.column('_split_row')[first].as_py(), field='split')}: "
                f"study {bad_study} has images in {' and '.join(splits)} (a study belongs to one split)"
            )
        dropped = pc.is_in(joined.column("study_id"), pa.array(np.unique(study[1:][clash])))
        self.skipped[f"{split_path.name}: study in several splits"] += int(pc.sum(dropped).as_py())
        return joined.filter(pc.invert(dropped))

    def studies(self) -> pa.Table:
        """One row per study: study_id, subject_id, split, n_images (sorted by subject, study)."""
        images = self._image_index()  # sorted by subject, study: a study's images are contiguous
        study = images.column("study_id").to_numpy()
        if len(study) == 0:
            return pa.table(
                {
                    "study_id": pa.array([], pa.int64()),
                    "subject_id": pa.array([], pa.int64()),
                    "split": pa.array([], pa.string()),
                    "n_images": pa.array([], pa.int64()),
                }
            )
        starts = np.flatnonzero(np.r_[True, study[1:] != study[:-1]])
        counts = np.diff(np.r_[starts, len(study)])
        index = pa.array(starts)
        return pa.table(
            {
                "study_id": images.column("study_id").take(index),
                "subject_id": images.column("subject_id").take(index),
                "split": images.column("split").take(index),
                "n_images": pa.array(counts, pa.int64()),
            }
        )

    # ---- labels ------------------------------------------------------------------------------

    def study_labels(self, splits: Iterable[str] | None = None, source: str = "chexpert") -> pa.Table:
        """Study-level labels: study_id, subject_id, split and one float32 column per observation
        (1.0 / 0.0 / -1.0, null = blank). `source`: "chexpert", "negbio" or "test-set-labeled"
        (2.1.0 radiologist labels; subject_id and split filled in from the metadata). Only studies
        with a label row are returned."""
        if source not in LABEL_SOURCES:
            raise InputError(f"unknown label source {source!r}; expected one of {', '.join(LABEL_SOURCES)}")
        if source not in self._labels:
            self._labels[source] = self._load_labels(source)
        table = self._labels[source]
        if splits is not None:
            table = table.filter(pc.is_in(table.column("split"), pa.array(_normalize_splits(splits))))
        return table

    def _label_plan(self, source: str) -> tuple[Path, dict[str, str], list[str], dict[str, pa.DataType]]:
        """Check a label CSV's header: (path, canonical -> header name, columns to read, their types)."""
        path = self._require_csv(LABEL_SOURCES[source])
        header = _read_header(path)
        needs_subject = source != "test-set-labeled"
        _check_columns(path, header, ["subject_id", "study_id"] if needs_subject else ["study_id"])
        label_columns: dict[str, str] = {}  # canonical -> header spelling
        for name in header:
            if name in ("subject_id", "study_id") or name == "":
                continue
            if not is_observation(name):
                # A misspelt observation is an error; other extra columns of users' copies (a
                # pandas index "Unnamed: 0", dicom_id, split, Path...) are not labels: ignored.
                near = difflib.get_close_matches(name.lower(), [o.lower() for o in OBSERVATIONS], 1, 0.8)
                if near:
                    raise InputError(
                        f"{where(path, field=name)}: unknown label column (expected the 14 observations; "
                        f"did you mean {OBSERVATIONS[[o.lower() for o in OBSERVATIONS].index(near[0])]!r}?)"
                    )
                continue
            canonical = canonical_name(name)
            if canonical in label_columns:
                raise InputError(f"{where(path, field=name)}: observation {canonical!r} appears twice")
            label_columns[canonical] = name
        missing = [o for o in OBSERVATIONS if o not in label_columns]
        if missing:
            raise InputError(
                f"{where(path, field=missing[0])}: missing label column (missing: {', '.join(missing)})"
            )
        id_columns = ["subject_id", "study_id"] if needs_subject else ["study_id"]
        types = {name: pa.int64() for name in id_columns} | {
            name: pa.float32() for name in label_columns.values()
        }
        return path, label_columns, id_columns + list(label_columns.values()), types

    def _prefetch_labels(self, pool: ThreadPoolExecutor, source: str = "chexpert") -> None:
        """Start reading a label CSV in the background; problems surface when the labels are used."""
        try:
            path, _, columns, types = self._label_plan(source)
        except InputError:
            return
        self._label_reads[source] = pool.submit(self._read_table, path, columns, types)

    def _load_labels(self, source: str) -> pa.Table:
        path, label_columns, columns, types = self._label_plan(source)
        needs_subject = source != "test-set-labeled"
        prefetched = self._label_reads.pop(source, None)
        raw = prefetched.result() if prefetched is not None else self._read_table(path, columns, types)
        check = _Validator(path, raw, self.lenient, self.skipped)
        study_id = check.integer("study_id")
        data: dict[str, pa.ChunkedArray | pa.Array] = {"study_id": study_id}
        if needs_subject:
            data["label_subject_id"] = check.integer("subject_id")
        for canonical in OBSERVATIONS:
            data[canonical] = check.label(label_columns[canonical])
        check.duplicates(study_id, "study_id", "study_id")
        data["_row"] = pa.array(np.arange(1, raw.num_rows + 1))
        labels = pa.table(data).filter(pa.array(check.keep()))

        studies = self.studies().select(["study_id", "subject_id", "split"])
        joined = labels.join(studies, keys="study_id", join_type="left outer")
        unknown = pc.is_null(joined.column("subject_id"))
        problems = [(unknown, "study_id", f"study not in {METADATA_CSV}", "study not in metadata")]
        if needs_subject:
            disagree = pc.fill_null(
                pc.not_equal(joined.column("subject_id"), joined.column("label_subject_id")), False
            )
            problems.append(
                (disagree, "subject_id", f"subject_id disagrees with {METADATA_CSV}", "ids disagree")
            )
        drop = np.zeros(joined.num_rows, dtype=bool)
        for mask, field_name, problem, reason in problems:
            values = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
            if not values.any():
                continue
            first = int(np.flatnonzero(values)[0])
            if not self.lenient:
                raise InputError(
                    f"{where(path, row=joined.column('_row')[first].as_py(), field=field_name)}: {problem} "
                    f"(study_id {joined.column('study_id')[first].as_py()})"
                )
            self.skipped[f"{path.name}: {reason}"] += int((values & ~drop).sum())
            drop |= values
        joined = joined.filter(pa.array(~drop)).sort_by(
            [("subject_id", "ascending"), ("study_id", "ascending")]
        )
        return joined.select(["study_id", "subject_id", "split", *OBSERVATIONS])

    # ---- reports -----------------------------------------------------------------------------

    def report_path(self, subject_id: int, study_id: int) -> Path:
        """Where the report of a study lives (under `reports_root`)."""
        return self.reports_root / report_relpath(subject_id, study_id)

    def report_text(self, subject_id: int, study_id: int) -> str | None:
        """The raw report text, or None when the study has no report. Read from
        ``files/pXX/pSUBJECT/sSTUDY.txt`` under `reports_root`, else from the DICOM release's
        mimic-cxr-reports.zip (`reports_root` itself, or that file inside it) without unpacking."""
        path = self.report_path(subject_id, study_id)
        if not self._reports_in_zip:
            try:
                return decode_report(path.read_bytes())
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise InputError(f"{where(path)}: cannot read report: {exc}") from None
        index = self._report_archive_index()
        if not index:
            return None
        member = index.get(f"p{subject_id}/s{study_id}.txt")
        if member is None:
            return None
        assert self._reports_zip is not None
        try:
            return decode_report(self._reports_zip.read(member))
        except (OSError, zipfile.BadZipFile, zlib.error) as exc:
            raise InputError(f"{where(self._reports_zip.filename)}: cannot read {member}: {exc}") from None

    def _report_archive_index(self) -> dict[str, str]:
        """ "pSUBJECT/sSTUDY.txt" -> member name of the reports zip (empty when there is none)."""
        if self._reports_zip_index is None:
            archive = self.reports_root if self._reports_in_zip else self.reports_root / REPORTS_ZIP
            self._reports_zip_index = {}
            if archive.is_file():
                try:
                    self._reports_zip = zipfile.ZipFile(archive)
                except (OSError, zipfile.BadZipFile) as exc:
                    raise InputError(f"{where(archive)}: not a readable zip of reports: {exc}") from None
                for name in self._reports_zip.namelist():
                    parts = name.rstrip("/").split("/")
                    if len(parts) >= 2 and parts[-1].endswith(".txt"):
                        self._reports_zip_index[f"{parts[-2]}/{parts[-1]}"] = name
        return self._reports_zip_index

    def report(self, subject_id: int, study_id: int) -> ReportSections | None:
        """The parsed report of a study, or None when it has no report file."""
        text = self.report_text(subject_id, study_id)
        return None if text is None else parse_report(text)

    # ---- selection ---------------------------------------------------------------------------

    def select(
        self,
        splits: Iterable[str] | None = None,
        views: Iterable[str] | None = None,
        require_positive: bool = False,
        k: int | None = None,
        seed: int = 0,
        shard: str | tuple[int, int] | None = None,
        exclude_subjects: Iterable[int] | str | os.PathLike | None = None,
        one_per_study: bool = True,
        *,
        source: str = "chexpert",
        with_reports: bool = True,
        check_files: bool = True,
        verify_images: bool = False,
    ) -> pa.Table:
        """Select images (see the module docstring for the rules) as a table with
        `shards.SELECTION_SCHEMA`, sorted by subject, study, dicom_id. Opens no image: with
        `check_files` it only checks that the selected images exist (a missing one is an error,
        or a counted skip when lenient); `verify_images` decodes each selected image (cheaply) so
        corrupt files are found now rather than mid-generation; with `with_reports` it reads the
        selected studies' reports."""
        table = self._image_index()
        table = table.append_column("_order", pa.array(np.arange(table.num_rows)))
        if splits is not None:
            table = table.filter(pc.is_in(table.column("split"), pa.array(_normalize_splits(splits))))
        if views is not None:
            wanted = _normalize_views(views)
            table = table.filter(pc.is_in(table.column("view"), pa.array(sorted(wanted), pa.string())))
        if exclude_subjects is not None:
            if isinstance(exclude_subjects, (str, os.PathLike)):
                exclude_subjects = read_subject_ids(exclude_subjects)
            excluded = pa.array(sorted({int(s) for s in exclude_subjects}), pa.int64())
            table = table.filter(pc.invert(pc.is_in(table.column("subject_id"), excluded)))
        if require_positive:
            labels = self.study_labels(source=source)
            positive = np.zeros(labels.num_rows, dtype=bool)
            for name in FINDINGS:
                positive |= np.asarray(
                    pc.fill_null(pc.equal(labels.column(name), 1.0), False).to_numpy(), dtype=bool
                )
            table = table.filter(
                pc.is_in(table.column("study_id"), labels.column("study_id").filter(pa.array(positive)))
            )
        # images() is sorted by subject, study, dicom_id: its row number is a deterministic tie-break
        # that costs no string comparisons.
        order = table.column("_order").to_numpy()
        if one_per_study and table.num_rows:
            views_np = table.column("view").fill_null("").to_numpy(zero_copy_only=False)
            rank = np.where(
                views_np == "PA", 0, np.where(views_np == "AP", 1, np.where(views_np == "", 3, 2))
            )
            study = table.column("study_id").to_numpy()
            by_study = np.lexsort((order, rank, study))
            first = np.ones(len(by_study), dtype=bool)
            first[1:] = study[by_study][1:] != study[by_study][:-1]
            keep = np.zeros(table.num_rows, dtype=bool)
            keep[by_study[first]] = True
            table = table.filter(pa.array(keep))
            order = table.column("_order").to_numpy()
        if k is not None:
            if k < 0:
                raise InputError(f"k must be >= 0, got {k}")
            key = _seeded_hash(table.column("study_id").to_numpy(), seed)
            chosen = np.lexsort((order, key))[:k]
            mask = np.zeros(table.num_rows, dtype=bool)
            mask[chosen] = True
            table = table.filter(pa.array(mask))
        study_ids = table.column("study_id").to_numpy()
        parsed_shard = parse_shard(shard)
        if parsed_shard is not None:
            index, count = parsed_shard
            in_shard = (_mix64(study_ids) % np.uint64(count)) == np.uint64(index)
            table = table.filter(pa.array(in_shard))
        table = table.sort_by("_order").drop_columns(["_order"])
        table = table.append_column("image_path", self._image_paths(table))
        if check_files or verify_images:
            table = self._check_images_exist(table)
        if verify_images:
            table = self._verify_images(table)
        return self._attach(table, source=source, with_reports=with_reports)

    def _check_images_exist(self, table: pa.Table) -> pa.Table:
        paths = table.column("image_path").to_pylist()
        present = np.array([(self.root / p).is_file() for p in paths], dtype=bool)
        if present.all():
            return table
        first = int(np.flatnonzero(~present)[0])
        if not self.lenient:
            raise InputError(
                f"{where(self.root / paths[first])}: image listed in {METADATA_CSV} (dicom_id "
                f"{table.column('dicom_id')[first].as_py()}) but absent"
            )
        self.skipped["images: listed but absent"] += int((~present).sum())
        return table.filter(pa.array(present))

    def _verify_images(self, table: pa.Table) -> pa.Table:
        """Decode every selected image cheaply; corrupt ones are errors (lenient: counted skips)."""
        from cxrmax.mimic.images import ImageError, verify

        keep = np.ones(table.num_rows, dtype=bool)
        for index, relative in enumerate(table.column("image_path").to_pylist()):
            try:
                verify(self.root / relative)
            except ImageError:
                if not self.lenient:
                    raise
                keep[index] = False
        if not keep.all():
            self.skipped["images: corrupt or undecodable"] += int((~keep).sum())
            table = table.filter(pa.array(keep))
        return table

    def _attach(self, table: pa.Table, source: str, with_reports: bool) -> pa.Table:
        """Add the labels struct and report sections; cast to SELECTION_SCHEMA."""
        try:
            labels = self.study_labels(source=source)
        except InputError:
            if _find_csv(self.root, LABEL_SOURCES[source]) is not None:
                raise
            labels = None  # a release without this label file: labels stay null
        if labels is not None and table.num_rows:
            label_part = labels.select(["study_id", *OBSERVATIONS])
            order_column = pa.array(np.arange(table.num_rows))
            joined = (
                table.select(["study_id"])
                .append_column("_order", order_column)
                .join(label_part, keys="study_id", join_type="left outer")
                .sort_by("_order")
            )
            struct = pa.StructArray.from_arrays(
                [joined.column(name).combine_chunks().cast(pa.float32()) for name in OBSERVATIONS],
                fields=list(LABELS_TYPE),
            )
        else:
            struct = pa.nulls(table.num_rows, LABELS_TYPE)
        findings: list[str | None] = []
        impressions: list[str | None] = []
        last: list[str | None] = []
        if with_reports:
            cache: dict[int, ReportSections | None] = {}
            missing = 0
            for subject_id, study_id in zip(
                table.column("subject_id").to_pylist(), table.column("study_id").to_pylist(), strict=True
            ):
                if study_id not in cache:
                    cache[study_id] = self.report(subject_id, study_id)
                    missing += cache[study_id] is None
                sections = cache[study_id]
                findings.append(sections.findings if sections else None)
                impressions.append(sections.impression if sections else None)
                last.append(sections.last_paragraph if sections else None)
            if missing:
                self.skipped["reports: missing (sections left null)"] += missing
        else:
            findings = impressions = last = [None] * table.num_rows
        return pa.table(
            {
                "sample_id": table.column("dicom_id"),
                "dicom_id": table.column("dicom_id"),
                "subject_id": table.column("subject_id"),
                "study_id": table.column("study_id"),
                "split": table.column("split"),
                "view": table.column("view"),
                "image_path": table.column("image_path"),
                "study_date": table.column("study_date"),
                "study_time": table.column("study_time"),
                "labels": struct,
                "findings": pa.array(findings, pa.string()),
                "impression": pa.array(impressions, pa.string()),
                "last_paragraph": pa.array(last, pa.string()),
            },
            schema=SELECTION_SCHEMA,
        )

    # ---- summary -----------------------------------------------------------------------------

    def summary(
        self,
        reports: bool = True,
        source: str = "chexpert",
        progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Counts for `cxrmax mimic summary`: studies/images/subjects per split, subjects whose
        studies fall in more than one split (a train/test leak), images per split and view, label prevalence (1/0/-1/blank and studies without a label row), report coverage.
        `progress(done, total)` is called while reports are parsed (227,835 files on the release)."""
        images = self._image_index()
        studies = self.studies()
        result: dict = {"root": str(self.root), "layout": self.layout, "version": self.version}
        per_split = {}
        for split in SPLITS:
            part = images.filter(pc.equal(images.column("split"), split))
            per_split[split] = {
                "images": part.num_rows,
                "studies": pc.count_distinct(part.column("study_id")).as_py() if part.num_rows else 0,
                "subjects": pc.count_distinct(part.column("subject_id")).as_py() if part.num_rows else 0,
            }
        result["splits"] = per_split
        # The release splits by patient; a subject in two splits leaks between train and test.
        spread = images.group_by("subject_id").aggregate([("split", "count_distinct")])
        leaking = spread.filter(pc.greater(spread.column("split_count_distinct"), 1))
        result["subjects_in_several_splits"] = sorted(leaking.column("subject_id").to_pylist())
        views = images.group_by(["split", "view"]).aggregate([("dicom_id", "count")])
        result["views"] = {
            (row["split"], row["view"] or ""): row["dicom_id_count"] for row in views.to_pylist()
        }
        try:
            labels = self.study_labels(source=source)
        except InputError:
            if _find_csv(self.root, LABEL_SOURCES[source]) is not None:
                raise
            labels = None
        if labels is not None:
            prevalence = {}
            for name in OBSERVATIONS:
                column = labels.column(name)
                prevalence[name] = {
                    "1": int(pc.sum(pc.equal(column, 1.0)).as_py() or 0),
                    "0": int(pc.sum(pc.equal(column, 0.0)).as_py() or 0),
                    "-1": int(pc.sum(pc.equal(column, -1.0)).as_py() or 0),
                    "blank": int(column.null_count),
                }
            result["labels"] = {
                "source": source,
                "studies_with_labels": labels.num_rows,
                "studies_without_labels": studies.num_rows - labels.num_rows,
                "prevalence": prevalence,
            }
        if reports:
            coverage = Counter()
            for done, (subject_id, study_id) in enumerate(
                zip(
                    studies.column("subject_id").to_pylist(),
                    studies.column("study_id").to_pylist(),
                    strict=True,
                )
            ):
                if progress is not None and done % 1000 == 0:
                    progress(done, studies.num_rows)
                sections = self.report(subject_id, study_id)
                if sections is None:
                    coverage["missing"] += 1
                    continue
                coverage["reports"] += 1
                coverage["findings"] += sections.findings is not None
                coverage["impression"] += sections.impression is not None
                coverage["both"] += sections.findings is not None and sections.impression is not None
                coverage["last_paragraph_only"] += sections.findings is None and sections.impression is None
                coverage["addenda"] += bool(sections.addenda)
            result["reports"] = {
                "studies": studies.num_rows,
                **{
                    k: coverage[k]
                    for k in (
                        "reports",
                        "findings",
                        "impression",
                        "both",
                        "last_paragraph_only",
                        "addenda",
                        "missing",
                    )
                },
            }
        result["skipped"] = dict(self.skipped)
        return result


def _sorted_by_subject_study_dicom(table: pa.Table) -> bool:
    """Whether rows are already ordered by (subject_id, study_id, dicom_id): integer checks with
    numpy, string comparisons only between neighbours of the same study."""
    if table.num_rows < 2:
        return True
    subject = table.column("subject_id").to_numpy()
    study = table.column("study_id").to_numpy()
    step_subject, step_study = np.diff(subject), np.diff(study)
    if (step_subject < 0).any():
        return False
    same_subject = step_subject == 0
    if (step_study[same_subject] < 0).any():
        return False
    ties = np.flatnonzero(same_subject & (step_study == 0))
    if ties.size == 0:
        return True
    dicom = table.column("dicom_id")
    return bool(pc.all(pc.less_equal(dicom.take(pa.array(ties)), dicom.take(pa.array(ties + 1)))).as_py())


def _normalize_splits(splits: Iterable[str]) -> list[str]:
    if isinstance(splits, str):
        splits = [splits]
    result = []
    for split in splits:
        value = _SPLIT_ALIASES.get(split.strip().lower(), split.strip().lower())
        if value not in SPLITS:
            raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        result.append(value)
    return result


def _normalize_views(views: Iterable[str]) -> set[str]:
    if isinstance(views, str):
        views = [views]
    wanted: set[str] = set()
    for view in views:
        value = view.strip().upper()
        if value == "FRONTAL":
            wanted.update(FRONTAL_VIEWS)
        elif value in ("LATERAL", "LATERALS"):
            wanted.update(LATERAL_VIEWS)
        elif value:
            wanted.add(value)
    return wanted


# --------------------------------------------------------------------------------------------------
# Selection manifests
# --------------------------------------------------------------------------------------------------


def write_selection(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write a selection manifest atomically: Parquet for ``.parquet``, Arrow IPC for ``.arrow`` /
    ``.feather``. The table is cast to `shards.SELECTION_SCHEMA` first."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".parquet", ".arrow", ".feather"):
        raise InputError(f"{where(path)}: selection manifests end in .parquet, .arrow or .feather")
    table = _conform(table, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            pq.write_table(table, tmp)
        else:
            import pyarrow.feather as feather

            feather.write_feather(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_selection(path: str | os.PathLike) -> pa.Table:
    """Read a selection manifest written by `write_selection` (or any Parquet/Arrow file with the
    SELECTION_SCHEMA columns) as a table with exactly SELECTION_SCHEMA."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where(path)}: selection manifest not found")
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
        else:
            import pyarrow.feather as feather

            table = feather.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{where(path)}: not a readable Parquet/Arrow file: {exc}") from None
    return _conform(table, path)


def _conform(table: pa.Table, path: Path) -> pa.Table:
    missing = [f.name for f in SELECTION_SCHEMA if f.name not in table.column_names]
    if missing:
        raise InputError(
            f"{where(path, field=missing[0])}: selection is missing columns {', '.join(missing)}"
        )
    table = table.select([f.name for f in SELECTION_SCHEMA])
    try:
        return table.cast(SELECTION_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as exc:
        raise InputError(f"{where(path)}: selection does not match SELECTION_SCHEMA: {exc}") from None


# --------------------------------------------------------------------------------------------------
# MS-CXR-T
# --------------------------------------------------------------------------------------------------

_PROGRESSION = ("improving", "stable", "worsening")
_QUALITY = ("one_expert", "multiple_experts", "disagreement")


def read_ms_cxr_t(path: str | os.PathLike) -> pa.Table:
    """Read the MS-CXR-T temporal image classification CSV: dicom_id, previous_dicom_id, study_id,
    previous_study_id, subject_id (int64) and per finding ``<f>_progression`` (improving | stable |
    worsening | null) and ``<f>_label_quality`` (one_expert | multiple_experts | disagreement | null).
    Column names and values are case-normalised; anything else is an InputError naming row and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where(path)}: MS-CXR-T CSV not found")
    header = _read_header(path)
    lowered = {name.strip().lower(): name for name in header}
    ids = ["dicom_id", "previous_dicom_id", "study_id", "previous_study_id", "subject_id"]
    finding_columns = [f"{f}_{kind}" for f in MS_CXR_T_FINDINGS for kind in ("progression", "label_quality")]
    missing = [name for name in ids + finding_columns if name not in lowered]
    if missing:
        raise InputError(f"{where(path, field=missing[0])}: missing column (missing: {', '.join(missing)})")
    raw = _read_csv(path, [lowered[name] for name in ids + finding_columns])
    raw = raw.rename_columns([name.strip().lower() for name in raw.column_names])
    check = _Validator(path, raw, lenient=False, skipped=Counter())
    data: dict[str, pa.ChunkedArray] = {
        "dicom_id": check.text("dicom_id"),
        "previous_dicom_id": check.text("previous_dicom_id"),
        "study_id": check.integer("study_id"),
        "previous_study_id": check.integer("previous_study_id"),
        "subject_id": check.integer("subject_id"),
    }
    for name in finding_columns:
        values = pc.utf8_lower(pc.utf8_trim_whitespace(raw.column(name)))
        values = pc.if_else(pc.fill_null(pc.equal(values, ""), True), pa.scalar(None, pa.string()), values)
        allowed = _PROGRESSION if name.endswith("_progression") else _QUALITY
        check.flag(
            pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, pa.array(allowed)))),
            name,
            f"value is not one of {', '.join(allowed)} or empty",
            "bad value",
        )
        data[name] = values
    return pa.table(data)
