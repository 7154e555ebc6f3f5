"""Label metrics for the leaderboard, vectorised with numpy.

Conventions (stated with every result):
- Labels are float arrays, one column per observation: 1 positive, 0 negative, -1 uncertain, NaN blank.
- Blank counts as negative. The uncertain policy is explicit: ``positive`` (default, the CheXbert-F1
  convention), ``negative``, or ``ignore`` (a study/observation cell where the reference or the
  prediction is uncertain is left out of that observation's counts).
- Applied to references and predictions alike.
- Probabilities: a prediction in [0, 1] that is not exactly 0/1 is a score; the binary prediction is
  ``score >= threshold`` (0.5) and AUROC is computed from the scores.
- F1 with no positives in prediction and reference is 0 (scikit-learn's ``zero_division=0``).
- Bootstrap: percentile intervals over studies resampled with replacement, computed from per-study
  sufficient statistics (one weight matrix times one statistics matrix per chunk of replicates).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from cxrmax.core.pathologies import COMPETITION_LABELS, OBSERVATIONS

UNCERTAIN_POLICIES = ("positive", "negative", "ignore")


def check_policy(policy: str) -> str:
    """Return the policy, or raise ValueError naming the options."""
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy {policy!r} is not one of {', '.join(UNCERTAIN_POLICIES)}")
    return policy


def binarize_labels(values: np.ndarray, policy: str = "positive") -> tuple[np.ndarray, np.ndarray]:
    """Turn 1/0/-1/NaN labels into (binary bool array, valid bool array) under the uncertain policy.

    Blank (NaN) and 0 are negative; -1 follows the policy; under ``ignore`` uncertain cells are
    marked invalid."""
    check_policy(policy)
    values = np.asarray(values, dtype=np.float32)
    uncertain = values == -1
    positive = values == 1
    if policy == "positive":
        positive = positive | uncertain
    valid = ~uncertain if policy == "ignore" else np.ones(values.shape, dtype=bool)
    return positive, valid


def f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 = 2tp / (2tp + fp + fn), 0 where the denominator is 0. Works on any shape."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast(a, b).shape), where=b > 0)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (numpy only; scipy's import costs a second)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    average = ends - (counts - 1) / 2.0
    return average[inverse]


def auroc(y_true: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve by the rank (Mann-Whitney) formula with tied scores averaged; equals
    scikit-learn's roc_auc_score. None when only one class is present."""
    y_true = np.asarray(y_true, dtype=bool)
    n_pos = int(y_true.sum())
    n_neg = y_true.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[y_true].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def confusion_stats(
    reference: np.ndarray,
    predicted: np.ndarray,
    policy: str = "positive",
    threshold: float = 0.5,
    is_score: np.ndarray | None = None,
) -> np.ndarray:
    """Per-study, per-observation confusion indicators, shape (n, k, 4): tp, fp, fn, tn (uint8).

    ``is_score`` (shape k) marks columns holding probabilities; those are thresholded. Cells
    excluded by the ``ignore`` policy are all zero."""
    reference = np.asarray(reference, dtype=np.float32)
    predicted = np.asarray(predicted, dtype=np.float32).copy()
    if is_score is not None and np.any(is_score):
        cols = np.asarray(is_score, dtype=bool)
        scored = predicted[:, cols]
        predicted[:, cols] = np.where(np.isnan(scored), np.nan, (scored >= threshold).astype(np.float32))
    ref_pos, ref_valid = binarize_labels(reference, policy)
    pred_pos, pred_valid = binarize_labels(predicted, policy)
    valid = ref_valid & pred_valid
    stats = np.empty(reference.shape + (4,), dtype=np.uint8)
    stats[..., 0] = ref_pos & pred_pos & valid
    stats[..., 1] = ~ref_pos & pred_pos & valid
    stats[..., 2] = ref_pos & ~pred_pos & valid
    stats[..., 3] = ~ref_pos & ~pred_pos & valid
    return stats


def label_summary(counts: np.ndarray, names: Sequence[str] = OBSERVATIONS) -> dict[str, float]:
    """Headline numbers from summed counts (..., k, 4): micro and macro F1 over all k observations and
    over the five competition labels. Vectorised over leading axes (bootstrap replicates)."""
    counts = np.asarray(counts, dtype=np.float64)
    comp = [names.index(n) for n in COMPETITION_LABELS if n in names]
    out = {}
    for suffix, idx in (("14", list(range(len(names)))), ("5", comp)):
        sub = counts[..., idx, :]
        tp, fp, fn = sub[..., 0], sub[..., 1], sub[..., 2]
        out[f"micro_f1_{suffix}"] = f1_from_counts(tp.sum(-1), fp.sum(-1), fn.sum(-1))
        out[f"macro_f1_{suffix}"] = f1_from_counts(tp, fp, fn).mean(-1)
    return out


