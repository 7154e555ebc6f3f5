"""Loading build-preferences' inputs: finding the files, reading them, normalising their columns onto
`WORK_SCHEMA` and checking their keys.

Inputs are generate's ``OUT/trajectories/<model>/*.arrow``, Arrow IPC/Parquet/JSONL files, a
`datasets` directory or a Hub id. Arrow and Parquet go through `cxrmax.core.io` (memory-mapped, with
the truncated-stream check); every problem is an InputError naming file, row and field, or with
``lenient`` a counted skip in the `LoadReport`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from cxrmax.core import schemas
from cxrmax.core.errors import InputError, where
from cxrmax.core.formats import MAX_FIELD_CHARS, open_binary, sniff
from cxrmax.core.io import read_table
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.core.splits import SPLIT_ALIASES, canonical_split

#: Accepted spellings of the columns build-preferences needs, for CXR-MAX-style data sets.
COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "sample_id": ("sample_id", "dicom_id", "image_id", "id"),
    "model": ("model", "source", "model_name", "teacher"),
    "text": ("text", "response", "trajectory", "reasoning", "answer", "output", "completion"),
}
#: Optional columns used when present (TRAJECTORY_SCHEMA names plus a few common extras).
OPTIONAL_COLUMNS = (
    "sample_index",
    "dicom_id",
    "subject_id",
    "study_id",
    "split",
    "image_path",
    "prompt_id",
    "prompt",
    "labels",
    "report",
    "findings",
    "impression",
)
#: TRAJECTORY_SCHEMA columns that build-preferences reads but does not need (never "unknown").
_KNOWN_UNUSED = set(schemas.TRAJECTORY_SCHEMA.names) - set(OPTIONAL_COLUMNS) - {"sample_id", "model", "text"}

#: The working schema every input is normalised to.
WORK_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("sample_index", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("dicom_id", pa.string()),
        pa.field("subject_id", pa.int64()),
        pa.field("study_id", pa.int64()),
        pa.field("split", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("labels", schemas.LABELS_TYPE),
        pa.field("report", pa.string()),
        pa.field("truncated", pa.bool_()),  # finish_reason "length" (the answer was cut at max_tokens)
        pa.field("source_file", pa.int32()),  # index into LoadReport.files
        pa.field("source_row", pa.int64()),  # 1-based data row in that file
    ]
)


@dataclass
class LoadReport:
    """What loading saw: files, rows, and everything skipped or ignored (with counts)."""

    files: list[str] = field(default_factory=list)
    rows: int = 0
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)
    empty_texts: int = 0  # null, blank or without any letter/digit (e.g. only zero-width spaces)
    truncated_texts: int = 0  # finish_reason "length": cut at max_tokens (see annotate_chunk)
    reasoning_joined: int = 0  # rows whose separate `reasoning` was put before the answer
    unreadable_files: list[str] = field(default_factory=list)  # --lenient: skipped, with the reason
    #: generate journals (wal-*.jsonl) found beside the shards: answers not committed yet (generate
    #: commits them when run again); never read, but reported
    uncommitted_journals: list[str] = field(default_factory=list)
    #: samples whose sources were asked different prompts: the preference row carries the first
    #: source's prompt (in the stable order), so its negatives answered another question
    samples_with_mixed_prompts: int = 0
    mixed_prompt_examples: list[str] = field(default_factory=list)
    duplicates_skipped: int = 0  # --lenient: same key, different answer (the first kept)
    identical_duplicates_skipped: int = 0  # same key, same answer (a merged copy): always dropped
    conflicting_samples_skipped: int = 0


def _read_file(path: Path) -> pa.Table:
    """One input file as a table: Arrow IPC (file or stream) and Parquet through `core.io.read_table`
    (chosen by content, truncated streams refused), JSON lines by pyarrow."""
    suffixes = [s.lower() for s in path.suffixes]  # a copy made on Windows may say .ARROW
    suffix = "".join(suffixes[-2:]) if suffixes[-1:] == [".gz"] else "".join(suffixes[-1:])
    if suffix in (".arrow", ".feather", ".ipc", ".parquet"):
        return read_table(path)
    if suffix in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
        return _read_jsonl(path)
    raise InputError(f"{where(path)}: unsupported file type (expected .arrow, .parquet or .jsonl)")


# Directory scans take these; a .json file is read only when named explicitly (generate keeps its
# run manifests, run-*.json, beside the shards).
_DATA_SUFFIXES = (".arrow", ".parquet", ".jsonl", ".jsonl.gz")
_SKIP_DIRS = {"preferences", "sft", "annotations", "exports", "figures", "cache", "consensus", ".cache"}


def find_input_files(spec: str | Path, journals: list[str] | None = None) -> list[Path]:
    """The data files an input names: a file; a directory (generate's OUT, OUT/trajectories,
    OUT/trajectories/<model>, or a `datasets` save_to_disk directory) searched recursively.
    generate's uncommitted journals are not input; their paths are appended to `journals`.
    Raises InputError when nothing readable is there."""
    path = Path(spec)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{where(path)}: no such file or directory")
    if (path / "trajectories").is_dir():
        path = path / "trajectories"
    files = []
    for candidate in sorted(path.rglob("*")):
        rel = candidate.relative_to(path).parts
        if any(part in _SKIP_DIRS or part.startswith(".") for part in rel[:-1]):
            continue
        # generate's journals (wal-*.jsonl) hold answers not yet committed to a shard: not input.
        if candidate.name.startswith((".", "wal-")):
            if journals is not None and candidate.name.startswith("wal-") and candidate.stat().st_size:
                journals.append(str(candidate))
            continue
        if candidate.is_file() and candidate.name.lower().endswith(_DATA_SUFFIXES):
            if candidate.name in ("dataset_info.json", "state.json", "dataset_dict.json"):
                continue
            files.append(candidate)
    if not files:
        raise InputError(f"{where(path)}: no trajectory files (.arrow, .parquet, .jsonl) found")
    return files


def _looks_like_hub_id(spec: str) -> bool:
    return not Path(spec).exists() and spec.count("/") == 1 and not spec.startswith((".", "/"))


def _load_hub(spec: str) -> pa.Table:
    # Deferred: importing datasets costs about a second, and only Hub ids need it here.
    import datasets

    try:
        loaded = datasets.load_dataset(spec)
    except Exception as exc:  # network, auth, missing repo: all mean "cannot read this input"
        raise InputError(
            f"{spec}: no such local path, and cannot load from the Hugging Face Hub as a data set id "
            f"({type(exc).__name__}: {exc})"
        ) from None
    tables = [ds.data.table for ds in loaded.values()] if hasattr(loaded, "values") else [loaded.data.table]
    return pa.concat_tables(tables, promote_options="default")


def _resolve(table: pa.Table, name: str, path: str) -> str | None:
    for alias in COLUMN_ALIASES.get(name, (name,)):
        if alias in table.column_names:
            return alias
    return None


def _cast(column: pa.Array | pa.ChunkedArray, to: pa.DataType, path: str, field: str):
    """`column.cast(to)`, or an InputError naming the first row whose value does not convert."""
    try:
        return column.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        reason = exc
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    for row in range(len(column)):  # only on failure: find the first bad value
        try:
            column.slice(row, 1).cast(to)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            value = repr(column[row].as_py())[:80]
            raise InputError(
                f"{where(path, row + 1, field)}: cannot read {value} as {to} ({reason})"
            ) from None
    raise InputError(f"{where(path, field=field)}: cannot read as {to} ({reason})") from None


def _blank_to_null(column: pa.Array | pa.ChunkedArray):
    """A blank label cell ("" or spaces, as CSV-derived files write it) means "not mentioned": null."""
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        return column
    trimmed = pc.utf8_trim_whitespace(column)
    return pc.if_else(pc.equal(trimmed, ""), pa.scalar(None, column.type), trimmed)


def _nan_to_null(values: pa.Array) -> pa.Array:
    """NaN is how pandas/NumPy exports write a blank label: null."""
    nan = pc.fill_null(pc.is_nan(values), False)
    return pc.if_else(nan, pa.scalar(None, values.type), values) if pc.any(nan).as_py() else values


def _labels_column(table: pa.Table, path: str) -> pa.Array | None:
    """Ground-truth labels as LABELS_TYPE: a `labels` struct, or one column per observation."""
    if "labels" in table.column_names:
        column = table.column("labels")
        if pa.types.is_struct(column.type):
            arrays = []
            names = [column.type.field(i).name for i in range(column.type.num_fields)]
            unknown = [n for n in names if n not in OBSERVATIONS]
            if unknown:
                raise InputError(f"{where(path, field='labels')}: unknown observation(s) {unknown}")
            combined = column.combine_chunks()
            for name in OBSERVATIONS:
                arrays.append(
                    _nan_to_null(
                        _cast(_blank_to_null(combined.field(name)), pa.float32(), path, f"labels.{name}")
                    )
                    if name in names
                    else pa.nulls(len(combined), pa.float32())
                )
            _check_label_values(arrays, path, "labels.")
            return pa.StructArray.from_arrays(
                arrays, fields=list(schemas.LABELS_TYPE), mask=combined.is_null()
            )
        raise InputError(
            f"{where(path, field='labels')}: expected a struct of observations, got {column.type}"
        )
    flat = [name for name in OBSERVATIONS if name in table.column_names]
    if flat:
        arrays = [
            _nan_to_null(_cast(_blank_to_null(table.column(name)), pa.float32(), path, name).combine_chunks())
            if name in flat
            else pa.nulls(table.num_rows, pa.float32())
            for name in OBSERVATIONS
        ]
        _check_label_values(arrays, path, "")
        return pa.StructArray.from_arrays(arrays, fields=list(schemas.LABELS_TYPE))
    return None


def _check_label_values(arrays: Sequence[pa.Array], path: str, prefix: str) -> None:
    """Labels are 1 (positive), 0 (negative), -1 (uncertain) or null: anything else (2, 0.5, NaN
    from a float export) is an InputError naming the first such row."""
    allowed = pa.array([1.0, 0.0, -1.0], pa.float32())
    for name, values in zip(OBSERVATIONS, arrays, strict=True):
        bad = pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, value_set=allowed)))
        if pc.any(bad).as_py():
            row = pc.index(bad, True).as_py()
            raise InputError(
                f"{where(path, row + 1, prefix + name)}: label {values[row].as_py()!r} is not 1, 0, -1 or empty"
            )


#: finish_reason values meaning "cut at the token limit" (OpenAI/vLLM, TGI, Anthropic spellings).
_TRUNCATED_REASONS = ("length", "max_tokens", "max_length", "model_length")


def _join_reasoning(
    reasoning: pa.ChunkedArray, text: pa.ChunkedArray, path: str
) -> tuple[pa.ChunkedArray, int]:
    """reasoning + blank line + answer where both are present and the answer is not the reasoning
    itself (or does not already start with it); else whichever is present. Returns the joined
    column and how many rows were joined."""
    try:
        reasoning = reasoning.cast(pa.string())
        text = text.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InputError(f"{where(path, field='reasoning')}: cannot read as string ({exc})") from None
    has_reasoning = pc.fill_null(pc.not_equal(pc.utf8_trim_whitespace(reasoning), ""), False)
    if not pc.any(has_reasoning).as_py():
        return text, 0
    rows = np.flatnonzero(has_reasoning.to_numpy(zero_copy_only=False))
    reasoning_list = reasoning.to_pylist()
    text_list = text.to_pylist()
    joined = 0
    for i in rows:
        thought, answer = reasoning_list[i].strip(), (text_list[i] or "").strip()
        if not answer:
            text_list[i] = thought
        elif answer != thought and not answer.startswith(thought):
            text_list[i] = f"{thought}\n\n{answer}"
            joined += 1
    return pa.chunked_array([pa.array(text_list, type=pa.string())]), joined


def normalise_table(table: pa.Table, path: str, file_index: int, report: LoadReport) -> pa.Table:
    """Map one input table onto WORK_SCHEMA (aliases resolved, types cast); unknown columns are
    ignored and listed in `report`. Raises InputError naming the file and field when a required
    column is missing or a column has an unusable type."""
    columns: dict[str, pa.Array | pa.ChunkedArray] = {}
    used = set()
    for name in ("sample_id", "model", "text"):
        found = _resolve(table, name, path)
        if found is None:
            raise InputError(
                f"{where(path, field=name)}: required column missing (accepted names: "
                f"{', '.join(COLUMN_ALIASES[name])}; found: {', '.join(table.column_names)})"
            )
        columns[name] = table.column(found)
        used.add(found)
    n = table.num_rows
    # A reasoning parser (vLLM/SGLang reasoning_content) returns the reasoning apart from the answer;
    # the trajectory is both, reasoning first. generate repeats the reasoning in `text` when there is
    # no answer (cut while thinking): that row is taken once.
    # Data sets with `reasoning` and `answer` columns (no `text`) are joined the same way.
    answer_column = next(
        (a for a in COLUMN_ALIASES["text"] if a != "reasoning" and a in table.column_names), None
    )
    if answer_column is not None and "reasoning" in table.column_names:
        used.add(answer_column)
        columns["text"], joined = _join_reasoning(
            table.column("reasoning"), table.column(answer_column), path
        )
        report.reasoning_joined += joined
        used.add("reasoning")
    if "finish_reason" in table.column_names:
        try:
            finish = pc.utf8_lower(pc.utf8_trim_whitespace(table.column("finish_reason").cast(pa.string())))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InputError(f"{where(path, field='finish_reason')}: cannot read as string ({exc})") from None
        columns["truncated"] = pc.fill_null(pc.is_in(finish, value_set=pa.array(_TRUNCATED_REASONS)), False)
        used.add("finish_reason")
    for name in OPTIONAL_COLUMNS:
        if name in ("labels", "report", "findings", "impression"):
            continue
        if name in table.column_names and name not in used:
            columns[name] = table.column(name)
            used.add(name)
    labels = _labels_column(table, path)
    if labels is not None:
        columns["labels"] = labels
        used.add("labels")
        used.update(name for name in OBSERVATIONS if name in table.column_names)
    for name in ("report", "impression", "findings"):
        if name in table.column_names:
            columns["report"] = table.column(name)
            used.update({"report", "impression", "findings"} & set(table.column_names))
            break
    out = []
    for fld in WORK_SCHEMA:
        if fld.name == "source_file":
            out.append(pa.array(np.full(n, file_index, dtype=np.int32)))
        elif fld.name == "source_row":
            out.append(pa.array(np.arange(1, n + 1, dtype=np.int64)))
        elif fld.name == "truncated" and fld.name not in columns:
            out.append(pa.array(np.zeros(n, dtype=bool)))
        elif fld.name in columns:
            value = _cast(columns[fld.name], fld.type, path, fld.name)
            if fld.name in ("sample_id", "model"):  # "sonnet " and "sonnet" are one source
                value = pc.utf8_trim_whitespace(value)
            elif fld.name == "split":  # "TEST"/"test", "validation"/"validate": one split (mismatch check)
                value = canonical_split_column(value)
            out.append(value)
        else:
            out.append(pa.nulls(n, fld.type))
    ignored = [c for c in table.column_names if c not in used and c not in _KNOWN_UNUSED]
    if ignored:
        report.ignored_columns[path] = ignored
    result = pa.Table.from_arrays(out, schema=WORK_SCHEMA)
    if result.column("sample_index").null_count:
        result = result.set_column(
            2, "sample_index", pc.fill_null(result.column("sample_index"), pa.scalar(0, pa.int32()))
        )
    return result


def load_trajectories(inputs: Sequence[str | Path], lenient: bool = False) -> tuple[pa.Table, LoadReport]:
    """Read and check every input; returns one WORK_SCHEMA table (rows with empty texts dropped)
    and a LoadReport.

    Errors (InputError, naming file, row and field) — or, with ``lenient``, counted skips:
    the same (sample_id, model, sample_index) twice with different texts (lenient keeps the first;
    identical copies are always dropped and counted); a sample_id whose
    study_id/subject_id/split differ between rows (lenient drops the sample); a corrupt or
    truncated file (lenient skips the file and lists it in `unreadable_files`). Null sample ids or
    model names are always errors. Empty texts (null, blank, or without a single letter or digit,
    such as zero-width spaces or lone markdown) are always counted skips."""
    report = LoadReport()
    table = _read_inputs(inputs, lenient, report)
    report.rows = table.num_rows
    table = _drop_empty_texts(table, report)
    report.truncated_texts = int(pc.sum(table.column("truncated")).as_py() or 0)
    table = _drop_duplicate_keys(table, report, lenient)
    table = _drop_mismatched_ids(table, report, lenient)
    _count_mixed_prompts(table, report)
    return table, report


def _read_jsonl(path: Path) -> pa.Table:
    """JSON lines by pyarrow's fast reader. When it fails, or when a string holds bytes that are not
    UTF-8 (pyarrow reads them without complaint; they would fail later, far from the file), a second
    pass over the lines says which 1-based row is wrong and why, in plain words: pyarrow's own
    message counts rows from 0 within a block and calls an unterminated string "Invalid encoding"."""
    try:
        try:
            table = pj.read_json(path)
        except pa.ArrowInvalid as exc:
            if "straddl" not in str(exc):
                raise
            # One line longer than the reader's block (answers of several MB): read with blocks
            # that hold the longest field the sniffer accepts.
            table = pj.read_json(path, read_options=pj.ReadOptions(block_size=2 * MAX_FIELD_CHARS))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputError(
            _first_bad_line(path) or f"{where(path)}: cannot read, corrupt or truncated file ({exc})"
        ) from None
    try:
        table.validate(full=True)  # checks that every string is UTF-8
    except pa.ArrowInvalid as exc:
        raise InputError(_first_bad_line(path) or f"{where(path)}: not UTF-8 text ({exc})") from None
    return table


def _first_bad_line(path: Path) -> str | None:
    """``FILE row N: <reason>`` for the first line of a JSON-lines file that is not UTF-8 or not a
    JSON object (rows are the file's lines, blank lines skipped as the reader skips them), or None
    when every line is fine (the file is bad in another way)."""
    kind = sniff(path)
    row = 0
    with open_binary(path, kind.compression) as raw:
        for line in raw:
            if not line.strip():
                continue
            row += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (
                    f"{where(path, row)}: not UTF-8 text (byte 0x{line[exc.start : exc.start + 1].hex()} at "
                    f"byte {exc.start + 1} of the line); re-save the file as UTF-8 (it was probably written "
                    "as Latin-1/Windows-1252)"
                )
            try:
                value = json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                return f"{where(path, row)}: not a JSON line ({exc.msg}, character {exc.colno}; a line cut short?)"
            if not isinstance(value, dict):
                return (
                    f'{where(path, row)}: a JSON {type(value).__name__}, not an object ({{"sample_id": ...}})'
                )
    return None


def _read_inputs(inputs: Sequence[str | Path], lenient: bool, report: LoadReport) -> pa.Table:
    """Every input read and normalised, concatenated (files listed in `report.files`)."""
    tables = []
    seen_files: set[Path] = set()
    for spec in inputs:
        spec_text = str(spec)
        if _looks_like_hub_id(spec_text):
            report.files.append(spec_text)
            tables.append(normalise_table(_load_hub(spec_text), spec_text, len(report.files) - 1, report))
            continue
        for path in find_input_files(spec, report.uncommitted_journals):
            resolved = path.resolve()
            if resolved in seen_files:  # `OUT OUT/trajectories`, or a shell glob overlapping a folder
                continue
            seen_files.add(resolved)
            try:
                loaded = _read_file(path)
            except InputError as exc:
                if not lenient:
                    raise InputError(f"{exc} (use --lenient to skip unreadable files)") from None
                report.unreadable_files.append(str(exc))
                continue
            report.files.append(str(path))
            tables.append(normalise_table(loaded, str(path), len(report.files) - 1, report))
    if not tables:
        if report.unreadable_files:
            raise InputError(f"no readable input: {'; '.join(report.unreadable_files[:3])}")
        raise InputError("no input given")
    return pa.concat_tables(tables)


def _location(table: pa.Table, files: Sequence[str], i: int, field: str | None = None) -> str:
    """Where row `i` of a WORK_SCHEMA table came from: file, data row and field."""
    f = table.column("source_file")[i].as_py()
    return where(files[f], table.column("source_row")[i].as_py(), field)


def _drop_empty_texts(table: pa.Table, report: LoadReport) -> pa.Table:
    """Refuse blank sample ids and model names; drop (and count) rows whose text is empty."""
    for name in ("sample_id", "model"):
        blank = pc.fill_null(pc.equal(table.column(name), ""), True)  # values are trimmed already
        if pc.any(blank).as_py():
            where_ = _location(table, report.files, pc.index(blank, True).as_py(), name)
            raise InputError(f"{where_}: empty {name}")
    # No letter or digit at all: blank, zero-width or control characters, lone markdown ("**", "---");
    # or a missing value spelled out by a converter (pandas "nan", Python "None", JSON "null").
    filled = pc.fill_null(table.column("text"), "")
    empty = pc.or_(
        pc.invert(pc.match_substring_regex(filled, r"[\p{L}\p{N}]")),
        pc.match_substring_regex(filled, r"^\s*(?i:nan|none|null|n/?a)\s*$"),
    )
    report.empty_texts = int(pc.sum(empty).as_py() or 0)
    return table.filter(pc.invert(empty)) if report.empty_texts else table


def _drop_duplicate_keys(table: pa.Table, report: LoadReport, lenient: bool) -> pa.Table:
    """Sort by (sample_id, model, sample_index) and handle keys seen twice: identical copies are
    dropped (counted); different answers are an InputError, or with `lenient` the first is kept."""
    order = pc.sort_indices(
        table, sort_keys=[("sample_id", "ascending"), ("model", "ascending"), ("sample_index", "ascending")]
    )
    table = table.take(order)
    if table.num_rows <= 1:
        return table
    sid = table.column("sample_id").combine_chunks()
    mdl = table.column("model").combine_chunks()
    idx = table.column("sample_index").combine_chunks()
    same = pc.and_(
        pc.and_(pc.equal(sid[1:], sid[:-1]), pc.equal(mdl[1:], mdl[:-1])), pc.equal(idx[1:], idx[:-1])
    )
    dup = np.flatnonzero(same.to_numpy(zero_copy_only=False)) + 1
    if not len(dup):
        return table
    # The same answer twice (a shard copied in twice, a machine's output merged again) is
    # harmless: dropped and counted. Two different answers under one key need a choice.
    texts = table.column("text").combine_chunks()
    identical = pc.equal(texts.take(pa.array(dup)), texts.take(pa.array(dup - 1))).to_numpy(
        zero_copy_only=False
    )
    conflicting = dup[~identical]
    if len(conflicting) and not lenient:
        i = int(conflicting[0])
        raise InputError(
            f"{_location(table, report.files, i, 'sample_id')}: duplicate key: sample {sid[i].as_py()!r} "
            f"answered by model {mdl[i].as_py()!r} (sample_index {idx[i].as_py()}) again with a different "
            f"answer; first seen at {_location(table, report.files, i - 1)} (use --lenient to keep the first)"
        )
    keep = np.ones(table.num_rows, dtype=bool)
    keep[dup] = False
    report.identical_duplicates_skipped = int(identical.sum())
    report.duplicates_skipped = len(conflicting)
    return table.filter(pa.array(keep))


def _distinct_per_sample(table: pa.Table, column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Sample ids whose rows hold more than one distinct (non-null) value of `column`."""
    grouped = (
        pa.table({"sample_id": table.column("sample_id"), "v": column})
        .group_by("sample_id")
        .aggregate([("v", "count_distinct")])
    )
    return grouped.filter(pc.greater(grouped.column("v_count_distinct"), 1)).column("sample_id")


def _drop_mismatched_ids(table: pa.Table, report: LoadReport, lenient: bool) -> pa.Table:
    """A sample id whose study_id/subject_id/split differ between rows: an InputError naming both
    rows, or with `lenient` the sample dropped (counted)."""
    for name in ("study_id", "subject_id", "split"):
        column = table.column(name)
        if column.null_count == table.num_rows:
            continue
        bad = _distinct_per_sample(table, column)
        if not len(bad):
            continue
        if not lenient:
            first = bad[0].as_py()
            rows = np.flatnonzero(pc.equal(table.column("sample_id"), first).to_numpy(zero_copy_only=False))
            values = sorted({str(table.column(name)[int(r)].as_py()) for r in rows})
            raise InputError(
                f"{_location(table, report.files, int(rows[0]), name)}: mismatched ids: sample {first!r} has "
                f"{name} {' vs '.join(values)} in different rows (e.g. "
                f"{_location(table, report.files, int(rows[-1]))}); use --lenient to skip"
            )
        drop = pc.is_in(table.column("sample_id"), value_set=bad.combine_chunks())
        report.conflicting_samples_skipped += len(bad)
        table = table.filter(pc.invert(drop))
    return table


def _count_mixed_prompts(table: pa.Table, report: LoadReport) -> None:
    """Count samples whose sources were asked different prompts (reported, not an error)."""
    prompts = table.column("prompt")
    if prompts.null_count < table.num_rows:
        mixed = _distinct_per_sample(table, prompts)
        report.samples_with_mixed_prompts = len(mixed)
        report.mixed_prompt_examples = [str(v) for v in mixed.slice(0, 5).to_pylist()]


def canonical_split_column(split: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Known split spellings -> train/validate/test; others lower-cased and trimmed (judged later)."""
    lowered = pc.utf8_lower(pc.utf8_trim_whitespace(split))
    aliases = pa.array(list(SPLIT_ALIASES))
    canonical = pa.array(list(SPLIT_ALIASES.values()))
    return pc.coalesce(pc.take(canonical, pc.index_in(lowered, value_set=aliases)), lowered)


def normalise_split(
    table: pa.Table, files: Sequence[str] = (), lenient: bool = False
) -> tuple[pa.Table, int, int]:
    """Map split spellings onto train/validate/test. A missing split goes to train (counted).
    An unrecognised one ("testing", "holdout") is an InputError naming the row: guessing would put
    test images into train; with `lenient` those rows are dropped (counted).
    Returns (table, rows without a split, rows dropped for an unrecognised split)."""
    raw = table.column("split").to_pylist()
    unknown = 0
    out = []
    invalid = []
    for i, value in enumerate(raw):
        split = "train"
        if value is None or not str(value).strip():
            unknown += 1
        else:
            split = canonical_split(str(value))
            if split is None:
                if not lenient:
                    file_index = table.column("source_file")[i].as_py()
                    path = files[file_index] if file_index < len(files) else "trajectories"
                    raise InputError(
                        f"{where(path, table.column('source_row')[i].as_py(), 'split')}: unknown split "
                        f"{value!r} (accepted: {', '.join(sorted(SPLIT_ALIASES))}); use --lenient to skip"
                    )
                invalid.append(i)
        out.append(split)
    index = table.schema.get_field_index("split")
    table = table.set_column(index, "split", pa.array(out, type=pa.string()))
    if invalid:
        keep = np.ones(table.num_rows, dtype=bool)
        keep[invalid] = False
        table = table.filter(pa.array(keep))
    return table, unknown, len(invalid)
