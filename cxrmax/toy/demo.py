"""`cxrmax demo`: the whole mission at toy scale, on CPU, in a few minutes.

Stages (each timed and printed):

1. **data**: a mini MIMIC-CXR (:func:`cxrmax.testing.mini_mimic.make_mini_mimic`), frontal images, one per study.
2. **teachers**: tiny VLMs fine-tuned from the shipped base reader (:mod:`cxrmax.toy.reader`, which reads
   sides from the film) with injected, known biases (:mod:`cxrmax.toy.teachers`): a faithful
   reference, one that swaps left and right, one that asserts an absent finding, one that often
   refuses, one that rambles. They learn from new studies (:func:`cxrmax.toy.reader.fresh_studies`),
   not from the films they then answer.
3. **generate**: every teacher answers the paper's rationale prompt through ``cxrmax generate`` (its
   transformers backend, in-process, batches of consecutive requests; ``--teacher-backend openai``
   serves each teacher on loopback with the OpenAI-compatible test server instead): train-split
   images feed the preferences, test-split images (several samples each) measure the drift.
4. **preferences**: ``build-preferences`` (vote consensus, drift annotations, ranked negatives, SFT
   rows, data card).
5. **students**: the base reader trained with SFT on all teachers' trajectories, then APO (multi-negative
   Plackett-Luce) from the SFT model; for comparison the SFT model alone and pairwise DPO from it.
   Students answer the test split through generate's transformers backend.
6. **score**: teachers and students on the leaderboard's ``cxr-max-rationale`` task (precision, recall,
   similarity vs the test labels and reports) plus the drift rates read by the labeler (refusal rate,
   hallucination rate, laterality error vs the report's side, length), stored on a local board.

Everything is real (trained models, generated text, scores computed from it), and everything is tiny:
a few hundred synthetic studies and models of about 200k parameters. The numbers show the mechanics of
drift and of training against it, not what a 7B model trained on CXR-MAX achieves.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from rich.table import Table
from transformers.utils import logging as hf_logging

from apo_train.config import APOConfig, SFTStageConfig
from apo_train.trainer import run_apo, run_sft
from cxrmax.core.errors import CxrmaxError, InputError
from cxrmax.core.io import atomic_write_json, atomic_write_text
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.generate import model_dirs, read_trajectories, trajectory_files
from cxrmax.generate.orchestrator import GenerateOptions, generate
from cxrmax.generate.prompts import load_prompt
from cxrmax.generate.roster import ModelSpec
from cxrmax.labeler import label_text
from cxrmax.leaderboard import score
from cxrmax.leaderboard.metrics import bootstrap_ci
from cxrmax.leaderboard.store import Board
from cxrmax.mimic.reader import MimicCXR, write_selection
from cxrmax.preferences import drift
from cxrmax.preferences.build import BuildOptions, build_preferences
from cxrmax.preferences.datacard import drift_statistics
from cxrmax.testing.mini_mimic import make_mini_mimic
from cxrmax.testing.openai_server import serve_in_thread
from cxrmax.toy import report
from cxrmax.toy import teachers as sim
from cxrmax.toy.pool import Job, run_jobs
from cxrmax.toy.reader import fresh_studies, shipped_reader

TOY_NOTICE = (
    "TOY-SCALE SIMULATION: synthetic mini MIMIC-CXR, tiny models (~200k parameters) trained for seconds "
    "on CPU with injected biases. The figures show the mechanics of drift and of training against it; "
    "they say nothing about real VLMs or about CXR-MAX at full scale."
)


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: data, training steps and samples."""

    studies: int
    teacher_steps: int
    # New studies the teachers learn from (toy.reader.fresh_studies), not the mini MIMIC-CXR's films.
    teacher_studies: int
    train_images: int | None  # train-split images the teachers answer (preference data); None: all
    test_samples: int  # answers per test image (drift is measured over them)
    sft_steps: int
    apo_steps: int
    max_tokens: int = 160
    # Requests answered together by the in-process transformers backend: 4.2x (16) and 4.5x (32) the
    # answers per second of one at a time (benchmark/perf/bench_batched_generation.py).
    generate_batch: int = 32
    teacher_batch: int = 16
    teacher_lr: float = 1e-3
    image_max_edge: int = 112
    # Students (see train_students): SFT as the teachers are trained, then APO / DPO from the SFT model.
    sft_batch: int = 16
    sft_lr: float = 1e-3
    apo_batch: int = 4  # samples per step, each 1 positive + its negatives
    # Chosen by benchmark/studies/apo_sweep.py (README there) on the base-reader demo: of lr {3e-5, 1e-4,
    # 3e-4} x beta {0.1, 0.5}, the highest quality, its drift rates below the SFT student's; 1e-4 and
    # above cut the answers short.
    apo_lr: float = 3e-5
    apo_beta: float = 0.5
    student_seeds: int = 3  # the student stage is repeated over this many seeds (teachers fixed)
    # The mini MIMIC-CXR's train / validate / test odds. The demo has no use for a validate split, so its
    # share goes to test: twice the test films to measure drift on, and the same train split and films
    # as MIMIC's 70/15/15 (make_mini_mimic draws one number per subject whatever the odds).
    split_weights: tuple[float, float, float] = (70, 0, 30)


SIZES: dict[str, DemoSize] = {
    # The test suite's size: every stage runs for real, on little data; two seeds of the students.
    "small": DemoSize(
        studies=60,
        teacher_steps=100,
        teacher_studies=200,
        train_images=None,
        test_samples=2,
        sft_steps=100,
        apo_steps=16,
        student_seeds=2,
        # 100 steps at the default 1e-3 leave the reader's answers as they were (no refusals learnt).
        teacher_lr=4e-3,
        sft_lr=4e-3,
    ),
    # Every teacher's drift visible; students trained with the teachers' recipe (steps of 16) on every
    # train image's answers, 500 steps (the SFT student's loss then at its rows' floor), APO / DPO at
    # the setting of benchmark/studies/apo_sweep.py, 3 seeds.
    "default": DemoSize(
        studies=240,
        teacher_steps=300,
        teacher_studies=1200,
        train_images=None,
        test_samples=3,
        sft_steps=500,
        apo_steps=60,
    ),
    # More data and steps: tighter intervals (longer; see README). 90 APO steps (1.4 passes over its 255
    # preferences): at 120 one seed's APO student fell below its SFT student (benchmark/studies/README.md).
    # 5 answers per test film: with 3 the side-error intervals of SFT and APO still touched.
    "large": DemoSize(
        studies=400,
        teacher_steps=360,
        teacher_studies=2000,
        train_images=None,
        test_samples=5,
        sft_steps=700,
        apo_steps=90,
    ),
}


@dataclass
class StageTiming:
    """Wall seconds of one demo stage (or why it was skipped)."""

    name: str
    seconds: float = 0.0
    skipped: str | None = None


@dataclass
class DemoResult:
    """What the demo produced: per-model rows, timings and artifact paths."""

    out: Path
    size: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    timings: list[StageTiming] = field(default_factory=list)
    artifacts: dict[str, str] = field(default_factory=dict)
    drift_report: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seed_rows: list[dict[str, Any]] = field(default_factory=list)  # every seed's students, scored
    sft_floor: dict[str, Any] | None = None  # see sft_floor_report

    @property
    def total_seconds(self) -> float:
        return sum(t.seconds for t in self.timings)

    def row(self, model: str) -> dict[str, Any]:
        """The scored row of one model (teacher or student)."""
        for row in self.rows:
            if row["model"] == model:
                return row
        raise KeyError(model)


