"""Drift annotations: how source trajectories differ from the ground truth, from the consensus and
from each other, per trajectory, per sample and along the reasoning steps.

Everything here is a pure function over numpy arrays, so that a chunk of thousands of samples is
annotated with a handful of vectorised operations.

Codings used throughout (also documented in ARCHITECTURE.md, "Preferences and drift"):

* observation **state** (int8, one column per observation in ``OBSERVATIONS`` order):
  0 absent (not mentioned), 1 negative, 2 uncertain, 3 positive. The order is the CheXpert mention
  priority (positive > uncertain > negative > absent), so the state of several mentions is their max.
* **side** (int8): 0 none/unspecified, 1 left, 2 right, 3 bilateral.
* a trajectory **claims** an observation when its state is positive or uncertain (the usual report
  metric convention: uncertain counts as positive, not mentioned as negative).

Samples are handled in a padded layout ``(G samples, K sources, 14 observations)`` with a boolean
``valid`` mask ``(G, K)``; K is the largest number of sources of a sample in the chunk.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np

from cxrmax.core.pathologies import OBSERVATIONS

N_OBS = len(OBSERVATIONS)
ABSENT, NEGATIVE, UNCERTAIN, POSITIVE = 0, 1, 2, 3
N_STATES = 4
STATE_NAMES = ("absent", "negative", "uncertain", "positive")
SIDE_NONE, SIDE_LEFT, SIDE_RIGHT, SIDE_BILATERAL = 0, 1, 2, 3
SIDE_NAMES = (None, "left", "right", "bilateral")

_STATUS_TO_STATE = {"absent": ABSENT, "negative": NEGATIVE, "uncertain": UNCERTAIN, "positive": POSITIVE}
_LABEL_TO_STATE = {1: POSITIVE, 0: NEGATIVE, -1: UNCERTAIN}
_STATE_TO_LABEL = (None, 0, -1, 1)
_SIDE_TO_CODE = {"left": SIDE_LEFT, "right": SIDE_RIGHT, "bilateral": SIDE_BILATERAL}

#: Default number of relative-position bins of the step-wise drift profile.
DEFAULT_STEP_BINS = 10


def status_to_state(status: str | None) -> int:
    """Map a labeler status ("positive", "negative", "uncertain", "absent"/None) to a state code."""
    if status is None:
        return ABSENT
    return _STATUS_TO_STATE[status]


def side_to_code(side: str | None) -> int:
    """Map "left"/"right"/"bilateral" to a side code; anything else ("unspecified", None) is 0."""
    return _SIDE_TO_CODE.get(side or "", SIDE_NONE)


def label_to_state(value: float | int | None) -> int:
    """Map a 1/0/-1/None label (MIMIC-CXR coding) to a state code."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ABSENT
    return _LABEL_TO_STATE[int(value)]


def state_to_label(state: int) -> int | None:
    """Map a state code back to the 1/0/-1/None label coding."""
    return _STATE_TO_LABEL[int(state)]


def labels_array_to_states(values: np.ndarray) -> np.ndarray:
    """Vectorised `label_to_state` over a float array (NaN = not mentioned) of any shape."""
    values = np.asarray(values, dtype=np.float32)
    out = np.zeros(values.shape, dtype=np.int8)
    out[values == 1] = POSITIVE
    out[values == 0] = NEGATIVE
    out[values == -1] = UNCERTAIN
    return out


def states_to_labels_array(states: np.ndarray) -> np.ndarray:
    """Vectorised `state_to_label`: float32 array with NaN for absent."""
    lookup = np.array([np.nan, 0.0, -1.0, 1.0], dtype=np.float32)
    return lookup[np.asarray(states, dtype=np.int64)]


def claimed(states: np.ndarray) -> np.ndarray:
    """Boolean mask of claimed observations (positive or uncertain)."""
    return states >= UNCERTAIN


# --------------------------------------------------------------------------------------------
# Per trajectory: agreement with a reference (ground truth or consensus)
# --------------------------------------------------------------------------------------------


