"""`cxrmax inspect`: one sample of a build-preferences output, whole.

`inspect_sample(out, sample_id)` gathers what the build knows of one sample into a `SampleView`:
the film (its path, resolved under the MIMIC-CXR root the build read), each source's answer with
its drift marked, the consensus positive, the ranked negatives with their drift, the ground truth
and the reference report. Nothing is recomputed that the build decided: which observations a
source hallucinated, contradicted, omitted or put on the wrong side comes from the drift
annotations (OUT/annotations); only the character spans that show them are found again, by
labelling the answer with `cxrmax.labeler.label_text` (the labeler gives its evidence per
observation). `cxrmax.preferences.inspect_html` renders a view as a self-contained page; the CLI
renders it in the terminal.

The kinds of marks, against the sample's consensus (drift.compare's definitions, split finer):

* hallucinated: the source claims (positive or uncertain) an observation the consensus does not
  mention;
* contradicted: the source and the consensus mention the observation in opposite states (one
  claims it, the other negates it);
* side-swapped: both claim it, on different specific sides (a laterality error vs the consensus);
* refusal: a refusal to interpret ("As an AI, I cannot ..."), which drifts maximally.

Observations the consensus claims and the source never mentions are *omitted*: listed, with no
span to mark.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from cxrmax.core.errors import InputError, where
from cxrmax.core.io import iter_arrow_batches, read_arrow
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.labeler import LabeledText, label_text
from cxrmax.mimic.images import encode_jpeg, preprocess, to_data_url
from cxrmax.mimic.reader import MimicCXR
from cxrmax.preferences.layout import annotations_path

#: The kinds of marked spans, in the order a legend lists them.
MARK_KINDS = ("hallucinated", "contradicted", "side-swapped", "refusal")

#: How many valid sample ids an error for an unknown one lists.
_EXAMPLE_IDS = 5
#: The longest edge of the film embedded in the HTML page (pixels): enough to read it, small page.
FILM_MAX_EDGE = 1024


@dataclass(frozen=True)
class Mark:
    """One span [start, end) of an answer to highlight, and why."""

    start: int
    end: int
    kind: str  # one of MARK_KINDS
    observation: str | None  # None for a refusal


@dataclass
class SourceAnswer:
    """One source trajectory of the sample and its drift from the consensus."""

    name: str  # the model, "model#k" for its k-th answer (sample_index k > 0)
    text: str | None  # None when the outputs do not keep it (neither a negative nor an SFT row)
    drift: float | None  # drift from the consensus, [0, 1]
    negative_rank: int | None  # 0 = the most drifting negative; None = not a negative
    refusal: bool
    truncated: bool  # cut at max_tokens (a negative only, never SFT)
    labels: dict[str, float | None]  # the labeler's reading (1 / 0 / -1 / None per observation)
    hallucinated: list[str] = field(default_factory=list)
    contradicted: list[str] = field(default_factory=list)
    side_swapped: list[str] = field(default_factory=list)
    omitted: list[str] = field(default_factory=list)
    marks: list[Mark] = field(default_factory=list)

    def segments(self) -> list[tuple[str, tuple[Mark, ...]]]:
        """The text cut at every mark boundary: (piece, the marks covering it), in order."""
        return segments(self.text or "", self.marks)


@dataclass
class Film:
    """The image of the sample."""

    path: str | None  # as stored in the outputs (relative to the MIMIC-CXR root, usually)
    resolved: str | None  # the file found on disk, None when not found
    problem: str | None = None  # why there is no image to show

    def data_url(self, max_edge: int = FILM_MAX_EDGE) -> str | None:
        """The film as a ``data:image/jpeg;base64,...`` URL (grayscale, at most `max_edge` pixels
        on its longest edge; DICOM decoded), or None when there is no readable file."""
        if self.resolved is None:
            return None
        try:
            return to_data_url(encode_jpeg(preprocess(self.resolved, max_edge=max_edge)))
        except InputError as exc:
            self.problem = str(exc)
            return None


@dataclass
class Negative:
    """One ranked negative of the preference row."""

    rank: int
    name: str
    drift: float | None


@dataclass
class SampleView:
    """Everything `cxrmax inspect` shows of one sample."""

    out: str
    sample_id: str
    split: str | None
    subject_id: int | None
    study_id: int | None
    prompt: str | None
    film: Film
    sources: list[SourceAnswer]
    consensus: str | None  # the positive (None when the sample has no preference row)
    consensus_source: str | None  # consensus-vote | consensus-model
    consensus_flagged: bool
    consensus_labels: dict[str, float | None]
    consensus_laterality: dict[str, str | None]
    negatives: list[Negative]
    drift_score: float | None  # the sample's step-wise drift score
    laterality_conflicts: list[str]
    ground_truth: dict[str, float | None]
    report: str | None
    report_note: str | None  # why there is no report
    no_preference_reason: str | None = None  # why the sample has no preference row


def segments(text: str, marks: list[Mark]) -> list[tuple[str, tuple[Mark, ...]]]:
    """`text` cut at every boundary of `marks` (overlaps allowed): (piece, covering marks)."""
    cuts = sorted({0, len(text), *(m.start for m in marks), *(m.end for m in marks)})
    cuts = [c for c in cuts if 0 <= c <= len(text)]
    out = []
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        covering = tuple(m for m in marks if m.start <= lo and hi <= m.end)
        out.append((text[lo:hi], covering))
    return out


# --------------------------------------------------------------------------------------------
# Reading the outputs
# --------------------------------------------------------------------------------------------


def _rows_of(path: Path, sample_id: str) -> list[dict]:
    """The rows of one sample in an Arrow/Parquet file, batch by batch (memory stays flat)."""
    rows: list[dict] = []
    for batch in iter_arrow_batches(path):
        hit = pc.equal(batch.column(batch.schema.get_field_index("sample_id")), sample_id)
        if pc.any(hit).as_py():
            rows += batch.filter(hit).to_pylist()
    return rows


def _split_files(out: Path, name: str, split: str | None) -> Iterator[Path]:
    """The Arrow files of one split of OUT/<name> (save_to_disk form; every split when unknown)."""
    folder = out / name
    if not (folder / "dataset_dict.json").is_file():
        raise InputError(f"{where(folder)}: not a build-preferences data set; run `cxrmax build-preferences`")
    splits = [split] if split else sorted(p.name for p in folder.iterdir() if p.is_dir())
    for s in splits:
        # The files save_to_disk listed in state.json: a trainer's cache-*.arrow beside them holds
        # other columns.
        try:
            state = json.loads((folder / s / "state.json").read_text(encoding="utf-8"))
            names = [f["filename"] for f in state["_data_files"]]
        except (OSError, ValueError, KeyError, TypeError):
            names = sorted(p.name for p in (folder / s).glob("data-*.arrow"))
        yield from (folder / s / name for name in names)


def _sample_row(out: Path, sample_id: str) -> dict:
    """The sample's row of OUT/annotations/samples.arrow; an unknown id is an InputError listing
    a few valid ones (the closest first)."""
    path = annotations_path(out, "samples")
    if not path.exists():
        raise InputError(f"{where(path)}: missing; run `cxrmax build-preferences` first")
    table = read_arrow(path)
    hit = table.filter(pc.equal(table.column("sample_id"), sample_id))
    if hit.num_rows:
        return hit.slice(0, 1).to_pylist()[0]
    if sample_id in _build_report(out).get("skipped_few_sources_examples", []):
        raise InputError(f"{where(out)}: sample {sample_id!r} was skipped: fewer sources than --min-sources")
    ids = table.column("sample_id").to_pylist()
    close = difflib.get_close_matches(sample_id, ids, n=_EXAMPLE_IDS, cutoff=0.6)
    examples = close + [i for i in ids if i not in close][: _EXAMPLE_IDS - len(close)]
    raise InputError(
        f"{where(out)}: no sample {sample_id!r} among its {len(ids)} samples"
        + (f"; e.g. {', '.join(examples)}" if examples else " (the build kept none)")
    )


def _build_report(out: Path) -> dict:
    """OUT/build_report.json ({} when missing or unreadable: it only adds hints here)."""
    try:
        report = json.loads((out / "build_report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _image_root(out: Path, image_root: str | os.PathLike | None) -> Path | None:
    """`image_root`, else the --mimic-root recorded in OUT/build_report.json."""
    if image_root is not None:
        return Path(image_root)
    recorded = _build_report(out).get("mimic_root")
    return Path(recorded) if recorded else None


def _film(path: str | None, root: Path | None, out: Path) -> Film:
    if path is None:
        return Film(None, None, "the sample has no image_path")
    candidates = [Path(path)] if os.path.isabs(path) else [p / path for p in (root, out) if p is not None]
    for candidate in candidates:
        if candidate.is_file():
            return Film(path, str(candidate))
    where_looked = ", ".join(str(c) for c in candidates) or path
    hint = "" if root is not None else " (pass --mimic-root)"
    return Film(path, None, f"no file at {where_looked}{hint}")


def _report(root: Path | None, subject_id: int | None, study_id: int | None) -> tuple[str | None, str | None]:
    """(the reference report: impression > findings > last paragraph, or why there is none)."""
    if root is None:
        return None, "no MIMIC-CXR root (the build had no --mimic-root; pass --mimic-root)"
    if subject_id is None or study_id is None:
        return None, "the sample has no subject/study id"
    try:
        sections = MimicCXR(root).report(subject_id, study_id)
    except InputError as exc:
        return None, str(exc)
    if sections is None or not sections.best():
        return None, f"no report for study {study_id} under {root}"
    return sections.best(), None


# --------------------------------------------------------------------------------------------
# Drift marks
# --------------------------------------------------------------------------------------------


def _kinds_of(trajectory: dict, consensus: dict[str, float | None]) -> dict[str, list[str]]:
    """Which observations the source hallucinated, contradicted, put on the wrong side or omitted,
    from its drift annotation (cons_hallucinated / cons_omitted / cons_side_errors)."""
    own = trajectory.get("labels") or {}
    hallucinated, contradicted, omitted = [], [], []
    for name in trajectory.get("cons_hallucinated") or []:
        (contradicted if consensus.get(name) == 0.0 else hallucinated).append(name)
    for name in trajectory.get("cons_omitted") or []:
        (contradicted if own.get(name) == 0.0 else omitted).append(name)
    order = {name: i for i, name in enumerate(OBSERVATIONS)}
    return {
        "hallucinated": hallucinated,
        "contradicted": sorted(contradicted, key=order.__getitem__),
        "side-swapped": list(trajectory.get("cons_side_errors") or []),
        "omitted": omitted,
    }


def _marks(labelled: LabeledText, kinds: dict[str, list[str]], sides: dict[str, str | None]) -> list[Mark]:
    """The spans of the labeler's evidence for each marked observation, and the refusal spans."""
    marks = []
    for kind in ("hallucinated", "contradicted", "side-swapped"):
        for name in kinds[kind]:
            evidence = labelled.observations[name].evidence if name in labelled.observations else []
            if kind == "side-swapped":
                # the mentions naming the source's own side are the swapped ones
                own = [e for e in evidence if e.laterality and e.laterality == sides.get(name)]
                evidence = own or evidence
            marks += [Mark(e.start, e.end, kind, name) for e in evidence]
    marks += [Mark(s.start, s.end, "refusal", None) for s in labelled.refusal]
    return sorted(marks, key=lambda m: (m.start, m.end))