class _Stages:
    """Times stages and prints one line per stage."""

    def __init__(self, result: DemoResult, console: Any) -> None:
        self.result = result
        self.console = console

    @contextlib.contextmanager
    def stage(self, name: str, what: str) -> Iterator[StageTiming]:
        timing = StageTiming(name)
        self.result.timings.append(timing)
        if self.console is not None:
            self.console.print(f"[bold cyan]{name}[/]: {what}")
        started = time.perf_counter()
        try:
            yield timing
        finally:
            timing.seconds = time.perf_counter() - started
        # Only a stage that ended is reported done (an interrupted one is not).
        if self.console is not None:
            status = f"skipped ({timing.skipped})" if timing.skipped else "done"
            self.console.print(f"  [dim]{name} {status} in {timing.seconds:.1f} s[/]")


def _torch_threads() -> None:
    """One intra-op thread and deterministic algorithms, whatever the machine's load: float sums
    reduced over another number of threads round differently, so a load-dependent thread count gave
    another table for the same seed. Teachers still train in parallel, one process per core."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True, warn_only=True)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def make_data(out: Path, size: DemoSize, seed: int) -> tuple[Path, Any, Any]:
    """The mini MIMIC-CXR and the demo's selections: (root, train selection, test selection).

    One frontal image per study; the train selection is a deterministic sample of ``train_images``
    (every frontal train image when None)."""
    root = out / "mimic"
    if not (root / "mimic-cxr-2.0.0-split.csv.gz").exists():
        make_mini_mimic(root, studies=size.studies, seed=seed, split_weights=size.split_weights)
    mimic = MimicCXR(root)
    train_all = mimic.select(splits=["train"], views=["PA", "AP"])
    train_gen = mimic.select(splits=["train"], views=["PA", "AP"], k=size.train_images, seed=seed)
    test = mimic.select(splits=["test"], views=["PA", "AP"])
    if train_all.num_rows == 0 or test.num_rows == 0:
        raise InputError(f"{root}: the mini MIMIC-CXR has no frontal train or test images; use more studies")
    write_selection(train_all, out / "selection-train-all.parquet")
    write_selection(train_gen, out / "selection-train.parquet")
    write_selection(test, out / "selection-test.parquet")
    return root, train_all, test


# --------------------------------------------------------------------------------------------
# Generation through the generate backends
# --------------------------------------------------------------------------------------------


def _model_spec(name: str, size: DemoSize) -> Any:
    # Temperature 1 reproduces the trained rates of the biases (greedy decoding would turn a 50%
    # refusal rate into all-or-nothing per prompt).
    return ModelSpec(
        name=name,
        hf_id=name,
        sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": size.max_tokens},
        in_roster=False,
    )


def generate_answers(
    name: str,
    model_dir: Path,
    selection: Path,
    mimic_root: Path,
    out: Path,
    size: DemoSize,
    samples: int,
    seed: int,
    backend: str,
    prompt: Any = None,
) -> dict[str, Any]:
    """Answers of one model to the rationale prompt over ``selection`` into ``out/trajectories/<name>``.

    ``backend="openai"``: the model is served on 127.0.0.1 by cxrmax.testing.openai_server and reached
    with generate's openai backend; ``"transformers"``: generate loads it in-process."""
    options = GenerateOptions(
        model=_model_spec(name, size),
        selection=selection,
        mimic_root=mimic_root,
        out=out,
        prompt=prompt if prompt is not None else load_prompt("rationale"),
        backend=backend,
        model_path=str(model_dir),
        samples=samples,
        seed=seed,
        concurrency=2,
        batch_size=size.generate_batch,
        image_max_edge=size.image_max_edge,
        timeout=120.0,
    )
    if backend == "openai":
        with serve_in_thread(model_dir, served_model_name=name) as server:
            options.base_urls = [server.base_url]
            stats = generate(options)
    else:
        stats = generate(options)
    return _stats_dict(stats)


def _generate_job(args: tuple) -> dict[str, Any]:
    _torch_threads()
    return generate_answers(*args)


def _stats_dict(stats: Any) -> dict[str, Any]:
    try:
        return asdict(stats)
    except TypeError:
        return {k: v for k, v in vars(stats).items() if isinstance(v, (int, float, str))}


# --------------------------------------------------------------------------------------------
# Drift rates read by the labeler
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriftCounts:
    """Per answer: its model, its film (sample_id) and its drift counts, one row each, the columns
    answers (1), refused, answered, hallucinating, pneumothorax claim, side errors, sides compared and
    words. Every drift rate is a ratio of these counts summed over answers (:func:`_rates_of_sums`)."""

    models: np.ndarray
    films: np.ndarray
    counts: np.ndarray

    def of(self, model: str) -> DriftCounts:
        """The answers of one model."""
        mine = self.models == model
        return DriftCounts(self.models[mine], self.films[mine], self.counts[mine])

    def by_film(self) -> tuple[np.ndarray, np.ndarray]:
        """(films in sorted order, their counts summed over each film's answers)."""
        films, inverse = np.unique(self.films.astype(str), return_inverse=True)
        summed = np.zeros((len(films), self.counts.shape[1]))
        np.add.at(summed, inverse, self.counts)
        return films, summed


def drift_counts(trajectories: Any, reference_sides: dict[str, dict[str, str]]) -> DriftCounts:
    """The drift of every answer in ``trajectories`` (a TRAJECTORY_SCHEMA table) read by the labeler,
    against the study's labels and ``reference_sides`` (sample_id -> report sides); see
    :func:`drift_rates` for the definitions."""
    models = trajectories.column("model").to_pylist()
    texts = [text or "" for text in trajectories.column("text").to_pylist()]
    samples = trajectories.column("sample_id").to_pylist()
    labels = trajectories.column("labels").to_pylist()
    n = len(texts)
    states, sides = np.zeros((n, drift.N_OBS), np.int8), np.zeros((n, drift.N_OBS), np.int8)
    ref_states, ref_sides = np.zeros_like(states), np.zeros_like(sides)
    refusal = np.zeros(n, dtype=bool)
    for row, (text, sample, truth) in enumerate(zip(texts, samples, labels, strict=True)):
        labeled = label_text(text)
        refusal[row] = labeled.is_refusal
        gold = reference_sides.get(sample, {})
        for column, name in enumerate(OBSERVATIONS):
            observation = labeled.observations.get(name)
            if observation is not None:
                states[row, column] = drift.status_to_state(observation.status)
                sides[row, column] = drift.side_to_code(observation.laterality)
            ref_states[row, column] = drift.label_to_state((truth or {}).get(name))
            ref_sides[row, column] = drift.side_to_code(gold.get(name))
    agreement = drift.compare(states, sides, ref_states, ref_sides)
    answered = ~refusal
    hallucinating = agreement.hallucinated.any(axis=1) & answered
    # The hallucinating teacher's own claim: a pneumothorax the labels lack (issue 14 asks whether the
    # students inherit it, which the any-finding rate above dilutes).
    claims_pneumothorax = agreement.hallucinated[:, OBSERVATIONS.index("Pneumothorax")] & answered
    side_errors = np.where(answered, agreement.side_errors.sum(axis=1), 0)
    side_compared = np.where(answered, agreement.side_compared, 0)
    words = np.array([len(text.split()) for text in texts], dtype=np.int64)
    counts = np.stack(
        [
            np.ones(n),
            refusal,
            answered,
            hallucinating,
            claims_pneumothorax,
            side_errors,
            side_compared,
            words,
        ],
        axis=1,
    ).astype(np.float64)
    return DriftCounts(np.array(models, dtype=object), np.array(samples, dtype=object), counts)


