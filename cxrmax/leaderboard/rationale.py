"""The cxr-max-rationale task: how faithful each model's rationales are to the ground truth.

Input: trajectory shards (``OUT/trajectories/<model>/*.arrow`` with shards.TRAJECTORY_SCHEMA, or the
folder above) or a submission file with study_id, model and a text column. Ground truth: the
``labels`` struct carried by each trajectory, else the references' labels for its study.

Per trajectory (the drift definitions of `cxrmax.preferences.drift`, reused here):
- precision = |claimed by the rationale and by the ground truth| / |claimed by the rationale|,
- recall = |claimed by both| / |claimed by the ground truth| (`cxrmax.preferences.drift.compare`; "claimed" =
  positive, and uncertain under the default policy),
- similarity = `cxrmax.preferences.drift.token_similarity`: the F1 of content-token overlap with the
  reference report (a token F1, not a Jaccard index; computed when report text is available from the
  references). The key keeps the paper's name "similarity" so that its chart's rows sit beside ours;
- label_jaccard = |claimed by both| / |claimed by either| (1 when both claim nothing).
Per model each figure is the mean over the trajectories where it is defined (precision is undefined
for a rationale that claims nothing, recall for a study with no positive label), with bootstrap CIs
over trajectories. The paper's chart does not publish its definitions: its rows are shown beside
ours as "published, not re-scored", not as a like-for-like comparison.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc

from cxrmax.core.errors import InputError, where
from cxrmax.core.formats import detect_format
from cxrmax.core.io import iter_arrow_batches
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.core.terminal import CONTROL_CHARACTERS
from cxrmax.generate import trajectory_files
from cxrmax.leaderboard import fingerprint, metrics, submissions
from cxrmax.leaderboard.predictions import Predictions, content_sha256
from cxrmax.leaderboard.references import (
    LabelReferences,
    ScoreResult,
    file_sha256,
    labels_of_texts,
    load_label_references,
    load_text_references,
    open_mimic,
)
from cxrmax.leaderboard.tasks import Task
from cxrmax.preferences import drift

_STAT_NAMES = (
    "precision",
    "has_precision",
    "recall",
    "has_recall",
    "similarity",
    "has_similarity",
    "label_jaccard",
    "count",
)


def _apply_policy(pred: np.ndarray, ref: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """States under the uncertain policy: positive keeps E's convention (uncertain is claimed),
    negative turns uncertain into negative, ignore blanks cells uncertain on either side."""
    pred, ref = pred.copy(), ref.copy()
    if policy == "negative":
        pred[pred == drift.UNCERTAIN] = drift.NEGATIVE
        ref[ref == drift.UNCERTAIN] = drift.NEGATIVE
    elif policy == "ignore":
        drop = (pred == drift.UNCERTAIN) | (ref == drift.UNCERTAIN)
        pred[drop] = drift.ABSENT
        ref[drop] = drift.ABSENT
    return pred, ref


def rationale_stats(
    predicted: np.ndarray,
    reference: np.ndarray,
    texts: list[str | None],
    reports: list[str | None] | None,
    policy: str,
) -> np.ndarray:
    """Per-trajectory statistics (n, 8) in `_STAT_NAMES` order from label arrays (NaN = blank)."""
    pred_states, ref_states = _apply_policy(
        drift.labels_array_to_states(predicted), drift.labels_array_to_states(reference), policy
    )
    zeros = np.zeros_like(pred_states)
    agreement = drift.compare(pred_states, zeros, ref_states, zeros)
    pred_claimed, ref_claimed = drift.claimed(pred_states), drift.claimed(ref_states)
    union = (pred_claimed | ref_claimed).sum(1)
    jaccard = np.where(union > 0, agreement.true_positive / np.maximum(union, 1), 1.0)
    similarity = np.full(len(texts), np.nan)
    if reports is not None:
        for i, (text, report) in enumerate(zip(texts, reports, strict=True)):
            value = drift.token_similarity(text, report)
            similarity[i] = np.nan if value is None else value
    out = np.zeros((len(texts), len(_STAT_NAMES)))
    for k, values in enumerate((agreement.precision, agreement.recall, similarity)):
        defined = ~np.isnan(values)
        out[:, 2 * k] = np.where(defined, values, 0.0)
        out[:, 2 * k + 1] = defined
    out[:, 6] = jaccard
    out[:, 7] = 1.0
    return out


def rationale_summary(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Per-model figures from summed `rationale_stats` (..., 8)."""

    def ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.full(np.shape(a), np.nan), where=b > 0)

    return {
        "precision": ratio(sums[..., 0], sums[..., 1]),
        "recall": ratio(sums[..., 2], sums[..., 3]),
        "similarity": ratio(sums[..., 4], sums[..., 5]),
        "label_jaccard": ratio(sums[..., 6], sums[..., 7]),
    }


