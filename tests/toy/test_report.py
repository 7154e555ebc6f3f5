"""The demo's students over seeds (seed_summary) and the interpretation computed from the table."""

import numpy as np
import pytest

from cxrmax.toy.demo import SEED_KEYS, seed_summary
from cxrmax.toy.report import interpretation, seeds_lower

RATES = ("refusal_rate", "hallucination_rate", "pneumothorax_claim_rate", "laterality_error_rate")


def _row(model, kind="teacher", ci_width=0.05, **figures):
    row = {"model": model, "kind": kind, "mean_words": 20.0, "similarity": 0.2}
    row |= {"precision": 0.6, "recall": 0.6, "refusal_rate": 0.1, "hallucination_rate": 0.4}
    row |= {"pneumothorax_claim_rate": 0.2, "laterality_error_rate": 0.3} | figures
    row["ci"] = {k: (row[k] - ci_width, row[k] + ci_width) for k in RATES}
    return row


def _student(model, seeds, ci_width=0.05):
    """A pooled student row over per-seed rows whose figures are given per seed."""
    per_seed = [
        _row(f"{model}-seed{k}", "student", **{key: values[k] for key, values in seeds.items()})
        for k in range(len(next(iter(seeds.values()))))
    ]
    pooled = _row(model, "student", ci_width, **{key: float(np.mean(v)) for key, v in seeds.items()})
    return seed_summary(pooled, per_seed)


def test_seed_summary_keeps_the_pooled_row_and_adds_each_seed_mean_and_sd():
    per_seed = [_row(f"s{k}", "student", precision=p) for k, p in enumerate((0.2, 0.4, 0.9))]
    pooled = _row("student-sft", "student", precision=0.5)
    row = seed_summary(pooled, per_seed)
    assert row["seeds"] == 3 and row["precision"] == 0.5 and row["ci"] == pooled["ci"]
    assert row["per_seed"]["precision"] == [0.2, 0.4, 0.9]
    assert row["seed_mean"]["precision"] == pytest.approx(0.5)
    assert row["seed_sd"]["precision"] == pytest.approx(np.std([0.2, 0.4, 0.9], ddof=1))
    assert set(row["per_seed"]) == set(SEED_KEYS)
    one = seed_summary(pooled, per_seed[:1])
    assert one["seed_sd"]["precision"] == 0.0  # no spread from one seed
    nan_seed = seed_summary(pooled, [_row("a", "student", laterality_error_rate=float("nan")), per_seed[0]])
    assert nan_seed["seed_mean"]["laterality_error_rate"] == pytest.approx(0.3)


def test_seeds_lower_counts_the_seeds_where_a_is_below_b():
    a = _student("student-apo", {"hallucination_rate": [0.1, 0.5, 0.2]})
    b = _student("student-sft", {"hallucination_rate": [0.3, 0.4, 0.3]})
    assert seeds_lower(a, b, "hallucination_rate") == (2, 3)
    assert seeds_lower(_row("x"), b, "hallucination_rate") is None


def _table(apo_halluc, sft_halluc, apo_quality, ci_width):
    teachers = [
        _row("faithful", mean_words=20.0, refusal_rate=0.0, hallucination_rate=0.4),
        _row("refuses", precision=0.7, recall=0.3, refusal_rate=0.6),
    ]
    sft = _student(
        "student-sft",
        {
            "hallucination_rate": sft_halluc,
            "refusal_rate": [0.2, 0.2, 0.2],
            "mean_words": [30.0, 31.0, 32.0],
            "precision": [0.62, 0.63, 0.64],
            "recall": [0.40, 0.42, 0.44],
        },
        ci_width,
    )
    apo = _student(
        "student-apo",
        {"hallucination_rate": apo_halluc, "precision": [apo_quality] * 3, "recall": [apo_quality] * 3},
        ci_width,
    )
    return [*teachers, sft, apo]


