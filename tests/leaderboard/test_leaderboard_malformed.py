"""Malformed and unusual submissions as people really send them.

Each case is a file written here byte for byte. The outcome is either the score of the same content
in canonical form (the interpretation is unambiguous and documented in `submissions`), or an
InputError naming the file, the row/line and the field. Never a traceback, never a different score.
"""

from __future__ import annotations

import bz2
import csv
import decimal
import gzip
import io
import json
import lzma
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cxrmax.core.errors import InputError
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.leaderboard import score

N = 12
IDS = [50414267 + 11 * i for i in range(N)]
_rng = np.random.default_rng(3)
LABELS = _rng.choice([1.0, 0.0, -1.0, np.nan], size=(N, 14), p=[0.3, 0.3, 0.1, 0.3]).astype(np.float32)
LABELS[2, 3] = 0.0  # the cell the value cases edit (row 3, Edema) starts negative
FINDINGS = [
    "Heart size is normal. No pleural effusion or pneumothorax.",
    "Small left pleural effusion with adjacent basilar atelectasis.",
    "Mild pulmonary edema. The heart is enlarged.",
] * (N // 3)
runner = CliRunner()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Prepared label and report reference files."""
    folder = tmp_path_factory.mktemp("refs")
    labels = folder / "labels.parquet"
    pq.write_table(
        pa.table({"study_id": IDS, **{o: LABELS[:, j] for j, o in enumerate(OBSERVATIONS)}}), labels
    )
    reports = folder / "reports.parquet"
    pq.write_table(pa.table({"study_id": IDS, "findings": FINDINGS}), reports)
    return {"labels": labels, "reports": reports}


# ---------------------------------------------------------------------------------------------------
# Builders: each returns the file's bytes.


def _cell(value: float) -> str:
    return "" if np.isnan(value) else str(int(value))


def label_rows(header=None, key=str, edit=None):
    rows = [header or ["study_id", *OBSERVATIONS]]
    for i, study in enumerate(IDS):
        row = [key(study), *(_cell(v) for v in LABELS[i])]
        rows.append(edit(i, row) if edit else row)
    return rows


def to_csv(rows, line_end="\n", delimiter=",", encoding="utf-8") -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator=line_end, delimiter=delimiter).writerows(rows)
    return buf.getvalue().encode(encoding)


def label_records():
    return [
        {
            "study_id": s,
            **{o: (None if np.isnan(v) else int(v)) for o, v in zip(OBSERVATIONS, LABELS[i], strict=True)},
        }
        for i, s in enumerate(IDS)
    ]


def jsonl(records, line_end="\n") -> bytes:
    return (line_end.join(json.dumps(r) for r in records) + line_end).encode()


def parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def set_edema(value):
    """Edit: row 3's Edema cell (1-based data row 3) becomes ``value``."""
    column = 1 + OBSERVATIONS.index("Edema")

    def edit(i, row):
        if i == 2:
            row[column] = value
        return row

    return edit


def with_column(rows, name, values, at=None):
    out = [list(r) for r in rows]
    at = len(out[0]) if at is None else at
    out[0].insert(at, name)
    for i, row in enumerate(out[1:]):
        row.insert(at, values(i))
    return out


CANONICAL = to_csv(label_rows())
EDEMA_POSITIVE = to_csv(label_rows(edit=set_edema("1")))
EDEMA_NEGATIVE = to_csv(label_rows(edit=set_edema("0")))
_TABLE = pa.Table.from_pylist(label_records())
_EDEMA = _TABLE.schema.get_field_index("Edema")

# (id, file name, bytes, canonical bytes it must score like)
READ_AS = [
    ("utf8-bom", "bom.csv", b"\xef\xbb\xbf" + CANONICAL, CANONICAL),
    ("crlf", "crlf.csv", to_csv(label_rows(), "\r\n"), CANONICAL),
    ("bom-crlf-jsonl", "bom.jsonl", b"\xef\xbb\xbf" + jsonl(label_records(), "\r\n"), CANONICAL),
    ("bom-json-array", "bom.json", b"\xef\xbb\xbf" + json.dumps(label_records()).encode(), CANONICAL),
    ("trailing-empty-lines", "trail.csv", CANONICAL + b"\n\n\n", CANONICAL),
    ("blank-lines-inside", "blank.csv", CANONICAL.replace(b"\n", b"\n\n", 4), CANONICAL),
    ("whitespace-only-lines", "ws.csv", CANONICAL.replace(b"\n", b"\n  \t \n", 3), CANONICAL),
    ("excel-empty-rows", "excel.csv", CANONICAL + b"," * 14 + b"\n" + b"," * 14 + b"\n", CANONICAL),
    ("gzip-with-gz", "sub.csv.gz", gzip.compress(CANONICAL), CANONICAL),
    ("gzip-without-gz", "sub.csv", gzip.compress(CANONICAL), CANONICAL),
    ("gz-name-plain-data", "plain.csv.gz", CANONICAL, CANONICAL),
    ("gzip-jsonl-no-suffix", "z.jsonl", gzip.compress(jsonl(label_records())), CANONICAL),
    ("bzip2-with-suffix", "sub.csv.bz2", bz2.compress(CANONICAL), CANONICAL),
    ("bzip2-without-suffix", "bz.csv", bz2.compress(CANONICAL), CANONICAL),
    ("xz-jsonl", "sub.jsonl.xz", lzma.compress(jsonl(label_records())), CANONICAL),
    ("parquet-broken-pandas-metadata", "meta.parquet", parquet(_TABLE.replace_schema_metadata({b"pandas": b"{not json"})), CANONICAL),
    ("parquet-named-csv", "really-parquet.csv", parquet(_TABLE), CANONICAL),
    ("ids-s-prefix", "s.csv", to_csv(label_rows(key=lambda s: f"s{s}")), CANONICAL),
    ("ids-dot-zero", "dot0.csv", to_csv(label_rows(key=lambda s: f"{s}.0")), CANONICAL),
    ("ids-mimic-path", "path.csv", to_csv(label_rows(key=lambda s: f"files/p10/p10000032/s{s}.txt")), CANONICAL),
    ("ids-subject-study-key", "ps.csv", to_csv(label_rows(key=lambda s: f"p10000032_s{s}")), CANONICAL),
    ("ids-json-float", "f.jsonl", jsonl([{**r, "study_id": float(r["study_id"])} for r in label_records()]), CANONICAL),
    ("ids-json-str-dot-zero", "f.json", json.dumps([{**r, "study_id": f"{r['study_id']}.0"} for r in label_records()]).encode(), CANONICAL),
    ("header-upper-underscores", "up.csv", to_csv(label_rows(header=["STUDY_ID", *(o.upper().replace(" ", "_") for o in OBSERVATIONS)])), CANONICAL),
    ("header-spaces-lower", "sp.csv", to_csv(label_rows(header=[" Study ID ", *(f"  {o.lower()} " for o in OBSERVATIONS)])), CANONICAL),
    ("header-aliases", "alias.csv", to_csv(label_rows(header=["study_id", *({"Lung Opacity": "Airspace Opacity", "Pleural Effusion": "Pleural_Effusion", "Enlarged Cardiomediastinum": "enlarged-cardiomediastinum"}.get(o, o) for o in OBSERVATIONS)])), CANONICAL),
    ("pandas-index-column", "idx.csv", to_csv(with_column(label_rows(), "", str, at=0)), CANONICAL),
    ("pandas-unnamed-0", "idx0.csv", to_csv(with_column(label_rows(), "Unnamed: 0", str, at=0)), CANONICAL),
    ("trailing-comma-every-line", "tc.csv", b"".join(line + b",\n" for line in CANONICAL.splitlines()), CANONICAL),
    ("trailing-comma-rows-only", "tcr.csv", b"\n".join([CANONICAL.splitlines()[0]] + [line + b"," for line in CANONICAL.splitlines()[1:]]) + b"\n", CANONICAL),
    ("semicolon-delimiter", "semi.csv", to_csv(label_rows(), delimiter=";"), CANONICAL),
    ("tab-delimiter-named-csv", "tab.csv", to_csv(label_rows(), delimiter="\t"), CANONICAL),
    ("excel-sep-line", "sep.csv", b"sep=;\r\n" + to_csv(label_rows(), "\r\n", ";"), CANONICAL),
    ("utf16-excel-unicode-text", "u16.csv", to_csv(label_rows(), "\r\n", "\t", "utf-16"), CANONICAL),
    ("utf32-with-bom", "u32.csv", to_csv(label_rows(), "\r\n", ",", "utf-32"), CANONICAL),
    ("utf32-big-endian-jsonl", "u32be.jsonl", b"\x00\x00\xfe\xff" + jsonl(label_records()).decode().encode("utf-32-be"), CANONICAL),
    ("utf16-jsonl-gzipped", "u16.jsonl.gz", gzip.compress(jsonl(label_records()).decode().encode("utf-16")), CANONICAL),
    ("classic-mac-cr-lines", "cr.csv", to_csv(label_rows(), "\r"), CANONICAL),
    ("quoted-header-names", "qh.csv", b",".join(b'"%s"' % h for h in CANONICAL.splitlines()[0].split(b",")) + b"\n" + b"\n".join(CANONICAL.splitlines()[1:]) + b"\n", CANONICAL),
    ("rexrank-input-fields-kept", "ps.jsonl", jsonl([{**r, "context": "Indication: SOB", "image_path": ["a.jpg"]} for r in label_records()]), CANONICAL),
    ("value-1.0", "v10.csv", to_csv(label_rows(edit=set_edema("1.0"))), EDEMA_POSITIVE),
    ("value-True", "vtrue.csv", to_csv(label_rows(edit=set_edema("True"))), EDEMA_POSITIVE),
    ("value-yes", "vyes.csv", to_csv(label_rows(edit=set_edema(" yes "))), EDEMA_POSITIVE),
    ("value-FALSE", "vfalse.csv", to_csv(label_rows(edit=set_edema("FALSE"))), EDEMA_NEGATIVE),
    ("value-plus-one", "vplus.csv", to_csv(label_rows(edit=set_edema("+1"))), EDEMA_POSITIVE),
    ("value-json-true", "vt.jsonl", jsonl([{**r, "Edema": True} if i == 2 else r for i, r in enumerate(label_records())]), EDEMA_POSITIVE),
    ("value-parquet-bool", "vb.parquet", parquet(_TABLE.set_column(_EDEMA, "Edema", pa.array([i == 2 or None for i in range(N)]).cast(pa.bool_()).fill_null(False))), None),
    ("value-parquet-decimal", "vd.parquet", parquet(_TABLE.set_column(_EDEMA, "Edema", _TABLE.column("Edema").cast(pa.decimal128(22, 2)))), CANONICAL),
    ("nested-predictions-object", "nest.json", json.dumps([{"study_id": r["study_id"], "predictions": {k: v for k, v in r.items() if k != "study_id"}} for r in label_records()]).encode(), CANONICAL),
]  # fmt: skip


def _result_numbers(result):
    return result.headline, result.n_scored, result.input_kind


@pytest.mark.parametrize(
    ("name", "content", "canonical"), [c[1:] for c in READ_AS], ids=[c[0] for c in READ_AS]
)
def test_unusual_but_unambiguous_files_score_as_their_canonical_form(
    tmp_path, refs, name, content, canonical
):
    path = tmp_path / name
    path.write_bytes(content)
    got = score(path, "mimic-cxr-labels", refs["labels"], n_boot=0)
    if canonical is None:  # a Parquet bool column: Edema is 1 in row 3 and 0 everywhere else
        edema = ["0"] * N
        edema[2] = "1"
        canonical = to_csv(label_rows(edit=lambda i, row: row[:4] + [edema[i]] + row[5:]))
    (tmp_path / "canonical.csv").write_bytes(canonical)
    want = score(tmp_path / "canonical.csv", "mimic-cxr-labels", refs["labels"], n_boot=0)
    assert _result_numbers(got) == _result_numbers(want)
    assert got.n_scored == N


def _bad_edema(value: str) -> bytes:
    return to_csv(label_rows(edit=set_edema(value)))


_JSONL_LINES = [json.dumps(r) for r in label_records()]

# (id, file name, bytes (None: no file), pattern the message must match after the file's path)
REFUSED = [
    ("empty-file", "empty.csv", b"", r": the file is empty"),
    ("only-blank-lines", "blank.jsonl", b"\n\n  \n", r": no data rows"),
    ("header-only", "header.csv", CANONICAL.splitlines()[0] + b"\r\n", r": no data rows"),
    ("binary-named-csv", "binary.csv", bytes(range(256)) * 8, r" line \d+: binary data, not a text submission"),
    ("latin-1-bytes", "latin1.csv", "study_id,report\n50414267,ok\n50414278,épanchement pleural\n".encode("latin-1"), r" line 3: not UTF-8 text \(byte 0xe9 .*re-save the file as UTF-8"),
    ("cp1252-quotes", "cp1252.csv", "study_id,report\n50414267,\u201cstable\u201d\n".encode("cp1252"), r" line 2: not UTF-8 text \(byte 0x93"),
    ("latin-1-gzipped", "latin1.csv.gz", gzip.compress("study_id,report\n50414267,caf\xe9\n".encode("latin-1")), r" line 2: not UTF-8 text"),
    ("xlsx-workbook", "preds.xlsx", b"PK\x03\x04" + b"\x00" * 40, r": this is a ZIP archive \(an Excel \.xlsx workbook\?\)"),
    ("xlsx-named-csv", "preds.csv", b"PK\x03\x04" + b"\x00" * 40, r": this is a ZIP archive"),
    ("utf16-without-bom", "u16.csv", CANONICAL.decode().encode("utf-16-le"), r": UTF-16 text without a byte-order mark"),
    ("header-name-with-newline", "hn.csv", CANONICAL.replace(b"Atelectasis", b'"Atel\nectasis"', 1), r" field 'Atel\\nectasis': unexpected column"),
    ("probability-just-above-one", "p1.csv", _bad_edema("1.0000001"), r" row 3 field 'Edema': 1\.0000001 is out of range"),
    ("zstd-compressed", "z.csv", b"\x28\xb5\x2f\xfd" + b"\x00" * 32, r": zstd-compressed; decompress it"),
    ("bzip2-truncated", "cut.csv.bz2", bz2.compress(CANONICAL)[:-20], r": cannot read the file \(truncated or corrupt\?\)"),
    ("no-header-row", "nohead.csv", b"\n".join(CANONICAL.splitlines()[1:]) + b"\n", r" line 1: starts with '50414267', data rather than column names"),
    ("unknown-suffix", "preds.txt", CANONICAL, r": unknown submission format 'txt'"),
    ("duplicate-same-values", "dup.csv", CANONICAL + CANONICAL.splitlines()[1] + b"\n", r" row 13 field 'study_id': duplicate study_id 50414267 \(first given in row 1\)"),
    ("duplicate-conflicting", "dupc.csv", CANONICAL + CANONICAL.splitlines()[1].replace(b",", b",1,", 1)[:-2] + b"\n", r" row 13 field 'study_id': duplicate study_id 50414267"),
    ("duplicate-per-image-rows", "img.csv", to_csv(with_column(label_rows() + [label_rows()[1]], "dicom_id", lambda i: f"dcm{i}")), r" row 13 field 'study_id': duplicate .*one per study"),
    ("id-scientific-notation", "sci.csv", to_csv(label_rows(key=lambda s: f"{s:.5E}")), r" row 1 field 'study_id': study_id '5\.04143E\+07' is not a study number \(scientific notation"),
    ("id-overflowing-int", "big.jsonl", jsonl([{**r, "study_id": 10**25} for r in label_records()]), r" row 1 field 'study_id': study_id 10{25} is not a study number"),
    ("id-overflowing-text", "big.csv", to_csv(label_rows(key=lambda s: "9" * 30)), r" row 1 field 'study_id': study_id '9{30}' is not a study number"),
    ("id-superscript-digit", "sup.csv", to_csv(label_rows(key=lambda s: "5041426\u00b2")), r" row 1 field 'study_id': study_id '5041426²' is not a study number"),
    ("id-negative", "neg.jsonl", jsonl([{**r, "study_id": -r["study_id"]} for r in label_records()]), r" row 1 field 'study_id': study_id -50414267 is not a study number"),
    ("id-boolean", "bool.jsonl", jsonl([{**r, "study_id": True} for r in label_records()]), r" row 1 field 'study_id': study_id True is not a study number"),
    ("id-two-study-parts", "two.csv", to_csv(label_rows(key=lambda s: f"s{s}_vs_s50000000")), r" row 1 field 'study_id': study_id 's50414267_vs_s50000000' is not a study number"),
    ("id-blank", "blankid.csv", to_csv(label_rows(edit=lambda i, row: [""] + row[1:] if i == 4 else row)), r" row 5 field 'study_id': study_id blank is not a study number"),
    ("id-unknown", "unknown.csv", CANONICAL + b"59999999" + b",0" * 14 + b"\n", r" row 13 field 'study_id': study_id 59999999 is not in the references"),
    ("extra-unknown-column", "extra.csv", to_csv(with_column(label_rows(), "confidence", lambda i: "0.3")), r" field 'confidence': unexpected column for a labels submission"),
    ("alias-and-name-twice", "twice.csv", to_csv(label_rows(header=["study_id", *("Pleural_Effusion" if o == "Pleural Other" else o for o in OBSERVATIONS)])), r" field 'Pleural_Effusion': observation 'Pleural Effusion' given by two columns"),
    ("missing-observation-column", "missing.csv", to_csv([r[:-1] for r in label_rows()]), r" field 'Support Devices': observation column missing"),
    ("value-nan-text", "nan.csv", _bad_edema("nan"), r" row 3 field 'Edema': NaN; leave the cell blank"),
    ("value-NaN-text", "NaN.csv", _bad_edema("NaN"), r" row 3 field 'Edema': NaN"),
    ("value-inf", "inf.csv", _bad_edema("inf"), r" row 3 field 'Edema': inf is out of range"),
    ("value-above-one", "gt1.csv", _bad_edema("1.3"), r" row 3 field 'Edema': 1\.3 is out of range"),
    ("value-below-zero", "lt0.csv", _bad_edema("-0.2"), r" row 3 field 'Edema': -0\.2 is out of range"),
    ("value-percent", "pct.csv", _bad_edema("73"), r" row 3 field 'Edema': 73 is out of range"),
    ("value-decimal-comma", "comma.csv", _bad_edema("0,7"), r" row 3 field 'Edema': '0,7' is not a label"),
    ("value-word", "word.csv", _bad_edema("present"), r" row 3 field 'Edema': 'present' is not a label"),
    ("value-json-NaN", "nan.json", json.dumps([{**r, "Edema": float("nan")} if i == 1 else r for i, r in enumerate(label_records())]).encode(), r" row 2 field 'Edema': NaN"),
    ("value-json-list", "list.jsonl", jsonl([{**r, "Edema": [1]} for r in label_records()]), r" row 1 field 'Edema': \[1\] is not a label"),
    ("value-parquet-nan", "nan.parquet", parquet(_TABLE.set_column(_EDEMA, "Edema", pa.array([0.5] * 3 + [float("nan")] * (N - 3)))), r" row 4 field 'Edema': NaN"),
    ("probability-column-with-minus-one", "pm1.csv", to_csv([["study_id", *OBSERVATIONS]] + [[str(s), *(["-1"] if i == 4 else ["0.25"]) * 14] for i, s in enumerate(IDS)]), r" row 5 field 'Atelectasis': -1 in a probability column"),
    ("probability-column-with-blank", "pbl.csv", to_csv([["study_id", *OBSERVATIONS]] + [[str(s), *([""] if i == 6 else ["0.25"]) * 14] for i, s in enumerate(IDS)]), r" row 7 field 'Atelectasis': blank in a probability column"),
    ("json-trailing-comma-in-array", "tc.json", json.dumps(label_records()).encode()[:-1] + b",\n]", r" row 12: line 2, a trailing comma before '\]'"),
    ("json-trailing-comma-in-object", "tco.json", json.dumps(label_records(), indent=1).encode()[:-4] + b',\n}\n]', r" row 12: invalid or truncated JSON \(a trailing comma before '}'\?.*\(line \d+\)"),
    ("json-wrapper-object", "wrap.json", json.dumps({"predictions": label_records()}).encode(), r" row 1 field 'predictions': 'predictions' holds a list"),
    ("json-holding-json-lines", "lines.json", jsonl(label_records()), r" row 1 field 'study_id': this object is one row.*name the file \.jsonl"),
    ("json-truncated", "cut.json", json.dumps(label_records(), indent=1).encode()[:-40], r" row 12: invalid or truncated JSON.*\(line \d+\)"),
    ("jsonl-holding-json-array", "array.jsonl", json.dumps(label_records(), indent=2).encode(), r" row 1: invalid JSON \(the file looks like one JSON array: name it \.json"),
    ("jsonl-one-broken-line", "broken.jsonl", "\n".join(_JSONL_LINES[:5] + [_JSONL_LINES[5][:-9]] + _JSONL_LINES[6:]).encode(), r" row 6: invalid JSON"),
    ("jsonl-two-objects-on-a-line", "two.jsonl", "".join(_JSONL_LINES).encode(), r" row 1: invalid JSON \(several JSON values on one line"),
    ("jsonl-array-line", "arr.jsonl", "\n".join([*_JSONL_LINES[:3], "[1, 2]"]).encode(), r" row 4: each line must be a JSON object, not list"),
    ("csv-short-row", "short.csv", CANONICAL + b"50414999,1,0\n", r" row 13: 3 fields where the header has 15"),
    ("csv-unbalanced-quote", "quote.csv", CANONICAL + b'50414999,"1,0\n', r" row 13: cannot parse CSV \(truncated file or unbalanced quote"),
    ("parquet-truncated", "cut.parquet", parquet(_TABLE)[:-30], r": not a readable Parquet file"),
    ("parquet-list-column", "list.parquet", parquet(_TABLE.set_column(_EDEMA, "Edema", pa.array([[1]] * N))), r" row 1 field 'Edema': \[1\] is not a label"),
    ("does-not-exist", "nope.csv", None, r": submission file not found"),
    ("does-not-exist-no-suffix", "nope", None, r": submission file not found"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "pattern"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_malformed_files_are_refused_naming_file_row_and_field(tmp_path, refs, name, content, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        score(path, "mimic-cxr-labels", refs["labels"], n_boot=0)
    message = str(caught.value)
    assert message.startswith(str(path)), message
    assert re.match(re.escape(str(path)) + pattern, message), message


def test_a_folder_is_not_a_submission(tmp_path, refs):
    folder = tmp_path / "adir.csv"
    folder.mkdir()
    with pytest.raises(InputError, match=r"adir\.csv: a labels submission is a file"):
        score(folder, "mimic-cxr-labels", refs["labels"], n_boot=0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_says_permission_denied(tmp_path, refs):
    path = tmp_path / "locked.csv"
    path.write_bytes(CANONICAL)
    path.chmod(0)
    with pytest.raises(InputError, match=r"locked\.csv: permission denied"):
        score(path, "mimic-cxr-labels", refs["labels"], n_boot=0)


def test_lenient_skips_and_counts_unparseable_lines(tmp_path, refs):
    lines = list(_JSONL_LINES)
    lines[5] = lines[5][:-9]  # a line cut mid-object
    lines[8] = "[1, 2]"  # not an object
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = score(path, "mimic-cxr-labels", refs["labels"], n_boot=0, lenient=True)
    assert result.extra["skipped_unreadable"] == 2
    assert result.n_scored == N - 2 and result.missing == 2
    assert any("2 unreadable rows skipped" in note and "row 6" in note for note in result.notes)
    # The remaining rows score exactly like a file without the two studies.
    keep = [r for i, r in enumerate(label_records()) if i not in (5, 8)]
    (tmp_path / "kept.jsonl").write_bytes(jsonl(keep))
    assert (
        result.headline
        == score(tmp_path / "kept.jsonl", "mimic-cxr-labels", refs["labels"], n_boot=0).headline
    )
    short = tmp_path / "short.csv"
    short.write_bytes(CANONICAL + b"50414999,1,0\n")
    counted = score(short, "mimic-cxr-labels", refs["labels"], n_boot=0, lenient=True)
    assert counted.extra["skipped_unreadable"] == 1 and counted.n_scored == N
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("{\n[\n")
    with pytest.raises(InputError, match=r"bad\.jsonl: no data rows \(every line was skipped\)"):
        score(only_bad, "mimic-cxr-labels", refs["labels"], n_boot=0, lenient=True)


def _edit_rows(edits: dict[tuple[int, str], str]):
    """Edit: set cells by (0-based study index, column name)."""
    header = ["study_id", *OBSERVATIONS]

    def edit(i, row):
        for (index, column), value in edits.items():
            if index == i:
                row[header.index(column)] = value
        return row

    return edit


_PROBABILITIES = [[f"{(i * 14 + j) % 97 / 100 + 0.005:.3f}" for j in range(14)] for i in range(N)]

# (id, file name, bytes, 0-based study indices that must be skipped)
LENIENT_SKIPS = [
    ("bad-study-ids", "ids.csv", to_csv(label_rows(edit=_edit_rows({(1, "study_id"): "", (4, "study_id"): "5.04E+07"}))), [1, 4]),
    ("bad-label-values", "vals.csv", to_csv(label_rows(edit=_edit_rows({(2, "Edema"): "nan", (2, "Fracture"): "2", (7, "Atelectasis"): "present"}))), [2, 7]),
    ("parquet-decimal-out-of-range", "dec.parquet", parquet(_TABLE.set_column(_EDEMA, "Edema", pa.array([decimal.Decimal("2.00") if i == 6 else decimal.Decimal(int(v)) if v == v else None for i, v in enumerate(LABELS[:, 3])], pa.decimal128(5, 2)))), [6]),
    ("json-values", "vals.jsonl", jsonl([{**r, "Edema": [1]} if i == 3 else {**r, "Fracture": float("inf")} if i == 9 else r for i, r in enumerate(label_records())]), [3, 9]),
    ("minus-one-in-probabilities", "prob.csv", to_csv([["study_id", *OBSERVATIONS]] + [[str(s), *(["-1"] + p[1:] if i == 5 else p)] for i, (s, p) in enumerate(zip(IDS, _PROBABILITIES, strict=True))]), [5]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "skipped"), [c[1:] for c in LENIENT_SKIPS], ids=[c[0] for c in LENIENT_SKIPS]
)
def test_lenient_skips_rows_with_unreadable_values(tmp_path, refs, name, content, skipped):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(str(path)) + r" row \d+ field "):
        score(path, "mimic-cxr-labels", refs["labels"], n_boot=0)
    got = score(path, "mimic-cxr-labels", refs["labels"], n_boot=0, lenient=True)
    assert got.extra["skipped_unreadable"] == len(skipped)
    assert got.n_scored == N - len(skipped) and got.missing == len(skipped)
    assert any(f"{len(skipped)} unreadable rows skipped" in note for note in got.notes)
    # The same as a file without those rows (and no others).
    if name == "prob.csv":
        rows = [["study_id", *OBSERVATIONS]] + [
            [str(s), *p] for s, p in zip(IDS, _PROBABILITIES, strict=True)
        ]
        kept = [rows[0]] + [row for i, row in enumerate(rows[1:]) if i not in skipped]
    else:
        kept = [row for i, row in enumerate(label_rows()) if i - 1 not in skipped]
    (tmp_path / "kept.csv").write_bytes(to_csv(kept))
    want = score(tmp_path / "kept.csv", "mimic-cxr-labels", refs["labels"], n_boot=0)
    assert got.headline == want.headline


def test_lenient_skips_non_text_reports(tmp_path, refs):
    path = tmp_path / "reports.jsonl"
    path.write_bytes(_report_jsonl([FINDINGS[0], 42, ["a"], *FINDINGS[3:]]))
    got = score(path, "mimic-cxr-report", refs["reports"], n_boot=0, processes=1, lenient=True)
    assert got.extra["skipped_unreadable"] == 2 and got.n_scored == N - 2
    kept = tmp_path / "kept.jsonl"
    kept.write_bytes(
        jsonl(
            [
                {"study_id": s, "report": t}
                for i, (s, t) in enumerate(zip(IDS, FINDINGS, strict=True))
                if i not in (1, 2)
            ]
        )
    )
    assert got.headline == score(kept, "mimic-cxr-report", refs["reports"], n_boot=0, processes=1).headline


def _frame(evenly_spaced: bool):
    import pandas as pd

    order = list(range(N)) if evenly_spaced else [3, 0, 5, 1, 2, 4, 6, 7, 8, 9, 10, 11]
    return pd.DataFrame(
        {"study_id": [IDS[i] for i in order], **{o: LABELS[order, j] for j, o in enumerate(OBSERVATIONS)}}
    )


def _pandas_bytes(write) -> bytes:
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()


# What pandas writes by default and with common options: (id, file name, writer, None or error pattern)
PANDAS = [
    ("to_csv-with-index", "idx.csv", lambda f: f.to_csv().encode(), None),
    ("to_csv-float-format", "ff.csv", lambda f: f.to_csv(index=False, float_format="%.1f").encode(), None),
    ("to_json-records", "r.json", lambda f: f.to_json(orient="records").encode(), None),
    ("to_json-records-lines", "r.jsonl", lambda f: f.to_json(orient="records", lines=True).encode(), None),
    ("to_json-index-by-study", "i.json", lambda f: f.set_index("study_id").to_json(orient="index").encode(), None),
    ("to_parquet-study-index", "i.parquet", lambda f: _pandas_bytes(f.set_index("study_id").to_parquet), None),
    ("to_parquet-study-range-index", "ri.parquet", lambda f: _pandas_bytes(f.set_index("study_id").to_parquet), "range"),
    ("to_json-default-columns", "c.json", lambda f: f.to_json().encode(), r" row 1 field 'study_id': the object is keyed by column names \(pandas' default to_json\(\)"),
    ("to_json-index-by-position", "p.json", lambda f: f.to_json(orient="index").encode(), r" row 1 field 'study_id': 50414\d+ differs from its key '0' \(keys that number the rows"),
    ("to_json-split", "s.json", lambda f: f.to_json(orient="split").encode(), r" row 1 field 'columns': this looks like pandas' to_json\(orient='split'"),
    ("to_json-values", "v.json", lambda f: f.to_json(orient="values").encode(), r" row 1: each array element must be an object \(a list of lists"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "write", "expect"), [c[1:] for c in PANDAS], ids=[c[0] for c in PANDAS])
def test_what_pandas_writes(tmp_path, refs, name, write, expect):
    path = tmp_path / name
    path.write_bytes(write(_frame(evenly_spaced=expect == "range")))
    if expect not in (None, "range"):
        with pytest.raises(InputError) as caught:
            score(path, "mimic-cxr-labels", refs["labels"], n_boot=0)
        assert re.match(re.escape(str(path)) + expect, str(caught.value)), str(caught.value)
        return
    (tmp_path / "canonical.csv").write_bytes(CANONICAL)
    want = score(tmp_path / "canonical.csv", "mimic-cxr-labels", refs["labels"], n_boot=0)
    got = score(path, "mimic-cxr-labels", refs["labels"], n_boot=0)
    assert _result_numbers(got) == _result_numbers(want)


def test_a_gigantic_line_is_refused_without_reading_it_whole(tmp_path, refs, monkeypatch):
    """A whole JSON array on one line of a .jsonl (or a blob) is never held in memory beyond the
    per-line limit: refused naming the line, or skipped and counted with --lenient."""
    import cxrmax.leaderboard.submissions.json as json_reader

    monkeypatch.setattr(json_reader, "MAX_FIELD_CHARS", 2000)  # the real limit is 64 MB
    array_line = json.dumps(label_records())  # ~4 kB on one line
    path = tmp_path / "one-line.jsonl"
    path.write_text("\n".join([_JSONL_LINES[0], array_line, *_JSONL_LINES[1:]]) + "\n")
    with pytest.raises(
        InputError, match=r"one-line\.jsonl row 2: a line over 0 MB \(one JSON array on one line"
    ):
        score(path, "mimic-cxr-labels", refs["labels"], n_boot=0)
    got = score(path, "mimic-cxr-labels", refs["labels"], n_boot=0, lenient=True)
    assert got.extra["skipped_unreadable"] == 1 and got.n_scored == N
    (tmp_path / "canonical.csv").write_bytes(CANONICAL)
    assert (
        got.headline
        == score(tmp_path / "canonical.csv", "mimic-cxr-labels", refs["labels"], n_boot=0).headline
    )


def _report_jsonl(texts) -> bytes:
    return jsonl([{"study_id": s, "report": t} for s, t in zip(IDS, texts, strict=True)])


_LONG = "no pleural effusion " * 7000  # 140 kB: over Python csv's default 128 KiB field limit

# (id, file name, bytes, the texts it must score like)
REPORTS_READ_AS = [
    ("newlines-quotes-commas-in-csv", "q.csv", to_csv([["study_id", "report"]] + [[str(s), f'FINDINGS:\n"Heart", size; normal,\r\nIMPRESSION: {t}'] for s, t in zip(IDS, FINDINGS, strict=True)]), [f'FINDINGS:\n"Heart", size; normal,\r\nIMPRESSION: {t}' for t in FINDINGS]),
    ("very-long-report-in-csv", "long.csv", to_csv([["study_id", "report"]] + [[str(s), _LONG if i < 2 else t] for i, (s, t) in enumerate(zip(IDS, FINDINGS, strict=True))]), [_LONG] * 2 + FINDINGS[2:]),
    ("all-empty-reports", "empty.csv", to_csv([["study_id", "report"]] + [[str(s), ""] for s in IDS]), [""] * N),
    ("one-word-report-only", "one.jsonl", jsonl([{"study_id": IDS[0], "report": "Normal."}]), None),
    ("null-reports", "null.jsonl", _report_jsonl([None] * 2 + FINDINGS[2:]), [""] * 2 + FINDINGS[2:]),
    ("rexrank-with-input-fields", "rx.json", json.dumps({f"s{s}": {"model_prediction": t, "image_path": ["files/x.jpg"], "context": "Indication: cough", "section_findings": t} for s, t in zip(IDS, FINDINGS, strict=True)}).encode(), FINDINGS),
    ("rexrank-path-keys", "rxp.json", json.dumps({f"p10/p10000032/s{s}": {"model_prediction": t} for s, t in zip(IDS, FINDINGS, strict=True)}).encode(), FINDINGS),
    ("rexrank-plain-strings-bom", "rxs.json", b"\xef\xbb\xbf" + json.dumps({str(s): t for s, t in zip(IDS, FINDINGS, strict=True)}).encode(), FINDINGS),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "texts"), [c[1:] for c in REPORTS_READ_AS], ids=[c[0] for c in REPORTS_READ_AS]
)
def test_report_submissions_score_as_their_texts(tmp_path, refs, name, content, texts):
    path = tmp_path / name
    path.write_bytes(content)
    got = score(path, "mimic-cxr-report", refs["reports"], n_boot=0, processes=1)
    if texts is None:  # one study only: compare with the same single row written plainly
        (tmp_path / "plain.jsonl").write_bytes(jsonl([{"study_id": IDS[0], "report": "normal"}]))
    else:
        (tmp_path / "plain.jsonl").write_bytes(_report_jsonl(texts))
    want = score(tmp_path / "plain.jsonl", "mimic-cxr-report", refs["reports"], n_boot=0, processes=1)
    assert got.headline == want.headline
    assert got.n_scored == want.n_scored


REPORTS_REFUSED = [
    ("rexrank-value-is-a-list", "rxl.json", json.dumps({str(s): [t] for s, t in zip(IDS, FINDINGS, strict=True)}).encode(), r" row 1 field '50414267': expected an object with model_prediction, got list"),
    ("report-is-a-number", "num.jsonl", _report_jsonl([5, *FINDINGS[1:]]), r" row 1 field 'report': expected text, got int"),
    ("report-is-a-list", "list.jsonl", _report_jsonl([FINDINGS[0], ["a", "b"], *FINDINGS[2:]]), r" row 2 field 'report': expected text, got list"),
    ("labels-file-for-report-task", "labels.csv", CANONICAL, r" field 'Atelectasis': unexpected column for a report submission"),
    ("findings-column-only", "f.csv", to_csv([["study_id", "findings"]] + [[str(s), t] for s, t in zip(IDS, FINDINGS, strict=True)]), r": expected study_id and a text column .*'findings' is read as a copy of the reference"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "pattern"), [c[1:] for c in REPORTS_REFUSED], ids=[c[0] for c in REPORTS_REFUSED]
)
def test_report_submissions_refused(tmp_path, refs, name, content, pattern):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        score(path, "mimic-cxr-report", refs["reports"], n_boot=0, processes=1)
    assert re.match(re.escape(str(path)) + pattern, str(caught.value)), str(caught.value)


@pytest.mark.parametrize(
    ("content", "name", "extra", "exit_code", "pattern"),
    [
        (CANONICAL, "ok.csv", [], 0, r"micro"),
        (gzip.compress(CANONICAL), "ok.csv", [], 0, r"micro"),
        ("study_id,Edema\n50414267,café\n".encode("latin-1"), "latin1.csv", [], 2, r"line 2: not UTF-8 text"),
        (_bad_edema("1.3"), "range.csv", [], 2, r"row 3 field 'Edema': 1\.3 is out of range"),
        (b"{\n" + jsonl(label_records()), "broken.jsonl", [], 2, r"row 1: invalid JSON"),
        (b"{\n" + jsonl(label_records()), "broken.jsonl", ["--lenient"], 0, r"1 unreadable rows skipped"),
        (None, "missing.csv", [], 2, r"missing\.csv: submission file not found"),
        (None, "preds[v2].csv", [], 2, r"preds\[v2\]\.csv: submission file not found"),
        (
            CANONICAL.replace(b"Edema", b"[bold]Edema", 1),
            "markup.csv",
            [],
            2,
            r"field '\[bold\]Edema': unexpected",
        ),
    ],
    ids=[
        "plain",
        "gzip-no-suffix",
        "latin-1",
        "out-of-range",
        "broken-jsonl",
        "broken-jsonl-lenient",
        "missing",
        "brackets-in-file-name",
        "markup-in-column-name",
    ],
)
def test_cli_exit_code_and_message(tmp_path, refs, content, name, extra, exit_code, pattern):
    from cxrmax.cli import app

    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    args = ["leaderboard", "score", str(path), "-t", "mimic-cxr-labels", "-r", str(refs["labels"])]
    result = runner.invoke(app, [*args, "--bootstrap", "0", *extra])
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == exit_code, output
    assert "Traceback" not in output
    assert re.search(pattern, " ".join(output.split())), output


_TASK = """name = "my-labels"
version = "1.0"
kind = "labels"
primary_metric = "micro_f1_14"
headline = ["micro_f1_14", "macro_f1_14"]
"""

# A task definition given by path (--task my-task.toml): (id, TOML text or bytes, error pattern or None)
TASK_FILES = [
    ("valid", _TASK, None),
    ("version-as-number", _TASK.replace('"1.0"', "2"), None),
    ("headline-as-string", _TASK.replace('["micro_f1_14", "macro_f1_14"]', '"micro_f1_14"'), r" field 'headline': expected a list of metric names"),
    ("higher-is-better-as-string", _TASK + 'higher_is_better = "false"\n', r" field 'higher_is_better': expected true or false"),
    ("kind-unknown", _TASK.replace('"labels"', '"segmentation"'), r" field 'kind': 'segmentation' is not one of"),
    ("name-missing", _TASK.replace('name = "my-labels"\n', ""), r" field 'name': missing in task definition"),
    ("name-not-text", _TASK.replace('"my-labels"', "[1, 2]"), r" field 'name': expected a string"),
    ("toml-syntax-error", _TASK + "headline = [\n", r": cannot read task definition"),
    ("latin-1-description", (_TASK + 'description = "r\xe9sum\xe9"\n').encode("latin-1"), r": cannot read task definition"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "pattern"), [c[1:] for c in TASK_FILES], ids=[c[0] for c in TASK_FILES])
def test_task_definition_files(tmp_path, refs, content, pattern):
    path = tmp_path / "my-task.toml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if pattern is None:
        (tmp_path / "sub.csv").write_bytes(CANONICAL)
        result = score(tmp_path / "sub.csv", str(path), refs["labels"], n_boot=0)
        assert result.task == "my-labels" and result.primary_value == pytest.approx(1.0)
        assert list(result.headline)[:2] == ["micro_f1_14", "macro_f1_14"]
        return
    with pytest.raises(InputError) as caught:
        score(tmp_path / "sub.csv", str(path), refs["labels"], n_boot=0)
    assert re.match(re.escape(str(path)) + pattern, str(caught.value)), str(caught.value)


def test_missing_task_file_and_bad_published_rows(tmp_path, monkeypatch):
    from cxrmax.leaderboard.tasks import get_task, published_rows

    with pytest.raises(InputError, match=r"nope\.toml: task definition file not found"):
        get_task(str(tmp_path / "nope.toml"))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "published").mkdir()
    (tmp_path / "tasks" / "t.toml").write_text(_TASK + 'published = "p.toml"\n')
    (tmp_path / "published" / "p.toml").write_text(
        '[[rows]]\nname = "A"\nmetrics = { micro_f1_14 = 0.5 }\n[[rows]]\nname = "B"\nmetrics = { micro_f1_14 = "n/a" }\n'
    )
    monkeypatch.setenv("CXRMAX_BENCHMARK_DIR", str(tmp_path))
    with pytest.raises(
        InputError, match=r"p\.toml row 2 field 'metrics\.micro_f1_14': 'n/a' is not a number"
    ):
        published_rows("my-labels")


def _reference_rows(edit=None):
    rows = label_rows()
    return [rows[0]] + [edit(i, list(r)) if edit else r for i, r in enumerate(rows[1:])]


# A prepared reference file (--references FILE) is user input too: (id, name, bytes, None or pattern)
REFERENCE_FILES = [
    ("csv-with-bom", "refs.csv", b"\xef\xbb\xbf" + CANONICAL, None),
    ("gzipped-csv", "refs.csv.gz", gzip.compress(CANONICAL), None),
    ("s-prefixed-ids", "refs.csv", to_csv(_reference_rows(lambda i, r: [f"s{r[0]}", *r[1:]])), None),
    ("value-two", "refs.csv", to_csv(_reference_rows(lambda i, r: [r[0], "2", *r[2:]] if i == 3 else r)), r" row 4 field 'Atelectasis': reference label 2 is not 1, 0, -1 or blank"),
    ("value-word", "refs.csv", to_csv(_reference_rows(lambda i, r: [r[0], "pos", *r[2:]] if i == 1 else r)), r" row 2 field 'Atelectasis': reference label 'pos' is not"),
    ("latin-1-header", "refs.csv", CANONICAL.replace(b"Edema", b"Ed\xe8me"), r": cannot read references: 'utf-8' codec"),
    ("duplicate-study", "refs.csv", CANONICAL + CANONICAL.splitlines()[1] + b"\n", r"refs\.csv: reference key 50414267 appears twice"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "pattern"), [c[1:] for c in REFERENCE_FILES], ids=[c[0] for c in REFERENCE_FILES]
)
def test_reference_files_are_validated(tmp_path, name, content, pattern):
    ref = tmp_path / name
    ref.write_bytes(content)
    (tmp_path / "sub.csv").write_bytes(CANONICAL)
    if pattern is None:
        assert score(tmp_path / "sub.csv", "mimic-cxr-labels", ref, n_boot=0).primary_value == pytest.approx(
            1.0
        )
        return
    with pytest.raises(InputError, match=pattern):
        score(tmp_path / "sub.csv", "mimic-cxr-labels", ref, n_boot=0)


def test_ms_cxr_t_answers_keyed_by_dicom_id_alone(tmp_path):
    """MS-CXR-T is image-pair based: answers keyed by dicom_id (no study_id column) are matched to
    their pairs; keyed by study_id they score the same."""
    from cxrmax.core.pathologies import MS_CXR_T_FINDINGS

    header = ["dicom_id", "previous_dicom_id", "study_id", "previous_study_id", "subject_id"]
    header += [f"{p}_{k}" for p in MS_CXR_T_FINDINGS for k in ("progression", "label_quality")]
    truth = ["improving", "stable", "worsening", "stable"]
    ref = tmp_path / "ms.csv"
    with open(ref, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for i, answer in enumerate(truth):
            cells = [f"dcm-{i}", f"prev-{i}", IDS[i], 51000000 + i, 10000000 + i]
            for prefix in MS_CXR_T_FINDINGS:
                cells += [answer, "one_expert"] if prefix == "edema" else ["", ""]
            writer.writerow(cells)
    answers = ["improving", "stable", "stable", "stable"]  # 3 of 4 right
    by_dicom = tmp_path / "by_dicom.csv"
    by_dicom.write_bytes(to_csv([["dicom_id", "edema"]] + [[f"dcm-{i}", a] for i, a in enumerate(answers)]))
    by_study = tmp_path / "by_study.csv"
    by_study.write_bytes(to_csv([["study_id", "edema"]] + [[str(IDS[i]), a] for i, a in enumerate(answers)]))
    dicom_result = score(by_dicom, "ms-cxr-t", ref, n_boot=0)
    assert dicom_result.headline["edema"] == pytest.approx(0.75) and dicom_result.n_scored == 4
    assert any("keyed by dicom_id" in note for note in dicom_result.notes)
    assert score(by_study, "ms-cxr-t", ref, n_boot=0).headline == dicom_result.headline
    unknown = tmp_path / "unknown.csv"
    unknown.write_bytes(to_csv([["dicom_id", "edema"], ["dcm-9", "stable"]]))
    with pytest.raises(
        InputError, match=r"unknown\.csv row 1 field 'dicom_id': dicom_id dcm-9 is not in the references"
    ):
        score(unknown, "ms-cxr-t", ref, n_boot=0)


def test_text_rows_then_label_rows_are_refused_not_half_ignored(tmp_path, refs):
    """JSON rows may leave out keys; label keys that first appear after text-only rows would be
    ignored silently by a text-mode scorer, so they are an error naming where they start."""
    rows = [{"study_id": s, "report": FINDINGS[i]} for i, s in enumerate(IDS[:6])]
    rows += [{"study_id": s, "Edema": 1} for s in IDS[6:]]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(jsonl(rows))
    with pytest.raises(
        InputError, match=r"mixed\.jsonl row 7 field 'Edema': observation values appear from this row on"
    ):
        score(path, "mimic-cxr-labels", refs["labels"], n_boot=0, processes=1, batch_rows=3)


def test_rows_with_text_only_among_label_rows(tmp_path, refs):
    """Label columns chosen, a JSON row with a report but no observation keys would score as
    all-blank: an error naming the row, or skipped and counted with --lenient."""
    rows = label_records()
    rows[4] = {"study_id": IDS[4], "report": FINDINGS[4]}
    rows[0] = {**rows[0], "report": "kept for reference"}  # text beside labels: labels are used
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(jsonl(rows))
    with pytest.raises(
        InputError, match=r"mixed\.jsonl row 5 field 'report': text but no observation values"
    ):
        score(path, "mimic-cxr-labels", refs["labels"], n_boot=0)
    got = score(path, "mimic-cxr-labels", refs["labels"], n_boot=0, lenient=True)
    assert got.extra["skipped_unreadable"] == 1 and got.n_scored == N - 1
    kept = tmp_path / "kept.jsonl"
    kept.write_bytes(jsonl([r for i, r in enumerate(label_records()) if i != 4]))
    assert got.headline == score(kept, "mimic-cxr-labels", refs["labels"], n_boot=0).headline


# ---------------------------------------------------------------------------------------------------
# Found by throwing unusual input at the real CLI (each test failed before its fix).


def test_negative_zero_is_zero_for_the_duplicate_rule(tmp_path, refs):
    """``-0`` is the label 0: the same predictions with "-0" cells are the same canonical
    predictions, so the board refuses them as a duplicate (they used to be a second entry)."""
    from cxrmax.leaderboard.store import Board, DuplicateSubmission

    def minus_zero(i, row):
        return [row[0], *("-0" if cell == "0" else cell for cell in row[1:])]

    (tmp_path / "plain.csv").write_bytes(CANONICAL)
    (tmp_path / "minus.csv").write_bytes(to_csv(label_rows(edit=minus_zero)))
    (tmp_path / "minus.jsonl").write_bytes(
        jsonl(
            [{k: (-0.0 if v == 0 and k != "study_id" else v) for k, v in r.items()} for r in label_records()]
        )
    )
    assert (
        b",-0," in (tmp_path / "minus.csv").read_bytes()
        and b"-0.0" in (tmp_path / "minus.jsonl").read_bytes()
    )
    plain = score(tmp_path / "plain.csv", "mimic-cxr-labels", refs["labels"], n_boot=0)
    with Board(tmp_path / "board.sqlite") as board:
        board.submit(plain, "plain")
        for name in ("minus.csv", "minus.jsonl"):
            got = score(tmp_path / name, "mimic-cxr-labels", refs["labels"], n_boot=0)
            assert got.headline == plain.headline
            assert got.predictions_sha256 == plain.predictions_sha256
            with pytest.raises(DuplicateSubmission, match="entry 1 'plain'"):
                board.submit(got, name)
        assert board.count() == 1


def _surrogate_reports() -> bytes:
    lines = _report_jsonl(FINDINGS).decode().splitlines()
    lines[1] = json.dumps({"study_id": IDS[1], "report": "left effusion "}).replace('"}', '\\ud800"}')
    return ("\n".join(lines) + "\n").encode()


def test_a_lone_surrogate_escape_in_a_text_is_named_not_a_traceback(tmp_path, refs):
    """JSON may spell a lone surrogate (``"\\ud800"``), which is no character and cannot be hashed as
    UTF-8: an InputError naming the file, row and field (it used to be a UnicodeEncodeError
    traceback); with --lenient the row is skipped and counted."""
    path = tmp_path / "sur.jsonl"
    path.write_bytes(_surrogate_reports())
    pattern = re.escape(str(path)) + r" row 2 field 'report': a lone UTF-16 surrogate \(a \\ud800 escape\)"
    with pytest.raises(InputError, match=pattern):
        score(path, "mimic-cxr-report", refs["reports"], n_boot=0, processes=1)
    got = score(path, "mimic-cxr-report", refs["reports"], n_boot=0, processes=1, lenient=True)
    assert got.extra["skipped_unreadable"] == 1 and got.n_scored == N - 1
    # Through the CLI, for a rationale's model name too: exit code 2, one line, no traceback.
    from cxrmax.cli import app

    rationale = tmp_path / "rationale.jsonl"
    rationale.write_bytes(
        jsonl([{"study_id": IDS[0], "model": "m", "text": "ok"}])
        + b'{"study_id": %d, "model": "m\\udc80", "text": "ok"}\n' % IDS[1]
    )
    result = runner.invoke(
        app, ["leaderboard", "score", str(rationale), "-t", "cxr-max-rationale", "-r", str(refs["labels"])]
    )
    output = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert "row 2 field 'model': a lone UTF-16 surrogate" in " ".join(output.split())


def test_rationale_model_names_are_trimmed_and_blank_ones_refused(tmp_path, refs):
    rows = [
        {"study_id": s, "model": "m1" if i % 2 else " m1 ", "text": "Small left effusion."}
        for i, s in enumerate(IDS)
    ]
    path = tmp_path / "r.jsonl"
    path.write_bytes(jsonl(rows))
    got = score(path, "cxr-max-rationale", refs["labels"], n_boot=0)
    assert list(got.per_model) == ["m1"] and got.per_model["m1"]["n"] == N
    for model, message in (("   ", "blank model name"), ("m\x1b[31m", "holds the control character '\\x1b'")):
        path.write_bytes(jsonl([dict(rows[0], model=model)]))
        with pytest.raises(
            InputError, match=re.escape(f"{path} row 1 field 'model': ") + ".*" + re.escape(message)
        ):
            score(path, "cxr-max-rationale", refs["labels"], n_boot=0)


def _cli(*args):
    from cxrmax.cli import app

    result = runner.invoke(app, ["leaderboard", *map(str, args)])
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_user_text_is_printed_as_written_not_as_rich_markup(tmp_path, refs):
    """File names, cells quoted in notes, entry and model names are the user's text: ``[v2]`` or
    ``[bold red]`` in them used to be taken as rich markup and vanish from the output."""
    path = tmp_path / "preds[v2] [bold red]x.csv"
    path.write_bytes(_bad_edema("[red]pos[/red]"))
    result, output = _cli(
        "score", path, "-t", "mimic-cxr-labels", "-r", refs["labels"], "--bootstrap", "0", "--lenient"
    )
    flat = " ".join(output.split())
    assert result.exit_code == 0, output
    assert "preds[v2] [bold red]x.csv" in flat
    assert "field 'Edema': '[red]pos[/red]' is not a label" in flat
    store = tmp_path / "board.sqlite"
    (tmp_path / "ok.csv").write_bytes(CANONICAL)
    name = "[bold red]model[/] v[2]"
    args = ("-t", "mimic-cxr-labels", "-r", refs["labels"], "--bootstrap", "0", "--store", store)
    result, output = _cli("submit", tmp_path / "ok.csv", "-n", name, *args)
    assert result.exit_code == 0 and f"stored entry 1 {name!r}" in output, output
    result, output = _cli("show", "-t", "mimic-cxr-labels", "--store", store)
    assert result.exit_code == 0 and name in output, output


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("line1\nline2", r"--name 'line1\\nline2': holds the control character '\\n' at character 6"),
        ("red\x1b[31m", r"holds the control character '\\x1b' at character 4"),
        ("bell\x07", r"holds the control character '\\x07'"),
        ("L" * 201, r"--name: 201 characters, over the 200"),
        ("  ", r"an entry needs a non-empty --name"),
    ],
    ids=["newline", "escape-sequence", "bell", "too-long", "blank"],
)
def test_entry_names_that_would_break_the_board_are_refused(tmp_path, refs, name, message):
    """A newline split the entry's row in show and Markdown, an escape sequence drove the terminal:
    such names are refused before scoring (exit code 2, one line), and nothing is written."""
    (tmp_path / "ok.csv").write_bytes(CANONICAL)
    store = tmp_path / "board.sqlite"
    result, output = _cli("submit", tmp_path / "ok.csv", "-n", name, "-t", "mimic-cxr-labels", "-r", refs["labels"], "--bootstrap", "0", "--store", store)  # fmt: skip
    assert result.exit_code == 2 and "Traceback" not in output, output
    assert re.search(message, output), output
    assert not store.exists()


def test_names_stored_before_the_rule_are_shown_escaped(tmp_path, refs):
    """An entry whose name holds control characters (a board written before names were checked) is
    shown with them escaped: one row in show and in Markdown, no raw escape sequence."""
    from cxrmax.leaderboard.render import export_board
    from cxrmax.leaderboard.store import Board

    (tmp_path / "ok.csv").write_bytes(CANONICAL)
    store = tmp_path / "board.sqlite"
    with Board(store) as board:
        board.submit(score(tmp_path / "ok.csv", "mimic-cxr-labels", refs["labels"], n_boot=0), "old")
        board._conn.execute("UPDATE entries SET name = ?", ("two\nlines\x1b[31m",))
        board._conn.commit()
        markdown = export_board(board, "md", ["mimic-cxr-labels"])
    assert "| two\\nlines\\x1b[31m |" in markdown and "\x1b" not in markdown
    result, output = _cli("show", "-t", "mimic-cxr-labels", "--store", store)
    assert result.exit_code == 0 and "two\\nlines\\x1b[31m" in output and "\x1b[31m" not in output, output


def test_reading_commands_never_create_a_store(tmp_path):
    """show, export and export-predictions on a store that does not exist (a mistyped --store) used to
    create it, folders included; now they read an empty board and leave nothing behind."""
    store = tmp_path / "typo" / "board.sqlite"
    result, output = _cli("show", "-t", "mimic-cxr-labels", "--store", store)
    assert result.exit_code == 0 and "no leaderboard store at" in output, output
    result, output = _cli("export", "-f", "csv", "--store", store)
    assert result.exit_code == 0 and "published" in output, output
    result, output = _cli("export-predictions", "1", "-o", "-", "--store", store)
    assert result.exit_code == 2 and "no entry 1 on the board" in output, output
    assert not (tmp_path / "typo").exists()


@pytest.mark.slow
def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_ctrl_c_while_scoring_a_large_submission_leaves_the_board_as_it_was(tmp_path, refs):
    """SIGINT to a real `cxrmax leaderboard submit` in the middle of scoring 50,000 reports: exit code
    130, one line, no traceback; the board holds exactly its earlier entry, passes SQLite's integrity
    check, has no orphan rows, and takes the same submission afterwards."""
    import signal
    import sqlite3
    import subprocess
    import sys
    import time

    n = 50_000  # ~12 s of scoring on 2 idle cores: the signal lands inside it on a much faster machine too
    ids = np.arange(50_000_000, 50_000_000 + n)
    phrases = [
        "Heart size is normal.",
        "Small left pleural effusion.",
        "Mild pulmonary edema.",
        "Bibasilar atelectasis.",
    ]
    texts = [" ".join(phrases[(i + k) % 4] for k in range(3)) for i in range(n)]
    pq.write_table(pa.table({"study_id": ids, "findings": texts}), tmp_path / "refs.parquet")
    (tmp_path / "big.jsonl").write_bytes(
        jsonl([{"study_id": int(s), "report": t[::-1]} for s, t in zip(ids, texts, strict=True)])
    )
    store = tmp_path / "board.sqlite"
    (tmp_path / "ok.csv").write_bytes(CANONICAL)
    first, output = _cli("submit", tmp_path / "ok.csv", "-n", "before", "-t", "mimic-cxr-labels", "-r", refs["labels"], "--bootstrap", "0", "--store", store)  # fmt: skip
    assert first.exit_code == 0, output
    command = [sys.executable, "-m", "cxrmax", "leaderboard", "submit", str(tmp_path / "big.jsonl"), "-t", "mimic-cxr-report", "-r", str(tmp_path / "refs.parquet"), "-n", "big", "--store", str(store), "-j", "1"]  # fmt: skip
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Imports cost ~0.6 s of CPU, scoring ~12 s: count the child's CPU time, not the wall clock, so
    # that a busy machine cannot make the signal land before scoring has started.
    deadline = time.monotonic() + 120
    while _cpu_seconds(child.pid) < 3.0 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGINT)
    output = child.communicate(timeout=120)[0]
    assert child.returncode == 130, output
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith("interrupted: nothing was stored on the board")
    with sqlite3.connect(store) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert [r[0] for r in conn.execute("SELECT name FROM entries")] == ["before"]
        assert conn.execute("SELECT COUNT(*) FROM entry_metrics WHERE entry_id NOT IN (SELECT id FROM entries)").fetchone()[0] == 0  # fmt: skip
        assert conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 1
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    with sqlite3.connect(store) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM entries ORDER BY id")] == ["before", "big"]


