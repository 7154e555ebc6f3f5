"""Messy real-world copies of a MIMIC-CXR root that once slipped through: ids too long for int64,
non-UTF-8 bytes in data rows, CSVs saved as ZIP/bzip2 under a .csv.gz name, folders where files
should be, a --reports-root that does not exist, unreadable reports under --lenient, absent label
files, dicom_ids that are not file names, symlink loops in the image cache. Real files, no mocks."""

from __future__ import annotations

import bz2
import gzip
import random
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cxrmax.cli import app
from cxrmax.core.errors import ImageError, InputError
from cxrmax.mimic import MimicCXR, read_subject_ids
from cxrmax.mimic.csvs import read_csv
from cxrmax.mimic.images import ImageCache, preprocess

META = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"


@pytest.fixture()
def root(mimic_copy: Path) -> Path:
    """A private copy of the session mini MIMIC-CXR (images hard-linked: replace, never write through)."""
    return mimic_copy


def _edit_gz(path: Path, edit) -> None:  # noqa: ANN001 - bytes -> bytes
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(edit(data)))


def _replace_line(data: bytes, number: int, edit) -> bytes:  # noqa: ANN001 - bytes -> bytes
    lines = data.split(b"\n")
    lines[number] = edit(lines[number])
    return b"\n".join(lines)


# ------------------------------------------------------------------------------------------ CSVs


def test_an_id_too_long_for_int64_is_named_not_a_traceback(root: Path) -> None:
    _edit_gz(
        root / SPLIT,
        lambda d: _replace_line(d, 3, lambda line: line.replace(b",1", b",99999999999999999991", 1)),
    )
    with pytest.raises(
        InputError, match=r"split\.csv\.gz row 3 field 'subject_id': not a positive integer id"
    ):
        MimicCXR(root).select(with_reports=False)
    lenient = MimicCXR(root, lenient=True)
    lenient.select(with_reports=False)
    assert lenient.skipped[f"{SPLIT}: bad subject_id"] == 1


@pytest.mark.parametrize("as_csv", [True, False], ids=["csv", "one id per line"])
def test_a_subject_list_with_an_id_too_long_for_int64(tmp_path: Path, as_csv: bool) -> None:
    path = tmp_path / "subjects.csv"
    path.write_text(("subject_id\n" if as_csv else "") + "10000032\n123456789012345678901234\n")
    with pytest.raises(InputError, match=r"subjects\.csv row 2"):
        read_subject_ids(path)


def test_a_subject_list_with_a_latin1_byte_far_down_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "subjects.txt"
    path.write_bytes(b"".join(b"%d\n" % (10000000 + i) for i in range(5000)) + b"# caf\xe9\n")
    with pytest.raises(InputError, match=r"subjects\.txt row 5001: not UTF-8"):
        read_subject_ids(path)


def _csv_with_latin1_at(tmp_path: Path, row: int) -> Path:
    lines = ["dicom_id,subject_id,description"] + [f"d{i},{10000000 + i},CHEST PA" for i in range(1, 3001)]
    lines[row] = lines[row].replace("CHEST", "CH\xc9ST")
    path = tmp_path / f"latin1-{row}.csv"
    path.write_bytes("\n".join(lines).encode("latin-1"))
    return path


@pytest.mark.parametrize("row", [5, 2500], ids=["in the first 8 KB", "far down"])
def test_a_latin1_byte_in_a_data_row(tmp_path: Path, row: int) -> None:
    """Named by row and field wherever it is (it used to be blamed on the header when it fell in the
    first 8 KB, and named no row further down); in a column that is not read it does not matter."""
    path = _csv_with_latin1_at(tmp_path, row)
    assert read_csv(path, ["dicom_id", "subject_id"]).num_rows == 3000
    with pytest.raises(InputError, match=rf"row {row} field 'description': not UTF-8 text \(bytes b'\\xc9'"):
        read_csv(path, ["dicom_id", "subject_id", "description"])


def test_a_latin1_procedure_description_does_not_stop_the_reader(root: Path) -> None:
    """PerformedProcedureStepDescription is not read: a Latin-1 accent in it is no error."""
    expected = MimicCXR(root).select(with_reports=False)
    _edit_gz(root / META, lambda d: _replace_line(d, 2, lambda line: line.replace(b"CHEST", b"CH\xc9ST", 1)))
    assert b"\xc9" in gzip.decompress((root / META).read_bytes())
    assert MimicCXR(root).select(with_reports=False).equals(expected)


@pytest.mark.parametrize("container", ["zip", "bz2"])
def test_a_csv_saved_as_another_container_is_named(root: Path, container: str) -> None:
    data = gzip.decompress((root / META).read_bytes())
    if container == "zip":
        with zipfile.ZipFile(root / META, "w") as archive:
            archive.writestr("mimic-cxr-2.0.0-metadata.csv", data)
        expected = r"metadata\.csv\.gz: a ZIP archive"
    else:
        (root / META).write_bytes(bz2.compress(data))
        expected = r"metadata\.csv\.gz: bzip2-compressed, not a CSV"
    with pytest.raises(InputError, match=expected):
        MimicCXR(root).select(with_reports=False)


@pytest.mark.parametrize("name", [SPLIT, CHEXPERT])
def test_a_folder_where_a_csv_should_be(root: Path, name: str) -> None:
    (root / name).unlink()
    (root / name).mkdir()
    with pytest.raises(InputError, match=rf"{name}: is a directory, not the CSV file"):
        mimic = MimicCXR(root)
        mimic.select(with_reports=False)


