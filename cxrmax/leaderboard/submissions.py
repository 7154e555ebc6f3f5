"""Streaming submission readers and validation.

Formats (chosen by file suffix, optionally gzipped):
- ``.csv`` / ``.tsv``: header row, one row per study.
- ``.jsonl`` / ``.ndjson``: one JSON object per line.
- ``.parquet``: one row per study, read in record batches.
- ``.json``: ReXrank style, an object keyed by study_id whose values are objects with
  ``model_prediction`` (or plain strings), or an array of row objects. Parsed incrementally, so a
  large file never sits in memory whole.

Rows are keyed by ``study_id`` (8 digits, an ``s`` prefix is accepted). A row carries either one value
per observation (1 / 0 / -1 / blank, or a probability in [0, 1]), or free text (``report``,
``model_prediction``, ...), or, for MS-CXR-T, one progression answer per finding. Every problem is a
`cxrmax.errors.InputError` naming the file, the row (1-based data row; JSON entries count as rows)
and the field.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from cxrmax.errors import InputError, where
from cxrmax.pathologies import MS_CXR_T_FINDINGS, MS_CXR_T_SHORT, OBSERVATIONS, canonical_name, is_observation

BATCH_ROWS = 8192
KEY_COLUMNS = ("study_id", "study", "studyid")
TEXT_COLUMNS = (
    "model_prediction",
    "report",
    "text",
    "prediction",
    "generated_report",
    "generated",
    "answer",
    "rationale",
    "output",
)
MODEL_COLUMNS = ("model", "model_name", "source")
#: Columns a submission may carry that scoring does not use.
PASSTHROUGH_COLUMNS = frozenset(
    {
        "subject_id",
        "dicom_id",
        "sample_id",
        "split",
        "image_path",
        "previous_dicom_id",
        "previous_study_id",
        "view",
        "prompt",
        "prompt_id",
        "id",
    }
)
FORMATS = ("csv", "tsv", "jsonl", "json", "parquet")


def detect_format(path: Path) -> str:
    """Format name from the suffix (``.gz`` stripped)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
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


def _open_text(path: Path) -> IO[str]:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


@dataclass
class RawBatch:
    """One batch of raw rows: ``rows`` are 1-based data row numbers, ``columns`` map a column name to
    its values (Python values, or a pyarrow array for Parquet)."""

    rows: np.ndarray
    columns: dict[str, Any]

    def __len__(self) -> int:
        return len(self.rows)


