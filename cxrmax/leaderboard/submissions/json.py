"""The JSON Lines and JSON submission readers: JSONL line by line, JSON parsed incrementally (a large
file never sits in memory whole), both with errors naming the row and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from cxrmax.core.errors import InputError, where
from cxrmax.core.formats import MAX_FIELD_CHARS, FileKind, open_text
from cxrmax.core.pathologies import is_observation
from cxrmax.leaderboard.submissions.batch import RawBatch, ReadLog, dict_batch
from cxrmax.leaderboard.submissions.columns import KEY_COLUMNS, TEXT_COLUMNS
from cxrmax.leaderboard.submissions.values import study_id_from_text


class RepeatedKey(ValueError):
    """One JSON object names the same key twice (json keeps the last silently; a submission must not)."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a repeated key at any depth."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise RepeatedKey(key)
        obj[key] = value
    return obj


def _repeated(location: str, key: str) -> str:
    return (
        f"{location}: the key {key!r} appears twice in one object (JSON would keep only the last): keep one"
    )


def _bounded_lines(fh: IO[str], path: Path, lenient: bool, log: ReadLog) -> Iterator[tuple[int, str]]:
    """Lines with their 1-based numbers, never holding more than MAX_FIELD_CHARS of one line: a
    gigantic line (a whole JSON array on one line, a binary blob) is an error naming it, or with
    ``lenient`` skipped and counted."""
    line_number = 0
    while True:
        line = fh.readline(MAX_FIELD_CHARS)
        if not line:
            return
        line_number += 1
        if len(line) < MAX_FIELD_CHARS or line.endswith(("\n", "\r")):
            yield line_number, line
            continue
        message = f"{where(path, row=line_number)}: a line over {MAX_FIELD_CHARS >> 20} MB (one JSON array on one line? JSON Lines hold one object per line)"
        if not lenient:
            raise InputError(message)
        log.skip(message)
        while line and not line.endswith(("\n", "\r")):  # drop the rest of the line
            line = fh.readline(MAX_FIELD_CHARS)


def jsonl_batches(
    path: Path, batch_rows: int, kind: FileKind, lenient: bool, log: ReadLog
) -> Iterator[RawBatch]:
    seen: list[str] = []
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    with open_text(path, kind) as fh:
        for row_number, line in _bounded_lines(fh, path, lenient, log):
            if not line.strip():
                continue
            problem = None
            try:
                record = json.loads(line, object_pairs_hook=_unique_keys)
            except RepeatedKey as exc:
                problem = _repeated(where(path, row=row_number, field=exc.key), exc.key)
            except json.JSONDecodeError as exc:
                hint = ""
                if not line.endswith("\n"):
                    hint = " (truncated last line?)"
                if exc.msg == "Extra data":
                    hint = " (several JSON values on one line: put one object per line)"
                elif records == [] and line.lstrip()[:1] == "[":
                    hint = (
                        " (the file looks like one JSON array: name it .json, or write one object per line)"
                    )
                problem = (
                    f"{where(path, row=row_number)}: invalid JSON{hint}: {exc.msg} (character {exc.pos + 1})"
                )
            else:
                if not isinstance(record, dict):
                    problem = f"{where(path, row=row_number)}: each line must be a JSON object, not {type(record).__name__}"
            if problem:
                if lenient:
                    log.skip(problem)
                    continue
                raise InputError(problem)
            records.append(record)
            rows.append(row_number)
            if len(records) >= batch_rows:
                yield dict_batch(records, rows, seen)
                records, rows = [], []
    yield dict_batch(records, rows, seen)