def test_a_failing_submission_leaves_no_new_store_behind(tmp_path, refs):
    """Scoring comes before the board is created: a submission that fails to score (a bad cell, no
    --lenient) leaves neither the store nor its folder; a good one then creates both."""
    store = tmp_path / "boards" / "board.sqlite"
    bad = tmp_path / "bad.csv"
    bad.write_bytes(_bad_edema("maybe"))
    args = ("-t", "mimic-cxr-labels", "-r", refs["labels"], "--bootstrap", "0", "--store", store)
    result, output = _cli("submit", bad, "-n", "bad", *args)
    assert result.exit_code == 2 and "'maybe' is not a label" in " ".join(output.split()), output
    assert not store.parent.exists()
    (tmp_path / "ok.csv").write_bytes(CANONICAL)
    result, output = _cli("submit", tmp_path / "ok.csv", "-n", "good", *args)
    assert result.exit_code == 0 and store.is_file(), output
    result, output = _cli("submit", tmp_path / "ok.csv", "-n", "again", *args)
    assert result.exit_code == 2 and "already on the" in output, output


def test_a_key_written_twice_in_one_object_is_named_not_silently_dropped(tmp_path, refs):
    """json keeps the last of two equal keys; a submission whose row says Edema 1 and then Edema 0
    is ambiguous, so it is an error naming the row and field (skipped and counted with --lenient)."""
    lines = list(_JSONL_LINES)
    lines[3] = lines[3][:-1] + ', "Edema": 0}'  # the row's Edema a second time
    path = tmp_path / "twice.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError) as info:
        score(path, "mimic-cxr-labels", refs["labels"], n_boot=0)
    assert str(info.value).startswith(f"{path} row 4 field 'Edema': the key 'Edema' appears twice")
    result = score(path, "mimic-cxr-labels", refs["labels"], n_boot=0, lenient=True)
    assert result.extra["skipped_unreadable"] == 1 and result.n_scored == N - 1
    array = tmp_path / "twice.json"
    array.write_text("[\n" + ",\n".join(lines) + "\n]\n")
    with pytest.raises(InputError, match=r"twice.json row 4 field 'Edema': the key 'Edema' appears twice"):
        score(array, "mimic-cxr-labels", refs["labels"], n_boot=0)
