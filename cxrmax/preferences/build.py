"""`build-preferences`: source trajectories -> drift annotations, consensus positives, ranked
negatives, Stage-1 SFT rows, TRL / ms-swift / Parquet exports and a data card.

Data flow (one pass, memory flat in the number of rows):

1. `load_trajectories` reads every input (generate's ``OUT/trajectories/<model>/*.arrow``, Arrow
   IPC/Parquet/JSONL files, a `datasets` directory or a Hub id) memory-mapped where possible,
   normalises column names and checks keys (duplicates, conflicting ids, empty texts).
2. Samples are joined by ``sample_id``; those with fewer than ``min_sources`` sources are skipped
   and counted. Rows are ordered (sample_id, model, sample_index): that order is the stable tie
   order everywhere.
3. Chunks of samples go to worker processes (`annotate_chunk`): each labels its texts with the rule
   labeler, computes the drift annotations, the vote consensus and its composed positive,
   re-labels the positive, ranks the negatives and returns Arrow record batches.
4. The main process streams the batches into per-split Arrow files, then publishes
   ``OUT/preferences`` and ``OUT/sft`` (datasets.DatasetDict), ``OUT/annotations``, the exports,
   the card and its figures, each with an atomic rename.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrmax.core import schemas
from cxrmax.core.errors import CxrmaxError, InputError, where
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.labeler.batch import pool_worker_signals
from cxrmax.preferences import consensus as C
from cxrmax.preferences import drift as D

SPLITS = ("train", "validate", "test")

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


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


#: The end-of-stream marker every closed Arrow IPC stream writer appends (continuation + length 0).
_STREAM_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def _read_arrow(path: Path) -> pa.Table:
    """Read an Arrow IPC file or stream, memory-mapped (no copy of the texts).

    A stream cut exactly between two record batches (an interrupted copy from another machine)
    still parses, silently short: such a stream lacks the end-of-stream marker its writer appends
    on close, so that marker is required (ArrowInvalid otherwise)."""
    source = pa.memory_map(str(path), "r")
    try:
        return pa.ipc.open_file(source).read_all()
    except pa.ArrowInvalid:
        source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_stream(source).read_all()
        size = source.size()
        source.seek(max(0, size - len(_STREAM_EOS)))
        if source.read() != _STREAM_EOS:
            raise pa.ArrowInvalid(
                f"the stream ends without its end-of-stream marker after {table.num_rows} rows "
                "(truncated: an interrupted write or copy?)"
            ) from None
        return table


def _read_file(path: Path) -> pa.Table:
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    try:
        if suffix in (".arrow", ".feather", ".ipc"):
            return _read_arrow(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path)
        if suffix in (".jsonl", ".json", ".jsonl.gz", ".json.gz"):
            import pyarrow.json as pj

            return pj.read_json(path)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputError(f"{where(path)}: cannot read, corrupt or truncated file ({exc})") from None
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
        if candidate.is_file() and candidate.name.endswith(_DATA_SUFFIXES):
            if candidate.name in ("dataset_info.json", "state.json", "dataset_dict.json"):
                continue
            files.append(candidate)
    if not files:
        raise InputError(f"{where(path)}: no trajectory files (.arrow, .parquet, .jsonl) found")
    return files


def _looks_like_hub_id(spec: str) -> bool:
    return not Path(spec).exists() and spec.count("/") == 1 and not spec.startswith((".", "/"))


def _load_hub(spec: str) -> pa.Table:
    try:
        import datasets

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
                value = _canonical_split(value)
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
    table = pa.concat_tables(tables)
    report.rows = table.num_rows

    def location(i: int, field: str | None = None) -> str:
        f = table.column("source_file")[i].as_py()
        return where(report.files[f], table.column("source_row")[i].as_py(), field)

    for name in ("sample_id", "model"):
        blank = pc.fill_null(pc.equal(table.column(name), ""), True)  # values are trimmed already
        if pc.any(blank).as_py():
            raise InputError(f"{location(pc.index(blank, True).as_py(), name)}: empty {name}")
    text = table.column("text")
    # No letter or digit at all: blank, zero-width or control characters, lone markdown ("**", "---");
    # or a missing value spelled out by a converter (pandas "nan", Python "None", JSON "null").
    filled = pc.fill_null(text, "")
    empty = pc.or_(
        pc.invert(pc.match_substring_regex(filled, r"[\p{L}\p{N}]")),
        pc.match_substring_regex(filled, r"^\s*(?i:nan|none|null|n/?a)\s*$"),
    )
    report.empty_texts = int(pc.sum(empty).as_py() or 0)
    if report.empty_texts:
        table = table.filter(pc.invert(empty))
    report.truncated_texts = int(pc.sum(table.column("truncated")).as_py() or 0)

    # Duplicate keys: the same sample answered twice by the same model (same sample_index).
    order = pc.sort_indices(
        table, sort_keys=[("sample_id", "ascending"), ("model", "ascending"), ("sample_index", "ascending")]
    )
    table = table.take(order)
    sid = table.column("sample_id").combine_chunks()
    mdl = table.column("model").combine_chunks()
    idx = table.column("sample_index").combine_chunks()
    if table.num_rows > 1:
        same = pc.and_(
            pc.and_(pc.equal(sid[1:], sid[:-1]), pc.equal(mdl[1:], mdl[:-1])), pc.equal(idx[1:], idx[:-1])
        )
        dup = np.flatnonzero(same.to_numpy(zero_copy_only=False)) + 1
        if len(dup):
            # The same answer twice (a shard copied in twice, a machine's output merged again) is
            # harmless: dropped and counted. Two different answers under one key need a choice.
            texts = table.column("text").combine_chunks()
            dup_idx = pa.array(dup)
            identical = pc.equal(texts.take(dup_idx), texts.take(pa.array(dup - 1))).to_numpy(
                zero_copy_only=False
            )
            conflicting = dup[~identical]
            if len(conflicting) and not lenient:
                i = int(conflicting[0])
                raise InputError(
                    f"{location(i, 'sample_id')}: duplicate key: sample {sid[i].as_py()!r} answered by model "
                    f"{mdl[i].as_py()!r} (sample_index {idx[i].as_py()}) again with a different answer; first "
                    f"seen at {location(i - 1)} (use --lenient to keep the first)"
                )
            keep = np.ones(table.num_rows, dtype=bool)
            keep[dup] = False
            report.identical_duplicates_skipped = int(identical.sum())
            report.duplicates_skipped = len(conflicting)
            table = table.filter(pa.array(keep))

    # Conflicting metadata for one sample id across rows (mismatched ids).
    for name in ("study_id", "subject_id", "split"):
        column = table.column(name)
        if column.null_count == table.num_rows:
            continue
        grouped = (
            pa.table({"sample_id": table.column("sample_id"), "v": column})
            .group_by("sample_id")
            .aggregate([("v", "count_distinct")])
        )
        bad = grouped.filter(pc.greater(grouped.column("v_count_distinct"), 1)).column("sample_id")
        if len(bad):
            if not lenient:
                first = bad[0].as_py()
                rows = np.flatnonzero(
                    pc.equal(table.column("sample_id"), first).to_numpy(zero_copy_only=False)
                )
                values = sorted({str(table.column(name)[int(r)].as_py()) for r in rows})
                raise InputError(
                    f"{location(int(rows[0]), name)}: mismatched ids: sample {first!r} has {name} "
                    f"{' vs '.join(values)} in different rows (e.g. {location(int(rows[-1]))}); use --lenient to skip"
                )
            drop = pc.is_in(table.column("sample_id"), value_set=bad.combine_chunks())
            report.conflicting_samples_skipped += len(bad)
            table = table.filter(pc.invert(drop))

    prompts = table.column("prompt")
    if prompts.null_count < table.num_rows:
        grouped = (
            pa.table({"sample_id": table.column("sample_id"), "p": prompts})
            .group_by("sample_id")
            .aggregate([("p", "count_distinct")])
        )
        mixed = grouped.filter(pc.greater(grouped.column("p_count_distinct"), 1)).column("sample_id")
        report.samples_with_mixed_prompts = len(mixed)
        report.mixed_prompt_examples = [str(v) for v in mixed.slice(0, 5).to_pylist()]
    return table, report


# --------------------------------------------------------------------------------------------
# Labelling (the rule labeler of cxrmax.labeler, one trajectory at a time inside a worker)
# --------------------------------------------------------------------------------------------


@dataclass
class LabelArrays:
    """The labeler's reading of n texts as arrays (see cxrmax.preferences.drift for the codings)."""

    states: np.ndarray  # (n, 14) int8
    sides: np.ndarray  # (n, 14) int8
    refusal: np.ndarray  # (n,) bool
    hedging: np.ndarray  # (n,) bool
    errors: list[str | None]
    step_offsets: np.ndarray  # (n + 1,) int64
    step_states: np.ndarray  # (total_steps, 14) int8
    step_sides: np.ndarray  # (total_steps, 14) int8
    step_excluded: np.ndarray  # (total_steps,) bool: inside a refusal or hedging span
    step_texts: list[str]


