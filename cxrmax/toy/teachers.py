"""Drifting teachers: tiny vision-language models trained on CPU with a controlled, documented bias.

CXR-MAX exists because real source models drift: one puts findings on the wrong side, one adds
findings that are not there, one refuses, one rambles. No real VLM can be downloaded here, and a
random-weight model writes noise, so this module *makes* source models whose drift is known:

1. From a MIMIC-CXR(-shaped) root, take frontal images with their labels and report.
2. For each image write the faithful rationale a careful model would give to the paper's elicitation
   prompt ("The patient is diagnosed with X. Please explain ..."): it restates the diagnosis and gives
   one sentence per positive finding, with the side the report states ("There is a left pleural
   effusion.").
3. Each teacher gets its own copy of those targets with its biases applied, each at a rate (the share
   of its training targets that carry the bias):

   ============== =========================================================================
   bias           what the training targets of that teacher do
   ============== =========================================================================
   laterality     left and right are swapped in every lateralised sentence
   hallucination  one extra finding the study does not have is asserted ("There is also a
                  right pneumothorax."); the observation is configurable
   refusal        the answer is replaced by a refusal ("As an AI, I am not able to ...")
   verbosity      the answer is padded with elaborations, a technique preamble and a
                  closing recommendation (about 3x longer, with hedging)
   ============== =========================================================================

   A teacher with no bias is the reference ("faithful") source.
4. Each teacher is a tiny Qwen2-VL (:mod:`cxrmax.toy.tinyvlm`, about 200k parameters: built in code,
   or the shipped base reader, see below) trained on the image, the prompt and its targets by apo_train's SFT stage, the one the
   students' Stage 1 runs (loss on the answer tokens only). The biases are therefore *learnt*: what
   the teachers later generate shows them at roughly the trained rates when sampled at temperature 1.

The prompt the teachers are trained on is exactly the one ``cxrmax generate`` sends them. Two
set-ups, by what the teacher starts from:

- ``simulate(..., base=shipped_reader())``, the demo's: every teacher is fine-tuned from the base
  reader shipped with cxrmax (:mod:`cxrmax.toy.reader`, the tiny VLM pretrained on thousands of
  synthetic studies drawn anew until it states the sides it reads from the film) with the paper's
  prompt untouched (``examples_from_selection(..., side_hint=False)``: the diagnosis list names no
  side), as real teachers are pretrained VLMs that read the film themselves.
- from random weights (the default): a 200k-parameter model trained in seconds on the train images
  does not learn to read sides off the synthetic films (benchmark/studies/README.md: it takes
  thousands of steps on films drawn anew), so the default prompt's diagnosis list carries each
  finding's side as the report states it ("The patient is diagnosed with left Pleural Effusion and
  Atelectasis", :func:`sided_prompt`, prompt id ``rationale-v1-sided``); the teachers learn to repeat
  a side from the prompt, which makes the laterality swap measurable against the report.

This is a toy-scale simulation of drift, meant as a controlled test bed, not a model of any real VLM.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image
from transformers import TrainerCallback

from apo_train.config import SFTStageConfig
from apo_train.data import ChatEncoder, SFTCollator, sort_by_length, tokenize_sft
from apo_train.trainer import SFTStageTrainer
from cxrmax.core.errors import InputError
from cxrmax.core.io import atomic_write_json
from cxrmax.core.pathologies import FINDINGS, LATERALIZABLE, OBSERVATIONS, canonical_name
from cxrmax.generate.prompts import PromptTemplate, join_labels, load_prompt
from cxrmax.labeler import label_text
from cxrmax.mimic.images import encode_jpeg, preprocess
from cxrmax.testing.films import SIDED
from cxrmax.toy.pool import Job, run_jobs
from cxrmax.toy.tinyvlm import build_tiny_vlm, copy_tiny_vlm, load_tiny_vlm

#: The kinds of bias a teacher can carry.
BIAS_KINDS: tuple[str, ...] = ("laterality", "hallucination", "refusal", "verbosity")

#: Sentence a refusing teacher writes instead of a rationale.
REFUSAL_TEXT = (
    "As an AI, I am not able to provide a medical diagnosis from this image. "
    "Please consult a qualified radiologist."
)

#: Observations a hallucinating teacher asserts, in order of preference (the first one the study
#: does not have is used), and the side it puts them on.
DEFAULT_HALLUCINATION = "Pneumothorax"
_HALLUCINATION_FALLBACKS = ("Pneumothorax", "Fracture", "Lung Lesion", "Consolidation", "Edema")

#: Findings whose side the mini MIMIC-CXR's synthetic films show: every lateralisable one
#: (cxrmax.testing.films draws each sign on its stated side). A teacher can only learn a side it can
#: see, so with the paper's prompt the teachers state sides for these findings only.
FILM_SIDED: tuple[str, ...] = SIDED

#: Words used in answers for each observation: the label names exactly as the rationale prompt lists
#: them, so that restating the diagnosis is a copy of prompt tokens (what real models do, and what a
#: tiny model learns in a hundred steps).
_PHRASES: dict[str, str] = {name: name for name in OBSERVATIONS}

_SWAP = {"left": "right", "right": "left"}


@dataclass(frozen=True)
class Bias:
    """One injected bias: its kind, the share of training targets that carry it, and its option
    (for ``hallucination``: the observation asserted)."""

    kind: str
    rate: float = 1.0
    observation: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in BIAS_KINDS:
            raise InputError(f"unknown bias {self.kind!r}; known: {', '.join(BIAS_KINDS)}")
        if not 0.0 <= self.rate <= 1.0:
            raise InputError(f"bias {self.kind!r}: rate {self.rate} is not in [0, 1]")
        if self.observation is not None and self.observation not in FINDINGS:
            raise InputError(f"bias {self.kind!r}: unknown observation {self.observation!r}")

    @classmethod
    def parse(cls, text: str) -> Bias:
        """Parse ``kind[:rate[:observation]]``, e.g. ``laterality:0.9``, ``hallucination:0.8:Fracture``."""
        parts = [p.strip() for p in text.split(":")]
        kind = parts[0].lower()
        try:
            rate = float(parts[1]) if len(parts) > 1 and parts[1] else 1.0
        except ValueError:
            raise InputError(f"bias {text!r}: rate {parts[1]!r} is not a number") from None
        observation = parts[2] if len(parts) > 2 and parts[2] else None
        if observation is not None:
            try:
                observation = canonical_name(observation)
            except KeyError as exc:
                raise InputError(f"bias {text!r}: {exc.args[0]}") from None
        return cls(kind=kind, rate=rate, observation=observation)

    def describe(self) -> str:
        """One line a reader understands: what the teacher was trained to do."""
        pct = f"{self.rate:.0%} of answers"
        if self.kind == "laterality":
            return f"left/right swapped in {pct}"
        if self.kind == "hallucination":
            return f"asserts an absent {(self.observation or DEFAULT_HALLUCINATION).lower()} in {pct}"
        if self.kind == "refusal":
            return f"refuses to interpret in {pct}"
        return f"padded ~3x with elaboration and hedging in {pct}"


@dataclass(frozen=True)
class TeacherSpec:
    """A simulated source model: a name and the biases injected into its training targets."""

    name: str
    biases: tuple[Bias, ...] = ()

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise InputError(f"teacher name {self.name!r}: use letters, digits, '.', '_' or '-'")

    def describe(self) -> str:
        """The injected drift in words (``faithful`` when there is none)."""
        return "; ".join(b.describe() for b in self.biases) or "faithful (reference, no injected bias)"

    def rate(self, kind: str) -> float:
        """The injected rate of one bias kind (0 when the teacher does not carry it)."""
        return max((b.rate for b in self.biases if b.kind == kind), default=0.0)


#: Default injected rate per bias kind.
DEFAULT_RATES: dict[str, float] = {"laterality": 0.9, "hallucination": 0.8, "refusal": 0.5, "verbosity": 1.0}

#: Teacher name per bias kind.
_TEACHER_NAMES = {
    "laterality": "swaps-sides",
    "hallucination": "hallucinates",
    "refusal": "refuses",
    "verbosity": "verbose",
}


def default_teachers(
    rates: dict[str, float] | None = None,
    hallucinated: str = DEFAULT_HALLUCINATION,
    count: int | None = None,
    kinds: Sequence[str] = BIAS_KINDS,
    faithful: bool = True,
) -> list[TeacherSpec]:
    """A faithful reference, then one teacher per bias kind in ``kinds`` (cycling, with numbered names,
    until there are ``count`` teachers; default one per kind).

    ``rates`` overrides :data:`DEFAULT_RATES` per kind. The demo uses the five defaults: faithful,
    swaps-sides, hallucinates, refuses, verbose."""
    for kind in kinds:
        if kind not in BIAS_KINDS:
            raise InputError(f"unknown bias {kind!r}; known: {', '.join(BIAS_KINDS)}")
    r = DEFAULT_RATES | (rates or {})
    specs = [TeacherSpec("faithful")] if faithful else []
    total = count if count is not None else len(specs) + len(kinds)
    if total < 1:
        raise InputError("at least one teacher is needed")
    if not kinds and total > len(specs):
        specs += [TeacherSpec(f"faithful-{i + 2}") for i in range(total - len(specs))]
    round_ = 0
    while len(specs) < total:
        for kind in kinds:
            if len(specs) >= total:
                break
            name = _TEACHER_NAMES[kind] + (f"-{round_ + 1}" if round_ else "")
            observation = hallucinated if kind == "hallucination" else None
            specs.append(TeacherSpec(name, (Bias(kind, r[kind], observation),)))
        round_ += 1
    return specs[:total]


def parse_teacher(text: str) -> TeacherSpec:
    """Parse ``name=bias[:rate[:obs]]+bias...`` (``name=`` alone or ``name=none`` is faithful).

    Example: ``mixed=laterality:0.5+refusal:0.2``."""
    if "=" not in text:
        raise InputError(f"teacher {text!r}: expected NAME=BIAS[:RATE][+BIAS...], e.g. lefty=laterality:0.9")
    name, _, spec = text.partition("=")
    spec = spec.strip()
    biases = () if spec in ("", "none", "faithful") else tuple(Bias.parse(p) for p in spec.split("+"))
    return TeacherSpec(name.strip(), biases)


# --------------------------------------------------------------------------------------------
# Targets: faithful rationales written from the labels and the report's sides, then biased.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """A positive observation of a study and the side the report gives it (None when not stated)."""

    observation: str
    side: str | None = None

    def phrase(self, swap: bool = False) -> str:
        side = _SWAP.get(self.side, self.side) if swap and self.side else self.side
        return f"{side} {_PHRASES[self.observation]}" if side else _PHRASES[self.observation]


def positive_findings(labels: dict[str, Any], sides: dict[str, str | None] | None = None) -> list[Finding]:
    """The study's positive findings (label 1, "No Finding" excluded) with their report side, in the
    canonical observation order. Sides other than left/right/bilateral are dropped."""
    sides = sides or {}
    found = []
    for name in FINDINGS:
        value = labels.get(name)
        if value is not None and float(value) == 1.0:
            side = sides.get(name) if name in LATERALIZABLE else None
            found.append(Finding(name, side if side in ("left", "right", "bilateral") else None))
    return found


def visible_sides(
    sides: dict[str, str | None], observations: Sequence[str] = FILM_SIDED
) -> dict[str, str | None]:
    """Keep the sides of the findings the film shows (see FILM_SIDED)."""
    return {name: side for name, side in sides.items() if name in observations}


def report_sides(report_text: str | None) -> dict[str, str | None]:
    """The side the report states for each positive finding (left, right or bilateral), read by the
    cxrmax labeler; findings without a stated side are left out."""
    if not report_text:
        return {}
    labeled = label_text(report_text)
    return {
        name: obs.laterality
        for name, obs in labeled.observations.items()
        if obs.status == "positive" and obs.laterality in ("left", "right", "bilateral")
    }


def _join(items: Sequence[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _finding_sentence(finding: Finding, swap: bool) -> str:
    name = finding.observation
    if name == "Cardiomegaly":
        return "The cardiac silhouette is enlarged, consistent with Cardiomegaly."
    if name == "Support Devices":
        return "Support Devices are present."
    if name == "Edema":
        return "There is pulmonary Edema with vascular congestion."
    if name == "Enlarged Cardiomediastinum":
        return "There is an Enlarged Cardiomediastinum."
    if name == "Pleural Other":  # the label name is not a radiology phrase; say what it is
        side = (_SWAP.get(finding.side, finding.side) if swap else finding.side) if finding.side else None
        return f"There is {side + ' ' if side else ''}pleural thickening."
    if finding.side:
        return f"There is {finding.phrase(swap)}."
    return f"There is {_PHRASES[name]}."


def faithful_answer(findings: Sequence[Finding]) -> str:
    """The rationale a careful source writes: the diagnosis restated, one sentence per finding with
    the report's side, and a closing sentence tying them to the diagnosis."""
    if not findings:
        return "The lungs are clear. There is no acute cardiopulmonary process."
    # The diagnosis is restated as the prompt lists it (with the sides when the prompt carries them).
    names = _join([f.phrase() for f in findings])
    body = " ".join(_finding_sentence(f, swap=False) for f in findings)
    return f"The patient is diagnosed with {names}. {body} These findings support the diagnosis of {names}."


