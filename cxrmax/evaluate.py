"""One-shot evaluation of a trained model: `evaluate(EvaluateOptions(...))`, behind `cxrmax evaluate`.

It composes three stages that know nothing of each other:

1. **Select** the frontal images of the MIMIC-CXR test split (`cxrmax.mimic.MimicCXR.select`) into
   ``OUT/evaluate/<name>/selection-test.parquet``.
2. **Generate** the model's answers to the sources' prompt with the sources' sampling through
   generate's orchestrator (backend ``transformers``: a merged model, a base model or a LoRA adapter
   folder as train-apo writes it), into ``OUT/evaluate/<name>/trajectories/<name>/``. The requests are
   keyed exactly once, as in `cxrmax generate`: rerunning the same command answers only what is
   missing. The answers stay out of ``OUT/trajectories/``, so an evaluation run inside a generate
   output never becomes a source of the next `build-preferences`.
3. **Score** on the leaderboard: the rationale task (`cxr-max-rationale`, every answer) and the label
   task (`mimic-cxr-labels`, the first answer of each study read by the labeler) where the
   references label the test studies, each with 95% bootstrap intervals. Sources found in a generate
   output (``OUT`` or ``sources``) with answers on the same test images are scored the same way on
   exactly those images, so their rows sit beside the model's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrmax.core.errors import InputError, where
from cxrmax.core.hf import adapter_base
from cxrmax.core.io import atomic_path, atomic_write_text, iter_arrow_batches
from cxrmax.generate.orchestrator import GenerateOptions, generate
from cxrmax.generate.progress import ProgressReporter, RunStats
from cxrmax.generate.prompts import load_prompt
from cxrmax.generate.reader import model_dirs, read_trajectories, trajectory_files
from cxrmax.generate.roster import DEFAULT_SAMPLING, ModelSpec, resolve_model, safe_dir_name
from cxrmax.leaderboard.references import ScoreResult, load_label_references
from cxrmax.leaderboard.scoring import score
from cxrmax.leaderboard.store import Board, DuplicateSubmission
from cxrmax.leaderboard.tasks import get_task
from cxrmax.mimic.reader import MimicCXR
from cxrmax.mimic.selection import write_selection

RATIONALE_TASK = "cxr-max-rationale"
LABEL_TASK = "mimic-cxr-labels"
#: Frontal views: the images the sources answered (generate's selections use the same).
FRONTAL_VIEWS = ("PA", "AP")
#: Trajectory columns the scoring submissions are made of.
_COLUMNS = ["sample_id", "study_id", "model", "sample_index", "text"]


@dataclass
class EvaluateOptions:
    """What one `cxrmax evaluate` run needs. Sampling left at None is the sources' own, as their
    trajectories record it (the most common one when they differ, with a note); without recorded
    sources, the roster entry of the model's base (pipelines/models.toml), else the roster's default."""

    model: str
    mimic_root: Path
    out: Path
    name: str | None = None
    prompt: str = "rationale"
    samples: int = 1
    seed: int = 0
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    studies: int | None = None  # a deterministic sample of the test studies (default: all)
    image_max_edge: int = 1024
    sources: Path | None = None  # a generate output whose models are scored beside (default: OUT)
    n_boot: int = 1000
    processes: int | None = None
    submit: str | None = None
    board: Path | None = None


@dataclass
class ModelScores:
    """One row of the comparison: a model's figures on both tasks (None where a task does not apply)."""

    model: str
    kind: str  # "evaluated" | "source"
    answers: int
    rationale: ScoreResult
    labels: ScoreResult | None = None

    def figures(self) -> dict[str, Any]:
        """The row's figures and their intervals, JSON-ready."""
        per_model = self.rationale.per_model.get(self.model, {})
        row: dict[str, Any] = {"model": self.model, "kind": self.kind, "answers": self.answers}
        ci: dict[str, Any] = {}
        for metric in ("precision", "recall", "similarity"):
            row[metric] = per_model.get(metric)
            if metric in (per_model.get("ci") or {}):
                ci[metric] = list(per_model["ci"][metric])
        if self.labels is not None:
            for metric, value in self.labels.headline.items():
                row[metric] = value
                if metric in self.labels.ci:
                    ci[metric] = list(self.labels.ci[metric])
        row["ci"] = ci
        return row


