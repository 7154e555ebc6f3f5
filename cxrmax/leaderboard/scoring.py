"""Score one submission against a task's references: `score(submission, task, references_root)`.

References are loaded by `cxrmax.leaderboard.references` (a MIMIC-CXR root or a prepared reference
file); rationale submissions are scored by `cxrmax.leaderboard.rationale`. The submission is
streamed batch by batch: every row is mapped to a reference slot at once (unknown and duplicate
study ids are caught there). Besides per-study numbers, each scorer keeps what it scored in
canonical form (`cxrmax.leaderboard.predictions.Predictions`: the board's duplicate key and its copy
for `export-predictions`) and the result's fingerprint (`cxrmax.leaderboard.fingerprint`).

A submission that overlaps no reference study is an error, with or without ``lenient``: a score of
nothing is not 0.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cxrmax.core.errors import CxrmaxError, InputError, where
from cxrmax.core.formats import sniff
from cxrmax.core.pathologies import COMPETITION_LABELS, MS_CXR_T_FINDINGS, OBSERVATIONS, PROGRESSION_CLASSES
from cxrmax.leaderboard import fingerprint, metrics, submissions, textmetrics
from cxrmax.leaderboard.predictions import Predictions
from cxrmax.leaderboard.progression import classify_progression
from cxrmax.leaderboard.rationale import score_rationales
from cxrmax.leaderboard.references import (
    ProgressionReferences,
    ScoreResult,
    TextReferences,
    file_sha256,
    labels_of_texts,
    load_label_references,
    load_progression_references,
    load_text_references,
)
from cxrmax.leaderboard.tasks import Task, get_task

__all__ = ["ScoreResult", "dumps", "file_sha256", "score"]

Progress = Callable[[int], None]


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
    #: Reference keys that exist but are not scored (report studies without the scored section):
    #: rows for them are skipped and counted, not called unknown.
    not_scored: np.ndarray | None = None
    n_rows: int = 0
    skipped_unknown: int = 0
    skipped_not_scored: int = 0
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

    def _plan_first(self, columns: list[str]) -> None:
        """Give each column of the first batch its role, and choose the row key."""
        self.plan = submissions.plan_columns(columns, self.kind, self.path, row=None, lenient=self.lenient)
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

    def _plan_later(self, columns: list[str], first_row: int) -> None:
        """Columns first seen in a later batch: observation or finding keys join the plan (JSON rows
        may leave out blank cells); a key, text or model column appearing late is an error."""
        known = set(self.plan.observations) | set(self.plan.progression) | set(self.plan.ignored)
        known |= {c for c in (self.plan.key, self.plan.text, self.plan.model) if c}
        new = [c for c in columns if c not in known]
        if not new:
            return
        extra = submissions.plan_columns(new, self.kind, self.path, row=first_row, lenient=self.lenient)
        if extra.key or extra.text or extra.model:
            raise InputError(
                f"{where(self.path, row=first_row, field=new[0])}: column appears only from this row on"
            )
        for column, obs in extra.observations.items():
            if obs in self.plan.observations.values():
                raise InputError(
                    f"{where(self.path, row=first_row, field=column)}: observation {obs!r} given by two columns"
                )
            self.plan.observations[column] = obs
        self.plan.progression.update(extra.progression)
        self.plan.ignored.extend(extra.ignored)

    def batches(self, batch_rows: int, progress: Progress | None) -> Any:
        """Yield (batch, kept row positions, their reference slots); unknown, unreadable and
        duplicate rows are refused here (or skipped and counted with ``lenient``)."""
        for batch in submissions.iter_batches(self.path, batch_rows, lenient=self.lenient, log=self.read_log):
            columns = list(batch.columns)
            if self.plan is None:
                self._plan_first(columns)
            else:
                self._plan_later(columns, int(batch.rows[0]))
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
            if unknown.any() and self.not_scored is not None:
                unscored = unknown & np.isin(ids, self.not_scored)
                self.skipped_not_scored += int(unscored.sum())
                unknown &= ~unscored
                bad_key = bad_key | unscored  # dropped from this batch like unreadable keys
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
    if not covered.any():
        # Even with --lenient: with no overlap every figure would be a 0 (or an accuracy of n = 0)
        # that ranks like a real score.
        raise InputError(
            f"{where(path)}: no row matches a study of the references ({len(ids)} reference studies); "
            "nothing to score (check the study ids, the task's split and --references)"
        )
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
    fmt = sniff(path).format
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
    if result.predictions is not None:
        result.predictions_sha256 = result.predictions.sha256
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
    slot_texts: list[str | None] = []  # free text per slot (text submissions only)
    mode = None
    for batch, keep, slots in stream.batches(batch_rows, progress):
        if mode is None:
            mode = _label_mode(stream, path, lenient)
        if mode == "values":
            _read_label_values(stream, batch, keep, slots, predicted)
        else:
            if stream.plan.observations:  # keys first seen in a later batch of a text submission
                column = next(iter(stream.plan.observations))
                raise InputError(
                    f"{where(path, row=int(batch.rows[0]), field=column)}: observation values appear from this "
                    f"row on, after rows scored from the text column {stream.plan.text!r}; give one or the other"
                )
            texts = stream.texts(batch, keep, slots, stream.plan.text)
            predicted[slots] = labels_of_texts(texts, processes)
            _keep_texts(slot_texts, len(refs.study_ids), slots, texts)
    covered, missing = _coverage(index, refs.study_ids, require_complete, path)
    if mode == "values":
        never = [o for o in OBSERVATIONS if o not in stream.plan.observations.values()]
        if never and sniff(path).format in ("jsonl", "json"):
            stream.notes.append(f"observations never given (blank in every row): {', '.join(never)}")
    is_score = None
    input_kind = "text" if mode == "text" else "labels"
    if mode == "values":
        is_score, covered, missing = _check_probabilities(
            stream, refs.study_ids, predicted, covered, missing, require_complete
        )
        if is_score.any():
            input_kind = "probabilities"
    scores = metrics.score_labels(
        refs.labels[covered], predicted[covered], uncertain, is_score=is_score, n_boot=n_boot, seed=seed
    )
    result = ScoreResult(
        **_base(task, path, uncertain, input_kind, stream, len(refs.study_ids), int(covered.sum()), missing),
        headline=scores.headline,
        ci=scores.ci,
        per_observation=scores.per_observation,
        n_boot=n_boot,
    )
    result.extra["references"] = refs.description
    result.extra["skipped_unreadable"] = stream.read_log.skipped
    result.extra["competition_labels"] = list(COMPETITION_LABELS)
    result.fingerprint = fingerprint.make(task, refs.content_hash(), refs.origin, uncertain)
    ids = refs.study_ids[covered]
    if mode == "text":
        result.predictions = Predictions.build(
            "text", "study_id", ids, {"text": _covered(slot_texts, covered)}
        )
    else:
        columns = {o: predicted[covered, j] for j, o in enumerate(OBSERVATIONS)}
        result.predictions = Predictions.build("labels", "study_id", ids, columns)
    result.notes = stream.finish_notes()
    result.notes.append(_COMPETITION_NOTE)
    if input_kind == "probabilities":
        result.notes.append(
            "probabilities thresholded at 0.5 for accuracy/precision/recall/F1; AUROC from the scores"
        )
    return result


_COMPETITION_NOTE = (
    "*_f1_5: over the 5 CheXpert competition labels (" + ", ".join(COMPETITION_LABELS) + "); *_f1_14: all 14"
)


def _keep_texts(slot_texts: list[str | None], size: int, slots: np.ndarray, texts: list) -> None:
    """Remember each slot's submitted text (for the canonical predictions)."""
    if not slot_texts:
        slot_texts.extend([None] * size)
    for slot, text in zip(slots.tolist(), texts, strict=True):
        slot_texts[slot] = text