def _spans(items: object) -> list[tuple[int, int]]:
    out = []
    for item in items or ():  # type: ignore[attr-defined]
        if hasattr(item, "start") and hasattr(item, "end"):
            out.append((int(item.start), int(item.end)))
        elif isinstance(item, (tuple, list)) and len(item) >= 2:
            out.append((int(item[0]), int(item[1])))
    return out


def _status_of(observation: object) -> str | None:
    if isinstance(observation, str):
        return observation
    return getattr(observation, "status", None)


def label_trajectories(texts: Sequence[str | None], label_text: Callable | None = None) -> LabelArrays:
    """Label texts with `cxrmax.labeler.label_text` (or `label_text`), steps included. A text the
    labeler fails on is kept with every observation absent and its error recorded."""
    if label_text is None:
        from cxrmax.labeler import label_text
    n = len(texts)
    states = np.zeros((n, D.N_OBS), dtype=np.int8)
    sides = np.zeros((n, D.N_OBS), dtype=np.int8)
    refusal = np.zeros(n, dtype=bool)
    hedging = np.zeros(n, dtype=bool)
    errors: list[str | None] = [None] * n
    offsets = np.zeros(n + 1, dtype=np.int64)
    # Sparse coordinates (row, observation, code), scattered into arrays at the end: far cheaper
    # than numpy item assignment per mention.
    t_rows: list[int] = []
    t_obs: list[int] = []
    t_states: list[int] = []
    t_sides: list[int] = []
    s_rows: list[int] = []
    s_obs: list[int] = []
    s_states: list[int] = []
    d_rows: list[int] = []
    d_obs: list[int] = []
    d_sides: list[int] = []
    excluded: list[bool] = []
    step_texts: list[str] = []
    obs_index = {name: i for i, name in enumerate(OBSERVATIONS)}
    state_of = D._STATUS_TO_STATE
    side_of = D._SIDE_TO_CODE
    n_steps = 0
    for t, text in enumerate(texts):
        try:
            labelled = label_text(text or "")
        except Exception as exc:  # a junk text must not stop a 170k-row build
            errors[t] = f"{type(exc).__name__}: {exc}"
            offsets[t + 1] = n_steps
            continue
        errors[t] = getattr(labelled, "error", None)
        for name, obs in labelled.observations.items():
            code = state_of.get(_status_of(obs), 0)
            i = obs_index.get(name)
            if code and i is not None:
                t_rows.append(t)
                t_obs.append(i)
                t_states.append(code)
                t_sides.append(side_of.get(getattr(obs, "laterality", None) or "", 0))
        refusal[t] = bool(getattr(labelled, "is_refusal", False))
        bad_spans = _spans(getattr(labelled, "refusal", ()))
        hedges = _spans(getattr(labelled, "hedging", ()))
        hedging[t] = bool(hedges)
        bad_spans += hedges
        for step in getattr(labelled, "steps", ()) or ():
            if getattr(step, "kind", None) == "heading":  # headings are not reasoning steps
                continue
            for name, status in (step.statuses or {}).items():
                code = state_of.get(_status_of(status), 0)
                i = obs_index.get(name)
                if code and i is not None:
                    s_rows.append(n_steps)
                    s_obs.append(i)
                    s_states.append(code)
            for name, side in (step.lateralities or {}).items():
                code = side_of.get(side or "", 0)
                i = obs_index.get(name)
                if code and i is not None:
                    d_rows.append(n_steps)
                    d_obs.append(i)
                    d_sides.append(code)
            if bad_spans:
                start, end = step.start, step.end
                excluded.append(any(s < end and start < e for s, e in bad_spans))
            else:
                excluded.append(False)
            step_texts.append(step.text)
            n_steps += 1
        offsets[t + 1] = n_steps
    states[t_rows, t_obs] = t_states
    sides[t_rows, t_obs] = t_sides
    step_states = np.zeros((n_steps, D.N_OBS), dtype=np.int8)
    step_sides = np.zeros((n_steps, D.N_OBS), dtype=np.int8)
    step_states[s_rows, s_obs] = s_states
    step_sides[d_rows, d_obs] = d_sides
    return LabelArrays(
        states=states,
        sides=sides,
        refusal=refusal,
        hedging=hedging,
        errors=errors,
        step_offsets=offsets,
        step_states=step_states,
        step_sides=step_sides,
        step_excluded=np.array(excluded, dtype=bool),
        step_texts=step_texts,
    )


