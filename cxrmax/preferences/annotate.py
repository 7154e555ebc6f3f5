"""One chunk of samples, annotated in a worker process: label, compare, vote, compose, rank.

`annotate_chunk` takes trajectories sorted by (sample_id, model, sample_index) and holding whole
samples, and returns five record batches (preferences, SFT rows, per-trajectory and per-sample
drift annotations, and the model consensus's contexts). It is pure: it writes nothing. Every batch
is built by column name against its schema (`record_batch`), so two columns of one type cannot be
swapped silently.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrmax.core import schemas
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.preferences import consensus as C
from cxrmax.preferences import drift as D
from cxrmax.preferences.labels import LabelArrays, label_trajectories, relabel

#: The columns of `ChunkResult.contexts` (what --consensus model reads, per preference row).
CONTEXT_SCHEMA = pa.schema(
    [pa.field("sources", pa.list_(pa.string())), pa.field("consensus_sides", pa.list_(pa.int8()))]
)


@dataclass
class ChunkOptions:
    """The ranking and annotation options a worker needs (picklable)."""

    drop_non_drifting: bool = False
    max_negatives: int | None = None
    exclude_refusals_from_sft: bool = False
    step_bins: int = D.DEFAULT_STEP_BINS
    delta: int = 1
    consensus: str = "vote"
    #: "composed": the vote's composed answer (supported source steps in the prompt's style);
    #: "selected": the source answer closest to the consensus (see `_select_positive`)
    positive: str = "composed"


@dataclass
class ChunkResult:
    """Record batches produced from one chunk, plus counters."""

    preferences: pa.RecordBatch
    sft: pa.RecordBatch
    trajectories: pa.RecordBatch
    samples: pa.RecordBatch
    counts: Counter
    contexts: pa.RecordBatch | None = None  # --consensus model: what the model reads, per preference row
    #: the first few texts the labeler failed on: (source_file, source_row, model, error), so that the
    #: summary can name the row behind a "labeler errors" count
    labeler_errors: list[tuple[int, int, str, str]] = field(default_factory=list)


def record_batch(columns: Mapping[str, pa.Array], schema: pa.Schema) -> pa.RecordBatch:
    """A record batch of `schema` from arrays given by column name (in schema order).

    Raises ValueError when the names are not exactly the schema's: building by position would let
    two columns of one type trade places without any error."""
    missing = [name for name in schema.names if name not in columns]
    extra = [name for name in columns if name not in schema.names]
    if missing or extra:
        raise ValueError(
            f"record batch columns differ from the schema: missing {missing}, unexpected {extra}"
        )
    return pa.RecordBatch.from_arrays([columns[name] for name in schema.names], schema=schema)


# --------------------------------------------------------------------------------------------
# Arrow helpers
# --------------------------------------------------------------------------------------------


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


def _col(chunk: pa.Table, name: str) -> pa.Array:
    return chunk.column(name).combine_chunks()


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


def _same_text(a: str | None, b: str | None) -> bool:
    """Equal up to whitespace (a composed positive re-flows a source's lines)."""
    return " ".join((a or "").split()) == " ".join((b or "").split())


# --------------------------------------------------------------------------------------------
# The steps of one chunk
# --------------------------------------------------------------------------------------------


@dataclass
class _Sources:
    """The chunk's trajectories as the steps below need them: texts, labels, sample groups."""

    texts: list[str | None]
    lab: LabelArrays
    failed: np.ndarray  # (n,) bool: the labeler raised on the text
    truncated: np.ndarray  # (n,) bool: cut at max_tokens
    names: list[str]  # "model" or "model#k" for sample_index k > 0
    offsets: np.ndarray  # (G + 1,) row offsets of the samples
    group_of: np.ndarray  # (n,) sample of each row

    @property
    def n_samples(self) -> int:
        return len(self.offsets) - 1

    @property
    def first(self) -> np.ndarray:
        """(G,) the first row of each sample."""
        return self.offsets[:-1]

    def rows(self, g: int) -> range:
        return range(int(self.offsets[g]), int(self.offsets[g + 1]))


def _read_sources(chunk: pa.Table, label_text: Callable | None) -> _Sources:
    """Label the chunk's texts and find its samples (runs of one sample_id)."""
    n = chunk.num_rows
    texts = chunk.column("text").to_pylist()
    lab = label_trajectories(texts, label_text)
    sample_ids = chunk.column("sample_id").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, sample_ids[1:] != sample_ids[:-1]])
    offsets = np.r_[starts, n].astype(np.int64)
    models = chunk.column("model").to_pylist()
    sample_index = chunk.column("sample_index").to_numpy(zero_copy_only=False)
    return _Sources(
        texts=texts,
        lab=lab,
        failed=np.array([e is not None for e in lab.errors], dtype=bool),
        truncated=chunk.column("truncated").to_numpy(zero_copy_only=False).astype(bool),
        names=[m if int(k) == 0 else f"{m}#{int(k)}" for m, k in zip(models, sample_index, strict=True)],
        offsets=offsets,
        group_of=np.repeat(np.arange(len(starts)), np.diff(offsets)),
    )