def _covered(slot_texts: list[str | None], covered: np.ndarray) -> list[str | None]:
    """The texts of the covered slots, in slot order."""
    return [slot_texts[i] for i in np.nonzero(covered)[0]] if slot_texts else []


def _label_mode(stream: _Stream, path: Path, lenient: bool) -> str:
    """ "values" when the first batch has observation columns (missing ones checked), else "text"."""
    plan = stream.plan
    if plan.observations:
        missing_obs = [o for o in OBSERVATIONS if o not in plan.observations.values()]
        sparse = sniff(path).format in ("jsonl", "json")  # absent key = blank cell
        if missing_obs and not lenient and not sparse:
            raise InputError(
                f"{where(path, field=missing_obs[0])}: observation column missing ({', '.join(missing_obs)}); "
                "every observation needs a column (blank cells are fine; --lenient treats missing columns as blank)"
            )
        if missing_obs and not sparse:
            stream.notes.append(f"observation columns missing, counted as blank: {', '.join(missing_obs)}")
        if plan.text:
            stream.notes.append(f"text column {plan.text!r} ignored: observation columns given")
        return "values"
    if plan.text:
        return "text"
    raise InputError(f"{where(path)}: {submissions.expected_columns('labels')}")


def _read_label_values(
    stream: _Stream, batch: submissions.RawBatch, keep: np.ndarray, slots: np.ndarray, predicted: np.ndarray
) -> None:
    """Parse the observation columns of a batch into ``predicted``; unreadable rows (``lenient``) and
    text-only rows are dropped and counted."""
    path, lenient, plan = stream.path, stream.lenient, stream.plan
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