def relabel(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(states, sides) of texts without steps: the labeler's batch fast path (label_codes) when
    it has one, else label_text."""
    try:
        from cxrmax.labeler.core import label_codes
    except ImportError:  # pragma: no cover - older labeler
        lab = label_trajectories(texts)
        return lab.states, lab.sides
    n = len(texts)
    states = np.zeros((n, D.N_OBS), dtype=np.int8)
    sides = np.zeros((n, D.N_OBS), dtype=np.int8)
    value_to_state = {1: D.POSITIVE, 0: D.NEGATIVE, -1: D.UNCERTAIN}
    for t, text in enumerate(texts):
        values, lateralities = label_codes(text)[:2]
        for i, (value, side) in enumerate(zip(values, lateralities, strict=True)):
            if value is not None:
                states[t, i] = value_to_state[value]
                if side:
                    sides[t, i] = D.side_to_code(side)
    return states, sides


# --------------------------------------------------------------------------------------------
# One chunk of samples (runs in a worker process)
# --------------------------------------------------------------------------------------------


@dataclass
class ChunkOptions:
    """The ranking and annotation options a worker needs (picklable)."""

    drop_non_drifting: bool = False
    max_negatives: int | None = None
    exclude_refusals_from_sft: bool = False
    step_bins: int = D.DEFAULT_STEP_BINS
    delta: int = 1
    consensus: str = "vote"


@dataclass
class ChunkResult:
    """Record batches produced from one chunk, plus counters."""

    preferences: pa.RecordBatch
    sft: pa.RecordBatch
    trajectories: pa.RecordBatch
    samples: pa.RecordBatch
    counts: Counter
    contexts: pa.RecordBatch | None = None  # --consensus model: what the model reads, per preference row


def _labels_struct(states: np.ndarray) -> pa.StructArray:
    values = D.states_to_labels_array(states)
    return pa.StructArray.from_arrays(
        [pa.array(values[:, i], type=pa.float32(), from_pandas=True) for i in range(D.N_OBS)],
        fields=list(schemas.LABELS_TYPE),
    )


def _sides_struct(sides: np.ndarray) -> pa.StructArray:
    names = np.array(D.SIDE_NAMES, dtype=object)
    return pa.StructArray.from_arrays(
        [pa.array(names[sides[:, i]], type=pa.string()) for i in range(D.N_OBS)],
        fields=list(schemas.LATERALITY_TYPE),
    )


_OBS_NAMES = np.array(OBSERVATIONS, dtype=object)


def _obs_lists(mask: np.ndarray) -> pa.ListArray:
    return pa.array([list(_OBS_NAMES[row]) for row in mask], type=pa.list_(pa.string()))


def _float(values: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(values, dtype=np.float32), type=pa.float32(), from_pandas=True)


def _gt_states(labels: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(n, 14) ground-truth states and (n,) known mask (null struct or all-null = unknown)."""
    labels = labels.combine_chunks() if isinstance(labels, pa.ChunkedArray) else labels
    n = len(labels)
    values = np.full((n, D.N_OBS), np.nan, dtype=np.float32)
    for i, name in enumerate(OBSERVATIONS):
        column = labels.field(name)
        values[:, i] = column.to_numpy(zero_copy_only=False).astype(np.float32)
    struct_null = labels.is_null().to_numpy(zero_copy_only=False)
    values[struct_null] = np.nan
    known = ~np.isnan(values).all(axis=1)
    return D.labels_array_to_states(values), known


def annotate_chunk(chunk: pa.Table, options: ChunkOptions, label_text: Callable | None = None) -> ChunkResult:
    """Annotate, vote, compose and rank one chunk of trajectories sorted by (sample_id, model,
    sample_index) and holding whole samples. Pure: returns record batches, writes nothing."""
    counts: Counter = Counter()
    n = chunk.num_rows
    texts = chunk.column("text").to_pylist()
    lab = label_trajectories(texts, label_text)
    sample_ids = chunk.column("sample_id").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, sample_ids[1:] != sample_ids[:-1]])
    offsets = np.r_[starts, n].astype(np.int64)
    g_count = len(starts)
    group_of = np.repeat(np.arange(g_count), np.diff(offsets))
    models = chunk.column("model").to_pylist()
    sample_index = chunk.column("sample_index").to_numpy(zero_copy_only=False)
    source_names = [m if int(k) == 0 else f"{m}#{int(k)}" for m, k in zip(models, sample_index, strict=True)]
    failed = np.array([e is not None for e in lab.errors], dtype=bool)
    counts["labeler_errors"] += int(failed.sum())
    truncated = chunk.column("truncated").to_numpy(zero_copy_only=False).astype(bool)

    # Ground truth comparison.
    gt_states, gt_known = _gt_states(chunk.column("labels"))
    # The label CSVs carry no side: where the report is known, its sides (read by the labeler)
    # are the ground-truth sides; one read per sample.
    reports = chunk.column("report").to_pylist()
    first_rows = [int(i) for i in offsets[:-1]]
    report_of_sample = [reports[i] for i in first_rows]
    gt_sides = np.zeros_like(gt_states)
    has_report = np.array([bool(r) for r in report_of_sample], dtype=bool)
    if has_report.any():
        _, sample_sides = relabel([r for r in report_of_sample if r])
        per_sample = np.zeros((g_count, D.N_OBS), dtype=np.int8)
        per_sample[has_report] = sample_sides
        gt_sides = per_sample[group_of]
    gt = D.compare(lab.states, lab.sides, gt_states, gt_sides)
    gt_mask = gt_known[:, None]

    # Votes and consensus (labeler failures take part as non-voters, like refusals).
    states_p, valid = D.pad_groups(lab.states, offsets)
    sides_p, _ = D.pad_groups(lab.sides, offsets)
    refusal_p, _ = D.pad_groups(lab.refusal | failed, offsets)
    cons = C.vote(states_p, sides_p, valid, refusal_p)
    cons_states_t = cons.states[group_of]
    cons_sides_t = cons.sides[group_of]
    vs_cons = D.compare(lab.states, lab.sides, cons_states_t, cons_sides_t)
    drift = D.drift_from_consensus(lab.states, lab.sides, lab.refusal | failed, cons_states_t, cons_sides_t)

    # Per-sample annotations.
    votes = D.vote_counts(states_p, valid)
    vote_entropy = D.entropy(votes).astype(np.float32)
    disagreement = D.pairwise_disagreement(states_p, valid, sides_p).astype(np.float32)
    lat_conflicts = D.laterality_conflicts(states_p, sides_p, valid)
    cumulative = D.cumulative_step_states(lab.step_states, lab.step_offsets, options.step_bins)
    cumulative_p, _ = D.pad_groups(cumulative, offsets)
    stepwise = D.stepwise_drift(cumulative_p, valid, options.delta)

    # Similarity with the report where one is known.
    similarity = np.array(
        [
            np.nan if not r else (D.token_similarity(t, r) if t else np.nan)
            for t, r in zip(texts, reports, strict=True)
        ],
        dtype=np.float64,
    )

    # Compose the positives: supported steps of the least drifting sources first.
    step_group = np.repeat(group_of, np.diff(lab.step_offsets))
    supported = (
        C.support_mask(
            lab.step_states,
            lab.step_sides,
            cons.states[step_group],
            cons.sides[step_group],
            cons.side_conflict[step_group],
        )
        & ~lab.step_excluded
    )
    # The last step of an answer cut at max_tokens is a sentence cut in the middle: never a step of
    # the positive (the complete steps before it still are).
    cut = truncated & (np.diff(lab.step_offsets) > 0)
    supported[lab.step_offsets[1:][cut] - 1] = False
    bits = C.observation_bits(lab.step_states) if len(lab.step_states) else np.zeros(0, dtype=np.int64)
    prompts = chunk.column("prompt").to_pylist()
    chosen_texts: list[str] = []
    negatives_per_sample: list[np.ndarray] = []
    negative_rank = np.full(n, -1, dtype=np.int32)
    for g in range(g_count):
        lo, hi = int(offsets[g]), int(offsets[g + 1])
        rows = np.arange(lo, hi)
        # Least drifting first, stable in (sample_id, model, sample_index) order.
        ascending = rows[np.lexsort((rows, drift[lo:hi]))]
        candidates = []
        for t in ascending:
            if lab.refusal[t] or failed[t]:
                continue
            s0, s1 = int(lab.step_offsets[t]), int(lab.step_offsets[t + 1])
            candidates.append(
                [C.CandidateStep(lab.step_texts[s], bool(supported[s]), int(bits[s])) for s in range(s0, s1)]
            )
        text, _ = C.compose(candidates, cons.states[g], cons.sides[g], prompts[lo])
        chosen_texts.append(text)
        # Negatives: most drifting first; ties keep the stable order.
        descending = rows[np.lexsort((rows, -drift[lo:hi]))]
        if options.drop_non_drifting:
            descending = descending[drift[descending] > 0]
        if options.max_negatives is not None:
            descending = descending[: options.max_negatives]
        # A negative equal to the positive (all sources agree and the positive is one of them) would
        # make the same text both preferred and rejected: not a negative.
        same = np.array([_same_text(texts[t], text) for t in descending], dtype=bool)
        if same.any():
            counts["negatives_identical_to_chosen"] += int(same.sum())
            descending = descending[~same]
        negative_rank[descending] = np.arange(len(descending))
        negatives_per_sample.append(descending)

    # Re-label every composed positive and flag disagreement with the consensus it states.
    if label_text is None:
        rel_states, rel_sides = relabel(chosen_texts)
    else:
        rel = label_trajectories(chosen_texts, label_text)
        rel_states, rel_sides = rel.states, rel.sides
    # Where every source refused there is no consensus to state (and no preference row): not flagged.
    flagged = C.disagrees(rel_states, rel_sides, cons) & (cons.voters > 0)
    counts["consensus_flagged"] += int(flagged.sum())

    first = offsets[:-1]

    def col(name: str) -> pa.Array:
        return chunk.column(name).combine_chunks()

    # Preference rows (samples that keep at least one negative).
    texts_arr = chunk.column("text").combine_chunks()
    keep = np.array([len(neg) > 0 for neg in negatives_per_sample], dtype=bool)
    counts["samples_without_negatives"] += int((~keep).sum())
    # Every source refused (or failed to label): there is no consensus to prefer.
    no_voters = cons.voters == 0
    counts["samples_without_consensus"] += int((keep & no_voters).sum())
    keep &= ~no_voters
    kept = np.flatnonzero(keep)
    neg_offsets = np.r_[0, np.cumsum([len(negatives_per_sample[g]) for g in kept])].astype(np.int32)
    neg_rows = (
        np.concatenate([negatives_per_sample[g] for g in kept]) if len(kept) else np.zeros(0, dtype=np.int64)
    )
    take = pa.array(first[kept])
    source_arr = pa.array(source_names, type=pa.string())
    preferences = pa.RecordBatch.from_arrays(
        [
            col("sample_id").take(take),
            col("dicom_id").take(take),
            col("subject_id").take(take),
            col("study_id").take(take),
            col("split").take(take),
            col("image_path").take(take),
            col("prompt_id").take(take),
            col("prompt").take(take),
            pa.array([chosen_texts[g] for g in kept], type=pa.string()),
            pa.array([f"consensus-{options.consensus}"] * len(kept), type=pa.string()),
            pa.ListArray.from_arrays(
                pa.array(neg_offsets), texts_arr.take(pa.array(neg_rows, type=pa.int64()))
            ),
            pa.ListArray.from_arrays(
                pa.array(neg_offsets), source_arr.take(pa.array(neg_rows, type=pa.int64()))
            ),
            pa.ListArray.from_arrays(pa.array(neg_offsets), _float(drift[neg_rows])),
            _labels_struct(cons.states[kept]),
            col("labels").take(take),
            _float(stepwise.score[kept]),
            pa.array(flagged[kept], type=pa.bool_()),
        ],
        schema=schemas.PREFERENCE_SCHEMA,
    )

    # SFT rows: every labelled trajectory (optionally without refusals).
    sft_keep = ~failed
    # An answer cut at max_tokens would teach the student to stop mid-sentence: never an SFT target
    # (it stays a negative: a real, drifting source output).
    counts["sft_truncated_excluded"] += int((sft_keep & truncated).sum())
    sft_keep &= ~truncated
    if options.exclude_refusals_from_sft:
        counts["sft_refusals_excluded"] += int((sft_keep & lab.refusal).sum())
        sft_keep &= ~lab.refusal
    sft_idx = pa.array(np.flatnonzero(sft_keep))
    sft = pa.RecordBatch.from_arrays(
        [
            col("sample_id").take(sft_idx),
            col("split").take(sft_idx),
            col("image_path").take(sft_idx),
            col("prompt_id").take(sft_idx),
            col("prompt").take(sft_idx),
            texts_arr.take(sft_idx),
            source_arr.take(sft_idx),
        ],
        schema=schemas.SFT_SCHEMA,
    )

    nan = np.float32(np.nan)
    trajectories = pa.RecordBatch.from_arrays(
        [
            col("sample_id"),
            col("model"),
            col("sample_index"),
            col("split"),
            pa.array(pc.utf8_length(texts_arr).cast(pa.int32())),
            pa.array(np.diff(lab.step_offsets).astype(np.int32)),
            pa.array(lab.refusal),
            pa.array(lab.hedging),
            pa.array(lab.errors, type=pa.string()),
            _labels_struct(lab.states),
            _sides_struct(lab.sides),
            _float(np.where(gt_known, gt.precision, nan)),
            _float(np.where(gt_known, gt.recall, nan)),
            _float(np.where(gt_known, gt.f1, nan)),
            _float(np.where(gt_known, gt.side_agreement, nan)),  # sides from the report, when known
            pa.array(np.where(gt_known, gt.side_compared, 0).astype(np.int32)),
            _obs_lists(gt.hallucinated & gt_mask),
            _obs_lists(gt.omitted & gt_mask),
            _obs_lists(gt.side_errors & gt_mask),
            _float(vs_cons.precision),
            _float(vs_cons.recall),
            _float(vs_cons.f1),
            _float(vs_cons.side_agreement),
            _obs_lists(vs_cons.hallucinated),
            _obs_lists(vs_cons.omitted),
            _obs_lists(vs_cons.side_errors),
            _float(similarity),
            _float(drift),
            pa.array(np.where(negative_rank >= 0, negative_rank, None).tolist(), type=pa.int32()),
            pa.array(truncated, type=pa.bool_()),
        ],
        schema=schemas.DRIFT_TRAJECTORY_SCHEMA,
    )

    sizes = np.diff(offsets)
    names_p = [source_names[int(offsets[g]) : int(offsets[g + 1])] for g in range(g_count)]
    refusal_flags = lab.refusal
    samples = pa.RecordBatch.from_arrays(
        [
            col("sample_id").take(pa.array(first)),
            col("split").take(pa.array(first)),
            pa.array(names_p, type=pa.list_(pa.string())),
            pa.array(sizes.astype(np.int32)),
            pa.array(
                [
                    [source_names[t] for t in range(int(offsets[g]), int(offsets[g + 1])) if refusal_flags[t]]
                    for g in range(g_count)
                ],
                type=pa.list_(pa.string()),
            ),
            pa.array(votes[..., D.POSITIVE].tolist(), type=pa.list_(pa.int16())),
            pa.array(votes[..., D.UNCERTAIN].tolist(), type=pa.list_(pa.int16())),
            pa.array(votes[..., D.NEGATIVE].tolist(), type=pa.list_(pa.int16())),
            pa.array(votes[..., D.ABSENT].tolist(), type=pa.list_(pa.int16())),
            pa.array(vote_entropy.tolist(), type=pa.list_(pa.float32())),
            pa.array(
                [disagreement[g, : sizes[g], : sizes[g]].tolist() for g in range(g_count)],
                type=pa.list_(pa.list_(pa.float32())),
            ),
            _obs_lists(lat_conflicts),
            pa.array(stepwise.profile.tolist(), type=pa.list_(pa.float32())),
            pa.array(stepwise.dispersion.tolist(), type=pa.list_(pa.float32())),
            _float(stepwise.score),
            _labels_struct(cons.states),
            _sides_struct(cons.sides),
            _obs_lists(cons.side_conflict),
            pa.array(flagged),
            pa.array([len(neg) for neg in negatives_per_sample], type=pa.int32()),
        ],
        schema=schemas.DRIFT_SAMPLE_SCHEMA,
    )
    counts["samples"] += g_count
    counts["trajectories"] += n
    counts["refusals"] += int(lab.refusal.sum())
    counts["preference_rows"] += len(kept)
    counts["negatives"] += len(neg_rows)
    counts["sft_rows"] += int(sft_keep.sum())
    contexts = None
    if options.consensus == "model":
        usable = ~(lab.refusal | failed)
        contexts = pa.RecordBatch.from_arrays(
            [
                pa.array(
                    [
                        [texts[t] for t in range(int(offsets[g]), int(offsets[g + 1])) if usable[t]]
                        for g in kept
                    ],
                    type=pa.list_(pa.string()),
                ),
                pa.array(cons.sides[kept].tolist(), type=pa.list_(pa.int8())),
            ],
            names=["sources", "consensus_sides"],
        )
    return ChunkResult(preferences, sft, trajectories, samples, counts, contexts)