def _shard_files(path: Path) -> list[Path]:
    """Committed trajectory shards (``part-*.arrow``) under OUT/trajectories/<model>/, given OUT or
    OUT/trajectories (generate's layout; journals of unfinished runs are not read)."""
    out = path.parent if path.name == "trajectories" else path
    files = trajectory_files(out)
    if not files:
        files = sorted(path.rglob("part-*.arrow"))
    if not files:
        raise InputError(f"{where(path)}: no trajectory shards (trajectories/<model>/part-*.arrow) found")
    return files


def _iter_rows(
    path: Path, batch_rows: int, lenient: bool
) -> Iterator[tuple[Path, np.ndarray, dict[str, Any]]]:
    """Yield (file, row numbers, columns) with columns study_id, model, text and optionally labels."""
    if path.is_dir():
        for file in _shard_files(path):
            start = 1
            for batch in iter_arrow_batches(file):
                names = batch.schema.names
                for needed in ("model", "text"):
                    if needed not in names:
                        raise InputError(f"{where(file, field=needed)}: trajectory shard lacks this column")
                rows = np.arange(start, start + batch.num_rows)
                start += batch.num_rows
                columns = {
                    "study_id": batch.column(names.index("study_id")).fill_null(-1)
                    if "study_id" in names
                    else np.full(batch.num_rows, -1, dtype=np.int64),
                    "model": batch.column(names.index("model")).to_pylist(),
                    "text": batch.column(names.index("text")).to_pylist(),
                }
                if "labels" in names:
                    columns["labels"] = batch.column(names.index("labels"))
                yield file, rows, columns
        return
    for batch in submissions.iter_batches(path, batch_rows):
        plan = submissions.plan_columns(list(batch.columns), "rationale", path, lenient=lenient)
        for role, name in (("study_id", plan.key), ("model", plan.model), ("text", plan.text)):
            if name is None:
                raise InputError(f"{where(path, field=role)}: {submissions.expected_columns('rationale')}")
        models = submissions.text_values(batch.columns[plan.model], batch.rows, path, plan.model)
        # Model names are trimmed ("m1 " is m1, as build-preferences reads them); blank ones and
        # ones holding control characters (a newline would split the per-model table) are errors.
        models = [m.strip() if m is not None else m for m in models]
        for i, model in enumerate(models):
            if not model:
                raise InputError(f"{where(path, row=int(batch.rows[i]), field=plan.model)}: blank model name")
            bad = CONTROL_CHARACTERS.search(model)
            if bad is not None:
                raise InputError(
                    f"{where(path, row=int(batch.rows[i]), field=plan.model)}: model name {model!r} holds the "
                    f"control character {bad.group()!r}"
                )
        yield (
            path,
            batch.rows,
            {
                "study_id": batch.columns[plan.key],
                "model": models,
                "text": submissions.text_values(batch.columns[plan.text], batch.rows, path, plan.text),
            },
        )


def _struct_labels(column: Any) -> np.ndarray:
    """LABELS_TYPE struct column -> (n, 14) float32 with NaN for blank; rows with a null struct are all NaN."""
    out = np.column_stack(
        [
            pc.struct_field(column, o).cast("float32").fill_null(np.nan).to_numpy(zero_copy_only=False)
            for o in OBSERVATIONS
        ]
    )
    return out.astype(np.float32)