def drift_rates(
    trajectories: Any,
    reference_sides: dict[str, dict[str, str]],
    n_boot: int = 1000,
    seed: int = 0,
    by_film: bool = False,
) -> dict[str, dict[str, Any]]:
    """Per model: refusal rate, hallucination rate, laterality error rate, mean words and answers, and
    under ``ci`` each rate's 95% percentile-bootstrap interval over the model's answers (``by_film``:
    over its films, each resampled with all its answers: the several answers to one film are not
    independent, so these intervals are the wider, honest ones for a per-film effect).

    The drift is the data card's (:func:`cxrmax.preferences.drift.compare` against the study's labels,
    with the report's sides as the reference sides): an answer hallucinates when it claims (positive
    or uncertain) an observation the labels do not claim; a side error is an observation both claim
    with different specific sides, over the sides compared. Refusals count for the refusal rate only.

    ``trajectories``: a TRAJECTORY_SCHEMA table; ``reference_sides``: sample_id -> report sides."""
    return rates_of_counts(drift_counts(trajectories, reference_sides), n_boot, seed, by_film)


def rates_of_counts(
    everything: DriftCounts, n_boot: int = 1000, seed: int = 0, by_film: bool = False
) -> dict[str, dict[str, Any]]:
    """:func:`drift_rates` of answers already read (:func:`drift_counts`)."""
    rates = {}
    for index, model in enumerate(dict.fromkeys(everything.models.tolist())):  # first-seen order
        mine = everything.of(model)
        totals = mine.counts.sum(axis=0)
        point = {key: float(value[0]) for key, value in _rates_of_sums(totals[None, :]).items()}
        rates[model] = {
            "answers": int(totals[0]),
            "refusal_rate": point["refusal_rate"],
            "hallucination_rate": point["hallucination_rate"],
            "pneumothorax_claim_rate": point["pneumothorax_claim_rate"],
            "laterality_error_rate": point["laterality_error_rate"],
            "sides_compared": int(totals[6]),
            "mean_words": point["mean_words"],
            "ci": bootstrap_ci(
                mine.by_film()[1] if by_film else mine.counts,
                _rates_of_sums,
                n_boot=n_boot,
                seed=seed + index,
            ),
        }
    return rates


def paired_film_difference(
    counts: DriftCounts, model: str, baseline: str, n_boot: int = 1000, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """``model``'s drift rates minus ``baseline``'s on the films both answered: per rate (difference,
    low, high), the 95% interval of a bootstrap that resamples films and keeps each film's answers of
    both models together. Pairing by film takes what makes a film easy or hard out of the comparison,
    which unpaired intervals over films leave in."""
    films_a, summed_a = counts.of(model).by_film()
    films_b, summed_b = counts.of(baseline).by_film()
    common, in_a, in_b = np.intersect1d(films_a, films_b, return_indices=True)
    if not len(common):
        return {}
    paired = np.concatenate([summed_a[in_a], summed_b[in_b]], axis=1)
    width = summed_a.shape[1]

    def difference(sums: np.ndarray) -> dict[str, np.ndarray]:
        mine, theirs = _rates_of_sums(sums[:, :width]), _rates_of_sums(sums[:, width:])
        return {key: mine[key] - theirs[key] for key in mine}

    point = {key: float(value[0]) for key, value in difference(paired.sum(axis=0)[None, :]).items()}
    intervals = bootstrap_ci(paired, difference, n_boot=n_boot, seed=seed)
    return {key: (point[key], *intervals[key]) for key in point if key in intervals}


def _rates_of_sums(sums: np.ndarray) -> dict[str, np.ndarray]:
    """The drift rates of summed per-answer counts (B replicates x 8 columns, see drift_rates)."""
    count, refused, answered, hallucinating, pneumothorax, side_errors, compared, words = sums.T
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "refusal_rate": refused / count,
            "hallucination_rate": hallucinating / answered,
            "pneumothorax_claim_rate": pneumothorax / answered,
            "laterality_error_rate": side_errors / compared,
            "mean_words": words / count,
        }


# --------------------------------------------------------------------------------------------
# `cxrmax simulate`: teachers on a MIMIC-CXR root, then their answers and measured drift
# --------------------------------------------------------------------------------------------


@dataclass
class SimulationRun:
    """What :func:`run_simulation` produced: the trained teachers and, when they answered, the drift
    measured in their answers (teacher name -> :func:`drift_rates` row)."""

    simulation: sim.Simulation
    mimic_root: Path
    train_images: int
    split: str
    answered_images: int = 0
    samples: int = 0
    measured: dict[str, dict[str, float]] = field(default_factory=dict)
    trajectories: Path | None = None