@dataclass
class Agreement:
    """Per-trajectory comparison with a reference label vector; arrays of shape (n,) or (n, 14).

    precision/recall/f1 are NaN where undefined (no claim, or nothing to recall); `side_agreement`
    is NaN where no observation is claimed by both with a specific side."""

    true_positive: np.ndarray
    hallucinated: np.ndarray  # (n, 14) bool: claimed, reference negative or absent
    omitted: np.ndarray  # (n, 14) bool: reference claims it, trajectory does not
    side_errors: np.ndarray  # (n, 14) bool: both claim it with different specific sides
    side_compared: np.ndarray  # (n,) number of observations whose sides were compared
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    side_agreement: np.ndarray


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num = num.astype(np.float64)
    den = den.astype(np.float64)
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def compare(
    states: np.ndarray, sides: np.ndarray, ref_states: np.ndarray, ref_sides: np.ndarray
) -> Agreement:
    """Compare trajectories (n, 14) with their references (n, 14), row by row.

    Precision = TP / claimed, recall = TP / reference-claimed, F1 their harmonic mean (0 when TP is 0
    and both are defined). Laterality is compared only where both claim the observation and both
    state a specific side (left, right or bilateral)."""
    pred = claimed(states)
    ref = claimed(ref_states)
    tp_mask = pred & ref
    tp = tp_mask.sum(axis=1)
    precision = _ratio(tp, pred.sum(axis=1))
    recall = _ratio(tp, ref.sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(
            np.isnan(precision) | np.isnan(recall),
            np.nan,
            np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0),
        )
    both_sided = tp_mask & (sides > 0) & (ref_sides > 0)
    side_errors = both_sided & (sides != ref_sides)
    compared = both_sided.sum(axis=1)
    side_agreement = _ratio(compared - side_errors.sum(axis=1), compared)
    return Agreement(
        true_positive=tp,
        hallucinated=pred & ~ref,
        omitted=ref & ~pred,
        side_errors=side_errors,
        side_compared=compared,
        precision=precision,
        recall=recall,
        f1=f1,
        side_agreement=side_agreement,
    )


def drift_from_consensus(
    states: np.ndarray,
    sides: np.ndarray,
    refusal: np.ndarray,
    cons_states: np.ndarray,
    cons_sides: np.ndarray,
) -> np.ndarray:
    """Drift of each trajectory from its sample's consensus, in [0, 1] (float32, shape (n,)).

    d = (hallucinated + omitted + side errors + 0.5 * certainty mismatches) / |claimed by either|,
    i.e. one minus a side- and certainty-aware Jaccard agreement over claimed observations; a
    certainty mismatch is positive vs uncertain on an observation both claim. Refusals drift
    maximally (1.0) whatever they say. When neither claims anything the drift is 0 (agreement)."""
    agreement = compare(states, sides, cons_states, cons_sides)
    both = claimed(states) & claimed(cons_states)
    certainty = (both & (states != cons_states)).sum(axis=1)
    union = (claimed(states) | claimed(cons_states)).sum(axis=1)
    errors = (
        agreement.hallucinated.sum(axis=1)
        + agreement.omitted.sum(axis=1)
        + agreement.side_errors.sum(axis=1)
        + 0.5 * certainty
    )
    drift = np.where(union > 0, errors / np.maximum(union, 1), 0.0)
    drift = np.minimum(drift, 1.0)
    drift = np.where(refusal, 1.0, drift)
    return drift.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Similarity of a rationale to the report
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9]+")
# Function words carry no finding; dropping them keeps the overlap about content.
_STOPWORDS = frozenset(
    "a an the and or of in on at to for with without is are was were be been being this that these "
    "there their it its as by from which who whom than then so such into onto upon also may might can "
    "could would should will shall has have had do does did not no but if while both either each per "
    "i we you he she they me my our your his her them us".split()
)


