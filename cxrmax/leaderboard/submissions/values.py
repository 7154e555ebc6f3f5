"""Cell parsing, vectorised where the input allows: study ids, label values, text, text keys."""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrmax.core.errors import InputError, where


def _as_list(values: Any) -> list[Any]:
    if hasattr(values, "to_pylist"):
        return values.to_pylist()
    return list(values)


#: A study id on its own: digits, an optional ``s`` prefix, an optional ``.0`` (a spreadsheet's float).
PLAIN_STUDY_ID = re.compile(r"[sS]?([0-9]+)(?:\.0*)?")
#: An ``s<digits>`` part inside a longer key: MIMIC paths (p10/p10000032/s50414267), p..._s... keys.
_EMBEDDED_ID = re.compile(r"(?<![A-Za-z0-9])[sS]([0-9]+)(?![0-9])")
_MAX_ID_DIGITS = 18  # int64


def study_id_from_text(text: str) -> int | None:
    """The study number in a key, or None: ``50414267``, ``s50414267``, ``50414267.0`` (a spreadsheet's
    float), or a longer key holding exactly one ``s<digits>`` part (``p10/p10000032/s50414267``,
    ``p10000032_s50414267.txt``)."""
    text = text.strip()
    match = PLAIN_STUDY_ID.fullmatch(text)
    if match:
        digits = match.group(1)
    else:
        found = set(_EMBEDDED_ID.findall(text))
        if len(found) != 1:
            return None
        digits = found.pop()
    if len(digits.lstrip("0")) > _MAX_ID_DIGITS:
        return None
    return int(digits)


def _bad_study_id(value: Any, path: Path, row: int, field_name: str) -> InputError:
    text = str(value).strip() if value is not None else ""
    if value is None or text == "":
        shown = "blank"
    else:
        shown = repr(value)
    hint = ""
    if re.fullmatch(r"[0-9.]+[eE][+-]?[0-9]+", text):
        hint = " (scientific notation, as a spreadsheet writes large numbers, loses digits: format the column as a whole number)"
    return InputError(
        f"{where(path, row=row, field=field_name)}: study_id {shown} is not a study number{hint}"
    )


def parse_study_ids(values: Any, rows: np.ndarray, path: Path, field_name: str = "study_id") -> np.ndarray:
    """study_id values -> int64 array. Accepts ints, whole floats and the text forms of
    `study_id_from_text`; anything else is an InputError naming the row."""
    if hasattr(values, "type"):
        if pa.types.is_integer(values.type) and values.null_count == 0:
            numbers = values.to_numpy()
            if numbers.dtype == np.uint64 and numbers.size and numbers.max() > np.iinfo(np.int64).max:
                i = int(np.argmax(numbers > np.iinfo(np.int64).max))
                raise _bad_study_id(int(numbers[i]), path, int(rows[i]), field_name)
            return numbers.astype(np.int64)
    items = _as_list(values)
    out = np.empty(len(items), dtype=np.int64)
    limit = 10**_MAX_ID_DIGITS
    for i, value in enumerate(items):
        number: int | None = None
        if isinstance(value, bool):
            number = None  # True is not study 1
        elif isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str):
            text = value.strip()
            # The common case (plain ASCII digits) without the regular expressions.
            fast = text.isdigit() and text.isascii() and len(text) <= _MAX_ID_DIGITS
            number = int(text) if fast else study_id_from_text(text)
        if number is None or not 0 <= number < limit:
            raise _bad_study_id(value, path, int(rows[i]), field_name)
        out[i] = number
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
        if pa.types.is_boolean(values.type) or pa.types.is_decimal(values.type):
            values = values.cast(pa.float64())  # true/false are 1/0; decimals are plain numbers
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


#: Words read as labels (case-insensitive): what a boolean column becomes in CSV, and yes/no.
LABEL_WORDS = {"true": 1.0, "false": 0.0, "yes": 1.0, "no": 0.0}


def _parse_label_cell(value: Any, row: int, path: Path, field_name: str) -> float:
    """One cell: a float, NaN for blank; errors name the row and field."""
    if value is None:
        return np.nan
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, str) and value.strip().lower() in LABEL_WORDS:
        return LABEL_WORDS[value.strip().lower()]
    if isinstance(value, decimal.Decimal):  # a Parquet decimal column read cell by cell
        value = float(value)
    if not isinstance(value, (int, float, str)):
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
            f"{where(path, row=int(rows[i]), field=field_name)}: {float(values[i]):.12g} is out of range (labels are 1, 0, -1 or blank; probabilities lie in [0, 1])"
        )
    # ``-0`` is 0: adding 0.0 turns negative zero into positive zero (NaN stays NaN), so the
    # canonical predictions of "-0" and "0" are the same bytes (the board's duplicate rule).
    return (values + 0.0).astype(np.float32)


#: A lone surrogate code point: what a JSON ``\\ud800`` escape without its pair decodes to.
_SURROGATE = re.compile("[\ud800-\udfff]")


def text_values(values: Any, rows: np.ndarray, path: Path, field_name: str) -> list[str | None]:
    """A text column as a list of str/None; non-string values, and strings holding a lone UTF-16
    surrogate (a JSON ``"\\ud800"`` escape: not a character, and not writable as UTF-8), are an
    error naming the row."""
    items = _as_list(values)
    for i, value in enumerate(items):
        if isinstance(value, str):
            lone = None if value.isascii() else _SURROGATE.search(value)
            if lone is not None:
                raise InputError(
                    f"{where(path, row=int(rows[i]), field=field_name)}: a lone UTF-16 surrogate "
                    f"(a \\u{ord(lone.group()):04x} escape) is not a character; "
                    "write the text as valid Unicode"
                )
            continue
        if value is not None:
            if isinstance(value, float) and math.isnan(value):
                raise InputError(
                    f"{where(path, row=int(rows[i]), field=field_name)}: NaN where text is expected"
                )
            raise InputError(
                f"{where(path, row=int(rows[i]), field=field_name)}: expected text, got {type(value).__name__}"
            )
    return items


def parse_or_skip(
    parse: Callable[[Any, np.ndarray, Path, str], Any],
    values: Any,
    rows: np.ndarray,
    path: Path,
    field_name: str,
    lenient: bool,
    fill: Any,
) -> tuple[Any, np.ndarray, dict[int, str]]:
    """Run a column parser; with ``lenient``, a failing column is parsed again cell by cell so that
    only the bad rows are lost: returns (parsed values with ``fill`` in bad rows, bad-row mask, the
    message of each bad row by position). Without ``lenient`` the first error is raised."""
    try:
        return parse(values, rows, path, field_name), np.zeros(len(rows), dtype=bool), {}
    except InputError:
        if not lenient:
            raise
    items = _as_list(values)
    bad = np.zeros(len(items), dtype=bool)
    messages: dict[int, str] = {}
    parsed: list[Any] = []
    for i, item in enumerate(items):
        try:
            parsed.append(parse([item], rows[i : i + 1], path, field_name)[0])
        except InputError as exc:
            bad[i] = True
            messages[i] = str(exc)
            parsed.append(fill)
    if isinstance(fill, float):
        return np.asarray(parsed, dtype=np.float32 if np.isnan(fill) else np.float64), bad, messages
    if isinstance(fill, int):
        return np.asarray(parsed, dtype=np.int64), bad, messages
    return parsed, bad, messages