def run_simulation(
    out: str | Path,
    teachers: Sequence[sim.TeacherSpec],
    mimic_root: str | Path | None = None,
    studies: int = 200,
    steps: int = 160,
    seed: int = 0,
    generate: bool = True,
    split: str = "test",
    samples: int = 2,
    paper_prompt: bool = False,
    notify: Callable[[str], None] | None = None,
    progress: Callable[[str, int, float], None] | None = None,
) -> SimulationRun:
    """Train ``teachers`` on the frontal train images of ``mimic_root`` (default: a mini MIMIC-CXR of
    ``studies`` studies made in OUT/mimic) into OUT/teachers; with ``generate`` every teacher then
    answers the frontal ``split`` images ``samples`` times (OUT/trajectories, generate's format) and
    their drift is measured against the labels and the report's sides.

    The prompt's diagnosis list carries the report's sides (:func:`cxrmax.toy.teachers.sided_prompt`)
    unless ``paper_prompt``. ``notify`` gets a line per step, ``progress`` (teacher, step, loss)."""
    say = notify or (lambda _message: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if mimic_root is None:
        mimic_root = out / "mimic"
        if not (mimic_root / "mimic-cxr-2.0.0-split.csv.gz").exists():
            say(f"making a mini MIMIC-CXR with {studies} studies in {mimic_root}")
            make_mini_mimic(mimic_root, studies=studies, seed=seed)
    mimic_root = Path(mimic_root)
    mimic = MimicCXR(mimic_root)
    train = mimic.select(splits=["train"], views=["PA", "AP"])
    answered = mimic.select(splits=[split], views=["PA", "AP"])
    prompt = None
    if not paper_prompt:  # the report's sides in the diagnosis list, for the train and the answered images
        prompt = sim.sided_prompt(sim.selection_sides(train) | sim.selection_sides(answered))
    examples, prompt = sim.examples_from_selection(
        train, mimic_root, side_hint=not paper_prompt, prompt=prompt
    )
    say(f"training {len(teachers)} teachers on {len(examples)} train images, {steps} steps each")
    simulation = sim.simulate(out / "teachers", examples, teachers, steps=steps, seed=seed, progress=progress)
    run = SimulationRun(simulation, mimic_root, len(examples), split)
    if not generate:
        return run
    if answered.num_rows == 0:
        raise InputError(f"{mimic_root}: no frontal {split} images to answer")
    selection = out / f"selection-{split}.parquet"
    write_selection(answered, selection)
    size = DemoSize(
        studies=0,
        teacher_steps=steps,
        teacher_studies=0,
        train_images=0,
        test_samples=samples,
        sft_steps=0,
        apo_steps=0,
    )
    for t in simulation.teachers:
        say(f"{t.spec.name} answers {answered.num_rows} {split} images x {samples}")
        generate_answers(
            t.spec.name, t.path, selection, mimic_root, out, size, samples, seed, "transformers", prompt
        )
    gold = {row["sample_id"]: sim.report_sides(_report_text(row)) for row in answered.to_pylist()}
    run.answered_images, run.samples = answered.num_rows, samples
    run.measured = drift_rates(read_trajectories(out, ordered=True), gold)
    run.trajectories = out / "trajectories"
    return run


# --------------------------------------------------------------------------------------------
# Students
# --------------------------------------------------------------------------------------------


def _student_settings(mimic_root: Path, size: DemoSize, seed: int) -> dict[str, Any]:
    """The settings every student stage shares (SFT, APO and DPO)."""
    return {
        "image_root": str(mimic_root),
        "max_edge": size.image_max_edge,
        "use_lora": False,  # a 200k-parameter model: full fine-tuning is as cheap as LoRA
        "bf16": False,
        "use_cpu": True,
        "seed": seed,
        "save_strategy": "no",
        "logging_steps": 5,
        "dataloader_num_workers": 0,
        "max_length": 1024,
        "jsonl_log": True,
        "global_batch_size": None,  # gradient_accumulation_steps as each stage sets it
        "image_jpeg_quality": 90,  # the pixels generate serves the student (and served the teachers)
        "image_cache_size": 4096,  # every image of the demo, processed once (0.3 MB each at 112 pixels)
        "max_grad_norm": 1.0,
    }


#: The preference-trained students and their loss (apo_train's loss_type).
PREFERENCE_STUDENTS = {"student-apo": "plackett-luce", "student-dpo": "pairwise"}


def train_sft_student(out: Path, data: Path, mimic_root: Path, base: Path, size: DemoSize, seed: int) -> Path:
    """Stage 1, SFT on all trajectories, into ``out/student-sft``.

    The teachers' recipe (:func:`cxrmax.toy.teachers.train_teacher`): full fine-tuning at ``sft_lr``
    with a 5% warm-up then cosine decay, gradients clipped at 1, one optimizer step per ``sft_batch``
    rows (no accumulation to the paper's global batch of 32, which cut the number of updates by
    four; the step's rows are sorted by length into two accumulated micro-batches, which saves
    padding and leaves the gradient as it is). The same seed gives the same student whatever the
    machine's load (see _torch_threads)."""
    _torch_threads()
    micro = sim.micro_batches(size.sft_batch)
    cfg = SFTStageConfig(
        output_dir=str(out / "student-sft"),
        model_name_or_path=str(base),
        dataset_path=str(data / "sft"),
        learning_rate=size.sft_lr,
        warmup_steps=0.05,
        lr_scheduler_type="cosine",
        max_steps=size.sft_steps,
        # As the teachers: each step's rows sorted by length into micro-batches (the same gradient).
        per_device_train_batch_size=size.sft_batch // micro,
        gradient_accumulation_steps=micro,
        sort_accumulated_by_length=True,
        **_student_settings(mimic_root, size, seed),
    )
    run_sft(cfg, console=None)
    return out / "student-sft"


def train_preference_student(
    out: Path, data: Path, mimic_root: Path, size: DemoSize, seed: int, name: str
) -> Path:
    """Stage 2 from the SFT student under ``out`` (also the reference): APO (``student-apo``,
    multi-negative Plackett-Luce) or pairwise DPO (``student-dpo``), both with ``apo_lr``,
    ``apo_beta``, ``apo_batch`` and ``apo_steps``, so only the loss differs."""
    _torch_threads()
    cfg = APOConfig(
        output_dir=str(out / name),
        model_name_or_path=str(out / "student-sft"),
        dataset_path=str(data / "preferences"),
        loss_type=PREFERENCE_STUDENTS[name],
        beta=size.apo_beta,
        learning_rate=size.apo_lr,
        warmup_steps=0.1,
        max_steps=size.apo_steps,
        per_device_train_batch_size=size.apo_batch,
        **_student_settings(mimic_root, size, seed),
    )
    run_apo(cfg, console=None)
    return out / name


def train_students(
    out: Path, data: Path, mimic_root: Path, base: Path, size: DemoSize, seed: int
) -> dict[str, Path]:
    """SFT on all trajectories, then APO (Plackett-Luce) and pairwise DPO from the SFT model, in this
    process. Returns model name -> model folder for ``student-sft``, ``student-apo``, ``student-dpo``."""
    students = {"student-sft": train_sft_student(out, data, mimic_root, base, size, seed)}
    for name in PREFERENCE_STUDENTS:
        students[name] = train_preference_student(out, data, mimic_root, size, seed, name)
    return students


#: The students, in the table's order.
STUDENTS = ("student-sft", "student-dpo", "student-apo")


def seed_model(student: str, index: int) -> str:
    """The model name of one seed's student: ``student-apo-seed1``."""
    return f"{student}-seed{index}"


@dataclass
class _StudentJob:
    out: Path  # OUT/students/seed-<index>
    data: Path
    mimic_root: Path
    base: Path  # the model every seed's SFT starts from (the shipped base reader)
    size: DemoSize
    seed: int
    index: int
    selection: Path
    prompt: Any


def _answer_test(job: _StudentJob, student: str, path: Path) -> tuple[str, Path]:
    model = seed_model(student, job.index)
    generate_answers(
        model,
        path,
        job.selection,
        job.mimic_root,
        job.out / "eval",
        job.size,
        job.size.test_samples,
        job.seed,
        "transformers",
        job.prompt,
    )
    return model, path


def _sft_job(job: _StudentJob) -> tuple[str, Path]:
    """One seed's Stage 1: SFT from the base model (the seed orders the rows), its answers to the
    test split into ``job.out/eval``. Runs in a worker process."""
    _torch_threads()
    path = train_sft_student(job.out, job.data, job.mimic_root, job.base, job.size, job.seed)
    return _answer_test(job, "student-sft", path)


def _preference_job(item: tuple[_StudentJob, str]) -> tuple[str, Path]:
    """One seed's APO or DPO student from its SFT student, and its answers. Runs in a worker process."""
    job, name = item
    _torch_threads()
    return _answer_test(
        job, name, train_preference_student(job.out, job.data, job.mimic_root, job.size, job.seed, name)
    )


@dataclass
class StudentStage:
    """What :func:`train_student_seeds` made: model -> folder, and the SFT loss floor."""

    models: dict[str, Path]
    sft_floor: dict[str, Any] | None = None  # see sft_floor_report; None without teachers


def train_student_seeds(
    out: Path,
    data: Path,
    mimic_root: Path,
    base: Path,
    size: DemoSize,
    seed: int,
    selection: Path,
    eval_out: Path,
    prompt: Any = None,
    workers: int | None = None,
    teachers: dict[str, Path] | None = None,
) -> StudentStage:
    """The student stage over ``size.student_seeds`` seeds (``seed``, ``seed + 1``, ...; the teachers
    and their data fixed): per seed SFT from ``base``, APO and DPO under ``out/seed-<k>``, and their
    answers to ``selection`` moved into ``eval_out/trajectories`` as ``student-*-seed<k>``. With
    ``teachers`` (name -> model folder) also the SFT loss floor (:func:`sft_floor_report`).

    The jobs run on ``workers`` single-threaded processes (default one per core): every seed's SFT
    job first, its APO and DPO jobs as soon as its SFT student exists, and the floor's log-probs
    whenever no training job waits, so no core idles while a seed finishes. Every seed's students
    are the same whatever the number of workers."""
    jobs = [
        _StudentJob(out / f"seed-{k}", data, mimic_root, Path(base), size, seed + k, k, selection, prompt)
        for k in range(size.student_seeds)
    ]
    floor_args = (data, mimic_root, size)

    def follow(key: Any, done: Any) -> list[Job]:
        if key[0] != "sft":
            return []
        job = jobs[key[1]]
        return [Job(_preference_job, (job, name), (name, job.index)) for name in PREFERENCE_STUDENTS] + (
            [Job(_row_logps_job, ([done[1]], *floor_args), ("logps", key[1]), priority=1)] if teachers else []
        )

    first = [Job(_sft_job, job, ("sft", job.index)) for job in jobs]
    if teachers:
        first.append(
            Job(_row_logps_job, (list(teachers.values()), *floor_args), ("logps", "teachers"), priority=1)
        )
    workers = max(1, workers if workers is not None else sim.default_workers())
    finished = run_jobs(first, follow, workers, initializer=_torch_threads)
    models: dict[str, Path] = {}
    (eval_out / "trajectories").mkdir(parents=True, exist_ok=True)
    trained = [(value, jobs[key[1]]) for key, value in finished.items() if key[0] != "logps"]
    for (model, path), job in sorted(trained, key=lambda item: item[0][0]):
        target = eval_out / "trajectories" / model
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(job.out / "eval" / "trajectories" / model), str(target))
        models[model] = path
    floor = None
    if teachers:
        floor = sft_floor_report(
            dict(zip(teachers, finished[("logps", "teachers")], strict=True)),
            {job.index: (job.out / "student-sft", finished[("logps", job.index)][0]) for job in jobs},
            data,
        )
    return StudentStage(models, floor)


