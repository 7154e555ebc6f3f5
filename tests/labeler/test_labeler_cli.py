"""`cxrmax label`: plain lines, JSONL (--field), Arrow/Parquet (--column), --out, --explain, bad rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from typer.testing import CliRunner

from cxrmax.cli import app
from cxrmax.labeler import label_texts

runner = CliRunner()


def flat(output: str) -> str:
    """The output with rich's line wrapping and table borders undone (for substring checks)."""
    for border in "│┃":
        output = output.replace(border, " ")
    return " ".join(output.split())


TEXTS = [
    "Small left pleural effusion. No pneumothorax.",
    "## Findings\n- **Cardiomegaly**\n- Possible right lower lobe pneumonia",
    "As an AI, I cannot interpret medical images. Please consult a radiologist.",
]


def test_label_plain_lines_from_stdin_shows_a_table():
    result = runner.invoke(app, ["label", "-"], input="Small left pleural effusion.\nLungs are clear.\n")
    assert result.exit_code == 0, result.output
    assert "Pleural" in result.output and "(left)" in result.output
    assert "2 texts, 0 with errors" in flat(result.output)


def test_label_jsonl_field_to_arrow(tmp_path):
    source = tmp_path / "answers.jsonl"
    source.write_text("".join(json.dumps({"id": i, "answer": t}) + "\n" for i, t in enumerate(TEXTS)))
    out = tmp_path / "labels.arrow"
    result = runner.invoke(app, ["label", str(source), "--field", "answer", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with pa.memory_map(str(out)) as handle:
        table = pa.ipc.open_file(handle).read_all()
    assert table.column("row").to_pylist() == [1, 2, 3]
    assert table.drop(["row"]).equals(label_texts(TEXTS))
    assert table.column("refusal").to_pylist() == [False, False, True]
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed into place


def test_label_arrow_and_parquet_columns(tmp_path):
    table = pa.table({"sample_id": ["a", "b", "c"], "text": TEXTS})
    arrow_path = tmp_path / "trajectories.arrow"
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    parquet_path = tmp_path / "trajectories.parquet"
    pq.write_table(table, parquet_path)
    out = tmp_path / "labels.parquet"
    for source in (arrow_path, parquet_path):
        result = runner.invoke(app, ["label", str(source), "--column", "text", "--out", str(out)])
        assert result.exit_code == 0, result.output
        labels = pq.read_table(out)
        assert labels.column("Pleural Effusion").to_pylist() == [1, None, None]
        assert labels.column("Pneumonia").to_pylist() == [None, -1, None]
    result = runner.invoke(app, ["label", str(parquet_path), "--column", "answer"])
    assert result.exit_code == 2
    assert "field 'answer'" in flat(result.output) and "no such column" in flat(result.output)


def test_label_explain_highlights_evidence():
    result = runner.invoke(app, ["label", "--explain", "-"], input="No change in the small left effusion.\n")
    assert result.exit_code == 0, result.output
    assert "positive Pleural Effusion (left)" in flat(result.output)
    assert "'effusion'" in flat(result.output)


def test_bad_jsonl_row_names_file_row_and_field_and_lenient_skips(tmp_path):
    source = tmp_path / "bad.jsonl"
    source.write_text(json.dumps({"text": TEXTS[0]}) + "\n{not json\n" + json.dumps({"other": 1}) + "\n")
    result = runner.invoke(app, ["label", str(source)])
    assert result.exit_code == 2
    assert f"{source} row 2 field 'text'" in flat(result.output)
    out = tmp_path / "labels.arrow"
    result = runner.invoke(app, ["label", str(source), "--lenient", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "2 malformed rows skipped" in flat(result.output)
    with pa.memory_map(str(out)) as handle:
        table = pa.ipc.open_file(handle).read_all()
    assert table.column("error").to_pylist() == [None, "text is None", "text is None"]
    assert not (tmp_path / "missing.arrow").exists()
    result = runner.invoke(app, ["label", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "no such file" in flat(result.output)


def test_keep_columns_and_empty_input(tmp_path):
    table = pa.table({"sample_id": ["a", "b", "c"], "model": ["m1", "m2", "m1"], "text": TEXTS})
    source = tmp_path / "trajectories.parquet"
    pq.write_table(table, source)
    out = tmp_path / "labels.arrow"
    result = runner.invoke(
        app, ["label", str(source), "--keep", "sample_id", "--keep", "model", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    with pa.memory_map(str(out)) as handle:
        labels = pa.ipc.open_file(handle).read_all()
    assert labels.column_names[:3] == ["row", "sample_id", "model"]
    assert labels.column("sample_id").to_pylist() == ["a", "b", "c"]
    assert labels.column("Pleural Effusion").to_pylist() == [1, None, None]
    jsonl = tmp_path / "answers.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(TEXTS)))
    result = runner.invoke(app, ["label", str(jsonl), "--keep", "id", "--out", str(out)])
    assert result.exit_code == 0, result.output
    with pa.memory_map(str(out)) as handle:
        assert pa.ipc.open_file(handle).read_all().column("id").to_pylist() == ["0", "1", "2"]
    result = runner.invoke(app, ["label", str(source), "--keep", "missing", "--out", str(out)])
    assert result.exit_code == 2 and "field 'missing'" in flat(result.output)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    # An empty input is an error (issue 16: an empty result fails with the reason) unless allowed.
    result = runner.invoke(app, ["label", str(empty), "--out", str(out)])
    assert result.exit_code == 2 and "no text to label" in flat(result.output)
    result = runner.invoke(app, ["label", str(empty), "--out", str(out), "--allow-empty"])
    assert result.exit_code == 0, result.output
    with pa.memory_map(str(out)) as handle:
        assert pa.ipc.open_file(handle).read_all().num_rows == 0
