"""DEMO.md: the demo's results as a person wants to read them.

Figures (matplotlib, written atomically under OUT/figures/), one test image shown whole, the drift
report of the preference build, and an interpretation computed from the numbers: a claim ("APO lowers
the hallucination rate") is made only when the two 95% intervals do not overlap; otherwise the text
says the difference is not measurable at this size. Nothing in the interpretation is canned."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cxrmax.core.io import atomic_path  # noqa: E402
from cxrmax.core.pathologies import OBSERVATIONS  # noqa: E402
from cxrmax.labeler import label_text  # noqa: E402

#: The drift rates drawn per model, with their names in words (lower is better for all).
RATE_NAMES = {
    "refusal_rate": "refusal rate",
    "hallucination_rate": "hallucination rate",
    "pneumothorax_claim_rate": "absent-pneumothorax claims",
    "laterality_error_rate": "side error vs report",
}
#: (student, baseline) pairs the report compares, by their intervals and film by film
STUDENT_PAIRS = (
    ("student-apo", "student-sft"),
    ("student-dpo", "student-sft"),
    ("student-apo", "student-dpo"),
)
#: Training metrics drawn per student, in the order of TRL's metric names.
CURVE_METRICS = ("loss", "rewards/accuracies", "rewards/margins")


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def drift_chart(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Grouped bars: each model's refusal, hallucination and side-error rates with 95% intervals."""
    models = [row["model"] for row in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(models) + 2), 3.6))
    width = 0.8 / len(RATE_NAMES)
    x = np.arange(len(models))
    for k, (key, name) in enumerate(RATE_NAMES.items()):
        values = np.array([_num(row.get(key)) for row in rows])
        low = np.array([_interval(row, key)[0] for row in rows])
        high = np.array([_interval(row, key)[1] for row in rows])
        err = np.vstack([np.clip(values - low, 0, None), np.clip(high - values, 0, None)])
        ax.bar(x + (k - 1) * width, values, width, yerr=np.nan_to_num(err), capsize=2, label=name)
    ax.set_xticks(x, models, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("rate on the test split (lower is better)")
    ax.set_title("Drift per model, with 95% bootstrap intervals over test answers")
    ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.28))
    return _save(fig, path)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The JSON lines a training run logged (apo_train's jsonl_log), [] when there are none."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def training_curves(logs: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One panel per metric (loss, rewards/accuracies, rewards/margins), one line per student."""
    fig, axes = plt.subplots(1, len(CURVE_METRICS), figsize=(12, 3.2))
    for ax, metric in zip(axes, CURVE_METRICS, strict=True):
        for name, records in logs.items():
            points = [(r["step"], r[metric]) for r in records if metric in r and "step" in r]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker=".", label=name)
        ax.set_xlabel("optimizer step")
        ax.set_title(metric)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle("Students' training: SFT loss, then APO / DPO loss, reward accuracy and margin", y=1.04)
    return _save(fig, path)


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _interval(row: dict[str, Any], key: str) -> tuple[float, float]:
    interval = (row.get("ci") or {}).get(key)
    return (float("nan"), float("nan")) if interval is None else (float(interval[0]), float(interval[1]))


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{value:.2f}"


def compare(a: dict[str, Any], b: dict[str, Any], key: str) -> str:
    """One sentence on ``key`` between rows ``a`` and ``b``: lower, higher, or not measurably different
    (the two 95% intervals overlap)."""
    name = RATE_NAMES.get(key, key)
    va, vb = _num(a.get(key)), _num(b.get(key))
    (la, ha), (lb, hb) = _interval(a, key), _interval(b, key)
    figures = f"{a['model']} {_fmt(va)} [{_fmt(la)}, {_fmt(ha)}] vs {b['model']} {_fmt(vb)} [{_fmt(lb)}, {_fmt(hb)}]"
    if va != va or vb != vb:
        return f"{name}: not measured for both ({figures})."
    if ha < lb:
        return f"{name}: {a['model']} is lower, intervals apart ({figures})."
    if hb < la:
        return f"{name}: {a['model']} is higher, intervals apart ({figures})."
    return f"{name}: no measurable difference at this size, the intervals overlap ({figures})."


