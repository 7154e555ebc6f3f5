"""Score one submission against a task's references: `score(submission, task, references_root)`.

References come from a MIMIC-CXR root (engineer A's `cxrmax.mimic.reader`) or from a prepared reference
file (Parquet/CSV/JSONL with study_id and the needed columns), which is also how the benchmarks and
offline users pass references. The submission is streamed batch by batch: every row is mapped to a
reference slot at once (unknown and duplicate study ids are caught there), and only per-study
numbers are kept, never the submission's texts.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from cxrmax.core.errors import CxrmaxError, InputError, where
from cxrmax.core.pathologies import (
    MS_CXR_T_FINDINGS,
    OBSERVATIONS,
    PROGRESSION_CLASSES,
    canonical_name,
    is_observation,
)
from cxrmax.leaderboard import metrics, submissions, textmetrics
from cxrmax.leaderboard.progression import classify_progression
from cxrmax.leaderboard.tasks import Task, get_task

Progress = Callable[[int], None]


@dataclass
class ScoreResult:
    """Scores of one submission on one task, with everything needed to reproduce and rank them."""

    task: str
    task_version: str
    kind: str
    submission: str
    sha256: str
    format: str
    uncertain: str
    input_kind: str  # labels | probabilities | text | answers
    n_rows: int
    n_references: int
    n_scored: int
    missing: int
    skipped_unknown: int
    primary_metric: str
    headline: dict[str, float | None]
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    per_observation: list[dict[str, Any]] = field(default_factory=list)
    per_finding: list[dict[str, Any]] = field(default_factory=list)
    per_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    n_boot: int = 0
    scored_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def coverage(self) -> float:
        """Fraction of reference studies the submission covers."""
        return self.n_scored / self.n_references if self.n_references else 0.0

    @property
    def primary_value(self) -> float | None:
        """Value of the task's ranking metric."""
        return self.headline.get(self.primary_metric)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (NaN written as null)."""
        data = asdict(self)
        data["coverage"] = self.coverage
        data["ci"] = {k: list(v) for k, v in self.ci.items()}
        return _clean(data)


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        return _clean(value.item())
    return value


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except PermissionError:
        raise InputError(f"{where(path)}: permission denied (cannot read the submission file)") from None
    except OSError as exc:
        raise InputError(f"{where(path)}: cannot read the submission file: {exc.strerror or exc}") from None
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------
# References


def _mimic(root: Path) -> Any:
    try:
        from cxrmax.mimic.reader import MimicCXR
    except ImportError as exc:
        raise CxrmaxError(
            f"reading references from a MIMIC-CXR root needs cxrmax.mimic.reader: {exc}"
        ) from None
    return MimicCXR(root)


def _read_table(path: Path) -> Any:
    """A small reference file (Parquet, CSV(.gz), JSONL) as a pyarrow Table."""
    import pyarrow as pa

    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).read()  # read_table would import pyarrow.dataset (~1 s)
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            import pyarrow.json as pajson

            return pajson.read_json(path)
        if name.endswith((".csv", ".csv.gz")):
            import pyarrow.csv as pacsv

            table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
            table.column_names  # noqa: B018 - pyarrow decodes header names lazily: fail here, not later
            return table
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{where(path)}: cannot read references: {exc}") from None
    raise InputError(
        f"{where(path)}: references must be a MIMIC-CXR root folder or a .parquet/.csv/.jsonl file"
    )


def _float_column(table: Any, name: str, path: Path) -> np.ndarray:
    """A reference label column as float32 (NaN = blank: empty, null or "nan"); anything other than
    1 / 0 / -1 / blank is an InputError naming the reference file, row and column, since a wrong
    reference silently changes every score."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(name)
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        column = pc.if_else(pc.equal(pc.utf8_trim_whitespace(column), ""), None, column)
    try:
        values = column.cast("float64").fill_null(np.nan).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, TypeError):
        texts = column.to_pylist()
        for row, value in enumerate(texts, start=1):
            try:
                float(value if value is not None else "nan")
            except (TypeError, ValueError):
                raise InputError(
                    f"{where(path, row=row, field=name)}: reference label {value!r} is not 1, 0, -1 or blank"
                ) from None
        raise InputError(
            f"{where(path, field=name)}: reference labels are not numbers ({column.type})"
        ) from None
    bad = ~np.isnan(values) & ~np.isin(values, (1.0, 0.0, -1.0))
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(
            f"{where(path, row=row + 1, field=name)}: reference label {values[row]:.12g} is not 1, 0, -1 or blank"
        )
    return values.astype(np.float32)