def _ground_truth(chunk: pa.Table, src: _Sources) -> tuple[D.Agreement, np.ndarray]:
    """Each trajectory against the ground truth, and (n,) whether that ground truth is known.

    The label CSVs carry no side: where the report is known, its sides (read by the labeler) are
    the ground-truth sides; one read per sample."""
    gt_states, gt_known = _gt_states(chunk.column("labels"))
    reports = chunk.column("report").to_pylist()
    report_of_sample = [reports[int(i)] for i in src.first]
    gt_sides = np.zeros_like(gt_states)
    has_report = np.array([bool(r) for r in report_of_sample], dtype=bool)
    if has_report.any():
        _, sample_sides = relabel([r for r in report_of_sample if r])
        per_sample = np.zeros((src.n_samples, D.N_OBS), dtype=np.int8)
        per_sample[has_report] = sample_sides
        gt_sides = per_sample[src.group_of]
    return D.compare(src.lab.states, src.lab.sides, gt_states, gt_sides), gt_known


def _report_similarity(chunk: pa.Table, texts: list[str | None]) -> np.ndarray:
    """(n,) token similarity of each text with its report (NaN where either is missing)."""
    reports = chunk.column("report").to_pylist()
    return np.array(
        [
            np.nan if not r else (D.token_similarity(t, r) if t else np.nan)
            for t, r in zip(texts, reports, strict=True)
        ],
        dtype=np.float64,
    )


@dataclass
class _Votes:
    """The vote consensus of each sample and what it says about each source."""

    cons: C.Vote
    vs_cons: D.Agreement  # each trajectory against its sample's consensus
    drift: np.ndarray  # (n,) drift score from the consensus
    votes: np.ndarray  # (G, 14, 4) vote counts per state
    entropy: np.ndarray  # (G, 14) float32
    disagreement: np.ndarray  # (G, K, K) float32 pairwise
    laterality_conflicts: np.ndarray  # (G, 14) bool
    stepwise: D.StepwiseDrift


def _vote(src: _Sources, options: ChunkOptions) -> _Votes:
    """Vote per sample (labeler failures take part as non-voters, like refusals) and the per-sample
    annotations: vote entropy, pairwise disagreement, laterality conflicts, step-wise drift."""
    lab, offsets = src.lab, src.offsets
    states_p, valid = D.pad_groups(lab.states, offsets)
    sides_p, _ = D.pad_groups(lab.sides, offsets)
    refusal_p, _ = D.pad_groups(lab.refusal | src.failed, offsets)
    cons = C.vote(states_p, sides_p, valid, refusal_p)
    cons_states_t = cons.states[src.group_of]
    cons_sides_t = cons.sides[src.group_of]
    votes = D.vote_counts(states_p, valid)
    cumulative = D.cumulative_step_states(lab.step_states, lab.step_offsets, options.step_bins)
    cumulative_p, _ = D.pad_groups(cumulative, offsets)
    return _Votes(
        cons=cons,
        vs_cons=D.compare(lab.states, lab.sides, cons_states_t, cons_sides_t),
        drift=D.drift_from_consensus(
            lab.states, lab.sides, lab.refusal | src.failed, cons_states_t, cons_sides_t
        ),
        votes=votes,
        entropy=D.entropy(votes).astype(np.float32),
        disagreement=D.pairwise_disagreement(states_p, valid, sides_p).astype(np.float32),
        laterality_conflicts=D.laterality_conflicts(states_p, sides_p, valid),
        stepwise=D.stepwise_drift(cumulative_p, valid, options.delta),
    )


