"""MIMIC-CXR reader: layouts, CSV coding, report sectioning, selection/sharding, bad input."""

from __future__ import annotations

import csv
import gzip
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from typer.testing import CliRunner

from cxrmax.cli import app
from cxrmax.core.errors import InputError
from cxrmax.core.pathologies import FINDINGS, OBSERVATIONS
from cxrmax.core.schemas import SELECTION_SCHEMA
from cxrmax.core.shards import parse_shard
from cxrmax.mimic import (
    MimicCXR,
    detect_layout,
    read_ms_cxr_t,
    read_selection,
    read_subject_ids,
    write_selection,
)
from cxrmax.mimic.reader import _mix64
from cxrmax.mimic.reports import parse_report
from cxrmax.testing.mini_mimic import MS_CXR_T_FILENAME, make_mini_mimic, write_synthetic_csvs

META = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"


# ---------------------------------------------------------------------------------------------- helpers


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], rows[1:]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def edit_cell(path: Path, row: int, column: str, value: str) -> None:
    """Set one cell (row is the 1-based data row)."""
    header, rows = read_csv(path)
    rows[row - 1][header.index(column)] = value
    write_csv(path, header, rows)


# ---------------------------------------------------------------------------------------------- layout


def test_layout_and_version_detection(mini_mimic: Path, mini_mimic_dicom: Path, tmp_path: Path) -> None:
    assert detect_layout(mini_mimic) == "jpg"
    assert detect_layout(mini_mimic_dicom) == "dicom"
    jpg = MimicCXR(mini_mimic)
    assert (jpg.layout, jpg.version, jpg.image_extension) == ("jpg", "2.0.0", ".jpg")
    dicom = MimicCXR(mini_mimic_dicom)
    assert (dicom.layout, dicom.image_extension) == ("dicom", ".dcm")
    selection = dicom.select(views=["frontal"])
    assert all(p.endswith(".dcm") for p in selection.column("image_path").to_pylist())
    assert all((mini_mimic_dicom / p).is_file() for p in selection.column("image_path").to_pylist())
    v21 = make_mini_mimic(tmp_path / "v21", studies=6, seed=5, version="2.1.0", large_images=0)
    assert MimicCXR(v21).version == "2.1.0"


@pytest.mark.parametrize(("layout", "suffix"), [("jpg", ".JPG"), ("jpg", ".jpeg"), ("dicom", ".DCM")])
def test_images_named_in_another_letter_case_or_spelling_are_found(
    mini_mimic: Path, mini_mimic_dicom: Path, tmp_path: Path, layout: str, suffix: str
) -> None:
    """A copy whose images were renamed (upper-cased by a file system, or .jpeg): the layout is still
    detected and every selected image path names a file that exists."""
    source = mini_mimic if layout == "jpg" else mini_mimic_dicom
    root = tmp_path / "copy"
    shutil.copytree(source, root)
    renamed = 0
    for image in list((root / "files").rglob(f"*.{'jpg' if layout == 'jpg' else 'dcm'}")):
        image.rename(image.with_suffix(suffix))
        renamed += 1
    assert renamed > 0
    assert detect_layout(root) == layout
    mimic = MimicCXR(root)
    assert mimic.image_extension == suffix
    paths = mimic.select(views=["frontal"]).column("image_path").to_pylist()
    assert paths and all(p.endswith(suffix) and (root / p).is_file() for p in paths)


def test_images_join_matches_metadata(mini_mimic: Path) -> None:
    mimic = MimicCXR(mini_mimic)
    images = mimic.images()
    header, rows = read_csv(mini_mimic / META)
    assert images.num_rows == len(rows)
    by_id = {r[0]: dict(zip(header, r, strict=True)) for r in rows}
    _, split_rows = read_csv(mini_mimic / SPLIT)
    split_of = {r[0]: r[3] for r in split_rows}
    for row in images.to_pylist():
        source = by_id[row["dicom_id"]]
        assert row["subject_id"] == int(source["subject_id"]) and row["study_id"] == int(source["study_id"])
        assert row["view"] == (source["ViewPosition"] or None)
        assert row["split"] == split_of[row["dicom_id"]]
        assert row["study_date"] == int(source["StudyDate"]) and row["study_time"] == float(
            source["StudyTime"]
        )
        assert (mini_mimic / row["image_path"]).is_file()
    studies = mimic.studies()
    assert studies.num_rows == 40 and pc.sum(studies.column("n_images")).as_py() == images.num_rows


