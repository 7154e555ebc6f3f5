"""Selection manifests: one streaming reader for Parquet, Arrow files and Arrow streams."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrmax.core.errors import InputError
from cxrmax.core.schemas import SELECTION_SCHEMA
from cxrmax.mimic import MimicCXR, iter_selection, read_selection, write_selection


@pytest.fixture(scope="module")
def selection(mini_mimic: Path) -> pa.Table:
    return MimicCXR(mini_mimic).select(k=7)


def _write_stream(table: pa.Table, path: Path, cut: int = 0) -> Path:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    data = sink.getvalue().to_pybytes()
    path.write_bytes(data[: len(data) - cut] if cut else data)
    return path


def test_read_selection_reads_arrow_streams(selection: pa.Table, tmp_path: Path) -> None:
    path = _write_stream(selection, tmp_path / "sel.arrow")
    assert read_selection(path).equals(selection)


def test_iter_selection_streams_the_columns_asked_for(selection: pa.Table, tmp_path: Path) -> None:
    for path in (
        write_selection(selection, tmp_path / "sel.parquet"),
        write_selection(selection, tmp_path / "sel.feather"),
        _write_stream(selection, tmp_path / "stream.arrow"),
    ):
        batches = list(iter_selection(path, ["sample_id", "image_path"], batch_rows=3))
        assert all(batch.num_rows <= 3 for batch in batches)
        assert all(batch.schema.names == ["sample_id", "image_path"] for batch in batches)
        table = pa.Table.from_batches(batches)
        assert table.column("sample_id").to_pylist() == selection.column("sample_id").to_pylist()
        assert pa.Table.from_batches(list(iter_selection(path))).schema.names == SELECTION_SCHEMA.names


def test_iter_selection_names_a_missing_column_before_any_batch(selection: pa.Table, tmp_path: Path) -> None:
    path = tmp_path / "no-labels.parquet"
    pq.write_table(selection.drop_columns(["labels"]), path)
    with pytest.raises(InputError, match="labels"):
        next(iter_selection(path, ["sample_id", "labels"]))


def test_a_truncated_arrow_stream_is_an_error_not_a_short_selection(
    selection: pa.Table, tmp_path: Path
) -> None:
    path = _write_stream(selection, tmp_path / "cut.arrow", cut=8)  # the end-of-stream marker only
    with pytest.raises(InputError, match="cut.arrow.*end-of-stream"):
        read_selection(path)
    with pytest.raises(InputError, match="cut.arrow.*end-of-stream"):
        list(iter_selection(path))


def test_missing_and_junk_manifests_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="absent.parquet.*not found"):
        read_selection(tmp_path / "absent.parquet")
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(InputError, match="junk.arrow"):
        next(iter_selection(tmp_path / "junk.arrow"))