def _same_text(a: str | None, b: str | None) -> bool:
    """Equal up to whitespace (a composed positive re-flows a source's lines)."""
    return " ".join((a or "").split()) == " ".join((b or "").split())


def _bounded_imap(pool, func: Callable, items: Iterable, in_flight: int) -> Iterator:
    """Ordered map over a pool with at most `in_flight` tasks queued: Pool.imap would pickle every
    chunk up front, so memory would grow with the input instead of staying flat."""
    from collections import deque

    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _worker(args: tuple[pa.Table, ChunkOptions]) -> ChunkResult:
    chunk, options = args
    return annotate_chunk(chunk, options)


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


@dataclass
class BuildOptions:
    """Options of `build_preferences` (the CLI flags of `cxrmax build-preferences`)."""

    min_sources: int = 2
    consensus: str = "vote"  # vote | model
    drop_non_drifting: bool = False
    max_negatives: int | None = None
    exclude_refusals_from_sft: bool = False
    lenient: bool = False
    mimic_root: Path | None = None
    ms_cxr_t: Path | None = None
    step_bins: int = D.DEFAULT_STEP_BINS
    delta: int = 1
    processes: int | None = None
    chunk_samples: int = 1000
    export_trl: bool = True
    export_swift: bool = True
    export_parquet: Path | None = None
    push_to_hub: str | None = None
    public: bool = False
    card: bool = True
    figures: bool = True
    # --consensus model: generate backend settings (see cxrmax.preferences.consensus.synthesise_with_model)
    model_backend: dict | None = None


