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
