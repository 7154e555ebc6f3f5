"""Submission validation: every bad-input case gives an InputError naming the file, row and field;
the readers stream (bounded memory on a large file); all formats give the same scores."""

from __future__ import annotations

import csv
import gzip
import json
import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrmax.core.errors import InputError
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.leaderboard import score
from cxrmax.leaderboard.submissions import iter_batches

N = 60
IDS = [50000000 + 7 * i for i in range(N)]


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """A prepared label reference file (study_id + 14 observations) and the label matrix."""
    rng = np.random.default_rng(0)
    labels = rng.choice([1.0, 0.0, -1.0, np.nan], size=(N, 14), p=[0.3, 0.3, 0.1, 0.3]).astype(np.float32)
    path = tmp_path_factory.mktemp("refs") / "labels.parquet"
    pq.write_table(pa.table({"study_id": IDS, **{o: labels[:, j] for j, o in enumerate(OBSERVATIONS)}}), path)
    return path, labels


def _cell(value: float) -> str:
    return "" if np.isnan(value) else str(int(value))


def write_csv(path, labels, ids=IDS, header=None, edit=None):
    header = header or ["study_id", *OBSERVATIONS]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i, study in enumerate(ids):
            row = [str(study), *(_cell(v) for v in labels[i])]
            if edit:
                row = edit(i, row)
            writer.writerow(row)
    return path


def _score(path, refs_path, **kw):
    return score(path, "mimic-cxr-labels", refs_path, n_boot=0, **kw)


def test_all_formats_agree(tmp_path, refs):
    ref_path, labels = refs
    base = _score(write_csv(tmp_path / "s.csv", labels), ref_path)
    assert base.headline["micro_f1_14"] == pytest.approx(1.0)
    rows = [
        {
            "study_id": s,
            **{o: (None if np.isnan(v) else int(v)) for o, v in zip(OBSERVATIONS, labels[i], strict=True)},
        }
        for i, s in enumerate(IDS)
    ]
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with gzip.open(tmp_path / "s.jsonl.gz", "wt") as fh:
        fh.write("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "s.json").write_text(
        json.dumps({f"s{r['study_id']}": {k: v for k, v in r.items() if k != "study_id"} for r in rows})
    )
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    for name in ("s.jsonl", "s.jsonl.gz", "s.json", "s.parquet"):
        result = _score(tmp_path / name, ref_path)
        assert result.headline == base.headline, name
        assert result.format in ("jsonl", "json", "parquet")


def test_unknown_study_id_names_row_and_field(tmp_path, refs):
    ref_path, labels = refs
    ids = list(IDS)
    ids[4] = 59999999
    path = write_csv(tmp_path / "s.csv", labels, ids)
    with pytest.raises(InputError, match=r"s\.csv row 5 field 'study_id'.*59999999 is not in the references"):
        _score(path, ref_path)
    result = _score(path, ref_path, lenient=True)
    assert result.skipped_unknown == 1 and result.missing == 1


def test_bad_study_id(tmp_path, refs):
    ref_path, labels = refs
    ids = [str(i) for i in IDS]
    ids[2] = "abc"
    with pytest.raises(InputError, match=r"row 3 field 'study_id': study_id 'abc'"):
        _score(write_csv(tmp_path / "s.csv", labels, ids), ref_path)


def test_missing_studies_coverage_and_require_complete(tmp_path, refs):
    ref_path, labels = refs
    path = write_csv(tmp_path / "s.csv", labels[:45], IDS[:45])
    result = _score(path, ref_path)
    assert (result.n_scored, result.missing, result.n_references) == (45, 15, 60)
    assert result.coverage == pytest.approx(0.75)
    assert result.headline["micro_f1_14"] == pytest.approx(1.0)  # scored on the covered studies
    with pytest.raises(InputError, match="15 of 60 reference studies missing.*require-complete"):
        _score(path, ref_path, require_complete=True)