def pool_seeds(eval_out: Path, pooled_out: Path, seeds: int) -> None:
    """Every seed's answers of each student in one folder per student under ``pooled_out/trajectories``
    (model renamed ``student-*``), for a bootstrap interval over all the seeds' answers."""
    for student in STUDENTS:
        tables = []
        for k in range(seeds):
            table = read_trajectories(eval_out, model=seed_model(student, k), ordered=True)
            column = table.schema.get_field_index("model")
            tables.append(
                table.set_column(column, "model", pa.array([student] * table.num_rows, pa.string()))
            )
        folder = pooled_out / "trajectories" / student
        folder.mkdir(parents=True, exist_ok=True)
        pooled = pa.concat_tables(tables)
        with pa.OSFile(str(folder / "part-pooled-seeds.arrow"), "wb") as sink:
            with ipc.new_file(sink, pooled.schema) as writer:
                writer.write_table(pooled)


#: Figures a student row carries per seed (mean and sd over seeds are computed from them).
SEED_KEYS = (
    "precision",
    "recall",
    "similarity",
    "refusal_rate",
    "hallucination_rate",
    "pneumothorax_claim_rate",
    "laterality_error_rate",
    "mean_words",
)


def seed_summary(pooled: dict[str, Any], per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A student's row over seeds: the pooled row (its figures and 95% intervals over all the seeds'
    answers) with, per figure, the per-seed values, their mean and their sd (``seeds``, ``seed_mean``,
    ``seed_sd``; sd with n - 1, 0 for one seed)."""
    row = dict(pooled)
    values = {key: [_float(r.get(key)) for r in per_seed] for key in SEED_KEYS}
    row["seeds"] = len(per_seed)
    row["per_seed"] = values
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        row["seed_mean"] = {k: float(np.nanmean(v)) for k, v in values.items()}
        row["seed_sd"] = {
            k: float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else 0.0 for k, v in values.items()
        }
    return row


def _float(value: Any) -> float:
    return float("nan") if value is None else float(value)


def sft_row_logps(
    model_dirs: Sequence[Path], data: Path, mimic_root: Path, size: DemoSize
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each model in ``model_dirs``: the summed log-probability of every SFT row's completion (eval
    mode, the rows as the SFT stage tokenizes them) and each row's number of completion tokens.

    The rows are tokenized once for all the models that share a tokenizer (the demo's teachers and
    students all do): tokenizing them took longer than scoring them."""
    import hashlib

    from apo_train.data import ChatEncoder, SFTCollator, load_split, tokenize_sft
    from apo_train.modeling import load_model, load_processor
    from apo_train.trainer import completion_logps

    _torch_threads()
    raw = load_split(str(data / "sft"), "train", ("prompt", "completion"))
    tokenized: dict[str, tuple[Any, Any]] = {}
    results = []
    for model_dir in model_dirs:
        vocabulary = hashlib.sha256(Path(model_dir, "tokenizer.json").read_bytes()).hexdigest()
        if vocabulary not in tokenized:
            encoder = ChatEncoder(
                load_processor(str(model_dir)), mimic_root, size.image_max_edge, jpeg_quality=90
            )
            rows, _ = tokenize_sft(raw, encoder, max_length=1024, source=data / "sft")
            tokenized[vocabulary] = (rows, SFTCollator(encoder))
        rows, collate = tokenized[vocabulary]
        model = load_model(str(model_dir), "auto", None).eval()
        logps, counts = [], []
        with torch.no_grad():
            for start in range(0, rows.num_rows, 16):
                batch = collate([rows[i] for i in range(start, min(start + 16, rows.num_rows))])
                batch["prompt_lengths"] = torch.tensor(
                    [len(r) for r in rows[start : start + 16]["prompt_input_ids"]]
                )
                lp, n = completion_logps(model, batch)
                logps.append(lp.numpy())
                counts.append(n.numpy())
        results.append((np.concatenate(logps), np.concatenate(counts)))
    return results


def _row_logps_job(args: tuple) -> list[tuple[np.ndarray, np.ndarray]]:
    return sft_row_logps(*args)


def sft_loss_floor(per_teacher: dict[str, tuple[np.ndarray, np.ndarray]], data: Path) -> dict[str, Any]:
    """The loss the SFT student can reach on its rows, per completion token, from each teacher's
    :func:`sft_row_logps` on them.

    The SFT rows are every teacher's answers, so a student that learnt all of them perfectly is the
    equal mixture of the teachers, p(y | x) = mean_k p_k(y | x); its per-token loss on the rows,
    -sum log p(y | x) / tokens, is the floor of the student's SFT loss (the answers' entropy at
    temperature 1), well above a teacher's own training loss on its own, nearly deterministic,
    targets. Also each teacher's loss on the rows it wrote (``own``)."""
    models = datasets.load_from_disk(str(data / "sft"))["train"]["model"]
    logps = np.stack([lp for lp, _ in per_teacher.values()])  # [K, rows]
    counts = next(iter(per_teacher.values()))[1]
    mixture = np.logaddexp.reduce(logps, axis=0) - np.log(len(per_teacher))
    own = {}
    for index, name in enumerate(per_teacher):
        mine = np.array([m == name for m in models])
        if mine.any():
            own[name] = float(-logps[index, mine].sum() / counts[mine].sum())
    return {"mixture": float(-mixture.sum() / counts.sum()), "own": own, "rows": int(len(counts))}


def sft_floor_report(
    teachers: dict[str, tuple[np.ndarray, np.ndarray]],
    students: dict[int, tuple[Path, tuple[np.ndarray, np.ndarray]]],
    data: Path,
) -> dict[str, Any]:
    """The SFT students' loss against the floor it should be compared with (:func:`sft_loss_floor`),
    from :func:`sft_row_logps` of every teacher (name -> log-probs) and of every seed's SFT student
    (seed -> (folder, log-probs)): per seed the student's per-token loss on its SFT rows (eval mode)
    and the mean of its last logged training losses, beside the teachers' mixture loss on the rows."""
    floor = sft_loss_floor(teachers, data)
    per_seed = {}
    for k, (path, (lp, counts)) in students.items():
        losses = [r["loss"] for r in report.read_log(path / "log.jsonl") if "loss" in r]
        per_seed[k] = {
            "rows_loss": float(-lp.sum() / counts.sum()),
            "last_train_loss": float(np.mean(losses[-3:])) if losses else float("nan"),
        }
    return {**floor, "students": per_seed}


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------