def _study_ids(table: Any, path: Path) -> np.ndarray:
    if "study_id" not in table.column_names:
        raise InputError(f"{where(path, field='study_id')}: references have no study_id column")
    column = table.column("study_id")
    if column.null_count:
        raise InputError(f"{where(path, field='study_id')}: references have blank study ids")
    return submissions.parse_study_ids(column.combine_chunks(), np.arange(1, len(column) + 1), path)


@dataclass
class LabelReferences:
    """Ground-truth labels aligned to study ids: labels (n, 14) float32 with NaN for blank."""

    study_ids: np.ndarray
    labels: np.ndarray
    description: str
    subject_ids: np.ndarray | None = None


def load_label_references(task: Task, root: str | Path) -> LabelReferences:
    """Labels of the task's split from a MIMIC-CXR root (chexpert CSV or 2.1.0 test set), or from a
    prepared file with study_id and the 14 observation columns."""
    root = Path(root)
    if root.is_file():
        table = _read_table(root)
        description = f"{root.name}"
    elif root.is_dir():
        splits = None if task.split == "all" else [task.split]
        table = _mimic(root).study_labels(splits=splits, source=task.reference_source)
        description = f"MIMIC-CXR {task.reference_source} labels, split {task.split}"
    else:
        raise InputError(f"{where(root)}: references not found")
    names = {}
    for column in table.column_names:
        if is_observation(column):
            names[canonical_name(column)] = column
    missing = [o for o in OBSERVATIONS if o not in names]
    if missing:
        raise InputError(
            f"{where(root, field=missing[0])}: references lack observation columns {', '.join(missing)}"
        )
    labels = np.column_stack([_float_column(table, names[o], root) for o in OBSERVATIONS]).astype(np.float32)
    subject = None
    if "subject_id" in table.column_names:
        subject = table.column("subject_id").fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    return LabelReferences(_study_ids(table, root), labels, description, subject)


@dataclass
class TextReferences:
    """Reference report sections aligned to study ids (studies with an empty section are dropped)."""

    study_ids: np.ndarray
    texts: list[str]
    description: str
    dropped: int = 0


def _pick_section(section: str, findings: Any, impression: Any, last: Any, report: Any) -> str | None:
    def ok(text: Any) -> str | None:
        return text if isinstance(text, str) and text.strip() else None

    if section == "findings":
        return ok(findings) or None
    if section == "impression":
        return ok(impression) or None
    if section == "report":
        return ok(report)
    return ok(impression) or ok(findings) or ok(last) or ok(report)


def load_text_references(task: Task, root: str | Path, section: str | None = None) -> TextReferences:
    """Reference report text per study: ``section`` findings | impression | best | report."""
    section = section or task.reference_section
    if section not in ("findings", "impression", "best", "report"):
        raise CxrmaxError(f"unknown report section {section!r}; use findings, impression, best or report")
    root = Path(root)
    if root.is_file():
        table = _read_table(root)
        ids = _study_ids(table, root)

        def col(name: str) -> list[Any]:
            return table.column(name).to_pylist() if name in table.column_names else [None] * len(ids)

        report_col = next((c for c in ("report", "text") if c in table.column_names), None)
        rows = zip(
            col("findings"),
            col("impression"),
            col("last_paragraph"),
            col(report_col) if report_col else col("report"),
            strict=True,
        )
        description = f"{root.name} ({section})"
    elif root.is_dir():
        mimic = _mimic(root)
        splits = None if task.split == "all" else [task.split]
        try:  # scoring reads reports only: skip the image existence check where the reader offers it
            selection = mimic.select(splits=splits, one_per_study=True, check_files=False)
        except TypeError:
            selection = mimic.select(splits=splits, one_per_study=True)
        ids = selection.column("study_id").to_numpy().astype(np.int64)
        subjects = selection.column("subject_id").to_numpy().astype(np.int64)
        findings = selection.column("findings").to_pylist()
        impression = selection.column("impression").to_pylist()
        last = selection.column("last_paragraph").to_pylist()
        if all(f is None for f in findings) and all(i is None for i in impression):
            parsed = [mimic.report(int(s), int(t)) for s, t in zip(subjects, ids, strict=True)]
            findings = [p.findings if p else None for p in parsed]
            impression = [p.impression if p else None for p in parsed]
            last = [p.last_paragraph if p else None for p in parsed]
        rows = zip(findings, impression, last, [None] * len(ids), strict=True)
        description = f"MIMIC-CXR reports ({section}), split {task.split}"
    else:
        raise InputError(f"{where(root)}: references not found")
    keep_ids, texts, dropped = [], [], 0
    for study_id, (f, i, last_paragraph, report) in zip(ids, rows, strict=True):
        text = _pick_section(section, f, i, last_paragraph, report)
        if text is None:
            dropped += 1
            continue
        keep_ids.append(int(study_id))
        texts.append(text)
    return TextReferences(np.asarray(keep_ids, dtype=np.int64), texts, description, dropped)