def test_duplicates_in_one_batch_and_across_batches(tmp_path, refs):
    ref_path, labels = refs
    ids = list(IDS)
    ids[10] = IDS[3]
    path = write_csv(tmp_path / "s.csv", labels, ids)
    with pytest.raises(
        InputError, match=r"row 11 field 'study_id': duplicate study_id 50000021 \(first given in row 4\)"
    ):
        _score(path, ref_path)
    ids = list(IDS)
    ids[50] = IDS[1]
    with pytest.raises(
        InputError, match=r"row 51 field 'study_id': duplicate study_id .*first given in row 2"
    ):
        _score(write_csv(tmp_path / "t.csv", labels, ids), ref_path, batch_rows=16)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("nan", "row 8 field 'Edema': NaN"),
        ("2", "row 8 field 'Edema': 2 is out of range"),
        ("-0.5", "row 8 field 'Edema': -0.5 is out of range"),
        ("present", "row 8 field 'Edema': 'present' is not a label"),
    ],
)
def test_bad_values_name_row_and_field(tmp_path, refs, value, message):
    ref_path, labels = refs
    j = OBSERVATIONS.index("Edema") + 1

    def edit(i, row):
        if i == 7:
            row[j] = value
        return row

    with pytest.raises(InputError, match=message):
        _score(write_csv(tmp_path / "s.csv", labels, edit=edit), ref_path)


def test_nan_in_json_and_parquet(tmp_path, refs):
    ref_path, labels = refs
    rows = [{"study_id": s, **{o: 0 for o in OBSERVATIONS}} for s in IDS]
    rows[5]["Fracture"] = float("nan")
    (tmp_path / "s.jsonl").write_text("\n".join(json.dumps(r) for r in rows))  # json writes NaN
    with pytest.raises(InputError, match=r"s\.jsonl row 6 field 'Fracture': NaN"):
        _score(tmp_path / "s.jsonl", ref_path)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "s.parquet")
    with pytest.raises(InputError, match=r"s\.parquet row 6 field 'Fracture': NaN"):
        _score(tmp_path / "s.parquet", ref_path)


def test_probability_columns_validated(tmp_path, refs):
    ref_path, labels = refs
    rng = np.random.default_rng(1)
    probs = rng.random((N, 14)).round(3)
    rows = [
        {"study_id": s, **{o: float(probs[i, j]) for j, o in enumerate(OBSERVATIONS)}}
        for i, s in enumerate(IDS)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    result = _score(tmp_path / "p.parquet", ref_path)
    assert result.input_kind == "probabilities"
    assert all(row["auroc"] is not None for row in result.per_observation)
    rows[9]["Edema"] = -1.0
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "q.parquet")
    with pytest.raises(InputError, match=r"row 10 field 'Edema': -1 in a probability column"):
        _score(tmp_path / "q.parquet", ref_path)


def test_wrong_columns(tmp_path, refs):
    ref_path, labels = refs
    header = ["study_id", *OBSERVATIONS]
    header[3] = "Heart Size"
    with pytest.raises(InputError, match=r"field 'Heart Size': unexpected column"):
        _score(write_csv(tmp_path / "a.csv", labels, header=header), ref_path)
    with pytest.raises(InputError, match=r"field 'Support Devices': observation column missing"):
        _score(
            write_csv(tmp_path / "b.csv", labels[:, :13], header=["study_id", *OBSERVATIONS[:13]]), ref_path
        )
    with pytest.raises(InputError, match=r"field 'study_id': no study_id column"):
        _score(write_csv(tmp_path / "c.csv", labels, header=["dicom_id", *OBSERVATIONS]), ref_path)
    # Aliases are mapped by name, whatever the column order.
    header = ["study_id", *OBSERVATIONS]
    header[OBSERVATIONS.index("Lung Opacity") + 1] = "Airspace Opacity"
    assert _score(write_csv(tmp_path / "d.csv", labels, header=header), ref_path).headline[
        "micro_f1_14"
    ] == pytest.approx(1.0)


