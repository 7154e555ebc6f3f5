"""The labeler on real radiology text: the 3,080 OpenI (Indiana University) development reports.

Runs the scoring of benchmark/realworld/openi_labeler.py (FINDINGS + IMPRESSION, 7 labels mapped onto
CheXpert observations) when the torchxrayvision 1.5.7 wheel that carries the report texts is cached or
can be fetched with `pip download`, and skips with the reason otherwise. The floors are the figures
reached when this test was written (issue 12), rounded down: a later change cannot silently undo
them. Graded (probable hedges positive, possible ones negative, the way OpenI's coders counted them) the
labeler reaches the issue's goal of micro-F1 >= 0.92 and every label >= 0.85 except Lung Lesion, whose
remaining errors are CheXpert's definitions ("nodular opacity" is a lesion, "calcified nodule" is not)
against OpenI's coding; the benchmark's README lists them.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmark" / "realworld" / "openi_labeler.py"

# policy -> label -> lowest F1 allowed ("micro" = micro-F1 over the 7 labels)
FLOORS: dict[str, dict[str, float]] = {
    "uncertain=positive": {
        "Atelectasis": 0.91,
        "Cardiomegaly": 0.95,
        "Pleural Effusion": 0.87,
        "Pneumonia": 0.50,
        "Pneumothorax": 0.85,
        "Consolidation": 0.86,
        "Lung Lesion": 0.67,
        "micro": 0.855,
    },
    "uncertain=negative": {
        "Atelectasis": 0.83,
        "Cardiomegaly": 0.90,
        "Pleural Effusion": 0.90,
        "Pneumonia": 0.84,
        "Pneumothorax": 0.90,
        "Consolidation": 0.93,
        "Lung Lesion": 0.74,
        "micro": 0.855,
    },
    "uncertain=graded": {
        "Atelectasis": 0.97,
        "Cardiomegaly": 0.95,
        "Pleural Effusion": 0.93,
        "Pneumonia": 0.88,
        "Pneumothorax": 0.88,
        "Consolidation": 0.93,
        "Lung Lesion": 0.73,
        "micro": 0.925,
    },
}
# The figures at the start of issue 12, for the report below (uncertain=positive, uncertain=negative).
BEFORE_MICRO = (0.680, 0.694)


def _load():
    spec = importlib.util.spec_from_file_location("openi_labeler", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("openi_labeler", module)
    spec.loader.exec_module(module)
    return module


def test_scoring_counts_uncertain_per_policy():
    """The scoring itself, on a hand-made gold standard (no report text needed)."""
    openi = _load()
    gold = {
        "a": dict.fromkeys(openi.LABEL_MAP, 0) | {"Pneumonia": 1},
        "b": dict.fromkeys(openi.LABEL_MAP, 0),
    }
    statuses = {
        "a": dict.fromkeys(openi.LABEL_MAP, "absent")
        | {"Pneumonia": "uncertain probable", "Atelectasis": "uncertain possible"},
        "b": dict.fromkeys(openi.LABEL_MAP, "negative") | {"Pleural Effusion": "positive"},
    }
    scores = openi.score(gold, statuses)
    positive, negative = scores["uncertain=positive"], scores["uncertain=negative"]
    graded = scores["uncertain=graded"]
    assert (positive["Pneumonia"]["tp"], positive["Pneumonia"]["fn"]) == (1, 0)
    assert (negative["Pneumonia"]["tp"], negative["Pneumonia"]["fn"]) == (0, 1)
    assert (graded["Pneumonia"]["tp"], graded["Atelectasis"]["fp"]) == (1, 0)
    assert positive["Atelectasis"]["fp"] == 1 and negative["Atelectasis"]["fp"] == 0
    assert positive["Pleural Effusion"]["fp"] == negative["Pleural Effusion"]["fp"] == 1
    assert positive["micro"]["precision"] == pytest.approx(1 / 3)
    assert negative["micro"]["f1"] == 0.0
    # Lung Lesion is Mass OR Nodule
    assert openi.LABEL_MAP["Lung Lesion"] == ("Mass", "Nodule")


def test_report_text_reads_findings_and_impression_only():
    openi = _load()
    text = openi.report_text(
        {"INDICATION": "pneumonia?", "FINDINGS": "No effusion.", "IMPRESSION": "Normal chest."}
    )
    assert "pneumonia" not in text
    assert text.startswith("FINDINGS: No effusion.") and text.endswith("IMPRESSION: Normal chest.")


@pytest.mark.slow
def test_openi_development_reports_keep_their_floors():
    openi = _load()
    gold_path = Path(os.environ.get("CXRMAX_OPENI_GOLD", openi.DEFAULT_GOLD))
    if not gold_path.is_file():
        pytest.skip(f"no OpenI gold labels at {gold_path}")
    wheel, how = openi.find_wheel(fetch=os.environ.get("CXRMAX_OPENI_FETCH", "1") != "0")
    if wheel is None:
        pytest.skip(f"OpenI report texts not available: {how}")
    scores, gold, statuses, reports = openi.evaluate(wheel, gold_path)
    assert len(gold) == 3080
    assert all(rid in reports for rid in gold)  # every scored id has its report in the wheel
    low = []
    for policy, floors in FLOORS.items():
        for name, floor in floors.items():
            if scores[policy][name]["f1"] < floor:
                low.append(f"{policy} {name}: {scores[policy][name]['f1']:.3f} < {floor}")
    assert not low, low
    assert scores["uncertain=positive"]["micro"]["f1"] > BEFORE_MICRO[0] + 0.15
    assert scores["uncertain=negative"]["micro"]["f1"] > BEFORE_MICRO[1] + 0.15
    # The batch path's graded values (cxrmax label --uncertain graded) are the benchmark's graded policy.
    from cxrmax.labeler import label_texts

    ids = sorted(gold)
    table = label_texts([openi.report_text(reports[rid]) for rid in ids], uncertain="graded")
    for name in openi.LABEL_MAP:
        column = table.column(name).to_pylist()
        mismatched = [
            rid
            for rid, value in zip(ids, column, strict=True)
            if int(value == 1) != openi.predicted(statuses[rid][name], "uncertain=graded")
        ]
        assert not mismatched, (name, mismatched[:5])
    # The labeler reads every report without an error and finds something in almost all of them.
    seen = Counter(status for row in statuses.values() for status in row.values())
    assert seen["negative"] > seen["positive"] > 0