def _check_probabilities(
    stream: _Stream,
    study_ids: np.ndarray,
    predicted: np.ndarray,
    covered: np.ndarray,
    missing: int,
    require_complete: bool,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Which observations hold probabilities (a value strictly between 0 and 1), and the coverage
    after refusing (or, with ``lenient``, dropping) rows with -1 or blank in such a column."""
    path, lenient, index = stream.path, stream.lenient, stream.index
    pred = predicted[covered]
    finite = ~np.isnan(pred)
    fractional = finite & (pred != -1) & (pred != 0) & (pred != 1)
    is_score = fractional.any(axis=0)
    if not is_score.any():
        return is_score, covered, missing
    rows_of = index.first_row[covered]
    not_probability = np.zeros(len(pred), dtype=bool)
    for j in np.nonzero(is_score)[0]:
        column = next(c for c, o in stream.plan.observations.items() if o == OBSERVATIONS[j])
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
        covered, missing = _coverage(index, study_ids, require_complete, path)
    return is_score, covered, missing


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
    if len(refs.dropped_ids):
        stream.not_scored = refs.dropped_ids
    slot_texts: list[str | None] = []
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
        _keep_texts(slot_texts, len(refs.texts), slots, texts)
        stats[slots] = corpus.score_batch(slots, texts)
        predicted[slots] = labels_of_texts(texts, processes)
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
    reference_labels = labels_of_texts([refs.texts[i] for i in np.nonzero(covered)[0]], processes)
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
    _report_provenance(result, task, refs, stream, sums, covered, slot_texts)
    return result


def _report_provenance(
    result: ScoreResult,
    task: Task,
    refs: TextReferences,
    stream: _Stream,
    sums: np.ndarray,
    covered: np.ndarray,
    slot_texts: list[str | None],
) -> None:
    """What a report score was computed against and how: references, section, the CIDEr-D corpus,
    ReXrank's BLEU-2, the studies without the section, the fingerprint and the canonical texts."""
    result.extra["references"] = refs.description
    result.extra["skipped_unreadable"] = stream.read_log.skipped
    result.extra["reference_section"] = refs.section
    result.extra["references_without_section"] = refs.dropped
    result.extra["competition_labels"] = list(COMPETITION_LABELS)
    result.extra["rexrank_bleu_2"] = textmetrics.rexrank_bleu_2_mean(sums)
    result.extra["cider_d_document_frequencies"] = (
        f"all {len(refs.texts)} task references ({refs.section} sections), not only the scored studies"
    )
    if stream.skipped_not_scored:
        result.extra["skipped_without_section"] = stream.skipped_not_scored
        result.notes.append(
            f"{stream.skipped_not_scored} rows for studies whose reference report has no {refs.section} "
            "section: not scored (they are not among the task's scored ids)"
        )
    result.fingerprint = fingerprint.make(
        task, refs.content_hash(), refs.origin, result.uncertain, refs.section
    )
    result.predictions = Predictions.build(
        "text", "study_id", refs.study_ids[covered], {"text": _covered(slot_texts, covered)}
    )
    result.notes.append("clinical efficacy (ce_*): cxrmax labeler on generated vs reference text")
    result.notes.append(_COMPETITION_NOTE.replace("*_f1", "ce_*_f1"))
    result.notes.append("CIDEr-D document frequencies: " + result.extra["cider_d_document_frequencies"])


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
    answers, input_kind, unreadable, cells = _read_progression_answers(stream, refs, batch_rows, progress)
    index = stream.index  # the dicom_id index when the submission was keyed that way
    keys = refs.dicom_ids if stream.key_column == "dicom_id" else keys
    covered, missing = _coverage(index, keys, require_complete, path)
    headline, per_finding, stats = _progression_accuracy(task, refs, answers, covered)

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
    result.extra["missing_answers"] = task.missing_answers
    result.fingerprint = fingerprint.make(task, refs.content_hash(), refs.origin, "n/a")
    kind = "text" if input_kind == "text" else "answers"
    result.predictions = Predictions.build(
        kind,
        stream.key_column,
        keys[covered],
        {name: [values[i] for i in np.nonzero(covered)[0]] for name, values in cells.items()},
    )
    if missing and task.missing_answers == "wrong":
        result.notes.append(
            f"{missing} reference rows absent from the submission: their annotated findings count as "
            'wrong (the task\'s missing_answers = "wrong")'
        )
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


def _read_progression_answers(
    stream: _Stream, refs: ProgressionReferences, batch_rows: int, progress: Progress | None
) -> tuple[np.ndarray, str | None, int, dict[str, list[str | None]]]:
    """Every row's answer per finding as a class index (-2 not given, -1 unreadable), from
    per-finding answer columns or from one free-text column, with the input kind, the count of
    answers that could not be read, and the canonical cells per slot (answer columns: the class
    name, or the cell as given when unreadable; free text: the text)."""
    path = stream.path
    findings = list(MS_CXR_T_FINDINGS)
    answers = np.full((len(refs.study_ids), len(findings)), -2, dtype=np.int8)  # -2 not given, -1 unreadable
    lookup = {name: i for i, name in enumerate(PROGRESSION_CLASSES)}
    input_kind = None
    unreadable = 0
    cells: dict[str, list[str | None]] = {}
    for batch, keep, slots in stream.batches(batch_rows, progress):
        plan = stream.plan
        if not plan.progression and not plan.text:
            raise InputError(f"{where(path)}: {submissions.expected_columns('ms-cxr-t')}")
        if plan.progression:
            input_kind = input_kind or "answers"
            for column, prefix in plan.progression.items():
                values = stream.texts(batch, keep, slots, column)
                j = findings.index(prefix)
                column_cells = cells.setdefault(prefix, [None] * len(refs.study_ids))
                for k, value in enumerate(values):
                    label = classify_progression(value, None) if value and value.strip() else None
                    answers[slots[k], j] = lookup[label] if label else -1
                    unreadable += bool(value and value.strip() and label is None)
                    column_cells[slots[k]] = label or (value.strip() if value and value.strip() else None)
        else:
            input_kind = input_kind or "text"
            values = stream.texts(batch, keep, slots, plan.text)
            text_cells = cells.setdefault("text", [None] * len(refs.study_ids))
            for k, value in enumerate(values):
                text_cells[slots[k]] = value
                for j, prefix in enumerate(findings):
                    if refs.classes[prefix][slots[k]] < 0:
                        continue
                    label = classify_progression(value, prefix)
                    answers[slots[k], j] = lookup[label] if label else -1
    # Findings in MS_CXR_T_FINDINGS order, so that column order never changes the canonical form.
    if "text" in cells:
        return answers, input_kind, unreadable, {"text": cells["text"]}
    blank = [None] * len(refs.study_ids)
    return answers, input_kind, unreadable, {prefix: cells.get(prefix, blank) for prefix in findings}


def _progression_accuracy(
    task: Task, refs: ProgressionReferences, answers: np.ndarray, covered: np.ndarray
) -> tuple[dict[str, float | None], list[dict[str, Any]], np.ndarray]:
    """Top-1 accuracy per finding and their mean (in the task's column order), the per-finding
    confusion counts, and the per-study (correct, annotated) statistics for the bootstrap.

    With the task's ``missing_answers = "wrong"`` every reference row counts (an absent row's
    annotated findings are wrong answers); with "skip" only the covered rows do."""
    findings = list(MS_CXR_T_FINDINGS)
    per_finding = []
    stats_columns = []
    headline: dict[str, float | None] = {}
    counted = np.ones_like(covered) if task.missing_answers == "wrong" else covered
    for j, prefix in enumerate(findings):
        truth = refs.classes[prefix]
        annotated = counted & (truth >= 0)
        correct = annotated & covered & (answers[:, j] == truth)
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
    return headline, per_finding, np.column_stack(stats_columns)[counted]


def dumps(result: ScoreResult) -> str:
    """The result as pretty JSON."""
    return json.dumps(result.to_dict(), indent=2)
