"""The mini MIMIC-CXR maker: exact layout and headers, determinism, labels consistent with reports."""

from __future__ import annotations

import csv
import gzip
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from typer.testing import CliRunner

from cxrmax.cli import app
from cxrmax.core.pathologies import FINDINGS, OBSERVATIONS, no_finding
from cxrmax.mimic import read_ms_cxr_t
from cxrmax.mimic.reports import parse_report
from cxrmax.testing.mini_mimic import (
    LABEL_COLUMNS,
    METADATA_COLUMNS,
    MS_CXR_T_COLUMNS,
    MS_CXR_T_FILENAME,
    SPLIT_COLUMNS,
    make_mini_mimic,
    write_synthetic_csvs,
)

DICOM_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")


def read_rows(path: Path) -> list[dict[str, str]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        return list(csv.DictReader(handle))


def header(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        return next(csv.reader(handle))


def test_layout_headers_and_ids(mini_mimic: Path) -> None:
    assert header(mini_mimic / "mimic-cxr-2.0.0-metadata.csv.gz") == list(METADATA_COLUMNS)
    assert header(mini_mimic / "mimic-cxr-2.0.0-split.csv.gz") == list(SPLIT_COLUMNS)
    assert header(mini_mimic / "mimic-cxr-2.0.0-chexpert.csv.gz") == list(LABEL_COLUMNS)
    assert header(mini_mimic / "mimic-cxr-2.0.0-negbio.csv.gz") == list(LABEL_COLUMNS)
    assert header(mini_mimic / MS_CXR_T_FILENAME) == list(MS_CXR_T_COLUMNS)
    metadata = read_rows(mini_mimic / "mimic-cxr-2.0.0-metadata.csv.gz")
    split = read_rows(mini_mimic / "mimic-cxr-2.0.0-split.csv.gz")
    assert len({r["study_id"] for r in metadata}) == 40
    assert {r["split"] for r in split} == {"train", "validate", "test"}
    assert {"PA", "AP", "LATERAL"} <= {r["ViewPosition"] for r in metadata}
    for row in metadata:
        assert DICOM_ID.match(row["dicom_id"])
        assert re.fullmatch(r"1\d{7}", row["subject_id"]) and re.fullmatch(r"5\d{7}", row["study_id"])
        image = (
            mini_mimic
            / "files"
            / f"p{row['subject_id'][:2]}"
            / f"p{row['subject_id']}"
            / f"s{row['study_id']}"
        ) / f"{row['dicom_id']}.jpg"
        with Image.open(image) as im:
            assert im.mode == "L"
            assert im.size == (int(row["Columns"]), int(row["Rows"]))
        assert image.parent.with_suffix(".txt").is_file()
    # Splits are per subject, as in the release.
    subject_split: dict[str, set[str]] = {}
    for row in split:
        subject_split.setdefault(row["subject_id"], set()).add(row["split"])
    assert all(len(v) == 1 for v in subject_split.values())
    # Some films are as large as the real ones.
    assert max(int(r["Rows"]) * int(r["Columns"]) for r in metadata) >= 2500 * 2300


# Independent reading of the documented phrasings: keyword -> observation, cue -> state.
KEYWORDS = {
    "Atelectasis": r"atelectasis",
    "Cardiomegaly": r"cardiomegaly|heart size",
    "Consolidation": r"consolidation",
    "Edema": r"edema",
    "Enlarged Cardiomediastinum": r"mediastin",
    "Fracture": r"fracture",
    "Lung Lesion": r"nodule",
    "Lung Opacity": r"opacit",
    "Pleural Effusion": r"effusion",
    "Pleural Other": r"pleural thickening",
    "Pneumonia": r"pneumonia",
    "Pneumothorax": r"pneumothora",
    "Support Devices": r"\btube\b",
}


def read_labels_from_text(text: str) -> dict[str, int | None]:
    labels: dict[str, int | None] = dict.fromkeys(FINDINGS)
    for sentence in re.split(r"(?<=\.)\s+", text.replace("\n", " ")):
        lower = sentence.lower()
        for name, pattern in KEYWORDS.items():
            if not re.search(pattern, lower):
                continue
            if lower.startswith("no ") or " no " in lower or "is normal" in lower:
                value = 0
            elif lower.startswith("possible") or "cannot be excluded" in lower:
                value = -1
            else:
                assert lower.startswith("there is") or lower.startswith("there are"), sentence
                value = 1
            assert labels[name] in (None, value), f"{name}: conflicting statements in {text!r}"
            labels[name] = value
    labels["No Finding"] = no_finding(labels)
    return labels


def test_labels_match_report_text(mini_mimic: Path) -> None:
    chexpert = read_rows(mini_mimic / "mimic-cxr-2.0.0-chexpert.csv.gz")
    assert len(chexpert) == 40
    states = set()
    for row in chexpert:
        subject, study = row["subject_id"], row["study_id"]
        text = (mini_mimic / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt").read_text()
        sections = parse_report(text)
        expected = {name: (None if row[name] == "" else int(float(row[name]))) for name in OBSERVATIONS}
        # Whatever a labeler reads (best section, findings, or the last paragraph) gives the CSV labels.
        for part in {sections.best(), sections.findings, sections.last_paragraph} - {None}:
            assert read_labels_from_text(part) == expected, (study, part)
        assert expected["No Finding"] == no_finding(expected)
        states.update(v for v in expected.values())
    assert states == {1, 0, -1, None}


def test_report_styles_and_laterality_present(mini_mimic: Path) -> None:
    texts = [p.read_text() for p in sorted((mini_mimic / "files").glob("p*/p*/s*.txt"))]
    joined = "\n".join(texts)
    assert "IMPRESSON:" in joined or "IMPRESION:" in joined
    assert "FINDING:" in joined or "FINDNGS:" in joined
    assert "_" * 40 in joined and "ADDENDUM" in joined
    assert "___" in joined  # PHI placeholders
    for side in ("left", "right", "bilateral"):
        assert re.search(rf"\b{side}\b", joined, re.I), side
    assert "cannot be excluded" in joined and "Possible" in joined
    # At least one report has no FINDINGS/IMPRESSION at all: labels sit in the last paragraph.
    assert any(parse_report(t).findings is None and parse_report(t).impression is None for t in texts)


def test_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = make_mini_mimic(tmp_path / "a", studies=6, seed=3, large_images=0)
    b = make_mini_mimic(tmp_path / "b", studies=6, seed=3, large_images=0)
    c = make_mini_mimic(tmp_path / "c", studies=6, seed=4, large_images=0)
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert (a / "mimic-cxr-2.0.0-chexpert.csv.gz").read_bytes() != (
        c / "mimic-cxr-2.0.0-chexpert.csv.gz"
    ).read_bytes()


def test_split_weights_move_validate_to_test_and_leave_train_alone(tmp_path: Path) -> None:
    from cxrmax.mimic import MimicCXR

    usual = MimicCXR(make_mini_mimic(tmp_path / "usual", studies=60, seed=2, large_images=0))
    folded = MimicCXR(
        make_mini_mimic(tmp_path / "folded", studies=60, seed=2, large_images=0, split_weights=(70, 0, 30))
    )

    def ids(mimic, split):
        return mimic.select(splits=[split])["sample_id"].to_pylist()

    assert ids(folded, "train") == ids(usual, "train")
    for row in folded.select(splits=["train"]).to_pylist():
        assert (folded.root / row["image_path"]).read_bytes() == (usual.root / row["image_path"]).read_bytes()
    # Only the first subject's study stays in validate (one subject per split is always made).
    assert len(set(ids(folded, "validate"))) < len(set(ids(usual, "validate")))
    assert set(ids(folded, "test")) == set(ids(usual, "test")) | (
        set(ids(usual, "validate")) - set(ids(folded, "validate"))
    )
    with pytest.raises(ValueError, match="split_weights"):
        make_mini_mimic(tmp_path / "bad", studies=6, split_weights=(70, -1, 30))


def test_needs_three_studies(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        make_mini_mimic(tmp_path, studies=2)


def test_plain_csv_and_2_1_0_test_set(tmp_path: Path) -> None:
    root = make_mini_mimic(tmp_path / "m", studies=12, seed=2, gz=False, version="2.1.0", large_images=0)
    assert (root / "mimic-cxr-2.0.0-metadata.csv").is_file()
    assert not (root / "mimic-cxr-2.0.0-metadata.csv.gz").exists()
    test_header = header(root / "mimic-cxr-2.1.0-test-set-labeled.csv")
    assert test_header[0] == "study_id" and "subject_id" not in test_header
    assert "Airspace Opacity" in test_header and "Lung Opacity" not in test_header
    split = read_rows(root / "mimic-cxr-2.0.0-split.csv")
    test_studies = {r["study_id"] for r in split if r["split"] == "test"}
    assert {r["study_id"] for r in read_rows(root / "mimic-cxr-2.1.0-test-set-labeled.csv")} == test_studies


def test_ms_cxr_t_pairs_are_same_subject_and_earlier(mini_mimic: Path) -> None:
    table = read_ms_cxr_t(mini_mimic / MS_CXR_T_FILENAME)
    assert table.num_rows >= 1
    metadata = {r["dicom_id"]: r for r in read_rows(mini_mimic / "mimic-cxr-2.0.0-metadata.csv.gz")}
    for row in table.to_pylist():
        current, previous = metadata[row["dicom_id"]], metadata[row["previous_dicom_id"]]
        assert int(current["subject_id"]) == int(previous["subject_id"]) == row["subject_id"]
        assert (
            int(current["study_id"]) == row["study_id"]
            and int(previous["study_id"]) == row["previous_study_id"]
        )
        assert current["ViewPosition"] in ("PA", "AP") and previous["ViewPosition"] in ("PA", "AP")
        assert (current["StudyDate"], float(current["StudyTime"])) > (
            previous["StudyDate"],
            float(previous["StudyTime"]),
        )


def test_dicom_layout_with_monochrome1(mini_mimic_dicom: Path) -> None:
    root = mini_mimic_dicom
    assert (root / "cxr-record-list.csv.gz").is_file() and (root / "cxr-study-list.csv.gz").is_file()
    records = read_rows(root / "cxr-record-list.csv.gz")
    assert not list(root.rglob("*.jpg"))
    photometric = set()
    for record in records:
        dataset = pydicom.dcmread(root / record["path"])
        photometric.add(dataset.PhotometricInterpretation)
        assert dataset.Rows > 0 and dataset.BitsStored in (12, 16)
        assert dataset.pixel_array.dtype == np.uint16
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}


def test_cli_fixtures_mimic(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["fixtures", "mimic", "--out", str(tmp_path / "out"), "--studies", "5", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    assert len(read_rows(tmp_path / "out" / "mimic-cxr-2.0.0-chexpert.csv.gz")) == 5
    result = CliRunner().invoke(app, ["fixtures", "mimic", "-o", str(tmp_path / "bad"), "--studies", "2"])
    assert result.exit_code != 0


def test_synthetic_csvs_small(tmp_path: Path) -> None:
    root = write_synthetic_csvs(tmp_path, n_images=500, n_studies=300, n_subjects=100, seed=1)
    metadata = read_rows(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    assert len(metadata) == 500 and len({r["study_id"] for r in metadata}) == 300
    assert header(root / "mimic-cxr-2.0.0-chexpert.csv.gz") == list(LABEL_COLUMNS)


def test_atomic_and_refuses_to_clobber(tmp_path: Path) -> None:
    out = tmp_path / "m"
    make_mini_mimic(out, studies=4, seed=0, large_images=0)
    with pytest.raises(FileExistsError, match="--overwrite"):
        make_mini_mimic(out, studies=4, seed=1, large_images=0)
    before = (out / "mimic-cxr-2.0.0-chexpert.csv.gz").read_bytes()
    make_mini_mimic(out, studies=4, seed=1, large_images=0, overwrite=True)
    assert (out / "mimic-cxr-2.0.0-chexpert.csv.gz").read_bytes() != before
    assert len(list(out.rglob("s*.txt"))) == 4  # no leftovers of the first build
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary folders left behind
    (tmp_path / "empty").mkdir()
    make_mini_mimic(tmp_path / "empty", studies=3, seed=0, large_images=0)  # an empty folder is fine


def test_ms_cxr_t_tiny_fixtures(tmp_path: Path) -> None:
    five = make_mini_mimic(tmp_path / "five", studies=5, seed=0, large_images=0)
    assert read_ms_cxr_t(five / MS_CXR_T_FILENAME).num_rows >= 1
    three = make_mini_mimic(tmp_path / "three", studies=3, seed=0, large_images=0)
    table = read_ms_cxr_t(three / MS_CXR_T_FILENAME)  # no subject has two studies: header only
    assert table.num_rows == 0 and table.column_names[:5] == list(MS_CXR_T_COLUMNS[:5])