def _quality(row: dict[str, Any]) -> float:
    """Mean of precision, recall and similarity (over seeds: the mean of the seeds' means)."""
    keys = ("precision", "recall", "similarity")
    per_seed = row.get("per_seed") or {}
    if all(k in per_seed for k in keys) and row.get("seeds", 0) > 1:
        return float(np.nanmean([np.nanmean([per_seed[k][i] for k in keys]) for i in range(row["seeds"])]))
    return float(np.nanmean([_num(row.get(k)) for k in keys]))


def _quality_sd(row: dict[str, Any]) -> float | None:
    keys = ("precision", "recall", "similarity")
    per_seed = row.get("per_seed") or {}
    if row.get("seeds", 0) < 2 or not all(k in per_seed for k in keys):
        return None
    return float(np.std([np.nanmean([per_seed[k][i] for k in keys]) for i in range(row["seeds"])], ddof=1))


def _seed_value(row: dict[str, Any], key: str) -> float:
    """The mean over seeds where the row has seeds, else the row's figure."""
    mean = (row.get("seed_mean") or {}).get(key)
    return _num(row.get(key)) if mean is None else float(mean)


def _seed_text(row: dict[str, Any], key: str) -> str:
    sd = (row.get("seed_sd") or {}).get(key)
    fmt = (lambda v: f"{v:.0f}") if key == "mean_words" else _fmt
    text = fmt(_seed_value(row, key))
    return text if sd is None or row.get("seeds", 0) < 2 else f"{text} ± {fmt(sd)}"


def seeds_lower(a: dict[str, Any], b: dict[str, Any], key: str) -> tuple[int, int] | None:
    """In how many seeds ``a``'s figure is below ``b``'s (the same seed's students), of how many."""
    xa, xb = (a.get("per_seed") or {}).get(key), (b.get("per_seed") or {}).get(key)
    if not xa or not xb or len(xa) != len(xb) or len(xa) < 2:
        return None
    pairs = [(u, v) for u, v in zip(xa, xb, strict=True) if u == u and v == v]
    return sum(u < v for u, v in pairs), len(pairs)


def _paired_verdict(paired: dict[str, Sequence[float]]) -> str:
    """The APO - SFT differences paired by film (see cxrmax.toy.demo.paired_film_difference) as one line."""
    parts, below = [], []
    for key, name in RATE_NAMES.items():
        if key not in paired:
            continue
        difference, low, high = paired[key]
        parts.append(f"{name} {difference:+.2f} [{low:+.2f}, {high:+.2f}]")
        if high < 0:
            below.append(name)
    verdict = (
        f"lower on {', '.join(below)} (interval of the difference below 0)"
        if below
        else "not measurably lower"
    )
    return (
        "Paired by film (each test film's answers of both students resampled together, so how hard a film "
        f"is drops out): APO - SFT {'; '.join(parts)}: APO is {verdict}."
    )