@dataclass
class EvaluateResult:
    """What `evaluate` did and found: the run's counters, each model's scores, where things are."""

    model: str
    model_kind: str  # "adapter" | "model"
    folder: Path
    selection: Path
    images: int
    sampling: dict[str, Any]
    generation: RunStats
    rows: list[ModelScores]
    notes: list[str] = field(default_factory=list)
    submitted: dict[str, int] = field(default_factory=dict)  # task -> board entry id

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (what ``--json`` writes)."""
        return {
            "model": self.model,
            "model_kind": self.model_kind,
            "folder": str(self.folder),
            "selection": str(self.selection),
            "images": self.images,
            "sampling": self.sampling,
            "generation": self.generation.as_dict(),
            "rows": [row.figures() for row in self.rows],
            "tasks": {
                row.model: {
                    "rationale": row.rationale.to_dict(),
                    **({"labels": row.labels.to_dict()} if row.labels is not None else {}),
                }
                for row in self.rows
            },
            "notes": self.notes,
            "submitted": self.submitted,
        }


def default_name(model: str) -> str:
    """The name a model is recorded under: its folder's name (a merged model's ``OUT/apo/merged`` is
    ``apo-merged``), or a Hub id as it is."""
    path = Path(model)
    if not path.is_dir():
        return model
    path = path.resolve()
    return f"{path.parent.name}-{path.name}" if path.name == "merged" else path.name


def source_sampling(model: str) -> dict[str, Any]:
    """The sampling the sources used: the roster entry of the model (or of an adapter's base) when
    it is a roster model, else the roster's default."""
    base = adapter_base(model) if Path(model).is_dir() else model
    if base:
        spec = resolve_model(base)
        if spec.in_roster:
            return {k: spec.sampling[k] for k in DEFAULT_SAMPLING}
    return dict(DEFAULT_SAMPLING)


def recorded_sampling(
    out_dir: str | Path, skip: str | None = None
) -> tuple[dict[str, Any] | None, list[str]]:
    """The sampling a generate output's answers were made with, as its trajectories record it (the
    ``sampling`` column of each model's first row; ``skip``: a model folder to leave out), and the
    models whose sampling differs from it. The most common sampling wins; None when none is recorded."""
    seen: dict[str, list[str]] = {}
    for folder in model_dirs(out_dir):
        files = trajectory_files(out_dir, folder.name) if folder.name != skip else []
        if not files:
            continue
        first = next((b for b in iter_arrow_batches(files[0], ["sampling"]) if b.num_rows), None)
        try:
            recorded = json.loads(first.column(0)[0].as_py()) if first is not None else None
        except (TypeError, ValueError):
            recorded = None
        if isinstance(recorded, dict) and all(k in recorded for k in DEFAULT_SAMPLING):
            key = json.dumps({k: recorded[k] for k in DEFAULT_SAMPLING}, sort_keys=True)
            seen.setdefault(key, []).append(folder.name)
    if not seen:
        return None, []
    common = max(seen, key=lambda key: len(seen[key]))
    return json.loads(common), sorted(m for key, models in seen.items() if key != common for m in models)


def evaluation_sampling(options: EvaluateOptions, name: str, notes: list[str]) -> dict[str, Any]:
    """The sampling the evaluated model answers with (flags still override it): the sources' own, as
    their trajectories record it, so the model's rows compare with theirs; else the roster's."""
    root = Path(options.sources) if options.sources is not None else Path(options.out)
    recorded, others = recorded_sampling(root, skip=safe_dir_name(name))
    if recorded is None:
        return source_sampling(options.model)
    if others:
        notes.append(
            f"sources sampled differently: {', '.join(others)} differ from the most common sampling "
            f"{json.dumps(recorded, sort_keys=True)}, which the model uses"
        )
    return recorded


def evaluate(options: EvaluateOptions, progress: ProgressReporter | None = None) -> EvaluateResult:
    """Select the test split, generate the model's answers (resumable), score them and the sources'
    on the rationale and label tasks, and submit to the board when asked (see the module docstring)."""
    name = options.name or default_name(options.model)
    folder = Path(options.out) / "evaluate" / safe_dir_name(name)
    selection, test = _select_test(options, folder)
    notes: list[str] = []
    sampling = evaluation_sampling(options, name, notes)
    generate_options = _generate_options(options, name, folder, selection, sampling)
    stats = generate(generate_options, progress=progress)
    sample_ids = test.column("sample_id").combine_chunks()
    scorer = _Scorer(options, folder, sample_ids, _labelled_studies(options.mimic_root, notes), notes)
    evaluated = scorer.score(folder / "trajectories" / safe_dir_name(name), "evaluated")
    if evaluated is None:
        raise InputError(f"{where(folder / 'trajectories')}: the model answered none of the test images")
    rows = [evaluated]
    for source in _sources(options, name):
        row = scorer.score(source, "source")
        if row is not None:
            rows.append(row)
    result = EvaluateResult(
        model=name,
        model_kind="adapter" if adapter_base(options.model) else "model",
        folder=folder,
        selection=selection,
        images=test.num_rows,
        sampling=generate_options.sampling_key(),
        generation=stats,
        rows=rows,
        notes=notes,
    )
    if options.submit:
        result.submitted = _submit(rows[0], options, result.notes)
    atomic_write_text(folder / "result.json", json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n")
    return result


def _select_test(options: EvaluateOptions, folder: Path) -> tuple[Path, pa.Table]:
    """The frontal test images (one per study), written as the run's selection."""
    test = MimicCXR(options.mimic_root).select(
        splits=["test"], views=FRONTAL_VIEWS, k=options.studies, seed=options.seed
    )
    if test.num_rows == 0:
        raise InputError(f"{where(options.mimic_root)}: no frontal test-split images to evaluate on")
    selection = folder / "selection-test.parquet"
    folder.mkdir(parents=True, exist_ok=True)
    write_selection(test, selection)
    return selection, test


def _generate_options(
    options: EvaluateOptions, name: str, folder: Path, selection: Path, sampling: dict[str, Any]
) -> GenerateOptions:
    """generate's options: the in-process transformers backend on the model folder (or Hub id)."""
    path = Path(options.model)
    model_path = str(path.resolve()) if path.is_dir() else options.model
    spec = ModelSpec(name=name, hf_id=model_path, sampling=sampling, in_roster=False)
    return GenerateOptions(
        model=spec,
        selection=selection,
        mimic_root=Path(options.mimic_root),
        out=folder,
        prompt=load_prompt(options.prompt),
        backend="transformers",
        model_path=model_path,
        samples=options.samples,
        seed=options.seed,
        temperature=options.temperature,
        top_p=options.top_p,
        max_tokens=options.max_tokens,
        concurrency=1,  # one in-process model generates one request at a time
        image_max_edge=options.image_max_edge,
    )


def _sources(options: EvaluateOptions, name: str) -> list[Path]:
    """The model folders of the sources' generate output (``sources``, else OUT), the model aside."""
    root = Path(options.sources) if options.sources is not None else Path(options.out)
    if options.sources is not None and not model_dirs(root):
        raise InputError(f"{where(root / 'trajectories')}: --sources holds no generate output")
    return [d for d in model_dirs(root) if d.name != safe_dir_name(name)]


@dataclass
class _Scorer:
    """Scores models' answers to the run's test images on both tasks, the same way for each."""

    options: EvaluateOptions
    folder: Path
    sample_ids: pa.Array
    labelled: np.ndarray | None  # the studies the label task's references label (None: no references)
    notes: list[str]

    def score(self, model_dir: Path, kind: str) -> ModelScores | None:
        """One model folder (OUT/trajectories/<model>) scored, or None when it answered no test image."""
        table = read_trajectories(model_dir.parent.parent, model_dir.name, _COLUMNS, ordered=True)
        table = table.filter(pc.is_in(table.column("sample_id"), value_set=self.sample_ids))
        if table.num_rows == 0:
            return None
        model = table.column("model")[0].as_py()
        answered = pc.count_distinct(table.column("sample_id")).as_py()
        if kind == "source" and answered < len(self.sample_ids):
            self.notes.append(
                f"{model}: answered {answered} of the {len(self.sample_ids)} test images (scored on those)"
            )
        stem = self.folder / "submissions" / safe_dir_name(model)
        rationale = self._score(_write_submission(table, Path(f"{stem}.rationale.parquet")), RATIONALE_TASK)
        # The label task reads one answer per study (a second would be a duplicate study): the first.
        first = table.filter(pc.equal(table.column("sample_index"), 0)).drop_columns(["model"])
        labels = None
        if self._labels_apply(first):
            labels = self._score(_write_submission(first, Path(f"{stem}.labels.parquet")), LABEL_TASK)
        return ModelScores(model, kind, table.num_rows, rationale, labels)

    def _score(self, submission: Path, task: str) -> ScoreResult:
        return score(
            submission,
            task,
            self.options.mimic_root,
            n_boot=self.options.n_boot,
            seed=self.options.seed,
            processes=self.options.processes,
        )

    def _labels_apply(self, first: pa.Table) -> bool:
        """The label task applies when its references label every study answered (else a note)."""
        if self.labelled is None or first.num_rows == 0:
            return False
        studies = first.column("study_id").to_numpy(zero_copy_only=False)
        if np.isin(studies, self.labelled).all():
            return True
        note = f"{LABEL_TASK} not scored: the references do not label every answered test study"
        if note not in self.notes:
            self.notes.append(note)
        return False


def _labelled_studies(root: Path, notes: list[str]) -> np.ndarray | None:
    """The test studies the label task's references label (its CheXpert labels under ``root``), or
    None with a note when there are none: the rationale task still applies."""
    try:
        study_ids = load_label_references(get_task(LABEL_TASK), root).study_ids
    except InputError as exc:
        notes.append(f"{LABEL_TASK} not scored: {exc}")
        return None
    if not len(study_ids):
        notes.append(f"{LABEL_TASK} not scored: the references label no test study")
        return None
    return study_ids


def _write_submission(table: pa.Table, path: Path) -> Path:
    """A leaderboard submission (study_id, model, text, sample_id) from trajectory rows, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(table.drop_columns(["sample_index"]), tmp)
    return path


def _submit(row: ModelScores, options: EvaluateOptions, notes: list[str]) -> dict[str, int]:
    """Put the model's results on the board under ``options.submit``: one entry per task."""
    info = {"model": options.model, "evaluated_by": "cxrmax evaluate", "samples": options.samples}
    entries: dict[str, int] = {}
    with Board(options.board) as board:
        for result in (row.rationale, row.labels):
            if result is None:
                continue
            try:
                entries[result.task] = board.submit(result, name=options.submit or row.model, model_info=info)
            except DuplicateSubmission as exc:  # a rerun of the same evaluation: on the board already
                notes.append(str(exc))
    return entries


__all__ = [
    "EvaluateOptions",
    "EvaluateResult",
    "ModelScores",
    "default_name",
    "evaluate",
    "evaluation_sampling",
    "recorded_sampling",
    "source_sampling",
]