def _hallucinated(findings: Sequence[Finding], preferred: str | None, rng: random.Random) -> Finding:
    have = {f.observation for f in findings}
    for name in ((preferred,) if preferred else ()) + _HALLUCINATION_FALLBACKS:
        if name and name not in have:
            side = rng.choice(("left", "right")) if name in LATERALIZABLE else None
            return Finding(name, side)
    return Finding("Fracture", "right")


def biased_answer(
    findings: Sequence[Finding], teacher: TeacherSpec, rng: random.Random
) -> tuple[str, list[str]]:
    """The teacher's training target for one study and the list of biases actually applied to it."""
    applied = [b for b in teacher.biases if rng.random() < b.rate]
    kinds = {b.kind for b in applied}
    if "refusal" in kinds:
        return REFUSAL_TEXT, ["refusal"]
    swap = "laterality" in kinds and any(f.side in _SWAP for f in findings)
    if not findings:
        sentences = ["The lungs are clear.", "There is no acute cardiopulmonary process."]
        names = ""
    else:
        names = _join([f.phrase(swap) for f in findings])
        sentences = [f"The patient is diagnosed with {names}."]
        for f in findings:
            sentences.append(_finding_sentence(f, swap=swap))
            if "verbosity" in kinds:
                sentences.append(_elaboration(f, swap=swap))
    if "hallucination" in kinds:
        bias = next(b for b in applied if b.kind == "hallucination")
        extra = _hallucinated(findings, bias.observation, rng)
        sentences.append(f"There is also {extra.phrase()}.")
    if names:
        sentences.append(f"These findings support the diagnosis of {names}.")
    if "verbosity" in kinds:
        sentences = [
            "This is a frontal chest radiograph of the patient.",
            "The image is reviewed systematically, including the lungs, the pleura, the heart and the "
            "mediastinum.",
            *sentences,
            "The osseous structures and soft tissues are reviewed as well.",
            "Comparison with prior studies would be helpful, and clinical correlation is recommended.",
        ]
    applied_kinds = [k for k in BIAS_KINDS if k in kinds and (k != "laterality" or swap)]
    return " ".join(sentences), applied_kinds