def _supported_steps(src: _Sources, cons: C.Vote) -> np.ndarray:
    """(steps,) bool: the steps that may go into the positive (they support the consensus and lie
    outside refusal and hedging spans)."""
    lab = src.lab
    step_group = np.repeat(src.group_of, np.diff(lab.step_offsets))
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
    cut = src.truncated & (np.diff(lab.step_offsets) > 0)
    supported[lab.step_offsets[1:][cut] - 1] = False
    return supported


@dataclass
class _Ranking:
    """The composed positive and the ranked negatives of each sample."""

    chosen: list[str | None]  # (G,) positive texts (None: no source answer may be the positive)
    chosen_source: list[str]  # (G,) consensus-vote | consensus-model | selected:<model>
    negatives: list[np.ndarray]  # per sample: negative rows, most drifting first
    negative_rank: np.ndarray  # (n,) int32: rank among its sample's negatives, -1 if none


def _compose_and_rank(
    chunk: pa.Table, src: _Sources, votes: _Votes, options: ChunkOptions, counts: Counter
) -> _Ranking:
    """Compose each positive from the supported steps of the least drifting sources first, and rank
    the negatives most drifting first (ties keep the stable (sample_id, model, sample_index) order)."""
    lab, drift, cons = src.lab, votes.drift, votes.cons
    if options.positive != "selected":  # the step checks only serve a composed positive
        supported = _supported_steps(src, cons)
        bits = C.observation_bits(lab.step_states) if len(lab.step_states) else np.zeros(0, dtype=np.int64)
        prompts = chunk.column("prompt").to_pylist()
    ranking = _Ranking([], [], [], np.full(chunk.num_rows, -1, dtype=np.int32))
    for g in range(src.n_samples):
        lo, hi = int(src.offsets[g]), int(src.offsets[g + 1])
        rows = np.arange(lo, hi)
        descending = rows[np.lexsort((rows, -drift[lo:hi]))]
        if options.positive == "selected":
            best = _select_positive(src, drift, rows)
            ranking.chosen.append(None if best is None else src.texts[best])
            ranking.chosen_source.append("" if best is None else f"selected:{src.names[best]}")
            if best is None:
                counts["samples_without_selectable_positive"] += 1
                ranking.negatives.append(descending[:0])
                continue
            # A source as close to the consensus as the positive is not worse than it: no negative.
            tied = drift[descending] <= drift[best]
            counts["negatives_tied_with_selected_positive"] += int(tied.sum()) - 1
            descending = descending[~tied]
        else:
            ascending = rows[np.lexsort((rows, drift[lo:hi]))]
            candidates = []
            for t in ascending:
                if lab.refusal[t] or src.failed[t]:
                    continue
                s0, s1 = int(lab.step_offsets[t]), int(lab.step_offsets[t + 1])
                candidates.append(
                    [
                        C.CandidateStep(lab.step_texts[s], bool(supported[s]), int(bits[s]))
                        for s in range(s0, s1)
                    ]
                )
            text, _ = C.compose(candidates, cons.states[g], cons.sides[g], prompts[lo])
            ranking.chosen.append(text)
            ranking.chosen_source.append(f"consensus-{options.consensus}")
        if options.drop_non_drifting:
            descending = descending[drift[descending] > 0]
        if options.max_negatives is not None:
            descending = descending[: options.max_negatives]
        # A negative equal to the positive (all sources agree and the positive is one of them) would
        # make the same text both preferred and rejected: not a negative.
        chosen = ranking.chosen[-1] or ""
        same = np.array([_same_text(src.texts[t], chosen) for t in descending], dtype=bool)
        if same.any():
            counts["negatives_identical_to_chosen"] += int(same.sum())
            descending = descending[~same]
        ranking.negative_rank[descending] = np.arange(len(descending))
        ranking.negatives.append(descending)
    return ranking


def _select_positive(src: _Sources, drift: np.ndarray, rows: np.ndarray) -> int | None:
    """The row of the sample's source answer that drifts least from the consensus, for
    ``positive="selected"``: never a refusal, an answer the labeler failed on, or one cut at
    max_tokens; among equally close answers the shortest (conciseness is not drift, but padding
    is what a verbose source adds), then the first in (model, sample_index) order. None when no
    answer qualifies."""
    usable = [int(t) for t in rows if not (src.lab.refusal[t] or src.failed[t] or src.truncated[t])]
    if not usable:
        return None
    return min(usable, key=lambda t: (float(drift[t]), len(src.texts[t] or ""), t))