def test_plain_csvs_read_like_gz(mini_mimic: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    for name in (META, SPLIT, CHEXPERT, "mimic-cxr-2.0.0-negbio.csv.gz"):
        (plain / name[:-3]).write_bytes(gzip.decompress((mini_mimic / name).read_bytes()))
    (plain / "files").symlink_to(mini_mimic / "files")
    a, b = MimicCXR(mini_mimic), MimicCXR(plain)
    assert a.images().equals(b.images())
    assert a.study_labels().equals(b.study_labels())
    assert a.select(k=7, seed=2).equals(b.select(k=7, seed=2))


def test_label_coding_kept(mini_mimic: Path) -> None:
    labels = MimicCXR(mini_mimic).study_labels()
    header, rows = read_csv(mini_mimic / CHEXPERT)
    assert labels.num_rows == len(rows)
    for name in OBSERVATIONS:
        assert labels.schema.field(name).type == pa.float32()
    expected = {int(r[1]): r for r in rows}
    seen = set()
    for row in labels.to_pylist():
        source = expected[row["study_id"]]
        assert row["subject_id"] == int(source[0])
        for name in OBSERVATIONS:
            cell = source[header.index(name)]
            assert row[name] == (None if cell == "" else float(cell))
            seen.add(row[name])
    assert seen == {1.0, 0.0, -1.0, None}
    train = MimicCXR(mini_mimic).study_labels(splits=["train"])
    assert 0 < train.num_rows < labels.num_rows and set(train.column("split").to_pylist()) == {"train"}


def test_label_sources_negbio_and_test_set(mini_mimic: Path, tmp_path: Path) -> None:
    root = make_mini_mimic(tmp_path / "m", studies=12, seed=7, version="2.1.0", large_images=0)
    # Make negbio differ from chexpert in one cell: each source reads its own file.
    negbio = root / "mimic-cxr-2.0.0-negbio.csv.gz"
    header, rows = read_csv(negbio)
    rows[0][header.index("Edema")] = "-1.0"
    write_csv(negbio, header, rows)
    mimic = MimicCXR(root)
    study = int(rows[0][1])
    negbio_row = (
        mimic.study_labels(source="negbio").filter(pc.equal(pc.field("study_id"), study)).to_pylist()[0]
    )
    assert negbio_row["Edema"] == -1.0
    test_set = mimic.study_labels(source="test-set-labeled")
    chexpert = mimic.study_labels(splits=["test"])
    assert test_set.column_names == chexpert.column_names
    assert test_set.sort_by("study_id").equals(chexpert.sort_by("study_id"))  # Airspace -> Lung Opacity
    with pytest.raises(InputError, match="unknown label source"):
        mimic.study_labels(source="chexbert")


# ---------------------------------------------------------------------------------------------- reports


def test_parse_report_standard() -> None:
    text = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with new onset ascites  // eval for infection

 COMPARISON:  None.

 FINDINGS:

 There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
 nodular opacities that most likely represent nipple shadows.

 IMPRESSION:

 No acute cardiopulmonary process.
"""
    sections = parse_report(text)
    assert sections.findings == (
        "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities that "
        "most likely represent nipple shadows."
    )
    assert sections.impression == "No acute cardiopulmonary process."
    assert sections.last_paragraph == "No acute cardiopulmonary process."
    assert sections.best() == sections.impression
    assert sections.sections["indication"].startswith("___F with new onset ascites")
    assert sections.addenda == ()


def test_parse_report_addendum_misspelled_inline_and_lists() -> None:
    text = """                                 FINAL ADDENDUM
 ADDENDUM:  Findings discussed with Dr. ___ at 3:15 pm on ___.

 ______________________________________________________________________________
                                 FINAL REPORT
 WET READ: ___ 10:03 PM
 FINDING:  Small left pleural effusion.
 Heart size normal.
 IMPRESSON:
 1. Small left pleural effusion.
 2. No pneumothorax.
"""
    sections = parse_report(text)
    assert sections.addenda == ("ADDENDUM: Findings discussed with Dr. ___ at 3:15 pm on ___.",)
    assert sections.findings == "Small left pleural effusion. Heart size normal."
    assert sections.impression == "1. Small left pleural effusion.\n2. No pneumothorax."
    assert "wet read" in sections.sections
    assert "ADDENDUM" not in (sections.best() or "")


def test_parse_report_missing_sections_and_last_paragraph() -> None:
    text = """ FINAL REPORT
 EXAMINATION:  CHEST (PORTABLE AP)
 INDICATION:  Dyspnea.

 Portable AP view of the chest.

 Right basilar atelectasis.  No pneumothorax.
 Dr. ___ was notified: results acknowledged.
"""
    sections = parse_report(text)
    assert sections.findings is None and sections.impression is None
    assert sections.last_paragraph == (
        "Right basilar atelectasis. No pneumothorax. Dr. ___ was notified: results acknowledged."
    )
    assert sections.best() == sections.last_paragraph
    only_impression = parse_report("FINDINGS AND IMPRESSION:  Clear lungs.\n")
    assert only_impression.impression == "Clear lungs." and only_impression.best() == "Clear lungs."
    conclusion = parse_report(" FINDINGS: Lungs clear.\n\n CONCLUSION: Normal chest.\n")
    assert conclusion.findings == "Lungs clear." and conclusion.impression == "Normal chest."
    assert parse_report("").best() is None and parse_report("   \n").findings is None


def test_reports_attached_to_selection(mini_mimic: Path) -> None:
    mimic = MimicCXR(mini_mimic)
    table = mimic.select()
    for row in table.to_pylist():
        sections = mimic.report(row["subject_id"], row["study_id"])
        assert sections is not None
        assert (row["findings"], row["impression"], row["last_paragraph"]) == (
            sections.findings,
            sections.impression,
            sections.last_paragraph,
        )
        assert sections.best()
    assert mimic.report(19999999, 59999999) is None


# ---------------------------------------------------------------------------------------------- selection


def test_select_filters(mini_mimic: Path) -> None:
    mimic = MimicCXR(mini_mimic)
    everything = mimic.select()
    assert everything.schema == SELECTION_SCHEMA
    assert everything.num_rows == 40  # one image per study
    assert everything.column("sample_id").equals(everything.column("dicom_id"))
    images = mimic.images()
    # One per study prefers PA, then AP.
    for row in everything.to_pylist():
        views = images.filter(pc.equal(images.column("study_id"), row["study_id"])).column("view").to_pylist()
        if "PA" in views:
            assert row["view"] == "PA"
        elif "AP" in views:
            assert row["view"] == "AP"
    frontal = mimic.select(views=["frontal"], one_per_study=False)
    assert set(frontal.column("view").to_pylist()) == {"PA", "AP"}
    lateral = mimic.select(views=["lateral"], one_per_study=False)
    assert set(lateral.column("view").to_pylist()) <= {"LATERAL", "LL"} and lateral.num_rows > 0
    assert mimic.select(one_per_study=False).num_rows == images.num_rows
    train = mimic.select(splits=["train"])
    assert set(train.column("split").to_pylist()) == {"train"}
    assert mimic.select(splits="val").num_rows == mimic.select(splits=["validate"]).num_rows > 0
    positive = mimic.select(require_positive=True)
    assert 0 < positive.num_rows < everything.num_rows
    for labels in positive.column("labels").to_pylist():
        assert any(labels[name] == 1.0 for name in FINDINGS)
    with pytest.raises(InputError, match="unknown split"):
        mimic.select(splits=["training"])


def test_exclude_subjects(mini_mimic: Path, tmp_path: Path) -> None:
    mimic = MimicCXR(mini_mimic)
    ms_cxr_t = mini_mimic / MS_CXR_T_FILENAME
    excluded = read_subject_ids(ms_cxr_t)
    assert excluded == set(read_ms_cxr_t(ms_cxr_t).column("subject_id").to_pylist())
    kept = mimic.select(exclude_subjects=ms_cxr_t)
    assert not excluded & set(kept.column("subject_id").to_pylist())
    everything = mimic.select()
    assert kept.num_rows == sum(s not in excluded for s in everything.column("subject_id").to_pylist())
    listing = tmp_path / "subjects.txt"
    listing.write_text("# MS-CXR-T\n" + "\n".join(f"p{s}" for s in sorted(excluded)) + "\n\n")
    assert mimic.select(exclude_subjects=listing).equals(kept)
    assert mimic.select(exclude_subjects=sorted(excluded)).equals(kept)
    listing.write_text("10000032\nnot-an-id\n")
    with pytest.raises(InputError, match=r"subjects.txt row 2"):
        read_subject_ids(listing)


def test_sample_k_is_deterministic_nested_and_order_free(mimic_copy: Path) -> None:
    mimic = MimicCXR(mimic_copy)
    a = mimic.select(k=10, seed=1)
    assert a.num_rows == 10 and a.equals(MimicCXR(mimic_copy).select(k=10, seed=1))
    assert set(a.column("study_id").to_pylist()) != set(
        mimic.select(k=10, seed=2).column("study_id").to_pylist()
    )
    small = set(mimic.select(k=4, seed=1).column("study_id").to_pylist())
    assert small < set(a.column("study_id").to_pylist())
    assert mimic.select(k=1000).num_rows == 40 and mimic.select(k=0).num_rows == 0
    # Shuffling the CSV rows changes nothing.
    for name in (META, SPLIT, CHEXPERT):
        header, rows = read_csv(mimic_copy / name)
        random.Random(0).shuffle(rows)
        write_csv(mimic_copy / name, header, rows)
    assert MimicCXR(mimic_copy).select(k=10, seed=1).equals(a)


def test_shards_partition_the_selection(mini_mimic: Path) -> None:
    mimic = MimicCXR(mini_mimic)
    for kwargs in ({}, {"k": 25, "seed": 3}, {"views": ["frontal"], "one_per_study": False}):
        whole = mimic.select(**kwargs)
        parts = [mimic.select(shard=(i, 3), **kwargs) for i in range(3)]
        ids = [p.column("dicom_id").to_pylist() for p in parts]
        assert sum(len(x) for x in ids) == whole.num_rows
        assert sorted(sum(ids, [])) == sorted(whole.column("dicom_id").to_pylist())
        studies = [set(p.column("study_id").to_pylist()) for p in parts]
        assert not (studies[0] & studies[1] or studies[0] & studies[2] or studies[1] & studies[2])
    assert mimic.select(shard="1/3").equals(mimic.select(shard=(1, 3)))
    assert parse_shard("2 / 8") == (2, 8)
    for bad in ("3/3", "a/b", "-1/2", "1/0"):
        with pytest.raises(InputError):
            parse_shard(bad)


def test_hash_is_splitmix64() -> None:
    # Known splitmix64 outputs (state 0 and 1): the shard of a study is the same on every machine.
    assert int(_mix64(np.array([0], dtype=np.uint64))[0]) == 0xE220A8397B1DCDAF
    assert int(_mix64(np.array([0x9E3779B97F4A7C15], dtype=np.uint64))[0]) == 0x6E789E6AA1B965F4


def test_selection_roundtrip(mini_mimic: Path, tmp_path: Path) -> None:
    table = MimicCXR(mini_mimic).select(k=5)
    for name in ("sel.parquet", "sel.arrow"):
        path = write_selection(table, tmp_path / "out" / name)
        assert read_selection(path).equals(table)
        assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(InputError, match=r"\.parquet"):
        write_selection(table, tmp_path / "sel.csv")
    pa_table = table.drop_columns(["labels"])
    import pyarrow.parquet as pq

    pq.write_table(pa_table, tmp_path / "broken.parquet")
    with pytest.raises(InputError, match="labels"):
        read_selection(tmp_path / "broken.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="junk.parquet"):
        read_selection(tmp_path / "junk.parquet")


@pytest.mark.slow
def test_selection_from_release_sized_metadata_opens_no_image(tmp_path: Path, monkeypatch) -> None:
    root = write_synthetic_csvs(tmp_path / "full", seed=0, gz=False)  # plain: skips 3 s of gzip

    def forbidden(*args, **kwargs):
        raise AssertionError("selection opened an image")

    import PIL.Image
    import pydicom

    monkeypatch.setattr(PIL.Image, "open", forbidden)
    monkeypatch.setattr(pydicom, "dcmread", forbidden)
    mimic = MimicCXR(root)
    assert mimic.images().num_rows == 377_110
    table = mimic.select(k=24_426, seed=0, with_reports=False, check_files=False)
    assert table.num_rows == 24_426 and len(set(table.column("study_id").to_pylist())) == 24_426
    parts = [
        mimic.select(k=24_426, seed=0, shard=(i, 4), with_reports=False, check_files=False) for i in range(4)
    ]
    assert sum(p.num_rows for p in parts) == 24_426


def test_ms_cxr_t_reader_normalises_and_validates(tmp_path: Path, mini_mimic: Path) -> None:
    source = mini_mimic / MS_CXR_T_FILENAME
    header, rows = read_csv(source)
    shouting = tmp_path / "upper.csv"
    rows[0][header.index("consolidation_progression")] = " Worsening "
    write_csv(shouting, [h.upper() for h in header], rows)
    table = read_ms_cxr_t(shouting)
    assert table.column("consolidation_progression")[0].as_py() == "worsening"
    assert table.schema.field("subject_id").type == pa.int64()
    rows[0][header.index("edema_label_quality")] = "two_experts"
    write_csv(tmp_path / "bad.csv", header, rows)
    with pytest.raises(InputError, match=r"bad.csv row 1 field 'edema_label_quality'"):
        read_ms_cxr_t(tmp_path / "bad.csv")
    write_csv(tmp_path / "missing.csv", header[:-1], [r[:-1] for r in rows])
    with pytest.raises(InputError, match="pneumothorax_label_quality"):
        read_ms_cxr_t(tmp_path / "missing.csv")


# ---------------------------------------------------------------------------------------------- bad input


def test_empty_root(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a MIMIC-CXR root"):
        MimicCXR(tmp_path)
    with pytest.raises(InputError, match="not a directory"):
        MimicCXR(tmp_path / "nowhere")


@pytest.mark.parametrize("name", [META, SPLIT])
def test_missing_csv(mimic_copy: Path, name: str) -> None:
    (mimic_copy / name).unlink()
    with pytest.raises(InputError, match=name.removesuffix(".gz")):
        MimicCXR(mimic_copy).select()


def test_missing_label_csv(mimic_copy: Path) -> None:
    (mimic_copy / CHEXPERT).unlink()
    mimic = MimicCXR(mimic_copy)
    with pytest.raises(InputError, match="chexpert.csv"):
        mimic.study_labels()
    with pytest.raises(InputError, match="chexpert.csv"):
        mimic.select(require_positive=True)
    # Without a label file a plain selection still works, with null labels.
    assert mimic.select().column("labels").null_count == 40


def test_empty_csv(mimic_copy: Path) -> None:
    (mimic_copy / SPLIT).write_bytes(gzip.compress(b""))
    with pytest.raises(InputError, match="empty file"):
        MimicCXR(mimic_copy).images()


def test_missing_and_unknown_columns(mimic_copy: Path) -> None:
    header, rows = read_csv(mimic_copy / META)
    index = header.index("ViewPosition")
    write_csv(
        mimic_copy / META, header[:index] + header[index + 1 :], [r[:index] + r[index + 1 :] for r in rows]
    )
    with pytest.raises(InputError, match=r"metadata.csv.gz field 'ViewPosition': missing column"):
        MimicCXR(mimic_copy).images()
    header, rows = read_csv(mimic_copy / CHEXPERT)
    header[header.index("Edema")] = "Oedema"
    write_csv(mimic_copy / CHEXPERT, header, rows)
    with pytest.raises(InputError, match=r"chexpert.csv.gz field 'Oedema': unknown label column"):
        MimicCXR(mimic_copy).study_labels()
    header[header.index("Oedema")] = "Airspace Opacity"  # alias of a column that is already there
    write_csv(mimic_copy / CHEXPERT, header, rows)
    with pytest.raises(InputError, match="appears twice"):
        MimicCXR(mimic_copy).study_labels()


@pytest.mark.parametrize("value", ["2.0", "yes", "0.5"])
def test_label_value_outside_coding(mimic_copy: Path, value: str) -> None:
    edit_cell(mimic_copy / CHEXPERT, 3, "Pneumonia", value)
    with pytest.raises(InputError, match=r"chexpert.csv.gz row 3 field 'Pneumonia': label value"):
        MimicCXR(mimic_copy).study_labels()
    lenient = MimicCXR(mimic_copy, lenient=True)
    assert lenient.study_labels().num_rows == 39
    assert lenient.skipped == {"mimic-cxr-2.0.0-chexpert.csv.gz: label value outside 1/0/-1/blank": 1}


def test_label_coding_accepts_integer_spelling(mimic_copy: Path) -> None:
    header, rows = read_csv(mimic_copy / CHEXPERT)
    expected = MimicCXR(mimic_copy).study_labels()
    rows = [
        [{"1.0": "1", "0.0": " 0", "-1.0": "-1"}.get(c, c) if i >= 2 else c for i, c in enumerate(r)]
        for r in rows
    ]
    write_csv(mimic_copy / CHEXPERT, header, rows)
    assert MimicCXR(mimic_copy).study_labels().equals(expected)


def test_ids_disagree_between_csvs(mimic_copy: Path) -> None:
    edit_cell(mimic_copy / SPLIT, 2, "study_id", "59999999")
    with pytest.raises(InputError, match=r"split.csv.gz row 2 field 'study_id': study_id disagrees"):
        MimicCXR(mimic_copy).images()
    lenient = MimicCXR(mimic_copy, lenient=True)
    _, meta_rows = read_csv(mimic_copy / META)
    assert lenient.images().num_rows == len(meta_rows) - 1
    assert lenient.skipped["mimic-cxr-2.0.0-split.csv.gz: ids disagree"] == 1


def test_label_subject_disagrees(mimic_copy: Path) -> None:
    edit_cell(mimic_copy / CHEXPERT, 5, "subject_id", "19999999")
    with pytest.raises(InputError, match=r"chexpert.csv.gz row 5 field 'subject_id': subject_id disagrees"):
        MimicCXR(mimic_copy).study_labels()
    edit_cell(mimic_copy / CHEXPERT, 5, "study_id", "59999998")
    with pytest.raises(InputError, match=r"chexpert.csv.gz row 5 field 'study_id': study not in"):
        MimicCXR(mimic_copy).study_labels()


def test_image_missing_from_split_and_duplicates(mimic_copy: Path) -> None:
    header, rows = read_csv(mimic_copy / SPLIT)
    write_csv(mimic_copy / SPLIT, header, rows[1:])
    with pytest.raises(InputError, match=r"metadata.csv.gz row \d+ field 'dicom_id': image has no row in"):
        MimicCXR(mimic_copy).images()
    write_csv(mimic_copy / SPLIT, header, rows + [rows[0]])
    with pytest.raises(InputError, match=rf"split.csv.gz row {len(rows) + 1} field 'dicom_id': duplicate"):
        MimicCXR(mimic_copy).images()
    rows[3][header.index("split")] = "holdout"
    write_csv(mimic_copy / SPLIT, header, rows)
    with pytest.raises(InputError, match=r"row 4 field 'split'"):
        MimicCXR(mimic_copy).images()


def test_bad_id_and_study_with_two_subjects(mimic_copy: Path) -> None:
    edit_cell(mimic_copy / META, 4, "subject_id", "p1234")
    with pytest.raises(InputError, match=r"metadata.csv.gz row 4 field 'subject_id': not a positive integer"):
        MimicCXR(mimic_copy).images()
    header, rows = read_csv(mimic_copy / META)
    # Give row 2 another subject but keep its study: one study, two subjects.
    original = next(r for r in rows if r[header.index("subject_id")] != "p1234")
    rows = [r for r in rows if r[header.index("subject_id")] != "p1234"]
    clone = list(original)
    clone[0] = "ffffffff-ffffffff-ffffffff-ffffffff-ffffffff"
    clone[header.index("subject_id")] = "19999999"
    write_csv(mimic_copy / META, header, rows + [clone])
    with pytest.raises(InputError, match="appears with subjects"):
        MimicCXR(mimic_copy).images()


def test_image_listed_but_absent(mimic_copy: Path) -> None:
    mimic = MimicCXR(mimic_copy)
    victim = mimic.select(k=1, seed=0).column("image_path")[0].as_py()
    (mimic_copy / victim).unlink()
    with pytest.raises(InputError, match=rf"{victim.split('/')[-1]}: image listed in .* but absent"):
        MimicCXR(mimic_copy).select()
    lenient = MimicCXR(mimic_copy, lenient=True)
    assert lenient.select().num_rows == 39
    assert lenient.skipped == {"images: listed but absent": 1}
    assert MimicCXR(mimic_copy).select(check_files=False).num_rows == 40


def test_cli_summary_and_select(mini_mimic: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["mimic", "summary", str(mini_mimic)])
    assert result.exit_code == 0, result.output
    for text in ("train", "validate", "test", "PA", "LATERAL", "Pleural Effusion", "impression", "addenda"):
        assert text in result.output
    assert "every subject's studies are in one split" in result.output
    out = tmp_path / "sel.parquet"
    args = ["mimic", "select", str(mini_mimic), "--split", "train", "--view", "frontal", "--require-positive"]
    args += [
        "--k",
        "6",
        "--seed",
        "1",
        "--exclude-subjects",
        str(mini_mimic / MS_CXR_T_FILENAME),
        "--out",
        str(out),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    table = read_selection(out)
    expected = MimicCXR(mini_mimic).select(
        splits=["train"],
        views=["frontal"],
        require_positive=True,
        k=6,
        seed=1,
        exclude_subjects=mini_mimic / MS_CXR_T_FILENAME,
    )
    assert table.equals(expected)
    shards = []
    for i in range(2):
        path = tmp_path / f"shard{i}.arrow"
        assert (
            runner.invoke(
                app, ["mimic", "select", str(mini_mimic), "--shard", f"{i}/2", "--out", str(path)]
            ).exit_code
            == 0
        )
        shards.append(read_selection(path))
    assert sum(s.num_rows for s in shards) == 40
    result = runner.invoke(app, ["mimic", "select", str(tmp_path / "nowhere"), "--out", str(out)])
    assert result.exit_code == 2 and "not a directory" in result.output


def test_summary_flags_a_subject_whose_studies_span_two_splits(mimic_copy: Path) -> None:
    split_csv = mimic_copy / "mimic-cxr-2.0.0-split.csv.gz"
    header, rows = read_csv(split_csv)
    assert MimicCXR(mimic_copy).summary(reports=False)["subjects_in_several_splits"] == []
    subject, study, split = (header.index(name) for name in ("subject_id", "study_id", "split"))
    studies_of: dict[str, set[str]] = {}
    for row in rows:
        studies_of.setdefault(row[subject], set()).add(row[study])
    leaker = next(s for s, studies in studies_of.items() if len(studies) > 1)
    moved = min(studies_of[leaker])
    old_split = next(row[split] for row in rows if row[study] == moved)
    new_split = "test" if old_split != "test" else "train"
    for row in rows:
        if row[study] == moved:  # every image of one study, so the study itself stays consistent
            row[split] = new_split
    write_csv(split_csv, header, rows)
    assert MimicCXR(mimic_copy).summary(reports=False)["subjects_in_several_splits"] == [int(leaker)]
    result = CliRunner().invoke(app, ["mimic", "summary", str(mimic_copy), "--no-reports"])
    assert result.exit_code == 0, result.output
    assert "1 subject(s) have studies in more than one split" in result.output and leaker in result.output


def test_cli_lenient_reports_skips(mimic_copy: Path, tmp_path: Path) -> None:
    edit_cell(mimic_copy / CHEXPERT, 2, "Edema", "7")
    runner = CliRunner()
    result = runner.invoke(
        app, ["mimic", "select", str(mimic_copy), "--require-positive", "--out", str(tmp_path / "s.parquet")]
    )
    assert result.exit_code == 2 and "row 2 field 'Edema'" in result.output
    result = runner.invoke(
        app,
        [
            "mimic",
            "select",
            str(mimic_copy),
            "--require-positive",
            "--lenient",
            "--out",
            str(tmp_path / "s.parquet"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Skipped" in result.output and "label value outside" in result.output


def test_corrupt_images_found_by_verify(mimic_copy: Path, mini_mimic_dicom: Path, tmp_path: Path) -> None:
    mimic = MimicCXR(mimic_copy)
    victim = mimic_copy / mimic.select(k=1, seed=5).column("image_path")[0].as_py()
    data = victim.read_bytes()
    victim.unlink()  # the copy hard-links images: never write through to the session fixture
    victim.write_bytes(data[: len(data) // 3])
    assert MimicCXR(mimic_copy).select().num_rows == 40  # existence alone does not open images
    with pytest.raises(InputError, match=victim.name):
        MimicCXR(mimic_copy).select(verify_images=True)
    lenient = MimicCXR(mimic_copy, lenient=True)
    assert lenient.select(verify_images=True).num_rows == 39
    assert lenient.skipped == {"images: corrupt or undecodable": 1}
    # The same for a DICOM layout.
    dicom_root = tmp_path / "dicom"
    shutil.copytree(mini_mimic_dicom, dicom_root)
    target = dicom_root / MimicCXR(dicom_root).select(k=1).column("image_path")[0].as_py()
    target.write_bytes(target.read_bytes()[:1000])
    with pytest.raises(InputError, match=target.name):
        MimicCXR(dicom_root).select(verify_images=True)
    assert MimicCXR(dicom_root, lenient=True).select(verify_images=True).num_rows == 11


def test_header_variants_by_first_word() -> None:
    sections = parse_report(" FINDINGS (PA):  Clear.\n\n IMPRESSION AND RECOMMENDATIONS:  Normal.\n")
    assert (sections.findings, sections.impression) == ("Clear.", "Normal.")
    slash = parse_report(" FINDINGS/IMPRESSION:  No acute process.\n")
    assert slash.impression == "No acute process." and slash.findings is None


def test_reports_root_elsewhere(mini_mimic: Path, tmp_path: Path) -> None:
    # The JPG release has no reports: they come from MIMIC-CXR and may live in another folder.
    images_only = tmp_path / "jpg"
    reports = tmp_path / "reports"
    for source in mini_mimic.rglob("*"):
        if source.is_file():
            target = (reports if source.suffix == ".txt" else images_only) / source.relative_to(mini_mimic)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    assert MimicCXR(images_only).select().column("impression").null_count == 40
    with_reports = MimicCXR(images_only, reports_root=reports).select()
    assert with_reports.equals(MimicCXR(mini_mimic).select().cast(with_reports.schema))
    result = CliRunner().invoke(app, ["mimic", "summary", str(images_only), "--reports-root", str(reports)])
    assert result.exit_code == 0 and "missing" in result.output


def test_dicom_release_without_jpg_csvs_says_what_to_do(mini_mimic_dicom: Path, tmp_path: Path) -> None:
    root = tmp_path / "dicom"
    shutil.copytree(mini_mimic_dicom, root)
    (root / META).unlink()
    with pytest.raises(InputError, match="copy MIMIC-CXR-JPG's CSVs"):
        MimicCXR(root).select()


def test_lenient_duplicate_metadata_rows_are_counted_once(mimic_copy: Path) -> None:
    for name in (META, SPLIT):
        header, rows = read_csv(mimic_copy / name)
        write_csv(mimic_copy / name, header, rows + [rows[0]])
    with pytest.raises(InputError, match="duplicate dicom_id"):
        MimicCXR(mimic_copy).images()
    lenient = MimicCXR(mimic_copy, lenient=True)
    images = lenient.images()
    assert images.num_rows == len(rows) and len(set(images.column("dicom_id").to_pylist())) == len(rows)
    assert lenient.skipped == {
        "mimic-cxr-2.0.0-metadata.csv.gz: duplicate dicom_id": 1,
        "mimic-cxr-2.0.0-split.csv.gz: duplicate dicom_id": 1,
    }


def test_sortedness_check() -> None:
    from cxrmax.mimic.reader import _sorted_by_subject_study_dicom as is_sorted

    def table(rows):
        subject, study, dicom = zip(*rows, strict=True)
        return pa.table({"subject_id": list(subject), "study_id": list(study), "dicom_id": list(dicom)})

    assert is_sorted(table([(1, 5, "b"), (1, 6, "a"), (2, 3, "a"), (2, 3, "c")]))
    assert not is_sorted(table([(1, 5, "b"), (1, 5, "a")]))  # dicom order within a study
    assert not is_sorted(table([(1, 6, "a"), (1, 5, "a")]))
    assert not is_sorted(table([(2, 1, "a"), (1, 9, "a")]))
    assert is_sorted(table([(1, 1, "z")]))


def test_cli_errors_print_user_text_literally(tmp_path: Path) -> None:
    """A path like runs[v2] must not be eaten as rich markup in the one-line error."""
    root = tmp_path / "mimic[v2][bold]"
    root.mkdir()
    result = CliRunner().invoke(app, ["mimic", "summary", str(root)])
    assert result.exit_code == 2
    assert "mimic[v2][bold]" in " ".join(result.output.split()).replace(" ", "")