def _source(name: str, text: str | None, trajectory: dict, consensus: dict, rank: int | None) -> SourceAnswer:
    kinds = _kinds_of(trajectory, consensus)
    answer = SourceAnswer(
        name=name,
        text=text,
        drift=trajectory.get("drift"),
        negative_rank=rank,
        refusal=bool(trajectory.get("refusal")),
        truncated=bool(trajectory.get("truncated")),
        labels=dict(trajectory.get("labels") or {}),
        hallucinated=kinds["hallucinated"],
        contradicted=kinds["contradicted"],
        side_swapped=kinds["side-swapped"],
        omitted=kinds["omitted"],
    )
    if text:
        labelled = label_text(text)
        # Spans index the labelled text; it is the answer itself unless the labeler refused it.
        if labelled.text == text:
            answer.marks = _marks(labelled, kinds, dict(trajectory.get("laterality") or {}))
    return answer


def _name(trajectory: dict) -> str:
    index = trajectory.get("sample_index") or 0
    return trajectory["model"] if index == 0 else f"{trajectory['model']}#{index}"


def _no_preference_reason(sample: dict) -> str:
    if sample.get("refusals") and len(sample["refusals"]) >= (sample.get("n_sources") or 0):
        return "every source refused: no consensus to prefer"
    return "no negative left after filtering (e.g. --drop-non-drifting, or all sources agree)"