@dataclass
class ProgressionReferences:
    """MS-CXR-T ground truth: per finding an array of class index (0..2) or -1 where not annotated."""

    study_ids: np.ndarray
    classes: dict[str, np.ndarray]
    description: str
    dicom_ids: np.ndarray | None = None

    @property
    def key(self) -> tuple[str, np.ndarray]:
        """The row key: study_id, or dicom_id when a study appears in several pairs."""
        if len(np.unique(self.study_ids)) == len(self.study_ids) or self.dicom_ids is None:
            return "study_id", self.study_ids
        return "dicom_id", self.dicom_ids


def load_progression_references(task: Task, root: str | Path) -> ProgressionReferences:
    """MS-CXR-T labels from ``root/<reference_file>`` or a given CSV, via `cxrmax.mimic.reader.read_ms_cxr_t`."""
    root = Path(root)
    path = root / (task.reference_file or "") if root.is_dir() else root
    if not path.is_file():
        raise InputError(f"{where(path)}: MS-CXR-T file not found")
    try:
        from cxrmax.mimic.reader import read_ms_cxr_t
    except ImportError as exc:
        raise CxrmaxError(f"reading MS-CXR-T needs cxrmax.mimic.reader.read_ms_cxr_t: {exc}") from None
    table = read_ms_cxr_t(path)
    ids = _study_ids(table, path)
    classes = {}
    lookup = {name: i for i, name in enumerate(PROGRESSION_CLASSES)}
    for prefix in MS_CXR_T_FINDINGS:
        column = f"{prefix}_progression"
        if column not in table.column_names:
            raise InputError(f"{where(path, field=column)}: column missing in MS-CXR-T file")
        values = table.column(column).to_pylist()
        classes[prefix] = np.asarray(
            [lookup.get(str(v).strip().lower(), -1) if v is not None else -1 for v in values], dtype=np.int8
        )
    # MS-CXR-T pairs a current with a previous image: one row per current study.
    dicom = (
        np.asarray([str(v).strip() for v in table.column("dicom_id").to_pylist()])
        if "dicom_id" in table.column_names
        else None
    )
    return ProgressionReferences(ids, classes, f"{path.name}", dicom)


# ---------------------------------------------------------------------------------------------------
# The scorer


def _label_texts(texts: Sequence[str | None], processes: int | None) -> np.ndarray:
    """Label free texts with engineer B's labeler: (n, 14) float32, NaN for not mentioned."""
    try:
        from cxrmax.labeler import label_texts
    except ImportError as exc:
        raise CxrmaxError(f"labelling free text needs cxrmax.labeler: {exc}") from None
    if not texts:
        return np.zeros((0, len(OBSERVATIONS)), dtype=np.float32)
    table = label_texts(list(texts), processes=processes)
    return np.column_stack(
        [
            table.column(o).cast("float32").fill_null(np.nan).to_numpy(zero_copy_only=False)
            for o in OBSERVATIONS
        ]
    ).astype(np.float32)