def content_tokens(text: str | None) -> Counter[str]:
    """Lower-cased alphanumeric tokens of `text` minus function words, as a multiset."""
    if not text:
        return Counter()
    return Counter(t for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS and len(t) > 1)


def token_similarity(text: str | None, report: str | None) -> float | None:
    """Similarity of a rationale to the report: F1 of clipped content-token overlap (ROUGE-1 style,
    without stemming) between the rationale and the report text. None when either side is empty."""
    a = content_tokens(text)
    b = content_tokens(report)
    if not a or not b:
        return None
    overlap = sum((a & b).values())
    if overlap == 0:
        return 0.0
    precision = overlap / sum(a.values())
    recall = overlap / sum(b.values())
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# Per sample: votes, entropy, pairwise disagreement, laterality conflicts
# --------------------------------------------------------------------------------------------


def vote_counts(states: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per-sample, per-observation counts of each state across valid sources: (G, 14, 4) int16."""
    one_hot = (states[..., None] == np.arange(N_STATES, dtype=np.int8)) & valid[:, :, None, None]
    return one_hot.sum(axis=1).astype(np.int16)


def entropy(counts: np.ndarray, normalise_by: np.ndarray | None = None) -> np.ndarray:
    """Shannon entropy (bits) of count vectors along the last axis; optionally divided by
    `normalise_by` (broadcast), e.g. log2(min(K, 4)) so that maximal disagreement is 1."""
    counts = counts.astype(np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    p = np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log2(np.where(p > 0, p, 1.0)), 0.0).sum(axis=-1)
    if normalise_by is not None:
        h = np.divide(h, normalise_by, out=np.zeros_like(h), where=normalise_by > 0)
    return h


def max_entropy_bits(n_sources: np.ndarray) -> np.ndarray:
    """log2(min(n, 4)): the largest entropy n sources can reach over the four states."""
    return np.log2(np.clip(n_sources, 1, N_STATES)).astype(np.float64)


def pairwise_disagreement(
    states: np.ndarray, valid: np.ndarray, sides: np.ndarray | None = None
) -> np.ndarray:
    """(G, K, K) fraction of the 14 observations on which two sources disagree: different states,
    or (with `sides`) both claim it with different specific sides. NaN where either source is
    missing; 0 on the diagonal."""
    diff = states[:, :, None, :] != states[:, None, :, :]
    if sides is not None:
        sided = claimed(states) & (sides > 0)
        both = sided[:, :, None, :] & sided[:, None, :, :]
        diff |= both & (sides[:, :, None, :] != sides[:, None, :, :])
    mask = valid[:, :, None] & valid[:, None, :]
    return np.where(mask, diff.mean(axis=-1), np.nan)


def laterality_conflicts(states: np.ndarray, sides: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(G, 14) bool: at least two sources claim the observation with different specific sides
    (left vs right, or unilateral vs bilateral)."""
    claimed_sided = claimed(states) & (sides > 0) & valid[:, :, None]
    seen = np.stack([(claimed_sided & (sides == s)).any(axis=1) for s in (1, 2, 3)], axis=-1)
    return seen.sum(axis=-1) >= 2


# --------------------------------------------------------------------------------------------
# Step-wise drift (the paper's P_j vs P_{j+Delta})
# --------------------------------------------------------------------------------------------


def cumulative_step_states(
    step_states: np.ndarray, step_offsets: np.ndarray, bins: int = DEFAULT_STEP_BINS
) -> np.ndarray:
    """State of each stream after each relative step bin: (n, bins + 1, 14) int8.

    Trajectory t has steps ``step_states[step_offsets[t]:step_offsets[t+1]]`` (each (14,) states).
    Step i of n goes to bin ``floor(i * bins / n)`` so trajectories of different lengths are
    compared at the same relative position; bin 0 of the output is the state before any step (all
    absent). The state after bin b is the per-observation max (= CheXpert priority) over all steps
    in bins <= b: what the stream has asserted so far."""
    n = len(step_offsets) - 1
    out = np.zeros((n, bins + 1, N_OBS), dtype=np.int8)
    lengths = np.diff(step_offsets)
    if len(step_states):
        traj = np.repeat(np.arange(n), lengths)
        index_in_traj = np.arange(len(step_states)) - np.repeat(step_offsets[:-1], lengths)
        step_bin = (index_in_traj * bins) // np.repeat(np.maximum(lengths, 1), lengths)
        np.maximum.at(out, (traj, step_bin + 1), step_states.astype(np.int8))
    np.maximum.accumulate(out, axis=1, out=out)
    return out


def _js_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon divergence (bits, in [0, 1]) between distributions along the last axis."""
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(a > 0, a * np.log2(np.where(a > 0, a, 1.0) / np.where(b > 0, b, 1.0)), 0.0).sum(
                axis=-1
            )

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@dataclass
class StepwiseDrift:
    """Step-wise drift of a chunk of samples.

    * ``profile`` (G, bins + 1 - delta): mean over active observations of JS(P_j || P_{j+delta}),
      P_j = the across-stream distribution of states after bin j (the paper's definition, made
      concrete; j = 0 is before any step).
    * ``dispersion`` (G, bins + 1): mean over active observations of the normalised entropy of P_j,
      i.e. how much the streams disagree at step j.
    * ``score`` (G,): the scalar drift score = mean of ``dispersion`` over bins 1..bins (area under
      the disagreement curve): 0 when all streams assert the same states at the same relative pace,
      1 at maximal disagreement from the first step on.

    "Active" observations are those some stream asserts (any non-absent final state); a sample with
    none gets 0."""

    profile: np.ndarray
    dispersion: np.ndarray
    score: np.ndarray


def stepwise_drift(cumulative: np.ndarray, valid: np.ndarray, delta: int = 1) -> StepwiseDrift:
    """Step-wise drift from padded cumulative states (G, K, bins + 1, 14) and the (G, K) mask."""
    g, _k, nb, _o = cumulative.shape
    one_hot = (cumulative[..., None] == np.arange(N_STATES, dtype=np.int8)) & valid[:, :, None, None, None]
    counts = one_hot.sum(axis=1).astype(np.float64)  # (G, bins+1, 14, 4)
    n_sources = valid.sum(axis=1)
    p = counts / np.maximum(n_sources, 1)[:, None, None, None]
    active = (counts[:, -1, :, 1:].sum(axis=-1) > 0).astype(np.float64)  # (G, 14)
    n_active = active.sum(axis=1)

    def mean_active(per_obs: np.ndarray) -> np.ndarray:  # (G, B, 14) -> (G, B)
        total = (per_obs * active[:, None, :]).sum(axis=-1)
        return np.divide(total, n_active[:, None], out=np.zeros_like(total), where=n_active[:, None] > 0)

    js = _js_divergence(p[:, :-delta], p[:, delta:]) if nb > delta else np.zeros((g, 0, N_OBS))
    h = entropy(counts, normalise_by=max_entropy_bits(n_sources)[:, None, None])
    dispersion = mean_active(h)
    score = dispersion[:, 1:].mean(axis=1) if nb > 1 else np.zeros(g)
    return StepwiseDrift(
        profile=mean_active(js).astype(np.float32),
        dispersion=dispersion.astype(np.float32),
        score=score.astype(np.float32),
    )


def pad_groups(
    values: np.ndarray, group_offsets: np.ndarray, fill: int | float = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Scatter per-trajectory rows (n, ...) grouped by contiguous `group_offsets` (G + 1,) into a
    padded (G, K, ...) array; returns it with the (G, K) validity mask."""
    sizes = np.diff(group_offsets)
    g = len(sizes)
    k = int(sizes.max()) if g else 0
    padded = np.full((g, k, *values.shape[1:]), fill, dtype=values.dtype)
    valid = np.arange(k)[None, :] < sizes[:, None]
    padded[valid] = values
    return padded, valid