# --------------------------------------------------------------------------------------------
# The view
# --------------------------------------------------------------------------------------------


def _texts_and_negatives(preference: dict | None, sft: list[dict]) -> tuple[dict[str, str], list[Negative]]:
    """Each source's answer by name (the outputs keep it as a negative or as an SFT completion)
    and the ranked negatives of the preference row."""
    texts = {row["model"]: row["completion"] for row in sft}
    negatives: list[Negative] = []
    if preference is not None:
        ranked = zip(
            preference["rejected_models"], preference["rejected"], preference["rejected_drift"], strict=True
        )
        for rank, (name, text, drift) in enumerate(ranked):
            texts[name] = text
            negatives.append(Negative(rank, name, drift))
    return texts, negatives


def inspect_sample(
    out: str | os.PathLike, sample_id: str, image_root: str | os.PathLike | None = None
) -> SampleView:
    """Gather one sample of a build-preferences output (see the module docstring).

    `image_root` is the MIMIC-CXR root for the film and the report (default: the --mimic-root the
    build recorded in OUT/build_report.json). Raises InputError when OUT is not a build output or
    has no such sample (the message lists a few valid ids)."""
    out = Path(out)
    sample = _sample_row(out, sample_id)
    split = sample.get("split")
    trajectories = _rows_of(annotations_path(out, "trajectories"), sample_id)
    preference = next(
        (row for path in _split_files(out, "preferences", split) for row in _rows_of(path, sample_id)), None
    )
    sft = [row for path in _split_files(out, "sft", split) for row in _rows_of(path, sample_id)]
    texts, negatives = _texts_and_negatives(preference, sft)
    rank_of = {n.name: n.rank for n in negatives}
    consensus = dict(sample.get("consensus_labels") or {})
    sources = [
        _source(_name(t), texts.get(_name(t)), t, consensus, rank_of.get(_name(t)))
        for t in sorted(trajectories, key=lambda t: (t["model"], t.get("sample_index") or 0))
    ]
    first = preference or (sft[0] if sft else {})
    root = _image_root(out, image_root)
    report, report_note = _report(root, first.get("subject_id"), first.get("study_id"))
    return SampleView(
        out=str(out),
        sample_id=sample_id,
        split=split,
        subject_id=first.get("subject_id"),
        study_id=first.get("study_id"),
        prompt=first.get("prompt"),
        film=_film(first.get("image_path"), root, out),
        sources=sources,
        consensus=preference["chosen"] if preference else None,
        consensus_source=preference["chosen_source"] if preference else None,
        consensus_flagged=bool(sample.get("consensus_flagged")),
        consensus_labels=consensus,
        consensus_laterality=dict(sample.get("consensus_laterality") or {}),
        negatives=negatives,
        drift_score=sample.get("drift_score"),
        laterality_conflicts=list(sample.get("laterality_conflicts") or []),
        ground_truth=dict((preference or {}).get("labels") or {}),
        report=report,
        report_note=report_note,
        no_preference_reason=None if preference else _no_preference_reason(sample),
    )