@dataclass
class _Stream:
    """Common streaming state: resolves columns and maps rows to reference slots."""

    path: Path
    kind: str
    index: submissions.StudyIndex
    lenient: bool
    plan: submissions.ColumnPlan | None = None
    key_column: str = "study_id"  # "dicom_id" for MS-CXR-T when a study has several image pairs
    # MS-CXR-T rows may be keyed by dicom_id even when study_id would do: (column, index) to use then.
    alternate_key: tuple[str, submissions.StudyIndex] | None = None
    n_rows: int = 0
    skipped_unknown: int = 0
    notes: list[str] = field(default_factory=list)
    read_log: submissions.ReadLog = field(default_factory=submissions.ReadLog)

    def skip_rows(self, slots: np.ndarray, bad: np.ndarray, messages: dict[int, str]) -> None:
        """Under ``lenient``: drop rows whose values could not be read (their studies count as
        missing) and count them; ``messages`` maps a position in ``slots`` to its error."""
        if not bad.any():
            return
        for i in np.nonzero(bad)[0]:
            if self.index.first_row[slots[i]] > 0:  # a row bad in two columns counts once
                self.read_log.skip(messages.get(int(i), "unreadable value"))
        self.index.release(slots[bad])

    def texts(self, batch: submissions.RawBatch, keep: np.ndarray, slots: np.ndarray, column: str) -> list:
        """A text column of the kept rows; under ``lenient`` a non-text value drops its row."""
        texts, bad, messages = submissions.parse_or_skip(
            submissions.text_values,
            _select(batch.columns[column], keep),
            batch.rows[keep],
            self.path,
            column,
            self.lenient,
            None,
        )
        self.skip_rows(slots, bad, messages)
        return texts

    def finish_notes(self) -> list[str]:
        """The reader's notes (format detection, skipped lines) followed by the scorer's."""
        return self.read_log.summary() + self.notes

    def batches(self, batch_rows: int, progress: Progress | None) -> Any:
        for batch in submissions.iter_batches(self.path, batch_rows, lenient=self.lenient, log=self.read_log):
            columns = list(batch.columns)
            first_row = int(batch.rows[0])
            if self.plan is None:
                self.plan = submissions.plan_columns(
                    columns, self.kind, self.path, row=None, lenient=self.lenient
                )
                if self.plan.key is None and self.alternate_key is not None:
                    name, alternate_index = self.alternate_key
                    if any(c.strip().lower() == name for c in columns):
                        self.key_column, self.index = name, alternate_index
                        self.notes.append(f"rows keyed by {name} (no study_id column)")
                if self.key_column != "study_id":
                    found = next((c for c in columns if c.strip().lower() == self.key_column), None)
                    if found is None:
                        raise InputError(
                            f"{where(self.path, field=self.key_column)}: the references pair some studies more than "
                            f"once, so rows must be keyed by {self.key_column} (found: {', '.join(columns)})"
                        )
                    if found in self.plan.ignored:
                        self.plan.ignored.remove(found)
                    if self.plan.key is not None:
                        self.plan.ignored.append(self.plan.key)
                    self.plan.key = found
                if self.plan.key is None:
                    raise InputError(
                        f"{where(self.path, field='study_id')}: no study_id column (found: {', '.join(columns)})"
                    )
                if self.plan.ignored:
                    self.notes.append(f"ignored columns: {', '.join(self.plan.ignored)}")
            else:
                known = set(self.plan.observations) | set(self.plan.progression) | set(self.plan.ignored)
                known |= {c for c in (self.plan.key, self.plan.text, self.plan.model) if c}
                new = [c for c in columns if c not in known]
                if new:
                    extra = submissions.plan_columns(
                        new, self.kind, self.path, row=first_row, lenient=self.lenient
                    )
                    if extra.key or extra.text or extra.model:
                        raise InputError(
                            f"{where(self.path, row=first_row, field=new[0])}: column appears only from this row on"
                        )
                    # JSON rows may leave out blank cells: an observation or finding key first
                    # seen in a later batch joins the plan (earlier rows were blank for it).
                    for column, obs in extra.observations.items():
                        if obs in self.plan.observations.values():
                            raise InputError(
                                f"{where(self.path, row=first_row, field=column)}: observation {obs!r} given by two columns"
                            )
                        self.plan.observations[column] = obs
                    self.plan.progression.update(extra.progression)
                    self.plan.ignored.extend(extra.ignored)
            numeric_key = self.key_column == "study_id"
            ids, bad_key, messages = submissions.parse_or_skip(
                submissions.parse_study_ids if numeric_key else submissions.parse_text_keys,
                batch.columns[self.plan.key],
                batch.rows,
                self.path,
                self.plan.key,
                self.lenient,
                -1 if numeric_key else "",
            )
            if not numeric_key:
                ids = np.asarray(ids, dtype=str)
            for i in sorted(messages):
                self.read_log.skip(messages[i])
            slots = self.index.lookup(ids)
            slots[bad_key] = -1
            unknown = (slots < 0) & ~bad_key
            if unknown.any():
                if not self.lenient:
                    i = int(np.nonzero(unknown)[0][0])
                    raise InputError(
                        f"{where(self.path, row=int(batch.rows[i]), field=self.plan.key)}: {self.key_column} {ids[i]} is not in the references "
                        f"({int(unknown.sum())} such rows in this batch; --lenient skips them)"
                    )
                self.skipped_unknown += int(unknown.sum())
            keep = np.nonzero(~unknown & ~bad_key)[0]
            per_image = self.key_column == "study_id" and any(
                c.strip().lower() == "dicom_id" for c in self.plan.ignored
            )
            hint = (
                "; rows are one per study: reduce per-image (dicom_id) rows to one per study first"
                if per_image
                else ""
            )
            self.index.claim(slots[keep], batch.rows[keep], ids[keep], self.path, self.plan.key, hint)
            self.n_rows += len(batch)
            if progress:
                progress(len(batch))
            yield batch, keep, slots[keep]