def run_demo(
    out: str | Path = "demo-out",
    size: str = "default",
    seed: int = 0,
    console: Any = None,
    teacher_backend: str = "transformers",
) -> DemoResult:
    """Run the whole toy pipeline under ``out`` (see the module docstring). Returns a DemoResult;
    writes ``out/demo_report.json`` and ``out/DEMO.md``. A stage that cannot run (a missing
    component) is reported as skipped with the reason, never faked."""
    with _third_party_bars_off():
        return _run_demo(out, size, seed, console, teacher_backend)


@contextlib.contextmanager
def _third_party_bars_off() -> Iterator[None]:
    """Hide the tqdm bars of `datasets` (saving, mapping) and `transformers` (loading, writing
    weights) for the demo's duration: its stage lines and rich training bars already show progress,
    and dozens of sub-second bars bury them. Restored afterwards."""
    datasets_were_on = datasets.is_progress_bar_enabled()
    transformers_were_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    # Spawned workers (teacher training, model servers) read it when transformers is imported.
    hub_variable = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    try:
        yield
    finally:
        if hub_variable is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = hub_variable
        if datasets_were_on:
            datasets.enable_progress_bars()
        if transformers_were_on:
            hf_logging.enable_progress_bar()


def demo_prompt() -> Any:
    """The prompt teachers and students are asked with: the paper's rationale prompt, which names the
    diagnoses and no sides (the side of a finding is for the model to read from the film)."""
    return load_prompt("rationale")


def train_demo_teachers(
    out: Path,
    teachers: Sequence[sim.TeacherSpec],
    root: Path,
    size: DemoSize,
    seed: int,
    backend: str = "transformers",
) -> tuple[sim.Simulation, Any]:
    """The demo's teachers trained under OUT/teachers, each answering the train split (into
    OUT/generate) and the test split (``size.test_samples`` answers per image, into OUT/eval) as soon
    as it is trained, in the processes that train the others (on ``backend``: ``transformers``,
    in-process in batches of ``size.generate_batch``; or ``openai``, served on 127.0.0.1 and asked one
    request at a time). Returns (simulation, prompt).

    Every teacher is fine-tuned from the shipped base reader (:func:`cxrmax.toy.reader.shipped_reader`),
    which reads from the film the sides the paper's prompt does not name, on ``size.teacher_studies``
    new studies (:func:`cxrmax.toy.reader.fresh_studies`, under OUT/teachers/studies) with its biased
    targets: the teachers learn their habits on other films than those they answer, as real teachers
    do. Teachers and students are all asked with the paper's prompt (:func:`demo_prompt`), and the
    targets state each lateralised finding's side as the film shows it."""
    prompt = demo_prompt()
    examples = fresh_studies(
        out / "teachers" / "studies",
        size.teacher_studies,
        seed,
        prompt,
        size.image_max_edge,
        sim.default_workers(),
    )

    def answer(teacher: sim.SimulatedTeacher) -> list[Job]:
        # Each answer's sampling is seeded by its request: the answers do not depend on the process.
        return [
            Job(
                _generate_job,
                (
                    teacher.spec.name,
                    teacher.path,
                    out / f"selection-{split}.parquet",
                    root,
                    folder,
                    size,
                    samples,
                    seed,
                    backend,
                    prompt,
                ),
                ("answers", teacher.spec.name, split),
                priority=1,
            )
            for split, folder, samples in (
                ("train", out / "generate", 1),
                ("test", out / "eval", size.test_samples),
            )
        ]

    simulation = sim.simulate(
        out / "teachers",
        examples,
        teachers,
        steps=size.teacher_steps,
        batch_size=size.teacher_batch,
        lr=size.teacher_lr,
        seed=seed,
        max_edge=size.image_max_edge,
        then=answer,
        base=shipped_reader(),
    )
    return simulation, prompt


def build_demo_preferences(generated: Path, data: Path, root: Path) -> dict[str, Any]:
    """build-preferences over the teachers' train-split answers into ``data``; returns the data card's
    drift statistics (``samples``, ``per_model``).

    The positive is the teachers' answer closest to their consensus, in its own words (``--positive
    selected``), not the consensus composed in another layout: a 200k-parameter student cannot write
    the paper's in-context consensus, and a composed positive in a layout no teacher writes taught
    the APO student that layout instead of what to avoid (benchmark/studies/README.md: no drift rate
    moved; with the selected positive refusals and hallucinations fell)."""
    # The committed Arrow shards themselves: generate's folder also holds run manifests (JSON)
    # that are not trajectories.
    build_preferences(
        trajectory_files(generated), data, BuildOptions(mimic_root=root, processes=1, positive="selected")
    )
    stats = drift_statistics(data)
    return {"samples": stats.samples, "per_model": stats.per_model}


def _run_demo(out: str | Path, size: str, seed: int, console: Any, teacher_backend: str) -> DemoResult:
    if size not in SIZES:
        raise InputError(f"--size must be one of {', '.join(SIZES)}, not {size!r}")
    spec = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(seed)
    _torch_threads()
    result = DemoResult(out=out, size=size)
    stages = _Stages(result, console)
    if console is not None:
        console.print(f"[bold yellow]{TOY_NOTICE}[/]")

    # 1. data
    with stages.stage("data", f"mini MIMIC-CXR with {spec.studies} studies"):
        root, train_all, test = make_data(out, spec, seed)
    train_images = (
        train_all.num_rows if spec.train_images is None else min(spec.train_images, train_all.num_rows)
    )
    result.artifacts["mini MIMIC-CXR"] = str(root)

    # 2. teachers, and their answers
    teachers = sim.default_teachers()
    gen_out, eval_out = out / "generate", out / "eval"
    with stages.stage(
        "teachers",
        f"fine-tune {len(teachers)} teachers from the base reader on {spec.teacher_studies} new studies, each "
        "with its injected drift; as each is trained it answers "
        f"{train_images} train images and {test.num_rows} test images x {spec.test_samples} "
        + (
            "(served on 127.0.0.1, openai backend)"
            if teacher_backend == "openai"
            else f"(in-process transformers backend, batches of {spec.generate_batch})"
        ),
    ):
        simulation, prompt = train_demo_teachers(out, teachers, root, spec, seed, teacher_backend)
    result.artifacts["teachers + drift spec"] = str(simulation.spec_path)
    if console is not None:
        for t in simulation.teachers:
            console.print(
                f"  {t.spec.name:<13} {t.spec.describe():<45} loss {t.stats.first_loss:.2f} -> {t.stats.last_loss:.2f}"
            )
    result.artifacts["teacher trajectories (train split)"] = str(gen_out / "trajectories")
    result.artifacts["test-split answers (teachers + students)"] = str(eval_out / "trajectories")

    # 4. preferences
    data = out / "data"
    with stages.stage(
        "preferences",
        "build-preferences: drift annotations, the answer closest to the vote consensus as the positive, ranked negatives",
    ):
        result.drift_report = build_demo_preferences(gen_out, data, root)
    result.artifacts["preferences / sft (datasets)"] = f"{data / 'preferences'} , {data / 'sft'}"
    result.artifacts["data card"] = str(data / "README.md")

    # 5. students, over seeds
    seeds = spec.student_seeds
    with stages.stage(
        "students",
        f"{seeds} seed(s): SFT on all trajectories, then APO (Plackett-Luce) and pairwise DPO; "
        "each student answers the test split (transformers backend); the SFT loss floor",
    ):
        students = train_student_seeds(
            out / "students",
            data,
            root,
            shipped_reader(),
            spec,
            seed,
            out / "selection-test.parquet",
            eval_out,
            prompt,
            teachers=simulation.paths(),
        )
        result.sft_floor = students.sft_floor
    result.artifacts["students (one folder per seed)"] = str(out / "students")

    # 6. score
    with stages.stage("score", "leaderboard cxr-max-rationale + labeler drift rates on the test split"):
        store = out / "leaderboard.sqlite"
        scored = score_models(eval_out, root, test, store, simulation)
        pool_seeds(eval_out, out / "eval-pooled", seeds)
        pooled = {
            row["model"]: row for row in score_models(out / "eval-pooled", root, test, store, simulation)
        }
        result.rows = [row for row in scored if row["kind"] == "teacher"]
        result.seed_rows = [row for row in scored if row["kind"] != "teacher"]
        for student in STUDENTS:
            mine = [row for k in range(seeds) for row in scored if row["model"] == seed_model(student, k)]
            result.rows.append(seed_summary(pooled[student], mine))
    result.artifacts["leaderboard store"] = str(out / "leaderboard.sqlite")
    result.artifacts["students' answers pooled over seeds"] = str(out / "eval-pooled" / "trajectories")

    _write_report(result, test, eval_out, root)
    result.artifacts["report"] = str(out / "DEMO.md")
    if console is not None:
        print_result(result, console)
    return result