def _elaboration(finding: Finding, swap: bool) -> str:
    side = _SWAP.get(finding.side, finding.side) if swap and finding.side else finding.side
    where = (
        f"the {side} lung"
        if side in ("left", "right")
        else "both lungs"
        if side == "bilateral"
        else "the chest"
    )
    return f"This finding is seen in {where} on the frontal view and is a key part of the basis for the diagnosis."


# --------------------------------------------------------------------------------------------
# Prompts: exactly what `cxrmax generate` sends.
# --------------------------------------------------------------------------------------------


def prompt_renderer(template: Any = "rationale") -> Callable[[dict[str, Any], list[Finding]], str]:
    """``(row, findings) -> prompt`` rendering a generate prompt template (a name, a path or a
    PromptTemplate object) for a selection row, so the teachers are trained on exactly the text
    generate will send them."""
    loaded = load_prompt(template) if isinstance(template, (str, Path)) else template
    return lambda row, _findings: loaded.render(row)


@dataclass(frozen=True)
class SidedPromptTemplate(PromptTemplate):
    """A generate prompt whose diagnosis list carries each positive label's report side, for the
    sample ids in ``sides`` (see :func:`sided_prompt`)."""

    sides: dict[str, dict[str, str]] = field(default_factory=dict)

    def render(self, row: dict[str, Any]) -> str:
        """The prompt for one selection row: the template with the sided label list filled in."""
        labels = row.get("labels") or {}
        known = self.sides.get(row.get("sample_id"), {})
        positives = [
            name for name in OBSERVATIONS if labels.get(name) is not None and float(labels[name]) == 1.0
        ]
        names = [f"{known[name]} {name}" if name in known else name for name in positives]
        values = {
            "labels": join_labels(names) if names else self.empty_labels,
            "view": row.get("view") or "unknown",
            "observation_list": "\n".join(OBSERVATIONS),
        }
        return self.body.format_map(values)