def _coverage(
    index: submissions.StudyIndex, ids: np.ndarray, require_complete: bool, path: Path
) -> tuple[np.ndarray, int]:
    covered = index.covered
    missing = int((~covered).sum())
    if missing and require_complete:
        sample = ", ".join(str(s) for s in ids[~covered][:5])
        raise InputError(
            f"{where(path)}: {missing} of {len(ids)} reference studies missing (e.g. {sample}); --require-complete is set"
        )
    return covered, missing


def _as_texts(values: Any) -> list[Any]:
    return values.to_pylist() if hasattr(values, "to_pylist") else list(values)


def _select(values: Any, keep: np.ndarray) -> Any:
    if hasattr(values, "take"):
        return values.take(keep)
    return [values[i] for i in keep]


def score(
    submission_path: str | Path,
    task: str | Task,
    references_root: str | Path | None,
    *,
    uncertain: str = "positive",
    require_complete: bool = False,
    lenient: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    section: str | None = None,
    processes: int | None = None,
    batch_rows: int = submissions.BATCH_ROWS,
    progress: Progress | None = None,
    sha256: str | None = None,
) -> ScoreResult:
    """Validate and score a submission file for ``task`` against references under ``references_root``.

    Raises `cxrmax.core.errors.InputError` naming the file, row and field for bad input; missing studies
    only reduce coverage unless ``require_complete``. ``sha256``: the file's hash when the caller
    computed it already (saves a pass over a large file)."""
    task = get_task(task)
    if uncertain not in metrics.UNCERTAIN_POLICIES:
        raise CxrmaxError(f"--uncertain {uncertain!r}: use one of {', '.join(metrics.UNCERTAIN_POLICIES)}")
    path = Path(submission_path)
    if references_root is None and task.kind != "rationale":
        raise CxrmaxError(
            f"task {task.name} needs references (a MIMIC-CXR root or a prepared reference file)"
        )
    if task.kind == "rationale":
        from cxrmax.leaderboard.rationale import score_rationales

        return score_rationales(
            path,
            task,
            references_root,
            uncertain=uncertain,
            n_boot=n_boot,
            seed=seed,
            processes=processes,
            lenient=lenient,
            progress=progress,
        )
    if path.is_dir():
        raise InputError(f"{where(path)}: a {task.kind} submission is a file (.csv, .jsonl, .json, .parquet)")
    submissions.check_file(path)
    fmt = submissions.sniff(path).format
    if task.kind == "labels":
        result = _score_labels(
            path,
            task,
            references_root,
            uncertain,
            require_complete,
            lenient,
            n_boot,
            seed,
            processes,
            batch_rows,
            progress,
        )
    elif task.kind == "report":
        result = _score_reports(
            path,
            task,
            references_root,
            uncertain,
            require_complete,
            lenient,
            n_boot,
            seed,
            section,
            processes,
            batch_rows,
            progress,
        )
    else:
        result = _score_progression(
            path, task, references_root, require_complete, lenient, n_boot, seed, batch_rows, progress
        )
    result.format = fmt
    result.sha256 = sha256 or file_sha256(path)  # the caller may have hashed the file already
    if result.extra.get("skipped_unreadable") is None:
        result.extra["skipped_unreadable"] = 0
    return result


def _base(
    task: Task,
    path: Path,
    uncertain: str,
    input_kind: str,
    stream: _Stream,
    n_ref: int,
    n_scored: int,
    missing: int,
) -> dict[str, Any]:
    return dict(
        task=task.name,
        task_version=task.version,
        kind=task.kind,
        submission=str(path),
        sha256="",
        format="",
        uncertain=uncertain,
        input_kind=input_kind,
        n_rows=stream.n_rows,
        n_references=n_ref,
        n_scored=n_scored,
        missing=missing,
        skipped_unknown=stream.skipped_unknown,
        primary_metric=task.primary_metric,
    )


