"""Accuracy of the labeler on a hand-labelled evaluation set (tests/data/labeler_eval.jsonl).

Each case was labelled by hand, reading the text as a radiologist would (never by running the
labeler). Codes: AT Atelectasis, CM Cardiomegaly, CO Consolidation, ED Edema, EC Enlarged
Cardiomediastinum, FR Fracture, LL Lung Lesion, LO Lung Opacity, NF No Finding, PE Pleural Effusion,
PO Pleural Other, PN Pneumonia, PX Pneumothorax, SD Support Devices. Values: pos / neg / unc, with
"/left", "/right" or "/bilateral" for the side (none written = unspecified); an observation not
listed is absent. "No Finding" is derived by the CheXpert rule from the hand labels (positive unless
a finding other than Support Devices is pos/unc) unless the case states it ("abs" for refusals).

Status accuracy per observation is measured over the cases where the expected OR the predicted status
is not absent (absent-absent agreements would inflate it); laterality accuracy over the cases where
both say the observation is present or negated, for the observations where a side applies.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cxrmax.core.pathologies import LATERALIZABLE, OBSERVATIONS
from cxrmax.labeler import label_text, label_texts

EVAL_PATH = Path(__file__).parent / "data" / "labeler_eval.jsonl"
CODES = {
    "AT": "Atelectasis",
    "CM": "Cardiomegaly",
    "CO": "Consolidation",
    "ED": "Edema",
    "EC": "Enlarged Cardiomediastinum",
    "FR": "Fracture",
    "LL": "Lung Lesion",
    "LO": "Lung Opacity",
    "NF": "No Finding",
    "PE": "Pleural Effusion",
    "PO": "Pleural Other",
    "PN": "Pneumonia",
    "PX": "Pneumothorax",
    "SD": "Support Devices",
}
STATUS = {"pos": "positive", "neg": "negative", "unc": "uncertain", "abs": "absent"}


def expected_labels(coded: dict[str, str]) -> dict[str, tuple[str, str | None]]:
    """{"PE": "pos/left", "PX": "neg"} -> observation -> (status, laterality), every observation filled
    ("No Finding" follows the CheXpert rule when not given)."""
    expected: dict[str, tuple[str, str | None]] = {}
    for code, value in coded.items():
        name = CODES[code]
        status, _, side = value.partition("/")
        status = STATUS[status]
        if name in LATERALIZABLE and status != "absent":
            expected[name] = (status, side or "unspecified")
        else:
            expected[name] = (status, None)
    if "No Finding" not in expected:
        abnormal = any(
            s in ("positive", "uncertain") for n, (s, _) in expected.items() if n != "Support Devices"
        )
        expected["No Finding"] = ("absent", None) if abnormal else ("positive", None)
    for name in OBSERVATIONS:
        expected.setdefault(name, ("absent", None))
    return expected


def load_cases() -> list[dict]:
    cases = []
    for line in EVAL_PATH.read_text().splitlines():
        if not line.strip():
            continue
        case = json.loads(line)
        case["expected"] = expected_labels(case["y"])
        cases.append(case)
    return cases


CASES = load_cases()


def score(cases: list[dict]) -> tuple[dict, dict, list[str]]:
    """Per observation: [status right, status counted], [side right, side counted]; and the misses."""
    status_tally = {name: [0, 0] for name in OBSERVATIONS}
    side_tally = {name: [0, 0] for name in OBSERVATIONS if name in LATERALIZABLE}
    misses = []
    for case in cases:
        result = label_text(case["text"])
        for name in OBSERVATIONS:
            want_status, want_side = case["expected"][name]
            got = result.observations[name]
            if want_status != "absent" or got.status != "absent":
                status_tally[name][1] += 1
                if got.status == want_status:
                    status_tally[name][0] += 1
                else:
                    misses.append(f"{case['id']} {name}: status {got.status} != {want_status}")
            if name in LATERALIZABLE and want_status != "absent" and got.status != "absent":
                side_tally[name][1] += 1
                if got.laterality == want_side:
                    side_tally[name][0] += 1
                else:
                    misses.append(f"{case['id']} {name}: side {got.laterality} != {want_side}")
        if bool(case.get("refusal", False)) != result.is_refusal:
            misses.append(f"{case['id']} refusal {result.is_refusal}")
        if "hedging" in case and bool(case["hedging"]) != bool(result.hedging):
            misses.append(f"{case['id']} hedging {bool(result.hedging)}")
    return status_tally, side_tally, misses


def test_evaluation_set_is_big_and_covers_every_observation():
    assert len(CASES) >= 300
    styles = {case["style"] for case in CASES}
    assert styles == {"report", "chatbot"}
    for name in OBSERVATIONS:
        if name == "No Finding":
            continue
        for style in ("report", "chatbot"):
            statuses = {c["expected"][name][0] for c in CASES if c["style"] == style}
            assert {"positive", "negative", "uncertain"} <= statuses or name == "Support Devices", (
                name,
                style,
            )
            if name in LATERALIZABLE:
                sides = {c["expected"][name][1] for c in CASES if c["style"] == style}
                assert {"left", "right", "bilateral"} <= sides, (name, style, sides)
    assert sum(1 for c in CASES if c.get("refusal")) >= 5


def test_accuracy_goals(capsys):
    status_tally, side_tally, misses = score(CASES)
    lines = [f"{'observation':28s} {'status':>14s} {'laterality':>14s}"]
    total = [0, 0]
    total_side = [0, 0]
    for name in OBSERVATIONS:
        right, count = status_tally[name]
        total[0] += right
        total[1] += count
        side = "-"
        if name in side_tally:
            s_right, s_count = side_tally[name]
            total_side[0] += s_right
            total_side[1] += s_count
            side = f"{s_right}/{s_count} {s_right / max(s_count, 1):.0%}"
        lines.append(f"{name:28s} {f'{right}/{count} {right / max(count, 1):.0%}':>14s} {side:>14s}")
    lines.append(
        f"{'overall':28s} {f'{total[0]}/{total[1]} {total[0] / total[1]:.1%}':>14s} "
        f"{f'{total_side[0]}/{total_side[1]} {total_side[0] / total_side[1]:.1%}':>14s}"
    )
    for split in sorted({c["split"] for c in CASES if c.get("split")}, key=lambda name: (len(name), name)):
        # cases written after the rules were in place (their first, untuned scores: see the issue note)
        part = [c for c in CASES if c.get("split") == split]
        p_status, p_side, _ = score(part)
        s_right, s_count = (sum(v[i] for v in p_status.values()) for i in (0, 1))
        l_right, l_count = (sum(v[i] for v in p_side.values()) for i in (0, 1))
        lines.append(
            f"{split + f' ({len(part)} cases)':28s} {f'{s_right / s_count:.1%}':>14s} {f'{l_right / l_count:.1%}':>14s}"
        )
    with capsys.disabled():
        print("\n" + "\n".join(lines))
        if misses:
            print("remaining misses:\n  " + "\n  ".join(misses))
    assert total[0] / total[1] >= 0.95
    assert total_side[0] / total_side[1] >= 0.95
    for name in OBSERVATIONS:
        right, count = status_tally[name]
        assert right / max(count, 1) >= 0.90, name
        if name in side_tally:
            s_right, s_count = side_tally[name]
            assert s_right / max(s_count, 1) >= 0.90, name
    flag_misses = [m for m in misses if "refusal" in m or "hedging" in m]
    assert len(flag_misses) <= 0.05 * len(CASES)


def test_batch_table_agrees_with_label_text():
    texts = [case["text"] for case in CASES]
    table = label_texts(texts, processes=1)
    assert table.num_rows == len(CASES)
    rows = table.to_pylist()
    for case, row in zip(CASES, rows, strict=True):
        result = label_text(case["text"])
        for name in OBSERVATIONS:
            assert row[name] == result.observations[name].value, (case["id"], name)
            assert row[f"{name} laterality"] == result.observations[name].laterality, (case["id"], name)
        assert row["refusal"] == result.is_refusal
        assert row["n_steps"] == result.n_steps


@pytest.mark.parametrize("style", ["report", "chatbot"])
def test_each_style_meets_the_overall_goal(style):
    status_tally, _, _ = score([c for c in CASES if c["style"] == style])
    right = sum(v[0] for v in status_tally.values())
    count = sum(v[1] for v in status_tally.values())
    assert right / count >= 0.93