def score_rationales(
    path: Path,
    task: Task,
    references_root: str | Path | None,
    *,
    uncertain: str = "positive",
    n_boot: int = 1000,
    seed: int = 0,
    processes: int | None = None,
    lenient: bool = False,
    batch_rows: int = submissions.BATCH_ROWS,
    progress: Any = None,
) -> ScoreResult:
    """Score rationales per model (see the module docstring for the definitions)."""
    label_refs, reports, notes = _rationale_references(task, references_root)
    per_model, n_rows, skipped, scored = _collect_stats(
        path, label_refs, reports, uncertain, processes, lenient, batch_rows, progress
    )
    if not per_model:
        raise InputError(f"{where(path)}: no rationale could be scored")
    table, overall = _per_model_table(per_model, n_boot, seed)
    headline = {
        name: (None if np.isnan(v) else float(v)) for name, v in rationale_summary(overall.sum(0)).items()
    }
    predictions = Predictions.build(
        "rationale",
        "study_id",
        np.asarray(scored[0], dtype=np.int64),
        {"model": scored[1], "text": scored[2]},
    )
    return ScoreResult(
        fingerprint=_fingerprint(task, label_refs, reports, uncertain),
        predictions=predictions,
        predictions_sha256=predictions.sha256,
        task=task.name,
        task_version=task.version,
        kind=task.kind,
        submission=str(path),
        sha256=file_sha256(path) if path.is_file() else _dir_sha256(path),
        format="arrow" if path.is_dir() else detect_format(path),
        uncertain=uncertain,
        input_kind="text",
        n_rows=n_rows,
        n_references=n_rows - skipped,
        n_scored=n_rows - skipped,
        missing=0,
        skipped_unknown=skipped,
        primary_metric=task.primary_metric,
        headline=headline,
        ci=metrics.bootstrap_ci(overall, rationale_summary, n_boot=n_boot, seed=seed),
        per_model=table,
        n_boot=n_boot,
        notes=notes
        + [
            "precision/recall: the observations the labeler reads in each answer (positive or uncertain) vs "
            "the ground-truth labels, the data card's drift definition; similarity: content-token F1 vs the "
            "reference report; per model means over trajectories"
        ],
    )


def _fingerprint(
    task: Task, label_refs: LabelReferences | None, reports: _Reports | None, uncertain: str
) -> dict[str, Any]:
    """The rationale fingerprint: the label references' hash and whether report text was read. Without
    references the ground truth is the trajectories' own labels: no reference set to compare."""
    if label_refs is None:
        return fingerprint.make(task, "", "labels in the trajectories", uncertain)
    header = {"references": "rationale", "labels": label_refs.content_hash(), "reports": reports is not None}
    return fingerprint.make(task, content_sha256(header, {}), label_refs.origin, uncertain)


def _rationale_references(
    task: Task, references_root: str | Path | None
) -> tuple[LabelReferences | None, _Reports | None, list[str]]:
    """Ground-truth labels and reference report text, when references are given, and the notes on
    what could not be computed without them."""
    notes: list[str] = []
    if references_root is None:
        notes.append("similarity not computed: no references given (report text needed)")
        return None, None, notes
    root = Path(references_root)
    label_refs = load_label_references(task, root)
    if root.is_dir():
        # A MIMIC-CXR root: read only the reports of the studies the rationales are about.
        return label_refs, _Reports(root, label_refs), notes
    try:
        text_refs = load_text_references(task, root, "best")
    except InputError as exc:
        notes.append(f"similarity not computed: no reference report text ({exc})")
        return label_refs, None, notes
    texts = dict(zip(text_refs.study_ids.tolist(), text_refs.texts, strict=True))
    return label_refs, _Reports(None, label_refs, texts), notes