def iter_batches(path: str | Path, batch_rows: int = BATCH_ROWS) -> Iterator[RawBatch]:
    """Stream a submission file as `RawBatch`es. Raises InputError for empty, truncated or malformed files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where(path)}: submission file not found")
    if path.stat().st_size == 0:
        raise InputError(f"{where(path)}: the file is empty")
    fmt = detect_format(path)
    produced = False
    try:
        if fmt in ("csv", "tsv"):
            source = _csv_batches(path, batch_rows, "\t" if fmt == "tsv" else ",")
        elif fmt == "jsonl":
            source = _jsonl_batches(path, batch_rows)
        elif fmt == "json":
            source = _json_batches(path, batch_rows)
        else:
            source = _parquet_batches(path, batch_rows)
        for batch in source:
            if len(batch):
                produced = True
                yield _expand_label_struct(batch, path)
    except (EOFError, gzip.BadGzipFile, UnicodeDecodeError, OSError) as exc:
        raise InputError(f"{where(path)}: cannot read the file (truncated or corrupt?): {exc}") from None
    if not produced:
        raise InputError(f"{where(path)}: no data rows")


#: A nested column of per-observation values (cxrmax's own tables use ``labels``, shards.LABELS_TYPE).
STRUCT_COLUMNS = ("labels", "predicted_labels")


def _expand_label_struct(batch: RawBatch, path: Path) -> RawBatch:
    """Flatten a ``labels`` struct (Parquet) or object (JSON) column into one column per field, so a
    table with shards.LABELS_TYPE scores like one with 14 observation columns."""
    name = next((c for c in batch.columns if c.strip().lower() in STRUCT_COLUMNS), None)
    if name is None:
        return batch
    values = batch.columns.pop(name)
    expanded: dict[str, Any] = {}
    if hasattr(values, "type"):
        import pyarrow as pa

        if not pa.types.is_struct(values.type):
            raise InputError(
                f"{where(path, field=name)}: expected a struct of observation values, got {values.type}"
            )
        # flatten() carries a null struct into its fields: every observation of that row is blank.
        for i, field_values in enumerate(values.flatten()):
            expanded[values.type.field(i).name] = field_values
    else:
        keys: list[str] = []
        for i, item in enumerate(values):
            if item is None:
                continue
            if not isinstance(item, dict):
                raise InputError(
                    f"{where(path, row=int(batch.rows[i]), field=name)}: expected an object of observation values"
                )
            keys += [k for k in item if k not in keys]
        for key in keys:
            expanded[key] = [None if item is None else item.get(key) for item in values]
    clash = [k for k in expanded if k in batch.columns]
    if clash:
        raise InputError(f"{where(path, field=clash[0])}: given both as a column and inside {name!r}")
    batch.columns.update(expanded)
    return batch


def _csv_batches(path: Path, batch_rows: int, delimiter: str) -> Iterator[RawBatch]:
    with _open_text(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{where(path)}: the file is empty") from None
        except csv.Error as exc:
            raise InputError(f"{where(path)}: cannot parse the header: {exc}") from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        if len(set(header)) != len(header):
            dup = next(h for h in header if header.count(h) > 1)
            raise InputError(f"{where(path, field=dup)}: column appears twice in the header")
        width = len(header)
        records: list[list[str]] = []
        rows: list[int] = []
        row_number = 0
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                raise InputError(
                    f"{where(path, row=row_number + 1)}: cannot parse CSV (truncated file or unbalanced quote?): {exc}"
                ) from None
            row_number += 1
            if len(record) != width:
                if not record or (len(record) == 1 and record[0] == "" and width > 1):
                    continue  # blank line
                raise InputError(
                    f"{where(path, row=row_number)}: {len(record)} fields where the header has {width} "
                    "(truncated file or stray delimiter?)"
                )
            records.append(record)
            rows.append(row_number)
            if len(records) >= batch_rows:
                yield _columns_batch(header, records, rows)
                records, rows = [], []
        yield _columns_batch(header, records, rows)


def _columns_batch(header: list[str], records: list[list[str]], rows: list[int]) -> RawBatch:
    columns = list(zip(*records, strict=True)) if records else [() for _ in header]
    return RawBatch(np.asarray(rows, dtype=np.int64), dict(zip(header, columns, strict=True)))


def _dict_batch(records: list[dict[str, Any]], rows: list[int], seen: list[str]) -> RawBatch:
    for record in records:
        for key in record:
            if key not in seen:
                seen.append(key)
    columns = {key: [record.get(key) for record in records] for key in seen}
    return RawBatch(np.asarray(rows, dtype=np.int64), columns)


def _jsonl_batches(path: Path, batch_rows: int) -> Iterator[RawBatch]:
    seen: list[str] = []
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    with _open_text(path) as fh:
        for row_number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                hint = " (truncated last line?)" if not line.endswith("\n") else ""
                raise InputError(f"{where(path, row=row_number)}: invalid JSON{hint}: {exc.msg}") from None
            if not isinstance(record, dict):
                raise InputError(f"{where(path, row=row_number)}: each line must be a JSON object")
            records.append(record)
            rows.append(row_number)
            if len(records) >= batch_rows:
                yield _dict_batch(records, rows, seen)
                records, rows = [], []
    yield _dict_batch(records, rows, seen)


class _JsonStream:
    """Incremental reader of a top-level JSON object or array: yields (key, value) pairs (key None for
    arrays) without loading the file. Values larger than `max_value_chars` are refused."""

    def __init__(self, fh: IO[str], path: Path, chunk: int = 1 << 20, max_value_chars: int = 64 << 20):
        self.fh, self.path, self.chunk, self.max_value_chars = fh, path, chunk, max_value_chars
        self.buf, self.pos, self.eof = "", 0, False
        self.decoder = json.JSONDecoder()

    def _more(self) -> None:
        data = self.fh.read(self.chunk)
        if not data:
            self.eof = True
        self.buf = self.buf[self.pos :] + data
        self.pos = 0

    def _skip_ws(self) -> bool:
        """Advance past whitespace; False at end of file."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in " \t\r\n":
                self.pos += 1
            if self.pos < len(self.buf):
                return True
            if self.eof:
                return False
            self._more()

    def _value(self, entry: int) -> Any:
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buf, self.pos)
                if end == len(self.buf) and not self.eof:
                    raise json.JSONDecodeError("value may continue", self.buf, end)
                self.pos = end
                return value
            except json.JSONDecodeError as exc:
                if self.eof:
                    raise InputError(
                        f"{where(self.path, row=entry)}: invalid or truncated JSON: {exc.msg}"
                    ) from None
                if len(self.buf) - self.pos > self.max_value_chars:
                    raise InputError(
                        f"{where(self.path, row=entry)}: invalid JSON or an entry over 64 MB"
                    ) from None
                self._more()

    def _expect(self, char: str, entry: int) -> None:
        if not self._skip_ws():
            raise InputError(f"{where(self.path, row=entry)}: truncated JSON (expected {char!r})")
        if self.buf[self.pos] != char:
            raise InputError(
                f"{where(self.path, row=entry)}: invalid JSON: expected {char!r}, found {self.buf[self.pos]!r}"
            )
        self.pos += 1

    def items(self) -> Iterator[tuple[str | None, Any]]:
        if not self._skip_ws():
            raise InputError(f"{where(self.path)}: the file is empty")
        opening = self.buf[self.pos]
        if opening not in "{[":
            raise InputError(
                f"{where(self.path)}: expected a JSON object keyed by study_id or an array of rows"
            )
        closing = "}" if opening == "{" else "]"
        self.pos += 1
        entry = 0
        while True:
            if not self._skip_ws():
                raise InputError(
                    f"{where(self.path, row=entry + 1)}: truncated JSON (file ends inside the top-level value)"
                )
            if self.buf[self.pos] == closing:
                self.pos += 1
                break
            if entry:
                self._expect(",", entry + 1)
                self._skip_ws()
            entry += 1
            key = None
            if opening == "{":
                key = self._value(entry)
                if not isinstance(key, str):
                    raise InputError(f"{where(self.path, row=entry)}: invalid JSON object key")
                self._expect(":", entry)
                self._skip_ws()
            yield key, self._value(entry)
        if self._skip_ws():
            raise InputError(f"{where(self.path)}: unexpected data after the top-level JSON value")