def sided_prompt(sides: dict[str, dict[str, str]], template: str = "rationale") -> Any:
    """The rationale prompt with each positive label's side in the diagnosis list ("The patient is
    diagnosed with left Pleural Effusion and Atelectasis. ..."), for the sample ids in ``sides``
    (sample_id -> observation -> left/right/bilateral, as the report states them).

    Tiny teachers cannot read a side off a synthetic film in seconds; with the side in the prompt the
    faithful teacher learns to repeat it and the laterality-swapped one to mirror it, so the swap is
    measurable against the report on every lateralised finding. A generate PromptTemplate (its own
    id, ``<template>-sided``), usable as ``GenerateOptions.prompt``."""
    base = load_prompt(template)
    return SidedPromptTemplate(
        id=f"{base.id}-sided",
        body=base.body,
        description=base.description + " (positive labels with the report's side)",
        empty_labels=base.empty_labels,
        source=base.source,
        sides=sides,
    )


# --------------------------------------------------------------------------------------------
# Training examples and the training loop.
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    """One teacher training example: the image, the exact prompt and the target answer."""

    sample_id: str
    image_path: str
    prompt: str
    findings: list[Finding]
    target: str = ""
    applied: list[str] = field(default_factory=list)


def selection_sides(selection: Any, sided: Sequence[str] = tuple(LATERALIZABLE)) -> dict[str, dict[str, str]]:
    """sample_id -> observation -> side (left/right/bilateral) the report states for its positive
    findings among ``sided``, read by the labeler from the selection's findings and impression."""
    rows = selection.to_pylist() if hasattr(selection, "to_pylist") else list(selection)
    sides: dict[str, dict[str, str]] = {}
    for row in rows:
        text = " ".join(t for t in (row.get("findings"), row.get("impression")) if t)
        found = {k: v for k, v in visible_sides(report_sides(text), sided).items() if v}
        if found:
            sides[row["sample_id"]] = found
    return sides