def _score_labels(
    path, task, root, uncertain, require_complete, lenient, n_boot, seed, processes, batch_rows, progress
) -> ScoreResult:
    refs = load_label_references(task, root)
    index = submissions.StudyIndex(refs.study_ids, source=refs.description)
    stream = _Stream(path, "labels", index, lenient)
    predicted = np.full(refs.labels.shape, np.nan, dtype=np.float32)
    mode = None
    for batch, keep, slots in stream.batches(batch_rows, progress):
        plan = stream.plan
        if mode is None:
            if plan.observations:
                mode = "values"
                missing_obs = [o for o in OBSERVATIONS if o not in plan.observations.values()]
                sparse = submissions.sniff(path).format in ("jsonl", "json")  # absent key = blank cell
                if missing_obs and not lenient and not sparse:
                    raise InputError(
                        f"{where(path, field=missing_obs[0])}: observation column missing ({', '.join(missing_obs)}); "
                        "every observation needs a column (blank cells are fine; --lenient treats missing columns as blank)"
                    )
                if missing_obs and not sparse:
                    stream.notes.append(
                        f"observation columns missing, counted as blank: {', '.join(missing_obs)}"
                    )
                if plan.text:
                    stream.notes.append(f"text column {plan.text!r} ignored: observation columns given")
            elif plan.text:
                mode = "text"
            else:
                raise InputError(f"{where(path)}: {submissions.expected_columns('labels')}")
        if mode == "values":
            bad_rows = np.zeros(len(keep), dtype=bool)
            messages: dict[int, str] = {}
            for column, obs in plan.observations.items():
                values, bad, column_messages = submissions.parse_or_skip(
                    submissions.parse_label_column,
                    _select(batch.columns[column], keep),
                    batch.rows[keep],
                    path,
                    column,
                    lenient,
                    np.nan,
                )
                predicted[slots, OBSERVATIONS.index(obs)] = values
                for i, message in column_messages.items():
                    messages.setdefault(i, message)  # one message (and one count) per row
                bad_rows |= bad
            if plan.text:
                # Sparse JSON rows may carry text only: with label columns chosen, such a row would
                # silently score as all-blank. Refuse it (or skip it with lenient).
                texts = _as_texts(_select(batch.columns[plan.text], keep))
                text_only = np.isnan(predicted[slots]).all(axis=1) & np.asarray(
                    [isinstance(t, str) and bool(t.strip()) for t in texts], dtype=bool
                )
                for i in np.nonzero(text_only & ~bad_rows)[0]:
                    message = (
                        f"{where(path, row=int(batch.rows[keep][i]), field=plan.text)}: text but no observation "
                        "values, while other rows give observation values; give one or the other"
                    )
                    if not lenient:
                        raise InputError(message)
                    messages[int(i)] = message
                bad_rows |= text_only
            predicted[slots[bad_rows]] = np.nan
            stream.skip_rows(slots, bad_rows, messages)
        else:
            if plan.observations:  # keys first seen in a later batch of a text submission
                column = next(iter(plan.observations))
                raise InputError(
                    f"{where(path, row=int(batch.rows[0]), field=column)}: observation values appear from this "
                    f"row on, after rows scored from the text column {plan.text!r}; give one or the other"
                )
            texts = stream.texts(batch, keep, slots, plan.text)
            predicted[slots] = _label_texts(texts, processes)
    covered, missing = _coverage(index, refs.study_ids, require_complete, path)
    if mode == "values":
        never = [o for o in OBSERVATIONS if o not in stream.plan.observations.values()]
        if never and submissions.sniff(path).format in ("jsonl", "json"):
            stream.notes.append(f"observations never given (blank in every row): {', '.join(never)}")
    ref = refs.labels[covered]
    pred = predicted[covered]
    is_score = None
    input_kind = "text" if mode == "text" else "labels"
    if mode == "values":
        finite = ~np.isnan(pred)
        fractional = finite & (pred != -1) & (pred != 0) & (pred != 1)
        is_score = fractional.any(axis=0)
        if is_score.any():
            input_kind = "probabilities"
            rows_of = index.first_row[covered]
            not_probability = np.zeros(len(pred), dtype=bool)
            for j in np.nonzero(is_score)[0]:
                column = next(c for c, o in plan.observations.items() if o == OBSERVATIONS[j])
                bad = np.nonzero((pred[:, j] == -1) | np.isnan(pred[:, j]))[0]
                for k in bad if lenient else bad[:1]:
                    what = "-1" if pred[k, j] == -1 else "blank"
                    message = (
                        f"{where(path, row=int(rows_of[k]), field=column)}: {what} in a probability column "
                        "(the column holds values strictly between 0 and 1, so every row needs a probability)"
                    )
                    if not lenient:
                        raise InputError(message)
                    if not not_probability[k]:
                        stream.read_log.skip(message)
                    not_probability[k] = True
            if not_probability.any():
                index.release(np.nonzero(covered)[0][not_probability])
                covered, missing = _coverage(index, refs.study_ids, require_complete, path)
                ref, pred = refs.labels[covered], predicted[covered]
    scores = metrics.score_labels(ref, pred, uncertain, is_score=is_score, n_boot=n_boot, seed=seed)
    result = ScoreResult(
        **_base(task, path, uncertain, input_kind, stream, len(refs.study_ids), int(covered.sum()), missing),
        headline=scores.headline,
        ci=scores.ci,
        per_observation=scores.per_observation,
        n_boot=n_boot,
    )
    result.extra["references"] = refs.description
    result.extra["skipped_unreadable"] = stream.read_log.skipped
    result.notes = stream.finish_notes()
    if input_kind == "probabilities":
        result.notes.append(
            "probabilities thresholded at 0.5 for accuracy/precision/recall/F1; AUROC from the scores"
        )
    return result