def _json_batches(path: Path, batch_rows: int) -> Iterator[RawBatch]:
    seen: list[str] = []
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    with _open_text(path) as fh:
        for entry, (key, value) in enumerate(_JsonStream(fh, path).items(), start=1):
            if key is not None:
                if isinstance(value, str) or value is None:
                    value = {"model_prediction": value}
                if not isinstance(value, dict):
                    raise InputError(
                        f"{where(path, row=entry, field=key)}: expected an object with model_prediction"
                    )
                if "study_id" in value and str(value["study_id"]) != key:
                    raise InputError(
                        f"{where(path, row=entry, field='study_id')}: {value['study_id']!r} differs from its key {key!r}"
                    )
                value = {"study_id": key, **{k: v for k, v in value.items() if k != "study_id"}}
            elif not isinstance(value, dict):
                raise InputError(f"{where(path, row=entry)}: each array element must be an object")
            records.append(value)
            rows.append(entry)
            if len(records) >= batch_rows:
                yield _dict_batch(records, rows, seen)
                records, rows = [], []
    yield _dict_batch(records, rows, seen)


def _parquet_batches(path: Path, batch_rows: int) -> Iterator[RawBatch]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{where(path)}: not a readable Parquet file (truncated?): {exc}") from None
    start = 1
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows):
            rows = np.arange(start, start + batch.num_rows, dtype=np.int64)
            start += batch.num_rows
            yield RawBatch(rows, {name: batch.column(i) for i, name in enumerate(batch.schema.names)})
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"{where(path, row=start)}: cannot read Parquet data (truncated?): {exc}") from None


# ---------------------------------------------------------------------------------------------------
# Column roles


@dataclass
class ColumnPlan:
    """What each submission column means."""

    key: str | None = None
    observations: dict[str, str] = field(default_factory=dict)  # source column -> observation
    text: str | None = None
    model: str | None = None
    progression: dict[str, str] = field(default_factory=dict)  # source column -> ms-cxr-t finding prefix
    ignored: list[str] = field(default_factory=list)


def _progression_prefix(name: str) -> str | None:
    low = name.strip().lower().replace(" ", "_")
    for suffix in ("_progression", "_answer"):
        if low.endswith(suffix):
            low = low[: -len(suffix)]
    for prefix, short in MS_CXR_T_SHORT.items():
        if low in (prefix, short.lower()):
            return prefix
    return None


