"""The demo's drift rates: the data card's definitions, with bootstrap intervals over answers."""

import pyarrow as pa
import pytest

from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.toy.demo import drift_rates

EFFUSION_LEFT = {name: None for name in OBSERVATIONS} | {"Pleural Effusion": 1.0}


def _table(rows):
    return pa.table(
        {
            "model": [r[0] for r in rows],
            "sample_id": [r[1] for r in rows],
            "text": [r[2] for r in rows],
            "labels": [EFFUSION_LEFT for _ in rows],
        }
    )


def test_rates_and_their_intervals():
    rows = []
    for i in range(40):
        rows.append(("good", f"s{i}", "There is a left pleural effusion."))
        side = "right" if i % 2 else "left"
        text = (
            "As an AI, I cannot interpret images." if i % 4 == 0 else f"There is a {side} pleural effusion."
        )
        rows.append(("drifty", f"s{i}", text))
    gold = {f"s{i}": {"Pleural Effusion": "left"} for i in range(40)}
    rates = drift_rates(_table(rows), gold, n_boot=300)
    good, drifty = rates["good"], rates["drifty"]
    assert good["refusal_rate"] == 0 and good["laterality_error_rate"] == 0
    assert drifty["refusal_rate"] == pytest.approx(0.25)
    assert drifty["laterality_error_rate"] == pytest.approx(20 / 30)
    low, high = drifty["ci"]["laterality_error_rate"]
    assert low < 20 / 30 < high and high - low < 0.5
    low, high = drifty["ci"]["refusal_rate"]
    assert low < 0.25 < high
    assert good["ci"]["refusal_rate"] == (0.0, 0.0)
    # the same seed gives the same intervals
    assert drift_rates(_table(rows), gold, n_boot=300)["drifty"]["ci"] == drifty["ci"]


def test_absent_pneumothorax_claims_are_counted_apart_from_other_hallucinations():
    rows = []
    for i in range(20):
        extra = (" There is also a right pneumothorax.", " There is a rib fracture.", "", "")[i % 4]
        rows.append(("m", f"s{i}", "There is a left pleural effusion." + extra))
    rows.append(("m", "s20", "As an AI, I cannot interpret images."))  # a refusal claims nothing
    rates = drift_rates(_table(rows), {}, n_boot=200)["m"]
    assert rates["hallucination_rate"] == pytest.approx(10 / 20)  # pneumothorax or fracture
    assert rates["pneumothorax_claim_rate"] == pytest.approx(5 / 20)
    low, high = rates["ci"]["pneumothorax_claim_rate"]
    assert low < 0.25 < high


def test_intervals_by_film_resample_films_not_answers():
    # 20 films, 5 answers each, all alike within a film: 5 answers carry one film's worth of evidence.
    rows = []
    for i in range(20):
        side = "right" if i % 2 else "left"
        rows += [("m", f"s{i}", f"There is a {side} pleural effusion.")] * 5
    gold = {f"s{i}": {"Pleural Effusion": "left"} for i in range(20)}
    answers = drift_rates(_table(rows), gold, n_boot=400)["m"]
    films = drift_rates(_table(rows), gold, n_boot=400, by_film=True)["m"]
    assert films["laterality_error_rate"] == answers["laterality_error_rate"] == pytest.approx(0.5)
    width = {k: r["ci"]["laterality_error_rate"][1] - r["ci"]["laterality_error_rate"][0] for k, r in
             (("answers", answers), ("films", films))}  # fmt: skip
    # The film interval is about sqrt(5) times the answer one (binomial over 20 films vs 100 answers).
    assert 1.6 < width["films"] / width["answers"] < 3.0, width


def test_a_paired_film_difference_sees_a_steady_gain_that_unpaired_intervals_miss():
    from cxrmax.toy.demo import drift_counts, paired_film_difference

    # Hard films (odd) and easy films (even): B errs on 5 / 1 of a film's 5 sides, A on 4 / 0, so A is
    # 0.2 better on every film while the films themselves differ far more than that.
    rows = []
    for i in range(40):
        for model, errors in (("A", 4 if i % 2 else 0), ("B", 5 if i % 2 else 1)):
            for k in range(5):
                side = "right" if k < errors else "left"
                rows.append((model, f"s{i}", f"There is a {side} pleural effusion."))
    gold = {f"s{i}": {"Pleural Effusion": "left"} for i in range(40)}
    films = drift_rates(_table(rows), gold, n_boot=400, by_film=True)
    a, b = films["A"]["ci"]["laterality_error_rate"], films["B"]["ci"]["laterality_error_rate"]
    assert films["A"]["laterality_error_rate"] == pytest.approx(0.4)
    assert films["B"]["laterality_error_rate"] == pytest.approx(0.6)
    assert a[1] > b[0]  # unpaired, the intervals overlap
    difference, low, high = paired_film_difference(drift_counts(_table(rows), gold), "A", "B", n_boot=400)[
        "laterality_error_rate"
    ]
    assert difference == pytest.approx(-0.2) and high < 0 and low == pytest.approx(-0.2)
    assert paired_film_difference(drift_counts(_table(rows), gold), "A", "nobody") == {}