def _score_reports(
    path,
    task,
    root,
    uncertain,
    require_complete,
    lenient,
    n_boot,
    seed,
    section,
    processes,
    batch_rows,
    progress,
) -> ScoreResult:
    refs = load_text_references(task, root, section)
    if not refs.texts:
        raise InputError(
            f"{where(root)}: no reference reports with a {section or task.reference_section} section"
        )
    corpus = textmetrics.ReferenceCorpus(refs.texts)
    index = submissions.StudyIndex(refs.study_ids, source=refs.description)
    stream = _Stream(path, "report", index, lenient)
    stats = np.zeros((len(refs.texts), len(textmetrics.STAT_COLUMNS)), dtype=np.float64)
    predicted = np.full((len(refs.texts), len(OBSERVATIONS)), np.nan, dtype=np.float32)
    want_meteor = textmetrics.wordnet_available()
    meteor = np.full(len(refs.texts), np.nan)
    for batch, keep, slots in stream.batches(batch_rows, progress):
        if stream.plan.text is None:
            sections = [c for c in stream.plan.ignored if c.strip().lower() in ("findings", "impression")]
            hint = (
                f"; {', '.join(repr(c) for c in sections)} is read as a copy of the reference section, "
                "so name the generated text column 'report' or 'model_prediction'"
                if sections
                else ""
            )
            raise InputError(f"{where(path)}: {submissions.expected_columns('report')}{hint}")
        texts = stream.texts(batch, keep, slots, stream.plan.text)
        stats[slots] = corpus.score_batch(slots, texts)
        predicted[slots] = _label_texts(texts, processes)
        if want_meteor:
            meteor[slots] = textmetrics.meteor_scores(texts, [refs.texts[s] for s in slots])
    covered, missing = _coverage(index, refs.study_ids, require_complete, path)
    sums = stats[covered].sum(0)
    headline: dict[str, float | None] = {k: float(v) for k, v in textmetrics.text_summary(sums).items()}
    notes = stream.finish_notes()
    if want_meteor:
        headline["meteor"] = float(np.nanmean(meteor[covered])) if covered.any() else 0.0
    else:
        headline["meteor"] = None
        notes.append(textmetrics.METEOR_MISSING)
    reference_labels = _label_texts([refs.texts[i] for i in np.nonzero(covered)[0]], processes)
    ce = metrics.score_labels(reference_labels, predicted[covered], uncertain, n_boot=0, prefix="ce_")
    headline.update(ce.headline)
    # Bootstrap the text metrics and clinical-efficacy F1 together from one statistics matrix.
    ce_stats = metrics.confusion_stats(reference_labels, predicted[covered], uncertain).reshape(
        int(covered.sum()), -1
    )
    joint = np.concatenate([stats[covered], ce_stats.astype(np.float64)], axis=1)
    n_text = stats.shape[1]

    def statistic(s: np.ndarray) -> dict[str, np.ndarray]:
        out = textmetrics.text_summary(s[:, :n_text])
        counts = s[:, n_text:].reshape(len(s), len(OBSERVATIONS), 4)
        out.update({"ce_" + k: v for k, v in metrics.label_summary(counts).items()})
        return out

    ci = metrics.bootstrap_ci(joint, statistic, n_boot=n_boot, seed=seed)
    result = ScoreResult(
        **_base(task, path, uncertain, "text", stream, len(refs.study_ids), int(covered.sum()), missing),
        headline=headline,
        ci=ci,
        per_observation=ce.per_observation,
        n_boot=n_boot,
        notes=notes,
    )
    result.extra["references"] = refs.description
    result.extra["skipped_unreadable"] = stream.read_log.skipped
    result.extra["reference_section"] = section or task.reference_section
    result.extra["references_without_section"] = refs.dropped
    result.notes.append("clinical efficacy (ce_*): cxrmax labeler on generated vs reference text")
    return result