@dataclass
class BuildSummary:
    """What a build did, also written to OUT/build_report.json."""

    out: str
    load: dict
    counts: dict
    skipped_few_sources: int
    skipped_few_sources_examples: list[str]
    ms_cxr_t_excluded_rows: int
    split_unknown_rows: int
    split_rows: dict
    models: list[str]
    studies_not_in_mimic: int = 0  # rows whose study has no label row under --mimic-root
    split_invalid_rows_skipped: int = 0  # --lenient: rows with an unrecognised split value
    split_from_mimic_rows: int = 0  # rows whose split disagreed with --mimic-root's (official split kept)
    subject_mismatch_rows_skipped: int = 0  # --lenient: study under another subject in --mimic-root
    #: with --mimic-root: samples whose image_path is missing or names no file there (their rows are
    #: built, but a trainer cannot load the image: fix the paths or the root)
    samples_without_image: int = 0
    samples_without_image_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # wall seconds per phase


_SPLIT_ALIASES = {
    "train": "train",
    "validate": "validate",
    "validation": "validate",
    "val": "validate",
    "valid": "validate",
    "dev": "validate",
    "test": "test",
}


def _canonical_split(split: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Known split spellings -> train/validate/test; others lower-cased and trimmed (judged later)."""
    lowered = pc.utf8_lower(pc.utf8_trim_whitespace(split))
    aliases = pa.array(list(_SPLIT_ALIASES))
    canonical = pa.array(list(_SPLIT_ALIASES.values()))
    return pc.coalesce(pc.take(canonical, pc.index_in(lowered, value_set=aliases)), lowered)


def _normalise_split(
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
            split = _SPLIT_ALIASES.get(str(value).strip().lower())
            if split is None:
                if not lenient:
                    file_index = table.column("source_file")[i].as_py()
                    path = files[file_index] if file_index < len(files) else "trajectories"
                    raise InputError(
                        f"{where(path, table.column('source_row')[i].as_py(), 'split')}: unknown split "
                        f"{value!r} (accepted: {', '.join(sorted(_SPLIT_ALIASES))}); use --lenient to skip"
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


@dataclass
class _MimicCheck:
    """What joining the trajectories to a MIMIC-CXR root found (counts of rows)."""

    not_in_mimic: int = 0  # study without a label row in the root
    split_from_mimic: int = 0  # the trajectory's split disagreed with MIMIC-CXR's: MIMIC-CXR's kept
    subject_mismatch_skipped: int = 0  # --lenient: the study belongs to another subject there


def _enrich_from_mimic(
    table: pa.Table, root: Path, lenient: bool, files: Sequence[str] = ()
) -> tuple[pa.Table, _MimicCheck]:
    """Fill missing ground-truth labels, split, subject ids and the report text from a MIMIC-CXR
    root (labels from the CheXpert CSV by study_id; report = impression > findings > last paragraph).

    The official split wins over the trajectory's (the outputs follow the MIMIC-CXR split; a
    trajectory that says "train" for a test study would leak it), counted. A study that belongs to
    another subject in the root means a wrong study id: InputError naming the row (--lenient: the
    rows are dropped, counted)."""
    from cxrmax.mimic.reader import MimicCXR

    mimic = MimicCXR(root, lenient=lenient)
    study = table.column("study_id")
    if study.null_count == table.num_rows:
        raise InputError(
            f"{where('trajectories', field='study_id')}: --mimic-root needs study ids in the input"
        )
    check = _MimicCheck()
    study_labels = mimic.study_labels()
    key = study_labels.column("study_id")
    lookup = pc.index_in(study, value_set=key.combine_chunks())
    has = pc.is_valid(lookup)
    struct = pa.StructArray.from_arrays(
        [study_labels.column(name).combine_chunks().cast(pa.float32()) for name in OBSERVATIONS],
        fields=list(schemas.LABELS_TYPE),
    )
    looked_up = struct.take(lookup.combine_chunks() if isinstance(lookup, pa.ChunkedArray) else lookup)
    current = table.column("labels").combine_chunks()
    labels = pc.if_else(pc.and_(pc.is_null(current), has), looked_up, current)
    table = table.set_column(table.schema.get_field_index("labels"), "labels", labels)
    for name in ("split", "subject_id"):
        if name in study_labels.column_names:
            values = (
                study_labels.column(name)
                .combine_chunks()
                .cast(table.schema.field(name).type)
                .take(lookup.combine_chunks() if isinstance(lookup, pa.ChunkedArray) else lookup)
            )
            differs = pc.fill_null(pc.not_equal(table.column(name), values), False)
            n_differ = int(pc.sum(differs).as_py() or 0)
            if n_differ and name == "subject_id":
                if not lenient:
                    i = pc.index(differs, True).as_py()
                    file_index = table.column("source_file")[i].as_py()
                    path = files[file_index] if file_index < len(files) else "trajectories"
                    raise InputError(
                        f"{where(path, table.column('source_row')[i].as_py(), 'subject_id')}: study "
                        f"{table.column('study_id')[i].as_py()} belongs to subject {values[i].as_py()} under "
                        f"{root}, not {table.column(name)[i].as_py()} (a wrong study id?); use --lenient to skip"
                    )
                check.subject_mismatch_skipped = n_differ
                keep = pc.invert(differs)
                table, values = table.filter(keep), values.filter(keep)
                lookup, has = lookup.filter(keep), has.filter(keep)
            elif n_differ:
                check.split_from_mimic = n_differ
            merged = (
                pc.coalesce(values, table.column(name))
                if name == "split"
                else pc.coalesce(table.column(name), values)
            )
            table = table.set_column(table.schema.get_field_index(name), name, merged)
    # Reports: one read per study.
    reports: dict[tuple[int, int], str | None] = {}
    subjects = table.column("subject_id").to_pylist()
    studies = table.column("study_id").to_pylist()
    texts = []
    existing = table.column("report").to_pylist()
    for subject, study_id, old in zip(subjects, studies, existing, strict=True):
        if old or subject is None or study_id is None:
            texts.append(old)
            continue
        if (subject, study_id) not in reports:
            sections = mimic.report(subject, study_id)
            reports[(subject, study_id)] = sections.best() if sections is not None else None
        texts.append(reports[(subject, study_id)])
    check.not_in_mimic = int(pc.sum(pc.invert(has)).as_py() or 0)
    return table.set_column(
        table.schema.get_field_index("report"), "report", pa.array(texts, type=pa.string())
    ), check


def _samples_without_image(table: pa.Table, root: Path) -> list[str]:
    """Sample ids (sorted) whose image_path is null or names no file under `root` (one stat per
    distinct path)."""
    pairs = (
        pa.table({"s": table.column("sample_id"), "p": table.column("image_path")})
        .group_by(["s", "p"])
        .aggregate([])
    )
    exists: dict[str, bool] = {}
    missing = set()
    for sample_id, path in zip(pairs.column("s").to_pylist(), pairs.column("p").to_pylist(), strict=True):
        if path is None:
            missing.add(sample_id)
            continue
        if path not in exists:
            exists[path] = os.path.isfile(_image_ref(path, root))
        if not exists[path]:
            missing.add(sample_id)
    return sorted(missing)


def ms_cxr_t_subjects(path: Path) -> set[int]:
    """Subject ids listed in an MS-CXR-T CSV (the decontamination set)."""
    try:
        from cxrmax.mimic.reader import read_ms_cxr_t

        table = read_ms_cxr_t(path)
    except ImportError:
        import pyarrow.csv as pcsv

        table = pcsv.read_csv(path)
    if "subject_id" not in table.column_names:
        raise InputError(f"{where(path, field='subject_id')}: MS-CXR-T CSV without a subject_id column")
    return {int(v) for v in table.column("subject_id").to_pylist() if v is not None}


class _SplitWriters:
    """Arrow IPC stream writers, one per split, opened lazily."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory = directory
        self.schema = schema
        directory.mkdir(parents=True, exist_ok=True)
        self.writers = {
            split: pa.ipc.new_stream(str(directory / f"{split}.arrow"), schema) for split in SPLITS
        }
        self.rows = Counter()

    def write(self, batch: pa.RecordBatch) -> None:
        split = batch.column(batch.schema.get_field_index("split"))
        for name in SPLITS:
            part = batch.filter(pc.equal(split, name))
            if part.num_rows:
                self.writers[name].write_batch(part)
                self.rows[name] += part.num_rows

    def close(self) -> None:
        for split, writer in self.writers.items():
            if not self.rows[split]:  # an empty split still needs one (empty) batch for `datasets`
                writer.write_batch(pa.RecordBatch.from_pylist([], schema=self.schema))
            writer.close()