def interpretation(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Sentences computed from the table: what the students inherited and what APO changed.

    Students over several seeds carry ``seeds``, ``per_seed``, ``seed_mean`` and ``seed_sd`` (see
    cxrmax.toy.demo.seed_summary) and intervals over every seed's answers pooled; comparisons are made on
    the pooled intervals and also counted seed by seed."""
    by_name = {row["model"]: row for row in rows}
    teachers = [row for row in rows if row.get("kind") == "teacher"]
    sft = by_name.get("student-sft")
    lines = []
    seeds = max((row.get("seeds", 1) for row in rows if row.get("kind") == "student"), default=1)
    if seeds > 1:
        lines.append(
            f"Students: {seeds} seeds of the student stage (teachers fixed); a figure is the mean over seeds ± "
            "their sd, an interval is over every seed's answers pooled."
        )
    if sft is not None and teachers:
        for key in ("precision", "recall"):
            mean = float(np.nanmean([_num(t.get(key)) for t in teachers]))
            gap = _seed_value(sft, key) - mean
            verdict = "within 0.05 of" if abs(gap) <= 0.05 or gap > 0 else "more than 0.05 below"
            lines.append(
                f"SFT student's {key} {_seed_text(sft, key)}, {verdict} the teachers' mean {mean:.2f} "
                f"(difference {gap:+.2f})."
            )
    faithful = by_name.get("faithful")
    if sft is not None and faithful is not None:
        for key in RATE_NAMES:
            if key != "laterality_error_rate":
                lines.append("Inherited from the teachers? " + compare(sft, faithful, key))
        words, reference = _seed_value(sft, "mean_words"), _num(faithful.get("mean_words"))
        lines.append(
            f"Length: the SFT student writes {_seed_text(sft, 'mean_words')} words per answer, "
            f"{'above' if words > reference else 'not above'} the faithful teacher's {reference:.0f}."
        )
    for key in RATE_NAMES:
        worst = max(
            teachers,
            key=lambda r: _num(r.get(key)) if _num(r.get(key)) == _num(r.get(key)) else -1,
            default=None,
        )
        if worst is not None and sft is not None:
            lines.append(
                f"The SFT student's {RATE_NAMES[key]} is {_seed_text(sft, key)}; the most "
                f"drifting teacher on it ({worst['model']}) has {_fmt(_num(worst.get(key)))}."
            )
    apart_below: dict[str, list[str]] = {}
    for student, other in STUDENT_PAIRS:
        if student not in by_name or other not in by_name:
            continue
        for key in RATE_NAMES:
            line = compare(by_name[student], by_name[other], key)
            count = seeds_lower(by_name[student], by_name[other], key)
            if count is not None:
                line = line[:-1] + f"; lower in {count[0]} of {count[1]} seeds."
            lines.append(line)
            if f"{student} is lower, intervals apart" in line:
                apart_below.setdefault(f"{student} vs {other}", []).append(RATE_NAMES[key])
    if "student-apo" in by_name and sft is not None:
        below = apart_below.get("student-apo vs student-sft", [])
        if below:
            answer = f"Yes on {', '.join(below)} (intervals apart)"
            rest = [name for name in RATE_NAMES.values() if name not in below]
            if rest:
                answer += f"; not on {', '.join(rest)}"
        else:
            answer = (
                "Not measurably: on no rate is the APO student below the SFT student with intervals apart"
            )
        lines.append(f"Does APO lower the drift? {answer}.")
        paired = (by_name["student-apo"].get("paired") or {}).get("student-sft") or {}
        if paired:
            lines.append(_paired_verdict(paired))
    if teachers and "student-apo" in by_name:
        best = max(teachers, key=_quality)
        apo, sd = _quality(by_name["student-apo"]), _quality_sd(by_name["student-apo"])
        verdict = "at least" if apo >= _quality(best) else "below"
        spread = "" if sd is None else f" ± {sd:.2f} over seeds"
        lines.append(
            f"Mean of precision, recall and similarity: student-apo {apo:.2f}{spread}, {verdict} the "
            f"best single teacher ({best['model']}, {_quality(best):.2f})."
        )
    return lines


def _drift_words(text: str, labels: dict[str, Any], sides: dict[str, str]) -> str:
    """What the labeler reads in one answer against the study: refusal, hallucinated and side-swapped
    findings, in words."""
    labelled = label_text(text)
    if labelled.is_refusal:
        return "refusal"
    notes = []
    for name in OBSERVATIONS:
        observation = labelled.observations.get(name)
        if observation is None or observation.status not in ("positive", "uncertain"):
            continue
        truth = labels.get(name)
        if truth not in (1, 1.0, -1, -1.0):
            notes.append(f"hallucinated {name}")
        elif sides.get(name) in ("left", "right") and observation.laterality in ("left", "right"):
            if observation.laterality != sides[name]:
                notes.append(f"{name} on the wrong side")
    return ", ".join(notes) or "no drift read"


def sample_section(
    trajectories: Any, test_row: dict[str, Any], sides: dict[str, str], film: Path | None
) -> str:
    """One test image whole: the film, the report's findings, every model's first answer with the drift
    the labeler reads in it."""
    sample = test_row["sample_id"]
    labels = test_row.get("labels") or {}
    positive = [name for name, value in labels.items() if value in (1, 1.0)]
    lines = [
        f"Sample `{sample}`; labels positive: {', '.join(positive) or 'none'}; report sides: "
        f"{', '.join(f'{k} {v}' for k, v in sides.items()) or 'none'}.",
        "",
    ]
    if film is not None:
        lines += [f"![the film]({film.name})", ""]
    report = " ".join(t for t in (test_row.get("findings"), test_row.get("impression")) if t)
    lines += [f"> report: {report}", "", "| model | answer | drift read by the labeler |", "|---|---|---|"]
    seen = set()
    for row in trajectories.to_pylist():
        if row["sample_id"] != sample or row["model"] in seen:
            continue
        seen.add(row["model"])
        text = (row.get("text") or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {row['model']} | {text} | {_drift_words(row.get('text') or '', labels, sides)} |")
    return "\n".join(lines)