def _collect_stats(
    path: Path,
    label_refs: LabelReferences | None,
    reports: _Reports | None,
    uncertain: str,
    processes: int | None,
    lenient: bool,
    batch_rows: int,
    progress: Any,
) -> tuple[dict[str, list[np.ndarray]], int, int, tuple[list[int], list[str], list[str | None]]]:
    """Per-model `rationale_stats` arrays over every row, the row count, the rows skipped for
    lack of ground truth (an error unless ``lenient``) and the scored rows (study ids, models,
    texts) for the canonical predictions."""
    index = submissions.StudyIndex(label_refs.study_ids) if label_refs is not None else None
    per_model: dict[str, list[np.ndarray]] = {}
    n_rows = skipped = 0
    scored: tuple[list[int], list[str], list[str | None]] = ([], [], [])
    for file, rows, columns in _iter_rows(path, batch_rows, lenient):
        n = len(rows)
        n_rows += n
        ids = columns["study_id"]
        if not isinstance(ids, np.ndarray):
            ids = submissions.parse_study_ids(ids, rows, file)
        truth = (
            _struct_labels(columns["labels"])
            if "labels" in columns
            else np.full((n, len(OBSERVATIONS)), np.nan, np.float32)
        )
        has_truth = ~np.isnan(truth).all(axis=1) if "labels" in columns else np.zeros(n, bool)
        keep = np.ones(n, dtype=bool)
        if index is not None:
            slots = index.lookup(ids)
            fill = ~has_truth & (slots >= 0)
            truth[fill] = label_refs.labels[slots[fill]]
            has_truth |= fill
        lacking = ~has_truth
        if lacking.any():
            if not lenient:
                i = int(np.nonzero(lacking)[0][0])
                raise InputError(
                    f"{where(file, row=int(rows[i]), field='study_id')}: no ground-truth labels for study {int(ids[i])} "
                    "(not in the references and no labels column; --lenient skips such rows)"
                )
            skipped += int(lacking.sum())
            keep &= has_truth
        idx = np.nonzero(keep)[0]
        texts = [columns["text"][i] for i in idx]
        predicted = labels_of_texts(texts, processes)
        report_texts = [reports.get(int(ids[i])) for i in idx] if reports is not None else None
        stats = rationale_stats(predicted, truth[idx], texts, report_texts, uncertain)
        models = np.asarray([columns["model"][i] for i in idx], dtype=object)
        for model in dict.fromkeys(models.tolist()):
            per_model.setdefault(model, []).append(stats[models == model])
        scored[0].extend(int(ids[i]) for i in idx)
        scored[1].extend(models.tolist())
        scored[2].extend(texts)
        if progress:
            progress(n)
    return per_model, n_rows, skipped, scored


def _per_model_table(
    per_model: dict[str, list[np.ndarray]], n_boot: int, seed: int
) -> tuple[dict[str, dict[str, Any]], np.ndarray]:
    """Each model's figures with bootstrap CIs, and every model's statistics stacked.

    A model's rows are put in one canonical order (sorted by their statistics) before resampling, so
    the intervals depend on the answers, not on the order a submission or concurrent generation
    wrote them in."""
    table: dict[str, dict[str, Any]] = {}
    all_stats = []
    for k, (model, parts) in enumerate(sorted(per_model.items())):
        stats = np.concatenate(parts)
        stats = stats[np.lexsort(stats.T[::-1])] if len(stats) else stats
        all_stats.append(stats)
        summary = {name: float(v) for name, v in rationale_summary(stats.sum(0)).items()}
        ci = metrics.bootstrap_ci(stats, rationale_summary, n_boot=n_boot, seed=seed + k)
        table[model] = {
            "n": int(len(stats)),
            **{name: (None if np.isnan(v) else v) for name, v in summary.items()},
            "ci": {name: list(v) for name, v in ci.items()},
        }
    return table, np.concatenate(all_stats)


class _Reports:
    """Reference report text (impression > findings > last paragraph) by study id: from a prepared
    table, or read on demand from a MIMIC-CXR root (cached), so that a rationale set about a few
    thousand studies never parses all of MIMIC-CXR's reports."""

    def __init__(
        self, root: Path | None, label_refs: LabelReferences, texts: dict[int, str] | None = None
    ) -> None:
        self.root = root
        self.texts = texts if texts is not None else {}
        self.subjects: dict[int, int] = {}
        self.mimic = None
        if root is not None:
            self.mimic = open_mimic(root)
            if label_refs.subject_ids is not None:
                self.subjects = dict(
                    zip(label_refs.study_ids.tolist(), label_refs.subject_ids.tolist(), strict=True)
                )

    def get(self, study_id: int) -> str | None:
        """The report text of a study, or None."""
        if self.mimic is None or study_id in self.texts:
            return self.texts.get(study_id)
        subject = self.subjects.get(study_id)
        sections = self.mimic.report(subject, study_id) if subject else None
        text = sections.best() if sections is not None else None
        self.texts[study_id] = text
        return text


def _dir_sha256(path: Path) -> str:
    """Hash of every shard's name and bytes, in sorted order (identifies a trajectory folder)."""
    digest = hashlib.sha256()
    for file in _shard_files(path):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file_sha256(file).encode())
    return digest.hexdigest()
