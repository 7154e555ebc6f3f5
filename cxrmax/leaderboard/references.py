"""What a submission is scored against, and what scoring returns.

References come from a MIMIC-CXR root (`cxrmax.mimic.reader`) or from a prepared reference file
(Parquet/CSV/JSONL with study_id and the needed columns), which is also how the benchmarks and
offline users pass references. `ScoreResult` is the one result type of every task kind; scoring.py
(labels, reports, MS-CXR-T) and rationale.py both build it from the loaders here, so neither imports
the other's internals.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from cxrmax.core.errors import CxrmaxError, InputError, where
from cxrmax.core.pathologies import (
    MS_CXR_T_FINDINGS,
    OBSERVATIONS,
    PROGRESSION_CLASSES,
    canonical_name,
    is_observation,
)
from cxrmax.leaderboard.fingerprint import ORIGIN_FILE, ORIGIN_ROOT
from cxrmax.leaderboard.predictions import Predictions, content_sha256
from cxrmax.leaderboard.submissions import parse_study_ids
from cxrmax.leaderboard.tasks import Task

if TYPE_CHECKING:
    from cxrmax.mimic.reader import MimicCXR

# cxrmax.labeler (its rule tables) and cxrmax.mimic.reader (pandas) cost about 0.8 s to import; a
# label submission scored against a prepared reference file needs neither, so the three functions
# that do import them when called.


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
    #: What the score was computed against (`cxrmax.leaderboard.fingerprint.make`).
    fingerprint: dict[str, Any] = field(default_factory=dict)
    #: sha256 of the canonical predictions (`Predictions.sha256`): the board's duplicate key.
    predictions_sha256: str = ""
    #: The canonical predictions themselves (kept by the board, not written to the JSON).
    predictions: Predictions | None = field(default=None, repr=False, compare=False)

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
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "predictions"}
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


def open_mimic(root: Path) -> MimicCXR:
    """The MIMIC-CXR reader of a root folder (labels, reports and selections for references)."""
    from cxrmax.mimic.reader import MimicCXR  # deferred: see the note at the top

    return MimicCXR(root)


def _read_table(path: Path) -> Any:
    """A small reference file (Parquet, CSV(.gz), JSONL) as a pyarrow Table."""
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pq.ParquetFile(path).read()  # read_table would import pyarrow.dataset (~1 s)
        if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
            return pajson.read_json(path)
        if name.endswith((".csv", ".csv.gz")):
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


def reference_study_ids(table: Any, path: Path) -> np.ndarray:
    """The study_id column of a reference table as int64 (missing or blank ids are an InputError)."""
    if "study_id" not in table.column_names:
        raise InputError(f"{where(path, field='study_id')}: references have no study_id column")
    column = table.column("study_id")
    if column.null_count:
        raise InputError(f"{where(path, field='study_id')}: references have blank study ids")
    return parse_study_ids(column.combine_chunks(), np.arange(1, len(column) + 1), path)


@dataclass
class LabelReferences:
    """Ground-truth labels aligned to study ids: labels (n, 14) float32 with NaN for blank."""

    study_ids: np.ndarray
    labels: np.ndarray
    description: str
    subject_ids: np.ndarray | None = None
    origin: str = ORIGIN_FILE

    def content_hash(self) -> str:
        """sha256 of the scored ids and their 14 labels (order-free: hashed sorted by study id)."""
        order = np.argsort(self.study_ids, kind="stable")
        columns = {"study_id": self.study_ids[order]}
        columns.update({o: self.labels[order, j] for j, o in enumerate(OBSERVATIONS)})
        return content_sha256({"references": "labels"}, columns)


def load_label_references(task: Task, root: str | Path) -> LabelReferences:
    """Labels of the task's split from a MIMIC-CXR root (chexpert CSV or 2.1.0 test set), or from a
    prepared file with study_id and the 14 observation columns."""
    root = Path(root)
    if root.is_file():
        table = _read_table(root)
        description = f"{root.name}"
    elif root.is_dir():
        splits = None if task.split == "all" else [task.split]
        table = open_mimic(root).study_labels(splits=splits, source=task.reference_source)
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
    origin = ORIGIN_ROOT if root.is_dir() else ORIGIN_FILE
    return LabelReferences(reference_study_ids(table, root), labels, description, subject, origin)


@dataclass
class TextReferences:
    """Reference report sections aligned to study ids (studies with an empty section are dropped)."""

    study_ids: np.ndarray
    texts: list[str]
    description: str
    dropped: int = 0
    origin: str = ORIGIN_FILE
    section: str = "findings"
    #: Studies of the split whose reports lack the scored section (not scored, not "unknown").
    dropped_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def content_hash(self) -> str:
        """sha256 of the scored ids, their reference texts and the section."""
        order = np.argsort(self.study_ids, kind="stable")
        columns = {"study_id": self.study_ids[order], "text": [self.texts[i] for i in order]}
        return content_sha256({"references": "text", "section": self.section}, columns)


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
        ids = reference_study_ids(table, root)

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
        mimic = open_mimic(root)
        splits = None if task.split == "all" else [task.split]
        # Scoring reads reports only: no image existence check.
        selection = mimic.select(splits=splits, one_per_study=True, check_files=False)
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
    keep_ids, texts, dropped_ids = [], [], []
    for study_id, (f, i, last_paragraph, report) in zip(ids, rows, strict=True):
        text = _pick_section(section, f, i, last_paragraph, report)
        if text is None:
            dropped_ids.append(int(study_id))
            continue
        keep_ids.append(int(study_id))
        texts.append(text)
    return TextReferences(
        np.asarray(keep_ids, dtype=np.int64),
        texts,
        description,
        len(dropped_ids),
        ORIGIN_ROOT if root.is_dir() else ORIGIN_FILE,
        section,
        np.asarray(dropped_ids, dtype=np.int64),
    )


@dataclass
class ProgressionReferences:
    """MS-CXR-T ground truth: per finding an array of class index (0..2) or -1 where not annotated."""

    study_ids: np.ndarray
    classes: dict[str, np.ndarray]
    description: str
    dicom_ids: np.ndarray | None = None
    origin: str = ORIGIN_FILE

    def content_hash(self) -> str:
        """sha256 of the row keys and the class of every finding (order-free)."""
        key_name, keys = self.key
        order = np.argsort(keys, kind="stable")
        columns: dict[str, Any] = {key_name: keys[order]}
        if key_name == "dicom_id":
            columns["study_id"] = self.study_ids[order]
        columns.update({prefix: self.classes[prefix][order] for prefix in MS_CXR_T_FINDINGS})
        return content_sha256({"references": "ms-cxr-t"}, columns)

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
    from cxrmax.mimic.reader import read_ms_cxr_t  # deferred: see the note at the top

    table = read_ms_cxr_t(path)
    ids = reference_study_ids(table, path)
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
    return ProgressionReferences(
        ids, classes, f"{path.name}", dicom, ORIGIN_ROOT if root.is_dir() else ORIGIN_FILE
    )


# ---------------------------------------------------------------------------------------------------
# Labeller output


def labels_of_texts(texts: Sequence[str | None], processes: int | None = None) -> np.ndarray:
    """Label free texts with `cxrmax.labeler`: (n, 14) float32, NaN for not mentioned."""
    from cxrmax.labeler import label_texts  # deferred: see the note at the top

    if not texts:
        return np.zeros((0, len(OBSERVATIONS)), dtype=np.float32)
    table = label_texts(list(texts), processes=processes)
    return np.column_stack(
        [
            table.column(o).cast("float32").fill_null(np.nan).to_numpy(zero_copy_only=False)
            for o in OBSERVATIONS
        ]
    ).astype(np.float32)