def _flag_positives(chosen: list[str], cons: C.Vote, label_text: Callable | None) -> np.ndarray:
    """(G,) bool: the re-labelled positive disagrees with the consensus it states. Where every
    source refused there is no consensus to state (and no preference row): not flagged."""
    if label_text is None:
        rel_states, rel_sides = relabel(chosen)
    else:
        rel = label_trajectories(chosen, label_text)
        rel_states, rel_sides = rel.states, rel.sides
    return C.disagrees(rel_states, rel_sides, cons) & (cons.voters > 0)


def _kept_samples(ranking: _Ranking, cons: C.Vote, counts: Counter) -> np.ndarray:
    """Samples that get a preference row: at least one negative and a consensus to prefer."""
    keep = np.array(
        [
            len(neg) > 0 and text is not None
            for neg, text in zip(ranking.negatives, ranking.chosen, strict=True)
        ],
        dtype=bool,
    )
    counts["samples_without_negatives"] += int((~keep).sum())
    # Every source refused (or failed to label): there is no consensus to prefer.
    no_voters = cons.voters == 0
    counts["samples_without_consensus"] += int((keep & no_voters).sum())
    return np.flatnonzero(keep & ~no_voters)


# --------------------------------------------------------------------------------------------
# The record batches
# --------------------------------------------------------------------------------------------


def _preference_batch(
    chunk: pa.Table,
    src: _Sources,
    votes: _Votes,
    ranking: _Ranking,
    flagged: np.ndarray,
    kept: np.ndarray,
    options: ChunkOptions,
) -> pa.RecordBatch:
    """PREFERENCE_SCHEMA rows of the kept samples: the positive and its negatives, most drifting first."""
    neg_offsets = pa.array(np.r_[0, np.cumsum([len(ranking.negatives[g]) for g in kept])].astype(np.int32))
    neg_rows = pa.array(
        np.concatenate([ranking.negatives[g] for g in kept]) if len(kept) else np.zeros(0, dtype=np.int64),
        type=pa.int64(),
    )
    take = pa.array(src.first[kept])
    columns = {
        name: _col(chunk, name).take(take)
        for name in (
            "sample_id",
            "dicom_id",
            "subject_id",
            "study_id",
            "split",
            "image_path",
            "prompt_id",
            "prompt",
        )
    }
    columns.update(
        {
            "chosen": pa.array([ranking.chosen[g] for g in kept], type=pa.string()),
            "chosen_source": pa.array([ranking.chosen_source[g] for g in kept], type=pa.string()),
            "rejected": pa.ListArray.from_arrays(neg_offsets, _col(chunk, "text").take(neg_rows)),
            "rejected_models": pa.ListArray.from_arrays(
                neg_offsets, pa.array(src.names, type=pa.string()).take(neg_rows)
            ),
            "rejected_drift": pa.ListArray.from_arrays(neg_offsets, _float(votes.drift[neg_rows.to_numpy()])),
            "consensus_labels": _labels_struct(votes.cons.states[kept]),
            "labels": _col(chunk, "labels").take(take),
            "drift_score": _float(votes.stepwise.score[kept]),
            "consensus_flagged": pa.array(flagged[kept], type=pa.bool_()),
        }
    )
    return record_batch(columns, schemas.PREFERENCE_SCHEMA)


def _sft_batch(chunk: pa.Table, src: _Sources, options: ChunkOptions, counts: Counter) -> pa.RecordBatch:
    """SFT_SCHEMA rows: every labelled trajectory, except answers cut at max_tokens (and refusals
    with ``exclude_refusals_from_sft``)."""
    keep = ~src.failed
    # An answer cut at max_tokens would teach the student to stop mid-sentence: never an SFT target
    # (it stays a negative: a real, drifting source output).
    counts["sft_truncated_excluded"] += int((keep & src.truncated).sum())
    keep &= ~src.truncated
    if options.exclude_refusals_from_sft:
        counts["sft_refusals_excluded"] += int((keep & src.lab.refusal).sum())
        keep &= ~src.lab.refusal
    rows = pa.array(np.flatnonzero(keep))
    columns = {
        name: _col(chunk, name).take(rows)
        for name in ("sample_id", "split", "image_path", "prompt_id", "prompt")
    }
    columns["completion"] = _col(chunk, "text").take(rows)
    columns["model"] = pa.array(src.names, type=pa.string()).take(rows)
    return record_batch(columns, schemas.SFT_SCHEMA)