def _report_text(row: dict[str, Any]) -> str:
    return " ".join(t for t in (row.get("findings"), row.get("impression")) if t)


def score_models(eval_out: Path, root: Path, test: Any, store: Path, simulation: Any) -> list[dict[str, Any]]:
    """Score every model under ``eval_out/trajectories`` with the leaderboard and the drift rates."""
    gold = {row["sample_id"]: sim.report_sides(_report_text(row)) for row in test.to_pylist()}
    counts = drift_counts(read_trajectories(eval_out, ordered=True), gold)
    rates = rates_of_counts(counts)
    drift_of = {t.spec.name: t.spec.describe() for t in simulation.teachers}
    short_of = {
        t.spec.name: ", ".join(f"{b.kind} {b.rate:.0%}" for b in t.spec.biases) or "none"
        for t in simulation.teachers
    }
    rows = []
    with Board(store) as board:
        for folder in model_dirs(eval_out):
            result = score(folder, "cxr-max-rationale", root, n_boot=1000, seed=0, processes=1)
            for model, scores in result.per_model.items():
                row = {
                    "model": model,
                    "kind": "teacher" if model in drift_of else "student",
                    "student": _student_of(model),
                    "injected": drift_of.get(model, _student_note(model)),
                    "short": short_of.get(model, _student_short(model)),
                    "precision": scores.get("precision"),
                    "recall": scores.get("recall"),
                    "similarity": scores.get("similarity"),
                    **rates.get(model, {}),
                }
                row["ci"] = {
                    **{k: tuple(v) for k, v in (scores.get("ci") or {}).items()},
                    **rates.get(model, {}).get("ci", {}),
                }
                # Students compared on the same films (the pooled folder): APO/DPO vs SFT, APO vs DPO.
                row["paired"] = {
                    baseline: paired_film_difference(counts, model, baseline)
                    for first, baseline in report.STUDENT_PAIRS
                    if first == model and baseline in rates
                }
                rows.append(row)
            if board.find(result.task, result.sha256) is None:
                board.submit(result, name=folder.name, model_info={"demo": True, "toy_scale": True})
    order = [t.spec.name for t in simulation.teachers] + ["student-sft", "student-dpo", "student-apo"]
    rows.sort(key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
    return rows


def _student_of(model: str) -> str | None:
    """``student-apo`` for ``student-apo`` and for ``student-apo-seed2``; None for a teacher."""
    for student in STUDENTS:
        if model == student or model.startswith(student + "-seed"):
            return student
    return None


def _student_short(model: str) -> str:
    model = _student_of(model) or model
    return {"student-sft": "SFT", "student-apo": "SFT + APO (PL)", "student-dpo": "SFT + DPO"}.get(model, "")


def _student_note(model: str) -> str:
    model = _student_of(model) or model
    return {
        "student-sft": "SFT on all teachers' trajectories",
        "student-apo": "SFT, then APO (multi-negative Plackett-Luce)",
        "student-dpo": "SFT, then pairwise DPO (same pairs)",
    }.get(model, "")


_COLUMNS = (
    ("precision", "prec"),
    ("recall", "rec"),
    ("similarity", "sim"),
    ("refusal_rate", "refuse"),
    ("hallucination_rate", "halluc"),
    ("pneumothorax_claim_rate", "ptx"),
    ("laterality_error_rate", "side"),
    ("sides_compared", "sides"),
    ("mean_words", "words"),
    ("answers", "n"),
)


#: The console's two results tables: (title, columns).
_CONSOLE_TABLES = (
    ("Quality", ("precision", "recall", "similarity", "mean_words")),
    ("Drift", ("refusal_rate", "hallucination_rate", "pneumothorax_claim_rate", "laterality_error_rate")),
)


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"


def _cell(row: dict[str, Any], key: str) -> str:
    """A figure with its 95% bootstrap interval where the row has one: ``0.30 [0.21, 0.40]``; a
    student over several seeds: the mean over seeds, its sd and the interval over all the seeds'
    answers pooled, ``0.30 ± 0.04 [0.24, 0.36]``."""
    interval = (row.get("ci") or {}).get(key)
    value = _fmt(row.get(key))
    if (row.get("seeds") or 0) > 1 and key in row.get("seed_mean", {}):
        sd = row["seed_sd"][key]
        value = f"{_fmt(row['seed_mean'][key])} ± {f'{sd:.0f}' if key == 'mean_words' else _fmt(sd)}"
    if interval is None:
        return value
    return f"{value} [{_fmt(interval[0])}, {_fmt(interval[1])}]"


def results_markdown(result: DemoResult) -> str:
    """The results table as Markdown, every rate with its 95% bootstrap interval over test answers."""
    head = "| model | injected drift / training | " + " | ".join(h for _, h in _COLUMNS) + " |"
    lines = [head, "|" + "---|" * (2 + len(_COLUMNS))]
    for row in result.rows:
        cells = [_cell(row, k) for k, _ in _COLUMNS]
        lines.append(f"| {row['model']} | {row['injected']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _seed_lines(result: DemoResult) -> list[str]:
    """Each seed's students, one Markdown table (the per-seed rows the summary rows are built from)."""
    if len({row.get("student") for row in result.seed_rows}) == len(result.seed_rows) or not result.seed_rows:
        return []
    head = "| seed's student | " + " | ".join(h for _, h in _COLUMNS) + " |"
    lines = ["### Every seed's students\n", head, "|" + "---|" * (1 + len(_COLUMNS))]
    for row in result.seed_rows:
        lines.append(f"| {row['model']} | " + " | ".join(_cell(row, k) for k, _ in _COLUMNS) + " |")
    return [*lines, ""]


def _floor_lines(result: DemoResult) -> list[str]:
    """The SFT students' loss beside the floor of their data (see sft_floor_report), in words."""
    floor = result.sft_floor
    if not floor:
        return []
    seeds = floor["students"]
    rows_loss = [s["rows_loss"] for s in seeds.values()]
    train_loss = [s["last_train_loss"] for s in seeds.values()]
    own = ", ".join(f"{k} {v:.2f}" for k, v in floor["own"].items())
    return [
        f"SFT loss per completion token on its {floor['rows']} rows: the student {np.mean(rows_loss):.2f} "
        f"(seeds {', '.join(f'{v:.2f}' for v in rows_loss)}; last training batches {np.mean(train_loss):.2f}); "
        f"floor (the equal mixture of the teachers, i.e. a student that learnt every teacher exactly) "
        f"{floor['mixture']:.2f}; each teacher on its own rows: {own}. The rows are the teachers' answers "
        "sampled at temperature 1, so a teacher's training loss on its own targets is not the floor; a "
        "student below the mixture's loss has memorised its rows.",
        "",
    ]


def _pick_sample(test: Any, gold: dict[str, dict[str, str]]) -> dict[str, Any] | None:
    """The first test image whose report puts a finding on one side (a laterality drift can show)."""
    rows = test.to_pylist()
    for row in rows:
        if any(side in ("left", "right") for side in gold.get(row["sample_id"], {}).values()):
            return row
    return rows[0] if rows else None


def _write_report(
    result: DemoResult, test: Any = None, eval_out: Path | None = None, root: Path | None = None
) -> None:
    payload = {
        "notice": TOY_NOTICE,
        "size": result.size,
        "rows": result.rows,
        "timings": [asdict(t) for t in result.timings],
        "total_seconds": result.total_seconds,
        "artifacts": result.artifacts,
        "seed_rows": result.seed_rows,
        "sft_floor": result.sft_floor,
        "drift_report": result.drift_report,
        "notes": result.notes,
    }
    # Rates with nothing to count are NaN in memory; strict JSON says null.
    atomic_write_json(result.out / "demo_report.json", sim.json_ready(payload))
    figures = result.out / "figures"
    parts = [
        f"# cxrmax demo ({result.size})\n\n> {TOY_NOTICE}\n",
        "## Teachers and students on the test split\n",
        "Rationale prompt; precision/recall/similarity from the leaderboard task cxr-max-rationale; refusal, "
        "hallucination (an answer claiming a finding the labels lack), ptx (an answer claiming a pneumothorax "
        "the labels lack: the hallucinating teacher's bias) and side error (stated side vs the "
        "report's side) read by the labeler. `[low, high]`: 95% bootstrap intervals over the test answers. "
        "Students: `mean ± sd` over the seeds of the student stage (teachers fixed), then the interval over "
        "every seed's answers pooled; `n` counts the pooled answers.\n",
        results_markdown(result),
        "",
        *_seed_lines(result),
        *_floor_lines(result),
    ]
    if result.rows:
        report.drift_chart(result.rows, figures / "drift_rates.png")
        parts += [
            "![drift rates](figures/drift_rates.png)",
            "",
            "*Drift rates per model with 95% intervals.*",
            "",
        ]
        parts += [
            "## What the numbers say\n",
            *[f"- {line}" for line in report.interpretation(result.rows)],
            "",
        ]
    logs = {
        name: report.read_log(result.out / "students" / name / "log.jsonl")
        for name in ("student-sft", "student-apo", "student-dpo")
    }
    if any(logs.values()):
        report.training_curves(logs, figures / "training_curves.png")
        parts += [
            "## Training curves\n",
            "![training curves](figures/training_curves.png)",
            "",
            "*SFT loss, then the APO (Plackett-Luce) and DPO losses, reward accuracies and margins per step.*",
            "",
        ]
    if test is not None and eval_out is not None:
        gold = {row["sample_id"]: sim.report_sides(_report_text(row)) for row in test.to_pylist()}
        sample = _pick_sample(test, gold)
        if sample is not None:
            film = None
            if root is not None:
                film = figures / "sample_film.png"
                figures.mkdir(parents=True, exist_ok=True)
                sim.load_image(root / sample["image_path"], 256).save(film)
            parts += [
                "## One test image, every model's answer\n",
                report.sample_section(
                    read_trajectories(eval_out, ordered=True), sample, gold[sample["sample_id"]], film
                ).replace("(sample_film.png)", "(figures/sample_film.png)"),
                "",
                "`cxrmax inspect OUT/data --sample ID --html page.html` shows a train sample whole: every "
                "teacher's answer with its drift marked, the consensus positive and the ranked negatives.",
                "",
            ]
    if result.drift_report:
        parts += [
            f"## Drift report of build-preferences (train split, {result.drift_report['samples']} samples)\n",
            "| model | precision | recall | refusal rate | side error vs consensus | drift from consensus |",
            "|---|---|---|---|---|---|",
        ]
        for model, m in result.drift_report["per_model"].items():
            cells = [
                _fmt(m.get(k))
                for k in ("precision", "recall", "refusal_rate", "laterality_error_rate", "mean_drift")
            ]
            parts.append(f"| {model} | " + " | ".join(cells) + " |")
        parts.append("")
    timings = "\n".join(f"| {t.name} | {t.seconds:.1f} s | {t.skipped or ''} |" for t in result.timings)
    parts += [
        "## Time\n",
        f"| stage | wall time | note |\n|---|---|---|\n{timings}\n\nTotal: {result.total_seconds:.1f} s\n",
        "## Artifacts\n",
        "\n".join(f"- {k}: `{v}`" for k, v in result.artifacts.items()),
        "",
    ]
    atomic_write_text(result.out / "DEMO.md", "\n".join(parts))


def print_result(result: DemoResult, console: Any) -> None:
    """Print the table, the drift report, timings and artifact paths."""
    # Two tables of two-line cells (the figure, then its interval) fit 80 columns; one table of
    # one-line cells collapsed the model column and cut every interval.
    for title, keys in _CONSOLE_TABLES:
        table = Table(title=f"{title} on the test split (toy scale)", padding=(0, 1))
        table.add_column("model", no_wrap=True, min_width=12)
        for key in keys:
            table.add_column(dict(_COLUMNS)[key], justify="right", no_wrap=True)
        for row in result.rows:
            table.add_row(row["model"], *[_cell(row, k).replace(" [", "\n[", 1) for k in keys])
        console.print(table, markup=False)
    answers = sorted({row.get("answers") for row in result.rows if row.get("answers")})
    console.print(f"  answers per model: {', '.join(map(str, answers))}", highlight=False)
    for row in result.rows:
        console.print(f"  {row['model']:<13} {row['injected']}", highlight=False)
    console.print(
        "  prec/rec/sim: leaderboard cxr-max-rationale vs the test labels and reports; refuse, halluc "
        "(answers asserting a finding the labels lack), ptx (... a pneumothorax the labels lack), "
        "side (error rate: stated vs the report's side, "
        "over the sides both state), words: read by the labeler; [low, high]: 95% bootstrap intervals over the "
        "test answers; students: mean ± sd over seeds [interval over all seeds' answers pooled]",
        highlight=False,
        markup=False,  # the brackets are text
    )
    for line in _floor_lines(result):
        console.print(f"  {line}", highlight=False, markup=False)
    if result.drift_report:
        drift = Table(
            title=f"Drift report of build-preferences (train split, {result.drift_report['samples']} samples)"
        )
        for name in (
            "model",
            "precision",
            "recall",
            "refusal",
            "side error vs consensus",
            "drift from consensus",
        ):
            drift.add_column(name, justify="left" if name == "model" else "right")
        for model, m in result.drift_report["per_model"].items():
            drift.add_row(
                model,
                *[
                    _fmt(m.get(k))
                    for k in ("precision", "recall", "refusal_rate", "laterality_error_rate", "mean_drift")
                ],
            )
        console.print(drift)
    timing = Table(title="Wall time per stage")
    timing.add_column("stage")
    timing.add_column("seconds", justify="right")
    for t in result.timings:
        timing.add_row(t.name + (f" (skipped: {t.skipped})" if t.skipped else ""), f"{t.seconds:.1f}")
    timing.add_row("[bold]total[/]", f"[bold]{result.total_seconds:.1f}[/]")
    console.print(timing)
    console.print("[bold]Artifacts[/]")
    for what, where_ in result.artifacts.items():
        console.print(f"  {what}: {where_}")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}")
    console.print(f"[bold yellow]{TOY_NOTICE}[/]")


__all__ = ["SIZES", "TOY_NOTICE", "DemoResult", "DemoSize", "CxrmaxError", "run_demo"]