def test_empty_and_truncated_files(tmp_path, refs):
    ref_path, labels = refs
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match=r"empty\.csv: the file is empty"):
        _score(tmp_path / "empty.csv", ref_path)
    (tmp_path / "header.csv").write_text("study_id," + ",".join(OBSERVATIONS) + "\n")
    with pytest.raises(InputError, match=r"header\.csv: no data rows"):
        _score(tmp_path / "header.csv", ref_path)
    full = write_csv(tmp_path / "full.csv", labels).read_bytes()
    (tmp_path / "cut.csv").write_bytes(full[: len(full) - 9])  # last row loses its tail
    with pytest.raises(InputError, match=r"cut\.csv row 60: .*fields where the header has 15"):
        _score(tmp_path / "cut.csv", ref_path)
    (tmp_path / "quote.csv").write_bytes(full + b'50000420,"1,0\n')
    with pytest.raises(InputError, match=r"quote\.csv row 61: cannot parse CSV"):
        _score(tmp_path / "quote.csv", ref_path)
    lines = [json.dumps({"study_id": s, **{o: 0 for o in OBSERVATIONS}}) for s in IDS]
    (tmp_path / "cut.jsonl").write_text("\n".join(lines)[:-20])
    with pytest.raises(InputError, match=r"cut\.jsonl row 60: invalid JSON \(truncated last line\?\)"):
        _score(tmp_path / "cut.jsonl", ref_path)
    doc = json.dumps({str(s): {o: 0 for o in OBSERVATIONS} for s in IDS})
    (tmp_path / "cut.json").write_text(doc[:-30])
    with pytest.raises(InputError, match=r"cut\.json row 60: invalid or truncated JSON"):
        _score(tmp_path / "cut.json", ref_path)
    pq.write_table(pa.Table.from_pylist([json.loads(line) for line in lines]), tmp_path / "full.parquet")
    data = (tmp_path / "full.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.parquet: not a readable Parquet file"):
        _score(tmp_path / "cut.parquet", ref_path)
    with gzip.open(tmp_path / "full.csv.gz", "wb") as fh:
        fh.write(full)
    data = (tmp_path / "full.csv.gz").read_bytes()
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) - 40])
    with pytest.raises(InputError, match=r"cut\.csv\.gz.*(truncated|fields)"):
        _score(tmp_path / "cut.csv.gz", ref_path)
    (tmp_path / "full.xlsx").write_text("x")
    with pytest.raises(InputError, match="unknown submission format"):
        _score(tmp_path / "full.xlsx", ref_path)


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@pytest.mark.slow
def test_large_files_stream_with_bounded_memory(tmp_path, refs):
    """A ~40 MB submission in each format is read batch by batch: Python-side peak memory stays a
    small fraction of the file (a reader that loads the file whole would need several times its size)."""
    refs_path = refs[0]
    text = "Heart size normal. " * 100  # ~1.9 kB per row
    n = 20_000
    jsonl = tmp_path / "big.jsonl"
    with open(jsonl, "w") as fh:
        for i in range(n):
            fh.write(json.dumps({"study_id": 50000000 + i, "report": text}) + "\n")
    big_json = tmp_path / "big.json"
    with open(big_json, "w") as fh:
        fh.write("{")
        for i in range(n):
            fh.write(
                ("," if i else "")
                + json.dumps(str(50000000 + i))
                + ":"
                + json.dumps({"model_prediction": text})
            )
        fh.write("}")
    big_csv = tmp_path / "big.csv"
    with open(big_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_id", "report"])
        for i in range(n):
            writer.writerow([50000000 + i, text])
    big_parquet = tmp_path / "big.parquet"
    writer = pq.ParquetWriter(big_parquet, pa.schema([("study_id", pa.int64()), ("report", pa.string())]))
    for start in range(0, n, 2000):
        writer.write_table(
            pa.table({"study_id": np.arange(start, start + 2000) + 50000000, "report": [text] * 2000})
        )
    writer.close()
    for path in (jsonl, big_json, big_csv, big_parquet):
        size_mib = path.stat().st_size / 2**20
        counted: list[int] = []

        def consume(path=path, counted=counted) -> None:
            for batch in iter_batches(path, batch_rows=1024):
                counted.append(len(batch))

        peak = _peak_mib(consume)
        assert sum(counted) == n
        assert peak < min(12.0, size_mib / 3), (path.name, peak, size_mib)
    # Through score() as well: the 60 reference studies are labelled from their text, the other rows
    # (unknown studies, skipped with --lenient) stream past without being kept.
    results = []
    peak = _peak_mib(
        lambda: results.append(
            score(
                big_json, "mimic-cxr-labels", refs_path, n_boot=0, lenient=True, processes=1, batch_rows=1024
            )
        )
    )
    assert (
        results[0].n_scored == N and results[0].skipped_unknown == n - N and results[0].input_kind == "text"
    )
    assert peak < 12.0, peak


def test_sparse_json_rows_leave_out_blank_cells(tmp_path, refs):
    """JSON rows may list only the observations they mention; a key first seen in a later batch is
    taken up, earlier rows being blank for it. CSV headers must still name all 14."""
    ref_path, labels = refs
    rows = []
    for i, study in enumerate(IDS):
        rows.append(
            {
                "study_id": study,
                **{o: int(v) for o, v in zip(OBSERVATIONS, labels[i], strict=True) if not np.isnan(v)},
            }
        )
    rows[0] = {
        "study_id": IDS[0],
        **{o: int(v) for o, v in zip(OBSERVATIONS[:3], labels[0][:3], strict=True) if not np.isnan(v)},
    }
    for row in rows[:40]:  # the first batches never mention Pleural Other
        row.pop("Pleural Other", None)
    (tmp_path / "sparse.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = _score(tmp_path / "sparse.jsonl", ref_path, batch_rows=16)
    expected = labels.copy()
    expected[0, 3:] = np.nan
    expected[:40, OBSERVATIONS.index("Pleural Other")] = np.nan
    from cxrmax.leaderboard.metrics import score_labels

    assert result.headline == pytest.approx(score_labels(labels, expected, n_boot=0).headline)
    assert result.headline["micro_f1_14"] < 1.0
    only_five = [{"study_id": s, "Edema": 1} for s in IDS]
    (tmp_path / "five.jsonl").write_text("\n".join(json.dumps(r) for r in only_five))
    assert any("never given" in n for n in _score(tmp_path / "five.jsonl", ref_path).notes)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_incremental_json_reader_matches_json_loads(tmp_path, chunk):
    from cxrmax.leaderboard.submissions.json import _JsonStream

    doc = {
        "s50000001": {
            "model_prediction": 'Left effusion, "small".\n No pneumothorax \u2013 stable.',
            "extra": [1, 2.5e3, None],
        },
        "50000002": "plain string prediction",
        "50000003": {"model_prediction": "", "nested": {"a": {"b": [True, False]}}},
        "50000004": {"score": 12345678901234567890},
    }
    for indent, name in ((None, "compact.json"), (2, "pretty.json")):
        path = tmp_path / name
        path.write_text(json.dumps(doc, indent=indent))
        with open(path) as fh:
            assert dict(_JsonStream(fh, path, chunk=chunk).items()) == doc
    rows = [{"study_id": 1, "report": "x" * 100}, {"study_id": 2, "report": None}]
    path = tmp_path / "array.json"
    path.write_text(json.dumps(rows, indent=1))
    with open(path) as fh:
        assert [v for _, v in _JsonStream(fh, path, chunk=chunk).items()] == rows
    path.write_text(json.dumps(rows) + " trailing")
    with open(path) as fh, pytest.raises(InputError, match="unexpected data after"):
        list(_JsonStream(fh, path, chunk=chunk).items())
    path.write_text('{"1": {"model_prediction": "a"} "2": {}}')
    with open(path) as fh, pytest.raises(InputError, match=r"row 2: invalid JSON: expected ','"):
        list(_JsonStream(fh, path, chunk=chunk).items())


def test_labels_struct_column_as_in_cxrmax_tables(tmp_path, refs):
    """A Parquet table with a shards.LABELS_TYPE ``labels`` struct (or JSON objects) scores like one
    with 14 observation columns; a null struct is a row of blanks."""
    from cxrmax.core.schemas import LABELS_TYPE

    ref_path, labels = refs
    structs = [
        {o: (None if np.isnan(v) else float(v)) for o, v in zip(OBSERVATIONS, labels[i], strict=True)}
        for i in range(N)
    ]
    structs[3] = None
    table = pa.table({"study_id": pa.array(IDS, pa.int64()), "labels": pa.array(structs, type=LABELS_TYPE)})
    pq.write_table(table, tmp_path / "struct.parquet")
    expected = labels.copy()
    expected[3] = np.nan
    from cxrmax.leaderboard.metrics import score_labels

    want = score_labels(labels, expected, n_boot=0).headline
    assert _score(tmp_path / "struct.parquet", ref_path).headline == pytest.approx(want)
    rows = [{"study_id": s, "labels": structs[i]} for i, s in enumerate(IDS)]
    (tmp_path / "struct.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert _score(tmp_path / "struct.jsonl", ref_path).headline == pytest.approx(want)
    rows[5]["labels"] = [1, 0]
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(InputError, match=r"row 6 field 'labels': expected an object"):
        _score(tmp_path / "bad.jsonl", ref_path)