_SCORES = ("precision", "recall", "f1", "side_agreement")
_MASKS = ("hallucinated", "omitted", "side_errors")


def _agreement_columns(agreement: D.Agreement, prefix: str, known: np.ndarray | None = None) -> dict:
    """The score and observation-list columns of DRIFT_TRAJECTORY_SCHEMA against one reference
    (``gt_`` or ``cons_``); rows whose reference is unknown (`known` False) get NaN and empty lists."""
    if known is None:
        known = np.ones(len(agreement.precision), dtype=bool)
    nan = np.float32(np.nan)
    columns = {f"{prefix}{name}": _float(np.where(known, getattr(agreement, name), nan)) for name in _SCORES}
    columns.update(
        {f"{prefix}{name}": _obs_lists(getattr(agreement, name) & known[:, None]) for name in _MASKS}
    )
    return columns


def _trajectory_batch(
    chunk: pa.Table,
    src: _Sources,
    votes: _Votes,
    ranking: _Ranking,
    ground_truth: tuple[D.Agreement, np.ndarray],
) -> pa.RecordBatch:
    """DRIFT_TRAJECTORY_SCHEMA rows: one per trajectory of the chunk."""
    lab = src.lab
    gt, gt_known = ground_truth
    rank = ranking.negative_rank
    columns = {name: _col(chunk, name) for name in ("sample_id", "model", "sample_index", "split")}
    columns.update(
        {
            "n_chars": pa.array(pc.utf8_length(_col(chunk, "text")).cast(pa.int32())),
            "n_steps": pa.array(np.diff(lab.step_offsets).astype(np.int32)),
            "refusal": pa.array(lab.refusal),
            "hedging": pa.array(lab.hedging),
            "labeler_error": pa.array(lab.errors, type=pa.string()),
            "labels": _labels_struct(lab.states),
            "laterality": _sides_struct(lab.sides),
            # gt_side_*: the sides read from the report, where one is known
            **_agreement_columns(gt, "gt_", gt_known),
            "gt_side_compared": pa.array(np.where(gt_known, gt.side_compared, 0).astype(np.int32)),
            **_agreement_columns(votes.vs_cons, "cons_"),
            "similarity": _float(_report_similarity(chunk, src.texts)),
            "drift": _float(votes.drift),
            "negative_rank": pa.array(np.where(rank >= 0, rank, None).tolist(), type=pa.int32()),
            "truncated": pa.array(src.truncated, type=pa.bool_()),
        }
    )
    return record_batch(columns, schemas.DRIFT_TRAJECTORY_SCHEMA)


def _sample_batch(
    chunk: pa.Table, src: _Sources, votes: _Votes, ranking: _Ranking, flagged: np.ndarray
) -> pa.RecordBatch:
    """DRIFT_SAMPLE_SCHEMA rows: one per sample of the chunk."""
    sizes = np.diff(src.offsets)
    first = pa.array(src.first)
    counts_of = {
        state: votes.votes[..., code].tolist()
        for state, code in (
            ("positive", D.POSITIVE),
            ("uncertain", D.UNCERTAIN),
            ("negative", D.NEGATIVE),
            ("absent", D.ABSENT),
        )
    }
    columns = {
        "sample_id": _col(chunk, "sample_id").take(first),
        "split": _col(chunk, "split").take(first),
        "models": pa.array(
            [src.names[r.start : r.stop] for r in map(src.rows, range(src.n_samples))],
            type=pa.list_(pa.string()),
        ),
        "n_sources": pa.array(sizes.astype(np.int32)),
        "refusals": pa.array(
            [[src.names[t] for t in src.rows(g) if src.lab.refusal[t]] for g in range(src.n_samples)],
            type=pa.list_(pa.string()),
        ),
        **{
            f"vote_{state}": pa.array(values, type=pa.list_(pa.int16()))
            for state, values in counts_of.items()
        },
        "vote_entropy": pa.array(votes.entropy.tolist(), type=pa.list_(pa.float32())),
        "disagreement": pa.array(
            [votes.disagreement[g, : sizes[g], : sizes[g]].tolist() for g in range(src.n_samples)],
            type=pa.list_(pa.list_(pa.float32())),
        ),
        "laterality_conflicts": _obs_lists(votes.laterality_conflicts),
        "drift_profile": pa.array(votes.stepwise.profile.tolist(), type=pa.list_(pa.float32())),
        "dispersion_profile": pa.array(votes.stepwise.dispersion.tolist(), type=pa.list_(pa.float32())),
        "drift_score": _float(votes.stepwise.score),
        "consensus_labels": _labels_struct(votes.cons.states),
        "consensus_laterality": _sides_struct(votes.cons.sides),
        "consensus_side_conflicts": _obs_lists(votes.cons.side_conflict),
        "consensus_flagged": pa.array(flagged),
        "n_negatives": pa.array([len(neg) for neg in ranking.negatives], type=pa.int32()),
    }
    return record_batch(columns, schemas.DRIFT_SAMPLE_SCHEMA)