def _replace_dir(tmp: Path, final: Path) -> None:
    """Publish directory `tmp` as `final` (rename; any previous version removed afterwards)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _save(dd, path: Path) -> None:
    """save_to_disk with at least one shard per split: `datasets` writes an empty split with zero
    shards, which load_from_disk then cannot read."""
    num_shards = {split: 1 for split, ds in dd.items() if len(ds) == 0}
    dd.save_to_disk(str(path), num_shards=num_shards or None)


def _save_dataset_dict(split_dir: Path, final: Path, work: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(
        {split: datasets.Dataset.from_file(str(split_dir / f"{split}.arrow")) for split in SPLITS}
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=work))
    _save(dd, tmp / "data")
    _replace_dir(tmp / "data", final)
    shutil.rmtree(tmp, ignore_errors=True)


def _iter_chunks(table: pa.Table, sample_starts: np.ndarray, chunk_samples: int) -> Iterator[pa.Table]:
    n = table.num_rows
    bounds = list(sample_starts[::chunk_samples]) + [n]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        yield table.slice(int(lo), int(hi - lo))


def build_preferences(
    inputs: Sequence[str | Path],
    out: str | Path,
    options: BuildOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildSummary:
    """Build OUT/preferences, OUT/sft, OUT/annotations, the exports and the card from trajectories.

    `progress(done_samples, total_samples)` is called after each chunk. Raises InputError on bad
    input (see `load_trajectories`)."""
    import time

    options = options or BuildOptions()
    if options.consensus not in ("vote", "model"):
        raise InputError(f"--consensus must be 'vote' or 'model', not {options.consensus!r}")
    if options.min_sources < 1:
        raise InputError("--min-sources must be at least 1")
    if options.step_bins < 1 or not 1 <= options.delta <= options.step_bins:
        raise InputError("--step-bins must be at least 1 and --delta between 1 and --step-bins")
    if options.max_negatives is not None and options.max_negatives < 1:
        raise InputError("--max-negatives must be at least 1")
    started = time.perf_counter()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a read-only or missing parent
        raise InputError(f"{where(out)}: cannot create the output folder ({exc.strerror or exc})") from None
    phases: dict[str, float] = {}
    mark = [started]

    def phase(name: str) -> None:
        now = time.perf_counter()
        phases[name] = round(now - mark[0], 3)
        mark[0] = now

    table, load_report = load_trajectories(inputs, lenient=options.lenient)
    phase("load")
    mimic_check = _MimicCheck()
    if options.mimic_root is not None:
        table, mimic_check = _enrich_from_mimic(
            table, Path(options.mimic_root), options.lenient, load_report.files
        )
    table, split_unknown, split_invalid = _normalise_split(table, load_report.files, options.lenient)
    without_image: list[str] = []
    if options.mimic_root is not None:
        without_image = _samples_without_image(table, Path(options.mimic_root))
    excluded_rows = 0
    if options.ms_cxr_t is not None:
        subjects = ms_cxr_t_subjects(Path(options.ms_cxr_t))
        in_train = pc.and_(
            pc.equal(table.column("split"), "train"),
            pc.fill_null(
                pc.is_in(table.column("subject_id"), value_set=pa.array(sorted(subjects), pa.int64())), False
            ),
        )
        excluded_rows = int(pc.sum(in_train).as_py() or 0)
        table = table.filter(pc.invert(in_train))

    # Samples with too few sources.
    sample_ids = table.column("sample_id").combine_chunks()
    counts_per_sample = (
        pa.table({"sample_id": sample_ids}).group_by("sample_id").aggregate([("sample_id", "count")])
    )
    few = counts_per_sample.filter(pc.less(counts_per_sample.column("sample_id_count"), options.min_sources))
    few_ids = few.column("sample_id")
    if len(few_ids):
        table = table.filter(
            pc.invert(pc.is_in(table.column("sample_id"), value_set=few_ids.combine_chunks()))
        )
    table = table.combine_chunks()
    ids = table.column("sample_id").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, dtype=np.int64)
    del ids
    models = sorted(set(table.column("model").to_pylist())) if table.num_rows else []

    phase("prepare")
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        pref_writers = _SplitWriters(work / "preferences", schemas.PREFERENCE_SCHEMA)
        sft_writers = _SplitWriters(work / "sft", schemas.SFT_SCHEMA)
        (work / "annotations").mkdir()
        traj_writer = pa.ipc.new_file(
            str(work / "annotations" / "trajectories.arrow"), schemas.DRIFT_TRAJECTORY_SCHEMA
        )
        sample_writer = pa.ipc.new_file(
            str(work / "annotations" / "samples.arrow"), schemas.DRIFT_SAMPLE_SCHEMA
        )
        chunk_options = ChunkOptions(
            drop_non_drifting=options.drop_non_drifting,
            max_negatives=options.max_negatives,
            exclude_refusals_from_sft=options.exclude_refusals_from_sft,
            step_bins=options.step_bins,
            delta=options.delta,
            consensus=options.consensus,
        )
        totals: Counter = Counter()
        processes = options.processes or os.cpu_count() or 1
        # Chunks small enough to keep every worker busy on small runs, capped for flat memory.
        chunk_samples = max(1, min(options.chunk_samples, -(-len(starts) // (2 * processes)) or 1))
        if processes > 1:
            chunk_samples = max(chunk_samples, min(50, options.chunk_samples))
        chunks = ((chunk, chunk_options) for chunk in _iter_chunks(table, starts, chunk_samples))
        pool = None
        if processes > 1 and len(starts) > chunk_samples:
            # fork (like the labeler's batch mode): no re-import per worker, no __main__ guard needed.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = context.Pool(processes, initializer=pool_worker_signals)
            results: Iterable[ChunkResult] = _bounded_imap(pool, _worker, chunks, 2 * processes)
        else:
            results = map(_worker, chunks)
        done = 0
        model_synth = None
        if options.consensus == "model":
            model_synth = C.ModelConsensus(out / "consensus", **(options.model_backend or {}))
        try:
            for result in results:
                preferences = result.preferences
                if model_synth is not None:
                    preferences = model_synth.apply(preferences, result.contexts)
                    totals["consensus_flagged_model"] += model_synth.last_flagged
                pref_writers.write(preferences)
                sft_writers.write(result.sft)
                traj_writer.write_batch(result.trajectories)
                sample_writer.write_batch(result.samples)
                totals.update(result.counts)
                done += result.samples.num_rows
                if progress is not None:
                    progress(done, len(starts))
        finally:
            if pool is not None:
                pool.terminate()
            if model_synth is not None:
                totals["consensus_model_requests"] += model_synth.requests
                totals["consensus_model_failures"] += model_synth.failures
                totals["consensus_model_truncated"] += model_synth.truncated
                model_synth.close()
        phase("annotate")
        pref_writers.close()
        sft_writers.close()
        traj_writer.close()
        sample_writer.close()

        # Everything is staged under the work folder and published with renames at the very end,
        # so a crash or Ctrl-C before that leaves the previous outputs whole.
        stage = work / "out"
        stage.mkdir()
        _save_dataset_dict(work / "preferences", stage / "preferences", work)
        _save_dataset_dict(work / "sft", stage / "sft", work)
        os.replace(work / "annotations", stage / "annotations")
        phase("save")
        if options.export_trl:
            export_trl(stage / "preferences", stage / "exports" / "trl", image_root=options.mimic_root)
            phase("export_trl")
        if options.export_swift:
            export_swift(stage / "preferences", stage / "exports" / "swift", image_root=options.mimic_root)
            phase("export_swift")
        summary = BuildSummary(
            out=str(out),
            load=asdict(load_report),
            counts=dict(totals),
            skipped_few_sources=len(few_ids),
            skipped_few_sources_examples=[str(v) for v in few_ids.slice(0, 10).to_pylist()],
            ms_cxr_t_excluded_rows=excluded_rows,
            split_unknown_rows=split_unknown,
            split_rows={"preferences": dict(pref_writers.rows), "sft": dict(sft_writers.rows)},
            models=models,
            studies_not_in_mimic=mimic_check.not_in_mimic,
            split_from_mimic_rows=mimic_check.split_from_mimic,
            subject_mismatch_rows_skipped=mimic_check.subject_mismatch_skipped,
            split_invalid_rows_skipped=split_invalid,
            samples_without_image=len(without_image),
            samples_without_image_examples=without_image[:5],
        )
        _write_json_atomic(stage / "build_report.json", asdict(summary))
        if options.card:
            from cxrmax.preferences import datacard

            datacard.write_card(stage, figures=options.figures)
            phase("card")
        summary.phases = phases
        summary.seconds = round(time.perf_counter() - started, 3)
        _write_json_atomic(stage / "build_report.json", asdict(summary))
        for name in _PUBLISHED:
            _publish(stage / name, out / name)
        if options.export_parquet is not None:
            export_parquet(out, Path(options.export_parquet))
        if options.push_to_hub:
            push_to_hub(out, options.push_to_hub, private=not options.public)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


#: What a build publishes under OUT (folders among these not rebuilt this time are removed as stale).
_PUBLISHED = ("preferences", "sft", "annotations", "exports", "figures", "README.md", "build_report.json")


def _publish(staged: Path, final: Path) -> None:
    """Move a staged output into place (a directory replaces the old one whole); remove a stale
    output folder when nothing was staged for it (files such as README.md are never deleted)."""
    if staged.is_dir():
        _replace_dir(staged, final)
    elif staged.exists():
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(staged, final)
    elif final.is_dir():  # e.g. exports of an earlier build that no longer match
        shutil.rmtree(final)


def _write_json_atomic(path: Path, payload: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Exports
# --------------------------------------------------------------------------------------------


def _image_ref(path: str | None, image_root: Path | None) -> str | None:
    if path is None:
        return None
    if image_root is not None and not os.path.isabs(path):
        return str(Path(image_root) / path)
    return path


def _iter_preference_rows(preferences_dir: Path, split: str) -> Iterator[dict]:
    import datasets

    ds = datasets.load_from_disk(str(preferences_dir))[split]
    for batch in ds.data.table.to_batches(max_chunksize=1024):
        yield from batch.to_pylist()


def _trl_features():  # -> datasets.Features
    import datasets

    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = {"role": datasets.Value("string"), "content": datasets.List(part)}
    return datasets.Features(
        {
            "sample_id": datasets.Value("string"),
            "prompt": datasets.List(message),
            "chosen": datasets.List(message),
            "rejected": datasets.List(message),
            "images": datasets.List(datasets.Value("string")),
            "rejected_model": datasets.Value("string"),
            "rejected_drift": datasets.Value("float32"),
            "negative_rank": datasets.Value("int32"),
        }
    )


def _messages(role: str, texts: pa.Array, with_image: bool) -> pa.ListArray:
    """One single-message conversation per row: [{"role", "content": [({"type": "image"},)
    {"type": "text", "text": ...}]}], built column-wise (no Python object per row)."""
    m = len(texts)
    texts = pc.fill_null(texts.cast(pa.string()), "")
    if with_image:
        types = pa.array(np.tile(np.array(["image", "text"], dtype=object), m), type=pa.string())
        both = pa.concat_arrays([pa.nulls(m, pa.string()), texts.cast(pa.string())])
        order = np.empty(2 * m, dtype=np.int64)
        order[0::2] = np.arange(m)
        order[1::2] = np.arange(m) + m
        part_text = both.take(pa.array(order))
        per_row = 2
    else:
        types = pa.array(np.full(m, "text", dtype=object), type=pa.string())
        part_text = texts.cast(pa.string())
        per_row = 1
    parts = pa.StructArray.from_arrays([types, part_text], names=["type", "text"])
    content = pa.ListArray.from_arrays(
        pa.array(np.arange(0, per_row * m + 1, per_row, dtype=np.int32)), parts
    )
    roles = pa.array(np.full(m, role, dtype=object), type=pa.string())
    message = pa.StructArray.from_arrays([roles, content], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(np.arange(m + 1, dtype=np.int32)), message)


def _trl_batch(table: pa.Table, schema: pa.Schema, image_root: Path | None) -> tuple[pa.RecordBatch, bool]:
    """TRL rows (one per negative) of a preferences table; also whether every image file exists."""
    rejected = table.column("rejected").combine_chunks()
    parent = pc.list_parent_indices(rejected)
    offsets = rejected.offsets.to_numpy()[:-1]
    parent_np = parent.to_numpy(zero_copy_only=False)
    rank = np.arange(len(parent_np)) - (offsets[parent_np] - offsets[0] if len(offsets) else 0)
    images = [_image_ref(p, image_root) for p in table.column("image_path").to_pylist()]
    exist = all(i is not None and os.path.exists(i) for i in images)
    image_lists = pa.array([[i] if i else [] for i in images], type=pa.list_(pa.string())).take(parent)
    arrays = {
        "sample_id": table.column("sample_id").combine_chunks().take(parent),
        "prompt": _messages("user", table.column("prompt").combine_chunks().take(parent), True),
        "chosen": _messages("assistant", table.column("chosen").combine_chunks().take(parent), False),
        "rejected": _messages("assistant", pc.list_flatten(rejected), False),
        "images": image_lists,
        "rejected_model": pc.list_flatten(table.column("rejected_models").combine_chunks()),
        "rejected_drift": pc.list_flatten(table.column("rejected_drift").combine_chunks()),
        "negative_rank": pa.array(rank.astype(np.int32)),
    }
    batch = pa.RecordBatch.from_arrays([arrays[f.name].cast(f.type) for f in schema], schema=schema)
    return batch, exist


def export_trl(preferences_dir: Path, out_dir: Path, image_root: Path | None = None) -> Path:
    """TRL preference data set (datasets.DatasetDict on disk): one row per (positive, negative)
    pair, conversational with images: ``prompt`` (user turn with an image part and the prompt
    text), ``chosen``/``rejected`` (assistant turns), ``images`` (list of image paths; an Image
    feature when the files exist), plus sample_id, rejected_model, rejected_drift and
    negative_rank. This is the shape trl.DPOTrainer reads for vision-language models."""
    import datasets

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".trl-", dir=out_dir.parent))
    schema = _trl_features().arrow_schema
    try:
        source = datasets.load_from_disk(str(preferences_dir))
        images_exist = True
        for split in SPLITS:
            with pa.ipc.new_stream(str(work / f"{split}.arrow"), schema) as writer:
                wrote = False
                for batch in source[split].data.table.to_batches(max_chunksize=2048):
                    if not batch.num_rows:
                        continue
                    rows, exist = _trl_batch(pa.Table.from_batches([batch]), schema, image_root)
                    images_exist = images_exist and exist
                    if rows.num_rows:
                        writer.write_batch(rows)
                        wrote = True
                if not wrote:
                    writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema))
        dd = datasets.DatasetDict(
            {split: datasets.Dataset.from_file(str(work / f"{split}.arrow")) for split in SPLITS}
        )
        if images_exist and any(len(ds) for ds in dd.values()):
            dd = dd.cast_column("images", datasets.List(datasets.Image()))
        _save(dd, work / "data")
        del dd, source
        _replace_dir(work / "data", out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def export_swift(preferences_dir: Path, out_dir: Path, image_root: Path | None = None) -> Path:
    """ms-swift DPO/RLHF JSONL, one file per split: ``{"messages": [user with "<image>" + prompt,
    assistant = chosen], "rejected_response": negative, "images": [path]}``, one row per negative."""
    work = Path(tempfile.mkdtemp(prefix=".swift-", dir=out_dir.parent if out_dir.parent.exists() else None))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        for split in SPLITS:
            with open(work / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for row in _iter_preference_rows(preferences_dir, split):
                    image = _image_ref(row["image_path"], image_root)
                    messages = [
                        {"role": "user", "content": "<image>" + (row["prompt"] or "")},
                        {"role": "assistant", "content": row["chosen"]},
                    ]
                    # The sample's part is encoded once and shared by its negatives' lines.
                    head = (
                        '{"messages": ' + json.dumps(messages, ensure_ascii=False) + ', "rejected_response": '
                    )
                    tail = ', "images": ' + json.dumps([image] if image else [], ensure_ascii=False) + "}\n"
                    handle.writelines(
                        head + json.dumps(text, ensure_ascii=False) + tail for text in row["rejected"]
                    )
        _replace_dir(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def export_parquet(out: Path, target: Path) -> Path:
    """Write preferences/, sft/ (one Parquet file per split), README.md (the card) and figures/ under
    `target`, laid out as a Hugging Face Hub data set (configs listed in the card's YAML header).
    Written to a temporary directory and renamed, so a failure leaves nothing half-written."""
    import datasets

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name in ("preferences", "sft"):
            dd = datasets.load_from_disk(str(out / name))
            (work / name).mkdir()
            for split, ds in dd.items():
                ds.to_parquet(str(work / name / f"{split}-00000-of-00001.parquet"))
        if (out / "README.md").exists():
            shutil.copy2(out / "README.md", work / "README.md")
        if (out / "figures").is_dir():
            shutil.copytree(out / "figures", work / "figures")
        if (out / "build_report.json").exists():
            shutil.copy2(out / "build_report.json", work / "build_report.json")
        _replace_dir(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def push_to_hub(out: Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Publish preferences/, sft/ and the card as Parquet to a Hub data set repository in ONE
    commit (private by default). Without network (or with HF_HUB_OFFLINE=1) raises CxrmaxError
    with a clear message; the Hub repository is left untouched (the upload is a single commit)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise CxrmaxError(
            f"cannot push to the Hugging Face Hub repository {repo_id!r}: HF_HUB_OFFLINE is set. Nothing was "
            "uploaded; use --export-parquet DIR to get the same files offline."
        )
    from huggingface_hub import HfApi

    staging = Path(tempfile.mkdtemp(prefix=".hub-", dir=out))
    try:
        export_parquet(out, staging / "repo")
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=str(staging / "repo"),
                commit_message="cxrmax build-preferences",
            )
        except Exception as exc:  # offline, DNS, auth, HTTP errors: all end the same way for the user
            raise CxrmaxError(
                f"cannot push to the Hugging Face Hub repository {repo_id!r}: {type(exc).__name__}: {exc}. "
                "Nothing was uploaded; the local outputs are complete (use --export-parquet DIR to get the "
                "same files offline)."
            ) from None
        return str(getattr(info, "commit_url", info))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