def _score_progression(
    path, task, root, require_complete, lenient, n_boot, seed, batch_rows, progress
) -> ScoreResult:
    refs = load_progression_references(task, root)
    key_name, keys = refs.key
    index = submissions.StudyIndex(keys, source=refs.description)
    alternate = None
    if key_name == "study_id" and refs.dicom_ids is not None:  # each row names one image pair too
        try:
            alternate = ("dicom_id", submissions.StudyIndex(refs.dicom_ids, source=refs.description))
        except InputError:  # repeated dicom ids: study_id stays the only key
            alternate = None
    stream = _Stream(path, "ms-cxr-t", index, lenient, key_column=key_name, alternate_key=alternate)
    findings = list(MS_CXR_T_FINDINGS)
    answers = np.full((len(refs.study_ids), len(findings)), -2, dtype=np.int8)  # -2 not given, -1 unreadable
    lookup = {name: i for i, name in enumerate(PROGRESSION_CLASSES)}
    input_kind = None
    unreadable = 0
    for batch, keep, slots in stream.batches(batch_rows, progress):
        plan = stream.plan
        if not plan.progression and not plan.text:
            raise InputError(f"{where(path)}: {submissions.expected_columns('ms-cxr-t')}")
        if plan.progression:
            input_kind = input_kind or "answers"
            for column, prefix in plan.progression.items():
                values = stream.texts(batch, keep, slots, column)
                j = findings.index(prefix)
                for k, value in enumerate(values):
                    label = classify_progression(value, None) if value and value.strip() else None
                    answers[slots[k], j] = lookup[label] if label else -1
                    unreadable += bool(value and value.strip() and label is None)
        else:
            input_kind = input_kind or "text"
            values = stream.texts(batch, keep, slots, plan.text)
            for k, value in enumerate(values):
                for j, prefix in enumerate(findings):
                    if refs.classes[prefix][slots[k]] < 0:
                        continue
                    label = classify_progression(value, prefix)
                    answers[slots[k], j] = lookup[label] if label else -1
    index = stream.index  # the dicom_id index when the submission was keyed that way
    keys = refs.dicom_ids if stream.key_column == "dicom_id" else keys
    covered, missing = _coverage(index, keys, require_complete, path)
    per_finding = []
    stats_columns = []
    headline: dict[str, float | None] = {}
    for j, prefix in enumerate(findings):
        truth = refs.classes[prefix]
        annotated = covered & (truth >= 0)
        correct = annotated & (answers[:, j] == truth)
        n = int(annotated.sum())
        acc = float(correct.sum() / n) if n else None
        headline[prefix] = acc
        confusion = {
            f"{PROGRESSION_CLASSES[t]}->{PROGRESSION_CLASSES[p] if p >= 0 else 'none'}": int(
                (annotated & (truth == t) & (answers[:, j] == p)).sum()
            )
            for t in range(3)
            for p in (-1, 0, 1, 2)
        }
        per_finding.append(
            {
                "finding": prefix,
                "n": n,
                "accuracy": acc,
                "confusion": {k: v for k, v in confusion.items() if v},
            }
        )
        stats_columns += [correct.astype(np.float64), annotated.astype(np.float64)]
    valid = [v for v in headline.values() if v is not None]
    headline["avg"] = float(np.mean(valid)) if valid else None
    # The paper's column order (Con, PE, Pna, Pnx, Ede, Avg), as listed in the task definition.
    order = [k for k in task.headline if k in headline] + [k for k in headline if k not in task.headline]
    headline = {k: headline[k] for k in order}
    per_finding.sort(key=lambda row: order.index(row["finding"]))
    stats = np.column_stack(stats_columns)[covered]

    def statistic(s: np.ndarray) -> dict[str, np.ndarray]:
        accs = np.divide(
            s[:, 0::2], s[:, 1::2], out=np.full((len(s), len(findings)), np.nan), where=s[:, 1::2] > 0
        )
        out = {prefix: accs[:, j] for j, prefix in enumerate(findings)}
        out["avg"] = np.nanmean(accs, axis=1)
        return out

    ci = metrics.bootstrap_ci(stats, statistic, n_boot=n_boot, seed=seed)
    result = ScoreResult(
        **_base(
            task,
            path,
            "n/a",
            input_kind or "answers",
            stream,
            len(refs.study_ids),
            int(covered.sum()),
            missing,
        ),
        headline=headline,
        ci=ci,
        per_finding=per_finding,
        n_boot=n_boot,
        notes=stream.finish_notes(),
    )
    result.extra["references"] = refs.description
    result.extra["skipped_unreadable"] = stream.read_log.skipped
    if unreadable:
        result.notes.append(
            f"{unreadable} answers could not be read as improving/stable/worsening (scored as wrong)"
        )
    unanswered = sum(
        int((covered & (refs.classes[prefix] >= 0) & (answers[:, j] < 0)).sum())
        for j, prefix in enumerate(findings)
    )
    if unanswered:
        result.notes.append(
            f"{unanswered} annotated (study, finding) pairs got no readable answer (scored as wrong)"
        )
    result.notes.append("avg = mean of the per-finding top-1 accuracies (the paper's Avg column)")
    return result


def dumps(result: ScoreResult) -> str:
    """The result as pretty JSON."""
    return json.dumps(result.to_dict(), indent=2)