def test_interpretation_claims_only_what_the_intervals_and_seeds_show():
    apart = interpretation(_table([0.1, 0.1, 0.1], [0.6, 0.6, 0.6], 0.9, 0.02))
    text = "\n".join(apart)
    assert "3 seeds of the student stage" in text
    assert "hallucination rate: student-apo is lower, intervals apart" in text
    assert "lower in 3 of 3 seeds" in text
    verdict = next(line for line in apart if line.startswith("Does APO lower the drift?"))
    assert verdict.startswith("Does APO lower the drift? Yes on") and "hallucination rate" in verdict
    assert "side error vs report" in verdict.partition("not on")[2]
    assert "at least the best single teacher" in text
    # The teachers' mean precision is 0.65: the student's 0.63 is within 0.05; recall 0.42 vs 0.45 too.
    assert "SFT student's precision 0.63 ± 0.01, within 0.05 of the teachers' mean 0.65" in text
    assert "refusal rate: student-sft is higher, intervals apart" in text  # inherited from `refuses`
    assert "writes 31 ± 1 words per answer, above the faithful teacher's 20" in text
    overlap = "\n".join(interpretation(_table([0.5, 0.55, 0.6], [0.6, 0.5, 0.55], 0.1, 0.3)))
    assert "hallucination rate: no measurable difference" in overlap
    assert "Does APO lower the drift? Not measurably" in overlap
    assert "below the best single teacher" in overlap


def test_interpretation_of_one_seed_reads_as_before():
    rows = [_row("faithful"), _row("student-sft", "student"), _row("student-apo", "student")]
    text = "\n".join(interpretation(rows))
    assert "seeds" not in text.split("Mean of")[0] or "lower in" not in text
    assert "Mean of precision, recall and similarity: student-apo" in text


def test_the_console_tables_fit_80_columns_with_every_model_and_interval_whole():
    from pathlib import Path

    from rich.console import Console

    from cxrmax.toy.demo import DemoResult, print_result

    rows = [_row("hallucinates"), _row("faithful")]
    rows.append(
        _student("student-apo", {"precision": [0.55, 0.6, 0.65], "hallucination_rate": [0.5, 0.6, 0.7]})
    )
    for row in rows:
        row |= {"sides_compared": 40, "injected": "x", "answers": 88}
        row["ci"] |= {"precision": (0.52, 0.68), "mean_words": (18.0, 23.0)}
    console = Console(width=80, record=True)
    print_result(DemoResult(out=Path("."), size="default", rows=rows), console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for row in rows:
        assert f"│ {row['model']} " in text  # the model column is not collapsed
    assert "0.60 ± 0.05" in text and "[0.52, 0.68]" in text and "[0.35, 0.45]" in text  # whole cells


def test_verdict_when_apo_is_below_on_every_rate():
    teachers = [_row("faithful"), _row("refuses", refusal_rate=0.6)]
    sft = _student("student-sft", {key: [0.6, 0.6, 0.6] for key in RATES}, 0.02)
    apo = _student("student-apo", {key: [0.1, 0.1, 0.1] for key in RATES}, 0.02)
    verdict = next(line for line in interpretation([*teachers, sft, apo]) if line.startswith("Does APO"))
    assert verdict == (
        "Does APO lower the drift? Yes on refusal rate, hallucination rate, absent-pneumothorax claims, "
        "side error vs report (intervals apart)."
    )


def test_the_paired_film_verdict_names_the_rates_whose_difference_is_below_zero():
    teachers = [_row("faithful"), _row("refuses", refusal_rate=0.6)]
    sft = _student("student-sft", {key: [0.5, 0.5, 0.5] for key in RATES}, 0.1)
    apo = _student("student-apo", {key: [0.45, 0.45, 0.45] for key in RATES}, 0.1)
    apo["paired"] = {
        "student-sft": {
            "refusal_rate": (-0.10, -0.12, -0.08),
            "hallucination_rate": (-0.05, -0.09, -0.01),
            "pneumothorax_claim_rate": (0.0, -0.02, 0.02),
            "laterality_error_rate": (-0.08, -0.15, 0.01),
            "mean_words": (-9.0, -10.0, -8.0),  # not a drift rate: not reported
        }
    }
    lines = interpretation([*teachers, sft, apo])
    assert any(line.startswith("Does APO lower the drift? Not measurably") for line in lines)  # unpaired
    [paired] = [line for line in lines if line.startswith("Paired by film")]
    assert "refusal rate -0.10 [-0.12, -0.08]" in paired and "words" not in paired
    assert paired.endswith(
        "APO is lower on refusal rate, hallucination rate (interval of the difference below 0)."
    )
    del apo["paired"]
    assert not [line for line in interpretation([*teachers, sft, apo]) if line.startswith("Paired by film")]
