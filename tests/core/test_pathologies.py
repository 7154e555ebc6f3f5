import pytest

from cxrmax.core.pathologies import (
    COMPETITION_LABELS,
    FINDINGS,
    OBSERVATIONS,
    binarize,
    canonical_name,
    no_finding,
    parse_label_value,
    positive_observations,
)


def test_vocabulary_matches_mimic_csv_header():
    header = (
        "Atelectasis,Cardiomegaly,Consolidation,Edema,Enlarged Cardiomediastinum,Fracture,Lung Lesion,"
        "Lung Opacity,No Finding,Pleural Effusion,Pleural Other,Pneumonia,Pneumothorax,Support Devices"
    )
    assert ",".join(OBSERVATIONS) == header
    assert len(FINDINGS) == 13 and "No Finding" not in FINDINGS
    assert set(COMPETITION_LABELS) <= set(OBSERVATIONS)


@pytest.mark.parametrize(
    "alias,name",
    [("Airspace Opacity", "Lung Opacity"), ("pleural_effusion", "Pleural Effusion"), ("  edema ", "Edema")],
)
def test_aliases(alias, name):
    assert canonical_name(alias) == name


def test_unknown_name_is_named_in_error():
    with pytest.raises(KeyError, match="Bronchiectasis"):
        canonical_name("Bronchiectasis")


@pytest.mark.parametrize(
    "cell,value", [("1.0", 1), ("0", 0), ("-1.0", -1), ("", None), (float("nan"), None), (None, None)]
)
def test_parse_label_value(cell, value):
    assert parse_label_value(cell) == value


@pytest.mark.parametrize("cell", ["2", "0.5", "yes"])
def test_parse_label_value_rejects(cell):
    with pytest.raises(ValueError):
        parse_label_value(cell)


def test_no_finding_rule():
    assert no_finding({"Support Devices": 1}) == 1
    assert no_finding({"Edema": -1}) is None
    assert no_finding({"Edema": 0, "Cardiomegaly": None}) == 1
    assert no_finding({"Pneumothorax": 1, "Support Devices": 1}) is None


def test_binarize_policies():
    assert [binarize(v) for v in (1, 0, -1, None)] == [1, 0, 1, 0]
    assert binarize(-1, "negative") == 0
    assert binarize(-1, "ignore") is None


def test_positive_observations_in_canonical_order():
    assert positive_observations({"Pneumothorax": 1, "Atelectasis": 1, "Edema": 0}) == [
        "Atelectasis",
        "Pneumothorax",
    ]