def _contexts_batch(src: _Sources, cons: C.Vote, kept: np.ndarray) -> pa.RecordBatch:
    """CONTEXT_SCHEMA rows aligned with the preference rows: the usable source texts and the vote's sides."""
    usable = ~(src.lab.refusal | src.failed)
    columns = {
        "sources": pa.array(
            [[src.texts[t] for t in src.rows(g) if usable[t]] for g in kept], type=pa.list_(pa.string())
        ),
        "consensus_sides": pa.array(cons.sides[kept].tolist(), type=pa.list_(pa.int8())),
    }
    return record_batch(columns, CONTEXT_SCHEMA)


def annotate_chunk(chunk: pa.Table, options: ChunkOptions, label_text: Callable | None = None) -> ChunkResult:
    """Annotate, vote, compose and rank one chunk of trajectories sorted by (sample_id, model,
    sample_index) and holding whole samples. Pure: returns record batches, writes nothing."""
    counts: Counter = Counter()
    src = _read_sources(chunk, label_text)
    counts["labeler_errors"] += int(src.failed.sum())
    ground_truth = _ground_truth(chunk, src)
    votes = _vote(src, options)
    ranking = _compose_and_rank(chunk, src, votes, options, counts)
    # Re-label every composed positive and flag disagreement with the consensus it states.
    flagged = _flag_positives([text or "" for text in ranking.chosen], votes.cons, label_text)
    counts["consensus_flagged"] += int(flagged.sum())
    kept = _kept_samples(ranking, votes.cons, counts)
    preferences = _preference_batch(chunk, src, votes, ranking, flagged, kept, options)
    sft = _sft_batch(chunk, src, options, counts)
    trajectories = _trajectory_batch(chunk, src, votes, ranking, ground_truth)
    samples = _sample_batch(chunk, src, votes, ranking, flagged)
    counts["samples"] += src.n_samples
    counts["trajectories"] += chunk.num_rows
    counts["refusals"] += int(src.lab.refusal.sum())
    counts["preference_rows"] += len(kept)
    counts["negatives"] += sum(len(ranking.negatives[g]) for g in kept)
    counts["sft_rows"] += sft.num_rows
    contexts = _contexts_batch(src, votes.cons, kept) if options.consensus == "model" else None
    return ChunkResult(preferences, sft, trajectories, samples, counts, contexts, _labeler_errors(chunk, src))


#: Labeler failures named per chunk (the count covers all of them).
LABELER_ERROR_EXAMPLES = 5


def _labeler_errors(chunk: pa.Table, src: _Sources) -> list[tuple[int | None, int | None, str, str]]:
    failed = np.flatnonzero(src.failed)[:LABELER_ERROR_EXAMPLES].tolist()
    if not failed:
        return []

    def column(name: str) -> list:
        # A chunk made outside load_trajectories may lack the provenance columns.
        values = chunk.column(name) if name in chunk.column_names else pa.nulls(chunk.num_rows)
        return [values[i].as_py() for i in failed]

    return list(
        zip(
            column("source_file"),
            column("source_row"),
            column("model"),
            [str(src.lab.errors[i]) for i in failed],
            strict=True,
        )
    )