def plan_columns(
    columns: Sequence[str], kind: str, path: Path, row: int | None = None, lenient: bool = False
) -> ColumnPlan:
    """Assign a role to every column for a task kind; unknown columns are an error (ignored and listed
    with ``lenient``)."""
    plan = ColumnPlan()
    for name in columns:
        low = name.strip().lower()
        if low in KEY_COLUMNS and plan.key is None:
            plan.key = name
        elif low in MODEL_COLUMNS and plan.model is None:
            plan.model = name
        elif low in TEXT_COLUMNS and plan.text is None:
            plan.text = name
        elif kind == "ms-cxr-t" and _progression_prefix(name):
            plan.progression[name] = _progression_prefix(name)  # type: ignore[assignment]
        elif kind == "labels" and is_observation(name):
            obs = canonical_name(name)
            if obs in plan.observations.values():
                raise InputError(
                    f"{where(path, row=row, field=name)}: observation {obs!r} given by two columns"
                )
            plan.observations[name] = obs
        elif low in PASSTHROUGH_COLUMNS or (kind == "report" and low in ("findings", "impression")):
            plan.ignored.append(name)
        elif lenient:
            plan.ignored.append(name)
        else:
            raise InputError(
                f"{where(path, row=row, field=name)}: unexpected column for a {kind} submission; {expected_columns(kind)}"
            )
    return plan


def expected_columns(kind: str) -> str:
    """The columns a submission of this task kind needs, as a sentence for error messages."""
    text = "one of " + ", ".join(TEXT_COLUMNS)
    if kind == "labels":
        return f"expected study_id and the 14 observation columns ({', '.join(OBSERVATIONS)}) or a text column ({text})"
    if kind == "ms-cxr-t":
        return f"expected study_id and per-finding columns ({', '.join(MS_CXR_T_FINDINGS)}, optionally with _progression) or a text column ({text})"
    if kind == "rationale":
        return f"expected study_id, model and a text column ({text})"
    return f"expected study_id and a text column ({text})"


# ---------------------------------------------------------------------------------------------------
# Value parsing (vectorised where the input allows)


def _as_list(values: Any) -> list[Any]:
    if hasattr(values, "to_pylist"):
        return values.to_pylist()
    return list(values)


def parse_study_ids(values: Any, rows: np.ndarray, path: Path, field_name: str = "study_id") -> np.ndarray:
    """study_id values -> int64 array. Accepts ints, digit strings and an ``s`` prefix."""
    if hasattr(values, "type"):
        import pyarrow as pa

        if pa.types.is_integer(values.type) and values.null_count == 0:
            return values.to_numpy().astype(np.int64)
    items = _as_list(values)
    out = np.empty(len(items), dtype=np.int64)
    for i, value in enumerate(items):
        if isinstance(value, bool):
            value = None
        if isinstance(value, int):
            out[i] = value
            continue
        if isinstance(value, float) and value.is_integer():
            out[i] = int(value)
            continue
        text = str(value).strip() if value is not None else ""
        if text[:1] in ("s", "S"):
            text = text[1:]
        if not text.isdigit():
            shown = "blank" if value is None or text == "" else repr(value)
            raise InputError(
                f"{where(path, row=int(rows[i]), field=field_name)}: study_id {shown} is not a study number"
            )
        out[i] = int(text)
    return out


def parse_text_keys(values: Any, rows: np.ndarray, path: Path, field_name: str) -> np.ndarray:
    """A text key column (dicom_id) as a numpy string array; blanks are an error naming the row."""
    items = _as_list(values)
    out = []
    for i, value in enumerate(items):
        text = str(value).strip() if value is not None else ""
        if not text:
            raise InputError(f"{where(path, row=int(rows[i]), field=field_name)}: blank {field_name}")
        out.append(text)
    return np.asarray(out, dtype=str)


def parse_label_column(values: Any, rows: np.ndarray, path: Path, field_name: str) -> np.ndarray:
    """One observation column -> float32 array: 1 / 0 / -1, probabilities in [0, 1], NaN for blank.

    Blank is an empty cell, null or a missing key. An explicit NaN, a non-number, or a value outside
    {-1} U [0, 1] is an error naming the row."""
    if hasattr(values, "type"):
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_floating(values.type) or pa.types.is_integer(values.type):
            nulls = values.is_null().to_numpy(zero_copy_only=False)
            numbers = values.fill_null(0).to_numpy(zero_copy_only=False).astype(np.float64)
            if pa.types.is_floating(values.type):
                bad = np.nonzero(pc.is_nan(values).fill_null(False).to_numpy(zero_copy_only=False))[0]
                if bad.size:
                    raise InputError(
                        f"{where(path, row=int(rows[bad[0]]), field=field_name)}: NaN; leave the cell null for 'not mentioned'"
                    )
            numbers[nulls] = np.nan
            return _check_range(numbers, rows, path, field_name)
    items = _as_list(values)
    out = np.empty(len(items), dtype=np.float64)
    # Submissions repeat a handful of cell values ("1", "0", "", null...): parse each distinct value
    # once. Booleans are excluded from the memo because True == 1 would hit the entry of 1.
    memo: dict[Any, float] = {}
    for i, value in enumerate(items):
        if value is not True and value is not False:
            try:
                out[i] = memo[value]
                continue
            except (KeyError, TypeError):
                pass
        number = _parse_label_cell(value, int(rows[i]), path, field_name)
        out[i] = number
        try:
            memo[value] = number
        except TypeError:
            pass
    return _check_range(out, rows, path, field_name)