def test_an_absent_label_file_is_said_not_silent(root: Path) -> None:
    (root / CHEXPERT).unlink()
    mimic = MimicCXR(root)
    table = mimic.select(with_reports=False)
    assert table.column("labels").null_count == table.num_rows
    assert mimic.skipped["labels: no mimic-cxr-2.0.0-chexpert.csv(.gz) (labels left null)"] == table.num_rows
    summary = MimicCXR(root).summary(reports=False)
    assert "labels" not in summary and any(key.startswith("labels: no") for key in summary["skipped"])
    result = CliRunner().invoke(app, ["mimic", "select", str(root), "--out", str(root / "s.parquet")])
    assert result.exit_code == 0, result.output
    assert "labels left null" in result.output


@pytest.mark.parametrize("bad", ["../../x", "a\\b", "..", "a\tb"])
def test_a_dicom_id_that_is_not_a_file_name(root: Path, bad: str) -> None:
    def edit(data: bytes) -> bytes:
        lines = data.split(b"\n")
        dicom = lines[1].split(b",", 1)[0]
        return data.replace(dicom, bad.encode())

    _edit_gz(root / META, edit)
    _edit_gz(root / SPLIT, edit)
    with pytest.raises(InputError, match=r"metadata\.csv\.gz row 1 field 'dicom_id': not a file name"):
        MimicCXR(root).select(with_reports=False)
    lenient = MimicCXR(root, lenient=True)
    assert (
        lenient.select(with_reports=False, one_per_study=False).num_rows
        == MimicCXR(root, lenient=True).images().num_rows
    )
    assert lenient.skipped[f"{META}: bad dicom_id"] == 1


# ------------------------------------------------------------------------------------------ reports


def test_a_reports_root_that_does_not_exist_is_an_error(root: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nowhere: reports root not found"):
        MimicCXR(root, reports_root=tmp_path / "nowhere")
    result = CliRunner().invoke(
        app,
        [
            "mimic",
            "select",
            str(root),
            "--out",
            str(tmp_path / "s.parquet"),
            "--reports-root",
            str(tmp_path / "nowhere"),
        ],
    )
    assert result.exit_code == 2 and "reports root not found" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "s.parquet").exists()


def test_an_unreadable_report_fails_one_study_under_lenient(root: Path) -> None:
    mimic = MimicCXR(root)
    first = mimic.select(with_reports=False).to_pylist()[0]
    report = mimic.report_path(first["subject_id"], first["study_id"])
    report.unlink()
    report.mkdir()  # a folder where the report should be (an archive extracted in place)
    with pytest.raises(InputError, match=rf"{report.name}: cannot read report: Is a directory"):
        MimicCXR(root).select()
    lenient = MimicCXR(root, lenient=True)
    table = lenient.select()
    assert table.num_rows == 40
    rows = {row["study_id"]: row for row in table.to_pylist()}
    assert rows[first["study_id"]]["impression"] is None and rows[first["study_id"]]["findings"] is None
    assert sum(row["impression"] is not None for row in rows.values()) > 20
    assert lenient.skipped == {"reports: unreadable (sections left null)": 1}
    summary = MimicCXR(root, lenient=True).summary()
    assert summary["reports"]["missing"] == 1
    assert summary["skipped"] == {"reports: unreadable (sections left null)": 1}


# ------------------------------------------------------------------------------------------ images


def test_a_folder_where_an_image_should_be_is_called_a_folder(root: Path) -> None:
    image = root / MimicCXR(root).select(with_reports=False).column("image_path")[0].as_py()
    image.unlink()
    image.mkdir()
    with pytest.raises(InputError, match=r"image listed in .* but a directory"):
        MimicCXR(root).select(with_reports=False)


def test_image_cache_names_a_symlink_loop(tmp_path: Path) -> None:
    loop = tmp_path / "loop.jpg"
    loop.symlink_to(loop)
    cache = ImageCache(tmp_path / "cache", max_edge=64)
    for call in (
        lambda: cache.jpeg(loop),
        lambda: preprocess(loop),
        lambda: preprocess(tmp_path / ("x" * 300)),
    ):
        with pytest.raises(ImageError, match=r"cannot read image"):
            call()


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (random.Random(7).randbytes(3000), "binary data"),
        (gzip.compress(b"FINDINGS: No effusion."), "gzip-compressed"),
        (b"PK\x03\x04" + b"\x00" * 40, "a ZIP archive"),
        (b"\x00" * 128 + b"DICM" + b"\x00" * 64, "a DICOM file"),
    ],
)
def test_a_report_that_is_not_text_is_named_not_read_as_cp1252(
    root: Path, content: bytes, named: str
) -> None:
    """Any bytes decode as Windows-1252; a report file of random bytes or an archive used to become
    nonsense text that the labeler then read. It is an error naming the file, and lenient runs go
    without that report."""
    mimic = MimicCXR(root)
    first = mimic.select(with_reports=False).to_pylist()[0]
    report = mimic.report_path(first["subject_id"], first["study_id"])
    report.write_bytes(content)
    with pytest.raises(InputError, match=rf"{report.name}: not a text report: {named}"):
        MimicCXR(root).report_text(first["subject_id"], first["study_id"])
    lenient = MimicCXR(root, lenient=True)
    rows = {row["study_id"]: row for row in lenient.select().to_pylist()}
    assert rows[first["study_id"]]["findings"] is None and rows[first["study_id"]]["impression"] is None
    assert lenient.skipped == {"reports: unreadable (sections left null)": 1}


def test_a_utf16_report_with_its_bom_is_read(root: Path) -> None:
    mimic = MimicCXR(root)
    first = mimic.select(with_reports=False).to_pylist()[0]
    report = mimic.report_path(first["subject_id"], first["study_id"])
    text = report.read_text()
    report.write_bytes(text.encode("utf-16"))  # Notepad's "Unicode": UTF-16 LE with a BOM
    assert MimicCXR(root).report_text(first["subject_id"], first["study_id"]) == text