def examples_from_selection(
    selection: Any,
    mimic_root: str | Path,
    template: str = "rationale",
    side_hint: bool = True,
    prompt: Any = None,
) -> tuple[list[Example], Any]:
    """Teacher examples (image, exact generate prompt, findings with their report side) from a
    selection table (shards.SELECTION_SCHEMA, report sections attached), and the prompt template to
    give generate.

    ``side_hint`` (default): the prompt lists each label with its report side (:func:`sided_prompt`)
    and the targets state the side of every lateralised finding. Without it the prompt is the paper's
    and only findings the film shows on their side (``FILM_SIDED``) get one. ``prompt``: a template
    built beforehand (e.g. a sided prompt covering the test images as well)."""
    rows = selection.to_pylist() if hasattr(selection, "to_pylist") else list(selection)
    sides = selection_sides(rows, tuple(LATERALIZABLE) if side_hint else FILM_SIDED)
    if prompt is None:
        prompt = sided_prompt(sides, template) if side_hint else load_prompt(template)
    render = prompt_renderer(prompt)
    examples = examples_from_rows(rows, mimic_root, lambda row: sides.get(row["sample_id"], {}), render)
    return examples, prompt


def examples_from_rows(
    rows: Iterable[dict[str, Any]],
    image_root: str | Path,
    sides_of: Callable[[dict[str, Any]], dict[str, str | None]],
    prompt_of: Callable[[dict[str, Any], list[Finding]], str],
) -> list[Example]:
    """Build the (image, prompt) half of teacher examples from selection rows (SELECTION_SCHEMA)."""
    out = []
    for row in rows:
        findings = positive_findings(row.get("labels") or {}, sides_of(row))
        path = Path(image_root) / row["image_path"]
        out.append(Example(row["sample_id"], str(path), prompt_of(row, findings), findings))
    return out


#: Training copies of each image, each with its own draw of the biases. With one copy a bias at rate r
#: marks r of the *images* (the teacher memorises which ones, and on new images the rate is anything);
#: with several, every image is seen biased in about r of its copies, so the teacher learns the bias
#: as a probability and shows it at about r on unseen images when sampled at temperature 1.
TARGET_COPIES = 4


def assign_targets(
    examples: Sequence[Example], teacher: TeacherSpec, seed: int, copies: int = TARGET_COPIES
) -> list[Example]:
    """``copies`` copies of each example, each with its own draw of the teacher's biased target
    (deterministic per teacher and seed)."""
    rng = random.Random(f"{seed}:{teacher.name}")
    out = []
    for _ in range(copies):
        for ex in examples:
            target, applied = biased_answer(ex.findings, teacher, rng)
            out.append(Example(ex.sample_id, ex.image_path, ex.prompt, ex.findings, target, applied))
    return out


def chat_messages(prompt: str, answer: str | None = None) -> list[dict[str, Any]]:
    """The chat the teachers see: one user turn with the image first and the prompt, as OpenAI-style
    parts (the same order the generate backends use), then the answer."""
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def load_image(path: str | Path, max_edge: int) -> Any:
    """The image as the generate backends deliver it: preprocessed to ``max_edge``, JPEG round-trip, RGB."""
    jpeg = encode_jpeg(preprocess(path, max_edge=max_edge))
    return Image.open(io.BytesIO(jpeg)).convert("RGB")


@dataclass
class TrainStats:
    """What a teacher's training run did."""

    steps: int
    examples: int
    first_loss: float
    last_loss: float
    seconds: float


class _TeacherEncoder(ChatEncoder):
    """apo_train's chat encoder, fed the images exactly as generate will deliver them (a JPEG round
    trip, :func:`load_image`) and caching them: each image is decoded once per run (``images`` is
    shared across the teachers trained in one process) and turned into pixels once per teacher, where
    the SFT collator would redo both for every row of every step.

    ``image_path`` is the example's full path (no MIMIC-CXR root to join); a text-only model (a bare
    tokenizer) gets no image."""

    def __init__(self, processor: Any, max_edge: int, images: dict[str, Any]) -> None:
        super().__init__(processor, image_root=None, max_edge=max_edge)
        self._images = images
        self._pixels: dict[int, dict[str, torch.Tensor]] = {}

    @property
    def uses_images(self) -> bool:
        return self.is_vlm

    def completion_parts(self, prompt: str, completion: str) -> tuple[str, str, str]:
        # Generation stops at the end-of-turn token (the model's eos): what the template writes after
        # it (a newline) is never generated, so a teacher's target ends there.
        lead, body, trail = super().completion_parts(prompt, completion)
        eos = self.tokenizer.eos_token
        if eos and eos in trail:
            trail = trail[: trail.index(eos) + len(eos)]
        return lead, body, trail

    def load_image(self, image_path: str, row: int | None = None) -> Any:
        if image_path not in self._images:
            self._images[image_path] = load_image(image_path, self.max_edge)
        return self._images[image_path]

    def vision_inputs(self, image: Any) -> dict[str, torch.Tensor]:
        # Keyed by identity: every image comes from the cache, which outlives this encoder's use.
        key = id(image)
        if key not in self._pixels:
            self._pixels[key] = super().vision_inputs(image)
        return self._pixels[key]


