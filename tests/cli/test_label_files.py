"""`cxrmax.labeler.files` through `cxrmax label`: formats and compression decided by content
(core.formats.sniff), so a .csv.gz is read as CSV and gzip lines are decompressed."""

from __future__ import annotations

import bz2
import gzip

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cxrmax.cli import app
from cxrmax.core.errors import InputError
from cxrmax.labeler.files import input_kind, iter_text_chunks, write_labels

runner = CliRunner()
TEXTS = ["Small left pleural effusion.", "Lungs are clear.", 'Mild "edema", no effusion.']


def _csv(delimiter: str = ",") -> str:
    rows = [f"id{delimiter}text"] + [
        f'{i}{delimiter}"{t.replace(chr(34), chr(34) * 2)}"' for i, t in enumerate(TEXTS)
    ]
    return "\n".join(rows) + "\n"


def _read(path) -> pa.Table:
    with pa.memory_map(str(path)) as handle:
        return pa.ipc.open_file(handle).read_all()


def test_csv_gz_is_read_as_csv_not_as_lines(tmp_path):
    source = tmp_path / "answers.csv.gz"
    source.write_bytes(gzip.compress(_csv().encode()))
    assert (input_kind(str(source)).format, input_kind(str(source)).compression) == ("csv", "gzip")
    chunks = list(iter_text_chunks(str(source), "text", keep=["id"]))
    assert [t for c in chunks for t in c.texts] == TEXTS
    assert chunks[0].kept.column("id").to_pylist() == ["0", "1", "2"]
    out = tmp_path / "labels.arrow"
    result = runner.invoke(app, ["label", str(source), "--column", "text", "--keep", "id", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = _read(out)
    assert table.column_names[:2] == ["row", "id"] and table.num_rows == 3
    assert table.column("Pleural Effusion").to_pylist()[0] == 1


def test_tsv_and_missing_csv_column(tmp_path):
    source = tmp_path / "answers.tsv"
    source.write_text(_csv("\t"))
    assert [t for c in iter_text_chunks(str(source), "text") for t in c.texts] == TEXTS
    with pytest.raises(InputError, match=r"field 'answer'.*no such column"):
        list(iter_text_chunks(str(source), "answer"))


def test_compressed_lines_and_content_over_name(tmp_path):
    lines = tmp_path / "answers.txt"
    lines.write_bytes(bz2.compress("\n".join(TEXTS).encode() + b"\n"))
    assert input_kind(str(lines)).format == "lines"
    assert [t for c in iter_text_chunks(str(lines)) for t in c.texts] == TEXTS
    jsonl = tmp_path / "answers.jsonl"  # gzip data without a .gz suffix
    jsonl.write_bytes(gzip.compress(b"".join(b'{"text": "%s"}\n' % t.encode() for t in TEXTS[:2])))
    assert [t for c in iter_text_chunks(str(jsonl)) for t in c.texts] == TEXTS[:2]
    with pytest.raises(InputError, match="--format 'xml'"):
        input_kind(str(jsonl), "xml")


def test_write_labels_is_atomic_and_refuses_a_bad_suffix(tmp_path):
    out = tmp_path / "labels.arrow"
    out.write_bytes(b"old")

    def failing():
        raise RuntimeError("interrupted")
        yield  # pragma: no cover

    with pytest.raises(RuntimeError):
        write_labels(failing(), out)
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["labels.arrow"]
    assert write_labels([], out, keep=["id"]) == 0
    assert _read(out).column_names[:2] == ["row", "id"]
    with pytest.raises(InputError, match="use a .arrow or .parquet"):
        write_labels([], tmp_path / "labels.csv")


def test_uncertain_policy_writes_the_graded_value(tmp_path):
    source = tmp_path / "reports.csv"
    source.write_text(
        "id,report\n"
        'a,"Bibasilar atelectasis versus scarring. This may represent early pneumonia."\n'
        'b,"No pneumothorax. Possible small left effusion."\n'
    )
    columns = {}
    for policy in ("keep", "graded", "negative"):
        out = tmp_path / f"{policy}.arrow"
        args = ["label", str(source), "--column", "report", "--uncertain", policy, "--out", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        table = _read(out)
        columns[policy] = [
            table.column(n).to_pylist() for n in ("Atelectasis", "Pneumonia", "Pleural Effusion")
        ]
    assert columns["keep"] == [[-1, None], [-1, None], [None, -1]]
    assert columns["graded"] == [[1, None], [0, None], [None, 0]]  # versus: probable; may / possible: not
    assert columns["negative"] == [[0, None], [0, None], [None, 0]]
    bad = runner.invoke(app, ["label", str(source), "--column", "report", "--uncertain", "maybe"])
    assert bad.exit_code != 0 and "graded" in bad.output