def _parse_label_cell(value: Any, row: int, path: Path, field_name: str) -> float:
    """One cell: a float, NaN for blank; errors name the row and field."""
    if value is None:
        return np.nan
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InputError(
            f"{where(path, row=row, field=field_name)}: {value!r} is not a label (use 1, 0, -1, blank or a probability)"
        )
    if isinstance(value, str):
        text = value.strip()
        if text == "":
            return np.nan
        try:
            number = float(text)
        except ValueError:
            raise InputError(
                f"{where(path, row=row, field=field_name)}: {value!r} is not a label (use 1, 0, -1, blank or a probability)"
            ) from None
    else:
        number = float(value)
    if math.isnan(number):
        raise InputError(
            f"{where(path, row=row, field=field_name)}: NaN; leave the cell blank for 'not mentioned'"
        )
    return number


def _check_range(values: np.ndarray, rows: np.ndarray, path: Path, field_name: str) -> np.ndarray:
    finite = ~np.isnan(values)
    bad = finite & ~((values == -1) | ((values >= 0) & (values <= 1)))
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise InputError(
            f"{where(path, row=int(rows[i]), field=field_name)}: {values[i]:g} is out of range (labels are 1, 0, -1 or blank; probabilities lie in [0, 1])"
        )
    return values.astype(np.float32)


def text_values(values: Any, rows: np.ndarray, path: Path, field_name: str) -> list[str | None]:
    """A text column as a list of str/None; non-string values are an error naming the row."""
    items = _as_list(values)
    for i, value in enumerate(items):
        if value is not None and not isinstance(value, str):
            if isinstance(value, float) and math.isnan(value):
                raise InputError(
                    f"{where(path, row=int(rows[i]), field=field_name)}: NaN where text is expected"
                )
            raise InputError(
                f"{where(path, row=int(rows[i]), field=field_name)}: expected text, got {type(value).__name__}"
            )
    return items


class StudyIndex:
    """Maps study ids of the references to dense slots and catches unknown and duplicate rows."""

    def __init__(self, study_ids: np.ndarray):
        study_ids = np.asarray(study_ids)
        if study_ids.dtype.kind not in "UO":
            study_ids = study_ids.astype(np.int64)
        self.order = np.argsort(study_ids, kind="stable")
        self.sorted = study_ids[self.order]
        if len(self.sorted) > 1 and np.any(self.sorted[1:] == self.sorted[:-1]):
            dup = self.sorted[1:][self.sorted[1:] == self.sorted[:-1]][0]
            raise InputError(f"references: key {dup} appears twice")
        self.size = len(study_ids)
        self.first_row = np.zeros(self.size, dtype=np.int64)  # 0 = not seen yet

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` (-1 where unknown)."""
        pos = np.searchsorted(self.sorted, ids)
        pos = np.minimum(pos, max(self.size - 1, 0))
        found = (self.sorted[pos] == ids) if self.size else np.zeros(len(ids), bool)
        return np.where(found, self.order[pos] if self.size else -1, -1)

    def claim(
        self, slots: np.ndarray, rows: np.ndarray, ids: np.ndarray, path: Path, field_name: str
    ) -> None:
        """Mark slots as submitted; a slot submitted twice (in this batch or before) is an error naming both rows."""
        seen_before = self.first_row[slots] > 0
        if seen_before.any():
            i = int(np.nonzero(seen_before)[0][0])
            raise InputError(
                f"{where(path, row=int(rows[i]), field=field_name)}: duplicate {field_name} {ids[i]} (first given in row {int(self.first_row[slots[i]])})"
            )
        uniq, first, counts = np.unique(slots, return_index=True, return_counts=True)
        if np.any(counts > 1):
            slot = uniq[counts > 1][0]
            where_rows = rows[slots == slot]
            raise InputError(
                f"{where(path, row=int(where_rows[1]), field=field_name)}: duplicate {field_name} {ids[slots == slot][0]} (first given in row {int(where_rows[0])})"
            )
        self.first_row[slots] = rows

    @property
    def covered(self) -> np.ndarray:
        """Bool mask of slots that received a row."""
        return self.first_row > 0