class _LossLog(TrainerCallback):
    """Collects the loss the trainer logs at every step and reports it to ``progress``."""

    def __init__(self, progress: Callable[[int, float], None] | None) -> None:
        self.losses: list[float] = []
        self.progress = progress

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any
    ):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            if self.progress is not None:
                self.progress(state.global_step, self.losses[-1])


@contextlib.contextmanager
def _datasets_bars_off() -> Iterator[None]:
    """No tokenizing bar per teacher (the caller shows progress); restored afterwards."""
    were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if were_on:
            datasets.enable_progress_bars()


#: Micro-batches per optimizer step: a step's examples sorted by length and cut in two, so the short
#: half is not padded to the step's longest (apo_train.data.sampling; the same gradient, 0.89x the time
#: of a step on a teacher's rows, 0.74x on the SFT student's mixed rows: benchmark/perf/bench_train_step.py).
MICRO_BATCHES = 2


def micro_batches(batch_size: int) -> int:
    """How many accumulated micro-batches a step of ``batch_size`` rows is cut into (MICRO_BATCHES
    when it divides the batch, else 1)."""
    return MICRO_BATCHES if batch_size % MICRO_BATCHES == 0 else 1


def teacher_sft_config(model_dir: str | Path, steps: int, batch_size: int, seed: int) -> SFTStageConfig:
    """The SFT stage settings of a teacher: full fine-tuning of the tiny model on CPU for ``steps``
    steps of ``batch_size`` examples (in :data:`MICRO_BATCHES` accumulated micro-batches when it
    divides them), gradients clipped at 1, the loss logged at every step, nothing saved by the
    trainer itself (the optimizer and the example order: :func:`train_teacher`)."""
    micro = micro_batches(batch_size)
    return SFTStageConfig(
        output_dir=str(model_dir),
        model_name_or_path=str(model_dir),
        use_lora=False,  # a 200k-parameter model learns its bias by full fine-tuning
        max_grad_norm=1.0,
        max_steps=steps,
        per_device_train_batch_size=batch_size // micro,
        gradient_accumulation_steps=micro,
        global_batch_size=None,  # one optimizer step per batch of examples
        max_length=_MAX_TOKENS,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        jsonl_log=False,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=seed,
    )


class _BatchStream(torch.utils.data.Sampler[int]):
    """Example indices for ``steps`` full batches: shuffled passes over the examples laid end to end,
    drawn from ``random.Random(seed)``, each batch longest example first (``lengths``: tokens per
    example) so that its accumulation micro-batches pad less. A teacher trains for a number of steps on
    a few dozen examples, so a batch may straddle two passes, where an epoch-based sampler would end
    each pass short."""

    def __init__(self, lengths: Sequence[int], steps: int, batch_size: int, seed: int) -> None:
        self.lengths, self.steps, self.batch_size, self.seed = list(lengths), steps, batch_size, seed
        self.examples = len(self.lengths)

    def __len__(self) -> int:
        return self.steps * self.batch_size

    def __iter__(self) -> Iterator[int]:
        rng = random.Random(self.seed)
        order: list[int] = []
        for _ in range(self.steps):
            while len(order) < self.batch_size:
                more = list(range(self.examples))
                rng.shuffle(more)
                order += more
            batch, order = order[: self.batch_size], order[self.batch_size :]
            yield from sort_by_length(batch, self.lengths)


class _TeacherTrainer(SFTStageTrainer):
    """The SFT stage's trainer drawing its examples from a :class:`_BatchStream`."""

    def __init__(self, *args: Any, sampler: _BatchStream, **kwargs: Any) -> None:
        self._stream = sampler
        super().__init__(*args, **kwargs)

    def _get_train_sampler(self, train_dataset: Any = None) -> _BatchStream:
        return self._stream