def per_observation(
    counts: np.ndarray,
    names: Sequence[str] = OBSERVATIONS,
    reference: np.ndarray | None = None,
    scores: np.ndarray | None = None,
    is_score: np.ndarray | None = None,
    policy: str = "positive",
) -> list[dict[str, object]]:
    """Accuracy, precision, recall, F1, support (reference positives) and n per observation from
    summed counts (k, 4); AUROC for columns given as probabilities."""
    counts = np.asarray(counts, dtype=np.float64)
    tp, fp, fn, tn = counts[:, 0], counts[:, 1], counts[:, 2], counts[:, 3]
    n = tp + fp + fn + tn
    accuracy = _safe_div(tp + tn, n)
    precision = _safe_div(tp, tp + fp)
    recall = _safe_div(tp, tp + fn)
    f1 = f1_from_counts(tp, fp, fn)
    rows: list[dict[str, object]] = []
    for j, name in enumerate(names):
        row: dict[str, object] = {
            "observation": name,
            "n": int(n[j]),
            "support": int(tp[j] + fn[j]),
            "accuracy": float(accuracy[j]),
            "precision": float(precision[j]),
            "recall": float(recall[j]),
            "f1": float(f1[j]),
            "auroc": None,
        }
        if scores is not None and reference is not None and is_score is not None and is_score[j]:
            ref_pos, ref_valid = binarize_labels(reference[:, j], policy)
            keep = ref_valid & ~np.isnan(scores[:, j])
            row["auroc"] = auroc(ref_pos[keep], scores[keep, j])
        rows.append(row)
    return rows


def bootstrap_ci(
    stats: np.ndarray,
    statistic: Callable[[np.ndarray], dict[str, np.ndarray]],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    chunk: int = 50,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over rows of ``stats`` (n, d).

    ``statistic`` maps summed statistics (B, d) to named arrays (B,). Each chunk of replicates draws
    row indices, turns them into a (chunk, n) count matrix (one bincount per replicate) and
    multiplies it with the statistics: no Python loop over rows."""
    stats = np.asarray(stats)
    n = stats.shape[0]
    if n == 0 or n_boot <= 0:
        return {}
    flat = stats.reshape(n, -1).astype(np.float32 if stats.dtype == np.uint8 else np.float64)
    with _single_threaded_blas():
        return _bootstrap(flat, stats.shape[1:], statistic, n, n_boot, seed, alpha, chunk)


@contextlib.contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Skinny matrix products run far faster on one BLAS thread: OpenBLAS's threading makes a
    (50 x 100k) @ (100k x 56) product 50x slower on a busy 2-core machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _bootstrap(
    flat: np.ndarray,
    shape: tuple[int, ...],
    statistic: Callable[[np.ndarray], dict[str, np.ndarray]],
    n: int,
    n_boot: int,
    seed: int,
    alpha: float,
    chunk: int,
) -> dict[str, tuple[float, float]]:
    rng = np.random.default_rng(seed)
    collected: dict[str, list[np.ndarray]] = {}
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        draws = rng.integers(0, n, size=(b, n), dtype=np.int32 if n < 2**31 else np.int64)
        weights = np.empty((b, n), dtype=flat.dtype)
        for row in range(b):  # one bincount per replicate: cheaper than one over offset indices
            weights[row] = np.bincount(draws[row], minlength=n)
        sums = (weights @ flat).astype(np.float64).reshape((b,) + shape)
        for name, values in statistic(sums).items():
            collected.setdefault(name, []).append(np.asarray(values, dtype=np.float64))
        done += b
    low, high = 100 * alpha / 2, 100 * (1 - alpha / 2)
    out = {}
    for name, parts in collected.items():
        values = np.concatenate(parts)
        values = values[~np.isnan(values)]
        if values.size:
            out[name] = (float(np.percentile(values, low)), float(np.percentile(values, high)))
    return out


@dataclass
class LabelScores:
    """Everything the label metrics produce for one submission."""

    headline: dict[str, float]
    ci: dict[str, tuple[float, float]]
    per_observation: list[dict[str, object]]


def score_labels(
    reference: np.ndarray,
    predicted: np.ndarray,
    policy: str = "positive",
    is_score: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    names: Sequence[str] = OBSERVATIONS,
    prefix: str = "",
) -> LabelScores:
    """Per-observation metrics, micro/macro F1 over 14 and 5 labels and their bootstrap CIs.

    ``reference`` and ``predicted`` are aligned (n, k) float arrays (NaN = blank)."""
    names = list(names)
    stats = confusion_stats(reference, predicted, policy, is_score=is_score)
    totals = stats.sum(axis=0, dtype=np.int64)
    headline = {prefix + k: float(v) for k, v in label_summary(totals, names).items()}

    def statistic(sums: np.ndarray) -> dict[str, np.ndarray]:
        return {prefix + k: v for k, v in label_summary(sums, names).items()}

    ci = bootstrap_ci(stats, statistic, n_boot=n_boot, seed=seed)
    scores = np.asarray(predicted, dtype=np.float32) if is_score is not None and np.any(is_score) else None
    rows = per_observation(
        totals, names, reference=reference, scores=scores, is_score=is_score, policy=policy
    )
    return LabelScores(headline=headline, ci=ci, per_observation=rows)


def set_agreement_stats(predicted: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-row statistics comparing positive-label sets (n, k) bool: columns
    |P & G|, |P|, |G|, Jaccard(P, G) (1 when both are empty), 1 (the row count)."""
    predicted = np.asarray(predicted, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    inter = (predicted & reference).sum(1)
    union = (predicted | reference).sum(1)
    jaccard = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return np.stack([inter, predicted.sum(1), reference.sum(1), jaccard, np.ones(len(inter))], axis=1).astype(
        np.float64
    )


def set_agreement_summary(sums: np.ndarray) -> dict[str, np.ndarray]:
    """Rationale precision (micro: sum|P&G| / sum|P|), recall (sum|P&G| / sum|G|) and similarity
    (mean per-row Jaccard) from summed `set_agreement_stats` (..., 5)."""
    sums = np.asarray(sums, dtype=np.float64)
    return {
        "precision": _safe_div(sums[..., 0], sums[..., 1]),
        "recall": _safe_div(sums[..., 0], sums[..., 2]),
        "similarity": _safe_div(sums[..., 3], sums[..., 4]),
    }