class _JsonStream:
    """Incremental reader of a top-level JSON object or array: yields (key, value) pairs (key None for
    arrays) without loading the file. Values larger than `max_value_chars` are refused."""

    def __init__(self, fh: IO[str], path: Path, chunk: int = 1 << 20, max_value_chars: int = MAX_FIELD_CHARS):
        self.fh, self.path, self.chunk, self.max_value_chars = fh, path, chunk, max_value_chars
        self.buf, self.pos, self.eof = "", 0, False
        self.lines_before = 0  # newlines in text already dropped from the buffer
        self.decoder = json.JSONDecoder(object_pairs_hook=_unique_keys)

    def _more(self) -> None:
        data = self.fh.read(self.chunk)
        if not data:
            self.eof = True
        self.lines_before += self.buf.count("\n", 0, self.pos)
        self.buf = self.buf[self.pos :] + data
        self.pos = 0

    def line(self, pos: int | None = None) -> int:
        """1-based line of a buffer position (default: the current one), for error messages."""
        pos = self.pos if pos is None else pos
        return self.lines_before + self.buf.count("\n", 0, pos) + 1

    def _at(self, entry: int) -> str:
        """Where the reader is: the entry (row) and, for people with an editor open, the line."""
        return f"{where(self.path, row=entry)}: line {self.line()}"

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
            except RepeatedKey as exc:
                raise InputError(_repeated(where(self.path, row=entry, field=exc.key), exc.key)) from None
            except json.JSONDecodeError as exc:
                if self.eof:
                    hint = ""
                    if exc.msg.startswith("Expecting property name") and self.buf[
                        : exc.pos
                    ].rstrip().endswith(","):
                        hint = " (a trailing comma before '}'? JSON does not allow one)"
                    raise InputError(
                        f"{where(self.path, row=entry)}: invalid or truncated JSON{hint}: {exc.msg} (line {self.line(exc.pos)})"
                    ) from None
                if len(self.buf) - self.pos > self.max_value_chars:
                    raise InputError(
                        f"{self._at(entry)}, invalid JSON or an entry over {self.max_value_chars >> 20} MB"
                    ) from None
                self._more()

    def _expect(self, char: str, entry: int) -> None:
        if not self._skip_ws():
            raise InputError(f"{self._at(entry)}, truncated JSON (expected {char!r})")
        if self.buf[self.pos] != char:
            raise InputError(
                f"{where(self.path, row=entry)}: invalid JSON: expected {char!r}, found {self.buf[self.pos]!r} (line {self.line()})"
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
                if not self._skip_ws():
                    raise InputError(f"{self._at(entry + 1)}, truncated JSON (file ends after a comma)")
                if self.buf[self.pos] == closing:
                    raise InputError(
                        f"{self._at(entry)}, a trailing comma before {closing!r} (JSON does not allow one; remove it)"
                    )
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
            raise InputError(
                f"{where(self.path)}: line {self.line()}, unexpected data after the top-level JSON value "
                "(one JSON object per line is JSON Lines: name the file .jsonl)"
            )


def json_batches(path: Path, batch_rows: int, kind: FileKind) -> Iterator[RawBatch]:
    seen: list[str] = []
    records: list[dict[str, Any]] = []
    rows: list[int] = []
    with open_text(path, kind) as fh:
        for entry, (key, value) in enumerate(_JsonStream(fh, path).items(), start=1):
            if key is not None:
                low = key.strip().lower()
                if isinstance(value, (dict, list)) and (
                    low in KEY_COLUMNS or low in TEXT_COLUMNS or is_observation(key)
                ):
                    raise InputError(
                        f"{where(path, row=entry, field=key)}: the object is keyed by column names "
                        "(pandas' default to_json() is column-oriented); write rows instead: "
                        "to_json(orient='records'), or orient='records', lines=True for a .jsonl file"
                    )
                if low in ("columns", "data") and isinstance(value, list):
                    raise InputError(
                        f"{where(path, row=entry, field=key)}: this looks like pandas' to_json(orient='split' or 'table'); "
                        "write orient='records' instead"
                    )
                if isinstance(value, str) or value is None:
                    value = {"model_prediction": value}
                if not isinstance(value, dict):
                    if low in KEY_COLUMNS:
                        hint = (
                            "this object is one row, not a mapping keyed by study id: for one object per "
                            "line name the file .jsonl, otherwise wrap the rows in a JSON array"
                        )
                    elif isinstance(value, list) and study_id_from_text(key) is None:
                        hint = (
                            f"{key!r} holds a list: a .json submission is an array of rows or an object "
                            "keyed by study_id, not a wrapper object; write the list itself"
                        )
                    else:
                        hint = f"expected an object with model_prediction, got {type(value).__name__}"
                    raise InputError(f"{where(path, row=entry, field=key)}: {hint}")
                if "study_id" in value and str(value["study_id"]) != key:
                    hint = ""
                    if key.isdigit() and len(key) < 8:
                        hint = (
                            " (keys that number the rows, as pandas' to_json(orient='index') writes, are not "
                            "study ids: write orient='records')"
                        )
                    raise InputError(
                        f"{where(path, row=entry, field='study_id')}: {value['study_id']!r} differs from its key {key!r}{hint}"
                    )
                value = {"study_id": key, **{k: v for k, v in value.items() if k != "study_id"}}
            elif not isinstance(value, dict):
                hint = (
                    " (a list of lists has no column names, as pandas' to_json(orient='values') writes: "
                    "write orient='records')"
                    if isinstance(value, list)
                    else ""
                )
                raise InputError(f"{where(path, row=entry)}: each array element must be an object{hint}")
            records.append(value)
            rows.append(entry)
            if len(records) >= batch_rows:
                yield dict_batch(records, rows, seen)
                records, rows = [], []
    yield dict_batch(records, rows, seen)