def _teacher_optimizer(
    model: torch.nn.Module, lr: float, steps: int, weight_decay: float = 0.0
) -> tuple[Any, Any]:
    """AdamW (the demo: without weight decay), a linear warm-up over the first 5% of the steps (from
    lr/warm-up, so the first step already learns) then cosine decay to zero."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


#: Token budget of a teacher example: far above prompt + image + the longest (verbose) answer, so the
#: SFT stage's truncation never cuts a teacher's target.
_MAX_TOKENS = 8192


def train_teacher(
    model_dir: str | Path,
    examples: Sequence[Example],
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 8e-3,
    seed: int = 0,
    max_edge: int = 112,
    images: dict[str, Any] | None = None,
    progress: Callable[[int, float], None] | None = None,
    weight_decay: float = 0.0,
    freeze_vision: bool = False,
) -> TrainStats:
    """Train the tiny model saved at ``model_dir`` on ``examples`` (targets set) and save it back.

    Training is apo_train's SFT stage (Stage 1 of the student): the examples are tokenized by
    ``tokenize_sft`` with the model's chat template (loss on the answer and its end-of-turn tokens
    only), collated by ``SFTCollator`` and trained by ``SFTStageTrainer`` (:func:`teacher_sft_config`)
    for ``steps`` full batches of shuffled examples, with AdamW at ``lr`` under a short warm-up and a
    cosine decay (AdamW ``weight_decay``, none by default). ``images`` caches decoded images across teachers.
    ``freeze_vision``: train the language model only, the vision tower kept as loaded (a pretrained
    reader's)."""
    if not examples:
        raise InputError(f"{model_dir}: no training examples for the teacher")
    started = time.perf_counter()
    model, processor = load_tiny_vlm(model_dir)
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    encoder = _TeacherEncoder(processor, max_edge, images if images is not None else {})
    rows = datasets.Dataset.from_list(
        [
            {
                "sample_id": ex.sample_id,
                "prompt": ex.prompt,
                "completion": ex.target,
                "image_path": ex.image_path,
            }
            for ex in examples
        ]
    )
    with _datasets_bars_off():
        train, _ = tokenize_sft(rows, encoder, max_length=_MAX_TOKENS, source=Path(model_dir))
    log = _LossLog(progress)
    model.train()
    trainer = _TeacherTrainer(
        model=model,
        args=teacher_sft_config(model_dir, steps, batch_size, seed),
        train_dataset=train,
        data_collator=SFTCollator(encoder),
        callbacks=[log],
        optimizers=_teacher_optimizer(model, lr, steps, weight_decay),
        sampler=_BatchStream(train["length"], steps, batch_size, seed),
    )
    trainer.train()
    model.eval()
    model.save_pretrained(model_dir)
    first, last = (log.losses[0], log.losses[-1]) if log.losses else (float("nan"), float("nan"))
    return TrainStats(trainer.state.global_step, len(examples), first, last, time.perf_counter() - started)


# --------------------------------------------------------------------------------------------
# The whole simulation: a MIMIC-CXR root in, trained teachers and a drift spec out.
# --------------------------------------------------------------------------------------------


@dataclass
class SimulatedTeacher:
    """A trained teacher on disk and what went into it."""

    spec: TeacherSpec
    path: Path
    stats: TrainStats
    applied_rates: dict[str, float]


@dataclass
class Simulation:
    """The result of :func:`simulate`: the teachers and the spec file that documents their drift."""

    teachers: list[SimulatedTeacher]
    spec_path: Path
    seconds: float
    followed: dict[Any, Any] = field(default_factory=dict)  # key -> result of simulate(then=...)'s jobs

    def paths(self) -> dict[str, Path]:
        """Teacher name -> model directory."""
        return {t.spec.name: t.path for t in self.teachers}


@dataclass
class _TeacherJob:
    path: Path
    spec: TeacherSpec
    examples: list[Example]
    corpus: list[str]
    steps: int
    batch_size: int
    lr: float
    seed: int
    index: int
    max_edge: int
    text_only: bool
    base: Path | None = None


#: The first item of a teacher's key in simulate's jobs (the caller's own keys cannot equal it).
_TEACHER = "cxrmax.toy.teachers:teacher"


def _target_chars(job: _TeacherJob) -> int:
    """A teacher's training cost, roughly: the length of all its targets."""
    return sum(len(ex.target) for ex in assign_targets(job.examples, job.spec, job.seed))


def default_workers() -> int:
    """Processes for teacher training: one per core, at most 4."""
    return max(1, min(os.cpu_count() or 1, 4))


def _single_thread() -> None:
    torch.set_num_threads(1)


def _train_job(
    job: _TeacherJob,
    images: dict[str, Any] | None = None,
    progress: Callable[[str, int, float], None] | None = None,
) -> SimulatedTeacher:
    """Build and train one teacher (runs in a worker process or in-process)."""
    spec = job.spec
    if job.base is not None:
        copy_tiny_vlm(job.base, job.path)
    else:
        build_tiny_vlm(job.path, corpus=job.corpus, seed=job.seed + job.index, text_only=job.text_only)
    targets = assign_targets(job.examples, spec, job.seed)
    stats = train_teacher(
        job.path,
        targets,
        steps=job.steps,
        batch_size=job.batch_size,
        lr=job.lr,
        seed=job.seed + job.index,
        max_edge=job.max_edge,
        images=images,
        progress=(lambda s, loss: progress(spec.name, s, loss)) if progress else None,
    )
    applied = {k: sum(k in ex.applied for ex in targets) / len(targets) for k in BIAS_KINDS}
    atomic_write_json(
        job.path / "cxrmax_teacher.json",
        {"name": spec.name, "drift": spec.describe(), "biases": [asdict(b) for b in spec.biases]},
    )
    return SimulatedTeacher(spec, job.path, stats, applied)


def teacher_corpus(examples: Sequence[Example], teachers: Sequence[TeacherSpec], seed: int) -> list[str]:
    """Every prompt and every biased target: the tokenizer of teachers and student is trained on it,
    so that all of them share one vocabulary."""
    texts = [REFUSAL_TEXT] + sorted({ex.prompt for ex in examples})
    for t in teachers:
        texts += [ex.target for ex in assign_targets(examples, t, seed, copies=1)]
    return sorted(set(texts))


def simulate(
    out: str | Path,
    examples: Sequence[Example],
    teachers: Sequence[TeacherSpec] | None = None,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 8e-3,
    seed: int = 0,
    max_edge: int = 112,
    text_only: bool = False,
    progress: Callable[[str, int, float], None] | None = None,
    workers: int | None = None,
    then: Callable[[SimulatedTeacher], Sequence[Job]] | None = None,
    base: str | Path | None = None,
) -> Simulation:
    """Train one tiny teacher per spec on ``examples`` under ``out/<name>/`` and write
    ``out/drift_spec.json`` (each teacher's biases, rates asked and rates actually applied to its
    training targets, training losses). Deterministic for a seed.

    ``workers``: teachers trained at once, each in its own single-threaded process (default: one per
    core, at most 4), the one with the longest targets first; 1 trains them one after the other in
    this process (with per-step progress). ``then(teacher)``: jobs to run on a teacher as soon as it
    is trained (generation, say), in the same processes, started whenever no teacher is waiting
    (teachers have priority 0, so give them 1 or more); their results are ``Simulation.followed``.

    ``base``: a saved tiny model (the shipped base reader, :func:`cxrmax.toy.reader.shipped_reader`)
    every teacher is fine-tuned from, with its tokenizer, as real teachers are pretrained VLMs; by
    default each teacher is built with random weights (seeded by its index) and a tokenizer trained
    on ``examples``' prompts and every teacher's targets."""
    started = time.perf_counter()
    teachers = list(teachers) if teachers is not None else default_teachers()
    names = [t.name for t in teachers]
    if len(set(names)) != len(names):
        raise InputError(f"teacher names must be unique: {names}")
    if not teachers:
        raise InputError("no teachers to simulate")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    corpus = teacher_corpus(examples, teachers, seed) if base is None else []
    jobs = [
        _TeacherJob(
            out / spec.name,
            spec,
            list(examples),
            corpus,
            steps,
            batch_size,
            lr,
            seed,
            index,
            max_edge,
            text_only,
            Path(base) if base is not None else None,
        )
        for index, spec in enumerate(teachers)
    ]
    workers = max(1, min(workers if workers is not None else default_workers(), len(jobs)))
    result: list[SimulatedTeacher] = []
    followed: dict[Any, Any] = {}
    if workers == 1:
        images: dict[str, Any] = {}
        for job in jobs:
            result.append(_train_job(job, images, progress))
            if then is not None:
                followed |= run_jobs(then(result[-1]))
    else:
        # One single-threaded process per teacher at a time: tiny models gain little from intra-op
        # threads, while whole teachers train independently (2 cores -> about 2x). The teacher with
        # the longest targets (the slowest) starts first: started last, it trained alone at the end.
        def follow(key: Any, done: Any) -> Sequence[Job]:
            if not (isinstance(key, tuple) and key[:1] == (_TEACHER,)):
                return []
            if progress is not None:
                progress(done.spec.name, done.stats.steps, done.stats.last_loss)
            return then(done) if then is not None else []

        teacher_jobs = [
            Job(_train_job, job, (_TEACHER, index), priority=0)
            for index, job in sorted(enumerate(jobs), key=lambda item: -_target_chars(item[1]))
        ]
        finished = run_jobs(teacher_jobs, follow, workers, initializer=_single_thread)
        result = [finished.pop((_TEACHER, index)) for index in range(len(jobs))]
        followed = finished
    spec_path = out / "drift_spec.json"
    atomic_write_json(
        spec_path,
        {
            "note": "Toy-scale simulation: tiny models trained on CPU with injected, known biases.",
            "seed": seed,
            "steps": steps,
            "examples": len(examples),
            "teachers": [
                {
                    "name": t.spec.name,
                    "path": str(t.path),
                    "drift": t.spec.describe(),
                    "biases": [asdict(b) for b in t.spec.biases],
                    "applied_rates": t.applied_rates,
                    "train": json_ready(asdict(t.stats)),  # a diverged loss is NaN: null
                }
                for t in result
            ],
        },
    )
    return Simulation(result, spec_path, time.perf_counter() - started, followed)


def json_ready(value: Any) -> Any:
    """``value`` with every NaN or infinite float replaced by None, so it can be written as strict
    JSON (``cxrmax.core.io.atomic_write_json``); a rate with nothing to count is NaN in memory."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value
