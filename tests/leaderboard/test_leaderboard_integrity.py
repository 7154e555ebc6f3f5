"""Leaderboard integrity (issue 15), on real SQLite boards and real scoring of a mini MIMIC-CXR:
fingerprints and a reference swap, coverage and a cherry-picked subset, zero overlap, duplicates on
canonical predictions, the MS-CXR-T denominator, schema 1 boards migrated, show / md / csv / html
agreeing, and export-predictions in ReXrank's JSON."""

from __future__ import annotations

import csv
import html
import io
import json
import re
import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from cxrmax.core.errors import InputError
from cxrmax.core.pathologies import COMPETITION_LABELS, MS_CXR_T_FINDINGS, OBSERVATIONS
from cxrmax.leaderboard import fingerprint, score
from cxrmax.leaderboard.render import board_table, export_board
from cxrmax.leaderboard.store import Board, DuplicateSubmission
from cxrmax.leaderboard.tasks import get_task, published_rows
from tests.helpers.leaderboard import make_result

runner = CliRunner()


@pytest.fixture(scope="module")
def truth(mini_mimic):
    from cxrmax.mimic.reader import MimicCXR

    return MimicCXR(mini_mimic).study_labels(splits=["test"])


def _write_labels(path, rows, flip_every: int = 0) -> str:
    """A label CSV from study_labels rows; ``flip_every`` flips Edema in every n-th row."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_id", *OBSERVATIONS])
        for i, row in enumerate(rows):
            values = [row[o] for o in OBSERVATIONS]
            if flip_every and i % flip_every == 0:
                j = OBSERVATIONS.index("Edema")
                values[j] = 0.0 if values[j] in (1.0, -1.0) else 1.0
            writer.writerow([row["study_id"], *("" if v is None else int(v) for v in values)])
    return str(path)


def _submit(board, path, refs, name, **kwargs):
    result = score(path, "mimic-cxr-labels", refs, n_boot=20, **kwargs)
    return board.submit(result, name), result


def _by_name(rows):
    return {r["name"]: r for r in rows}


def test_a_user_made_reference_file_never_ranks_above_the_official_references(tmp_path, mini_mimic, truth):
    rows = truth.to_pylist()
    honest = _write_labels(tmp_path / "honest.csv", rows, flip_every=2)
    with Board(tmp_path / "board.sqlite") as board:
        _, official = _submit(board, honest, mini_mimic, "honest")
        assert official.fingerprint["reference_origin"] == fingerprint.ORIGIN_ROOT
        assert (
            board.official_references(get_task("mimic-cxr-labels"))[0]
            == official.fingerprint["reference_sha256"]
        )
        # The swap: an answer key made from one's own predictions scores 1.0 against itself.
        cheat = _write_labels(tmp_path / "cheat.csv", rows, flip_every=3)
        key = tmp_path / "my_refs.csv"
        key.write_bytes((tmp_path / "cheat.csv").read_bytes())
        _, swapped = _submit(board, cheat, key, "cheater")
        assert swapped.headline["micro_f1_14"] == pytest.approx(1.0)
        assert swapped.fingerprint["reference_sha256"] != official.fingerprint["reference_sha256"]
        # The same reference content as a prepared file is the official set: content, not origin.
        table = truth.select(["study_id", *OBSERVATIONS])
        pq.write_table(table, tmp_path / "official_copy.parquet")
        _, copied = _submit(
            board, _write_labels(tmp_path / "copy.csv", rows, 4), tmp_path / "official_copy.parquet", "copy"
        )
        assert copied.fingerprint["reference_origin"] == fingerprint.ORIGIN_FILE
        assert copied.fingerprint["id"] == official.fingerprint["id"]
        _, table_rows = board_table(board, "mimic-cxr-labels")
    named = _by_name(table_rows)
    assert [r["name"] for r in table_rows if r["group"] == "ranked"] == ["copy", "honest"]
    assert named["copy"]["rank"] == 1 and named["honest"]["rank"] == 2
    cheater = named["cheater"]
    assert cheater["group"] == "other-references" and cheater["rank"] == ""
    assert cheater["source"].startswith("scored against references ")
    assert cheater["source"].endswith("; not ranked") and "official" in cheater["source"]
    # Groups never interleave: every ranked row comes before every other-references row.
    groups = [r["group"] for r in table_rows]
    assert groups == sorted(groups, key=["ranked", "unranked", "other-references", "published"].index)


def test_a_task_file_pin_overrides_the_board(tmp_path, mini_mimic, truth, monkeypatch):
    import dataclasses

    sub = _write_labels(tmp_path / "s.csv", truth.to_pylist())
    result = score(sub, "mimic-cxr-labels", mini_mimic, n_boot=0)
    task = dataclasses.replace(get_task("mimic-cxr-labels"), reference_sha256="0" * 64)
    monkeypatch.setattr("cxrmax.leaderboard.render.get_task", lambda _name: task)
    with Board(tmp_path / "board.sqlite") as board:
        board.submit(result, "from-a-root")
        _, rows = board_table(board, task)
    assert rows[0]["group"] == "other-references"  # a root that is not the pinned data ranks nowhere
    assert "official 0000000000" in rows[0]["source"]


def test_a_cherry_picked_subset_is_shown_unranked_with_its_coverage(tmp_path, mini_mimic, truth):
    rows = truth.to_pylist()
    with Board(tmp_path / "board.sqlite") as board:
        _submit(board, _write_labels(tmp_path / "all.csv", rows, flip_every=2), mini_mimic, "complete")
        _, subset = _submit(board, _write_labels(tmp_path / "three.csv", rows[:3]), mini_mimic, "three")
        assert subset.headline["micro_f1_14"] == pytest.approx(1.0)
        _, table_rows = board_table(board, "mimic-cxr-labels")
        md = export_board(board, "md", ["mimic-cxr-labels"])
    named = _by_name(table_rows)
    assert named["complete"]["rank"] == 1
    coverage = 3 / len(rows)
    assert named["three"]["rank"] == "" and named["three"]["group"] == "unranked"
    assert named["three"]["source"] == f"scored (coverage {coverage:.3f} < 1.000; not ranked)"
    assert named["three"]["coverage"] == pytest.approx(coverage)
    assert f"coverage {coverage:.3f} < 1.000" in md


def test_zero_overlap_is_an_error_even_with_lenient(tmp_path, mini_mimic, truth):
    from cxrmax.cli import app

    path = tmp_path / "elsewhere.csv"
    path.write_text("study_id," + ",".join(OBSERVATIONS) + "\n" + "59999999" + ",1" * 14 + "\n")
    with pytest.raises(InputError, match="no row matches a study of the references"):
        score(path, "mimic-cxr-labels", mini_mimic, n_boot=0, lenient=True)
    store = tmp_path / "board.sqlite"
    for command in ("score", "submit"):
        args = [
            "leaderboard",
            command,
            str(path),
            "-t",
            "mimic-cxr-labels",
            "-r",
            str(mini_mimic),
            "--lenient",
        ]
        if command == "submit":
            args += ["--name", "nothing", "--store", str(store)]
        got = runner.invoke(app, args)
        assert got.exit_code == 2 and "nothing to score" in got.output, got.output
    with Board(store) as board:
        assert board.count() == 0
    # MS-CXR-T: no overlapping row is not an accuracy over n = 0 either.
    (tmp_path / "ms.csv").write_text("study_id,edema\n59999999,stable\n")
    with pytest.raises(InputError, match="nothing to score"):
        score(tmp_path / "ms.csv", "ms-cxr-t", mini_mimic, n_boot=0, lenient=True)


def test_duplicates_are_the_same_predictions_and_policy_not_the_same_bytes(tmp_path, mini_mimic, truth):
    from cxrmax.cli import app

    rows = truth.to_pylist()
    first = _write_labels(tmp_path / "first.csv", rows)
    store = tmp_path / "board.sqlite"

    def submit(path, *extra):
        args = ["leaderboard", "submit", str(path), "-t", "mimic-cxr-labels", "-r", str(mini_mimic)]
        return runner.invoke(app, [*args, "--name", "m", "--store", str(store), "--bootstrap", "0", *extra])

    assert submit(first).exit_code == 0
    newline = tmp_path / "newline.csv"
    newline.write_bytes((tmp_path / "first.csv").read_bytes() + b"\n")
    again = submit(newline)
    assert again.exit_code == 2 and "already on the mimic-cxr-labels board as entry 1" in again.output
    # Another spelling of the same predictions: JSONL, rows reversed, 1.0 for 1.
    with open(tmp_path / "other.jsonl", "w") as fh:
        for row in reversed(rows):
            fh.write(
                json.dumps({"study_id": f"s{row['study_id']}", **{o: row[o] for o in OBSERVATIONS}}) + "\n"
            )
    assert submit(tmp_path / "other.jsonl").exit_code == 2
    # The same file under another uncertain policy is another entry.
    other_policy = submit(first, "--uncertain", "ignore")
    assert other_policy.exit_code == 0, other_policy.output
    with Board(store) as board:
        entries = board.entries("mimic-cxr-labels")
        assert [(e.id, e.uncertain) for e in entries] == [(1, "positive"), (2, "ignore")]
        assert entries[0].predictions_sha256 == entries[1].predictions_sha256
        assert board._conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 1
        with pytest.raises(DuplicateSubmission, match="uncertain=ignore"):
            board.submit(score(newline, "mimic-cxr-labels", mini_mimic, uncertain="ignore", n_boot=0), "x")


def _ms_cxr_t_refs(tmp_path, n: int = 5):
    header = ["dicom_id", "previous_dicom_id", "study_id", "previous_study_id", "subject_id"]
    header += [f"{p}_{k}" for p in MS_CXR_T_FINDINGS for k in ("progression", "label_quality")]
    rows = []
    for i in range(n):
        cells = [f"dcm-{i}", f"prev-{i}", 51000000 + i, 50000000 + i, 10000000 + i]
        for prefix in MS_CXR_T_FINDINGS:
            cells += ["stable", "one_expert"] if prefix == "edema" else ["", ""]
        rows.append(cells)
    path = tmp_path / "ms.csv"
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    return path


def test_ms_cxr_t_absent_rows_count_as_wrong(tmp_path):
    refs = _ms_cxr_t_refs(tmp_path, n=5)
    sub = tmp_path / "answers.csv"
    sub.write_text("study_id,edema\n" + "".join(f"{51000000 + i},stable\n" for i in range(4)))
    result = score(sub, "ms-cxr-t", refs, n_boot=50)
    assert get_task("ms-cxr-t").missing_answers == "wrong"
    assert result.headline["edema"] == pytest.approx(4 / 5)  # not 4 / 4: the absent row is wrong
    assert result.per_finding[[r["finding"] for r in result.per_finding].index("edema")]["n"] == 5
    assert result.coverage == pytest.approx(0.8)
    assert any("1 reference rows absent" in note for note in result.notes)
    # A blank cell and an absent row weigh the same.
    blank = tmp_path / "blank.csv"
    blank.write_text(sub.read_text() + f"{51000004},\n")
    assert score(blank, "ms-cxr-t", refs, n_boot=0).headline["edema"] == pytest.approx(4 / 5)
    low, high = result.ci["edema"]
    assert low <= 0.8 <= high


def test_a_schema_1_board_is_migrated_and_its_entries_are_never_ranked(tmp_path):
    path = tmp_path / "old.sqlite"
    connection = sqlite3.connect(path)
    connection.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('format', 'cxrmax-leaderboard'), ('schema_version', '1');
        CREATE TABLE entries (
            id INTEGER PRIMARY KEY AUTOINCREMENT, task TEXT NOT NULL, task_version TEXT NOT NULL,
            name TEXT NOT NULL, model_info TEXT, submission_sha256 TEXT NOT NULL, submission_file TEXT,
            uncertain TEXT NOT NULL, primary_metric TEXT NOT NULL, primary_value REAL, coverage REAL,
            n_scored INTEGER, created_at TEXT NOT NULL, result_json TEXT NOT NULL,
            UNIQUE (task, submission_sha256));
        CREATE TABLE entry_metrics (
            entry_id INTEGER NOT NULL REFERENCES entries(id) ON DELETE CASCADE, metric TEXT NOT NULL,
            value REAL CHECK (value IS NULL OR typeof(value) IN ('real', 'integer')), ci_low REAL,
            ci_high REAL, PRIMARY KEY (entry_id, metric));
        CREATE INDEX entries_task ON entries(task);
        INSERT INTO entries VALUES (1, 'mimic-cxr-labels', '1.0', 'legacy', '{}', 'abc', 'a.csv',
            'positive', 'micro_f1_14', 0.99, 1.0, 10, '2026-01-01T00:00:00+00:00', '{"headline": {}}');
        INSERT INTO entry_metrics VALUES (1, 'micro_f1_14', 0.99, 0.9, 1.0);
        """
    )
    connection.commit()
    connection.close()
    with Board(path) as board:
        assert dict(board._conn.execute("SELECT key, value FROM meta"))["schema_version"] == "2"
        legacy = board.get(1)
        assert legacy.metrics == {"micro_f1_14": 0.99} and legacy.ci["micro_f1_14"] == (0.9, 1.0)
        assert legacy.fingerprint is None
        board.submit(make_result("a" * 64, 0.5), "new")
        _, rows = board_table(board, "mimic-cxr-labels")
        with pytest.raises(Exception, match="stored before the board kept predictions"):
            board.predictions(1)
    assert [(r["rank"], r["name"], r["group"]) for r in rows] == [
        (1, "new", "ranked"),
        ("", "legacy", "other-references"),
    ]
    assert rows[1]["source"] == (
        "scored against other/unknown references: stored before fingerprints; not ranked"
    )
    assert rows[1]["fingerprint"] == "unknown"
    with Board(path) as board:  # reopening a migrated board is a no-op
        assert board.count() == 2


def _show_rows(output: str) -> list[str]:
    return [line for line in output.splitlines() if "│" in line or "|" in line]


def test_show_md_csv_and_html_agree(tmp_path, monkeypatch):
    from cxrmax.cli import app

    store = tmp_path / "board.sqlite"
    with Board(store) as board:
        board.submit(make_result("1" * 64, 0.7), "complete-a")
        board.submit(make_result("2" * 64, 0.8), "complete-b")
        partial = make_result("3" * 64, 0.95)
        partial.n_scored = 4
        board.submit(partial, "partial")
        board.submit(
            make_result("4" * 64, 0.99, reference_sha="e" * 64, origin=fingerprint.ORIGIN_FILE), "own-key"
        )
        _, rows = board_table(board, "mimic-cxr-labels")
        md = export_board(board, "md", ["mimic-cxr-labels"])
        table_csv = export_board(board, "csv", ["mimic-cxr-labels"])
        page = export_board(board, "html", ["mimic-cxr-labels"])
    expected = [
        (r["rank"], r["name"], r["source"], r["coverage"], r["fingerprint"], r["ci_95"]) for r in rows
    ]
    assert [e[:2] for e in expected] == [
        (1, "complete-b"),
        (2, "complete-a"),
        ("", "partial"),
        ("", "own-key"),
    ]
    # CSV
    parsed = list(csv.DictReader(io.StringIO(table_csv)))
    assert [
        (
            int(r["rank"]) if r["rank"] else "",
            r["name"],
            r["source"],
            float(r["coverage"]),
            r["fingerprint"],
            r["ci_95"],
        )
        for r in parsed
    ] == expected
    # Markdown: one row per entry with the same cells.
    for rank, name, source, coverage, fp, ci in expected:
        line = next(line for line in md.splitlines() if f"| {name} |" in line)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == [str(rank), name, source]
        assert f"{coverage:.4f}" in cells and fp in cells and ci in cells
    # HTML: the same cells, each group in its own tbody.
    for rank, name, source, _coverage, fp, ci in expected:
        row = re.search(rf"<tr>(.*?{re.escape(name)}.*?)</tr>", page).group(1)
        cells = [html.unescape(c) for c in re.findall(r">([^<]*)</td>", row)]
        assert cells[:3] == [str(rank), name, source] and fp in cells and ci in cells
    assert page.count("<tbody") == 3
    # show: the same rank, status, coverage, fingerprint and CI on each entry's line.
    shown = runner.invoke(
        app, ["leaderboard", "show", "-t", "mimic-cxr-labels", "--store", str(store)], terminal_width=250
    )
    assert shown.exit_code == 0, shown.output
    for rank, name, source, coverage, fp, ci in expected:
        line = next(line for line in _show_rows(shown.output) if f" {name} " in line)
        assert line.split("│")[1].strip() == str(rank)
        assert source in line and fp in line and ci in line and f"{coverage:.3f}" in line
    assert "pinned by entry 1" in shown.output


def test_published_rows_are_sorted_apart_and_cited_once(tmp_path):
    with Board(tmp_path / "board.sqlite") as board:
        result = make_result("9" * 64, 0.5, task="ms-cxr-t")
        result.kind, result.primary_metric, result.uncertain = "ms-cxr-t", "avg", "n/a"
        result.fingerprint = fingerprint.make(get_task("ms-cxr-t"), "f" * 64, fingerprint.ORIGIN_ROOT, "n/a")
        result.headline = {"avg": 0.5}
        board.submit(result, "mine")
        _, rows = board_table(board, "ms-cxr-t")
        md = export_board(board, "md", ["ms-cxr-t"])
        page = export_board(board, "html", ["ms-cxr-t"])
        table_csv = export_board(board, "csv", ["ms-cxr-t"])
    assert rows[0]["name"] == "mine" and rows[0]["rank"] == 1
    published = [r for r in rows if r["group"] == "published"]
    assert len(published) == len(published_rows("ms-cxr-t")) and rows[1:] == published
    averages = [r["avg"] for r in published]
    assert averages == sorted(averages, reverse=True) and published[0]["name"] == "APO 7B (paper)"
    source = published_rows("ms-cxr-t")[0].source
    assert md.count(source) == 1 and page.count(source) == 1
    assert sum(1 for r in csv.DictReader(io.StringIO(table_csv)) if r["citation"] == source) == 1
    assert all(r["submitted"] == "" for r in published)  # the citation is not repeated per row


def test_export_predictions_writes_rexrank_json_that_scores_the_same(tmp_path, mini_mimic):
    from cxrmax.cli import app
    from cxrmax.mimic.reader import MimicCXR

    selection = MimicCXR(mini_mimic).select(splits=["test"])
    findings = dict(
        zip(selection.column("study_id").to_pylist(), selection.column("findings").to_pylist(), strict=True)
    )
    entries = {str(s): {"model_prediction": f"  {f}\n"} for s, f in findings.items() if f}
    (tmp_path / "reports.json").write_text(json.dumps(entries))
    store = tmp_path / "board.sqlite"
    args = ["leaderboard", "submit", str(tmp_path / "reports.json"), "-t", "mimic-cxr-report"]
    stored = runner.invoke(
        app, [*args, "-r", str(mini_mimic), "-n", "echo", "--store", str(store), "--bootstrap", "0"]
    )
    assert stored.exit_code == 0, stored.output
    out = tmp_path / "exported.json"
    exported = runner.invoke(
        app, ["leaderboard", "export-predictions", "1", "-o", str(out), "--store", str(store)]
    )
    assert exported.exit_code == 0, exported.output
    data = json.loads(out.read_text())
    assert data == {k: {"model_prediction": v["model_prediction"].strip()} for k, v in entries.items()}
    again = score(out, "mimic-cxr-report", mini_mimic, n_boot=0)
    first = score(tmp_path / "reports.json", "mimic-cxr-report", mini_mimic, n_boot=0)
    assert again.headline == first.headline and again.predictions_sha256 == first.predictions_sha256
    # Label values export as an object per study.
    truth = MimicCXR(mini_mimic).study_labels(splits=["test"]).to_pylist()
    _write_labels(tmp_path / "labels.csv", truth)
    with Board(store) as board:
        entry = board.submit(
            score(tmp_path / "labels.csv", "mimic-cxr-labels", mini_mimic, n_boot=0), "labels"
        )
        labels = board.predictions(entry).to_rexrank()
    row = truth[0]
    assert labels[str(row["study_id"])]["model_prediction"] == {
        o: (None if row[o] is None else int(row[o])) for o in OBSERVATIONS
    }
    missing = runner.invoke(
        app, ["leaderboard", "export-predictions", "99", "-o", str(out), "--store", str(store)]
    )
    assert missing.exit_code == 2 and "no entry 99" in missing.output


def test_results_name_the_competition_labels_and_the_cider_corpus(tmp_path, mini_mimic, truth):
    result = score(
        _write_labels(tmp_path / "s.csv", truth.to_pylist()), "mimic-cxr-labels", mini_mimic, n_boot=0
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["extra"]["competition_labels"] == list(COMPETITION_LABELS)
    assert len(COMPETITION_LABELS) == 5
    assert data["fingerprint"]["metric_version"] == fingerprint.METRIC_VERSIONS["labels"]
    assert "predictions" not in data and len(data["predictions_sha256"]) == 64


def test_rexrank_bleu_2_matches_nltk_sentence_bleu_on_its_tokens():
    pytest.importorskip("nltk")
    from nltk.translate.bleu_score import sentence_bleu

    from cxrmax.leaderboard import textmetrics

    refs = [
        "No acute cardiopulmonary process. Heart size is normal.",
        "Small left pleural effusion, unchanged.",
        "Lungs are clear.",
        "Mild pulmonary edema.",
    ]
    cands = [
        "Heart size is normal. No acute process.",
        "Small left pleural effusion.",
        "Clear lungs bilaterally",
        "",
    ]
    corpus = textmetrics.ReferenceCorpus(refs)
    stats = corpus.score_batch(np.arange(len(refs)), cands)
    want = [
        sentence_bleu([textmetrics.rexrank_tokenize(r)], textmetrics.rexrank_tokenize(c), weights=(0.5, 0.5))
        if textmetrics.rexrank_tokenize(c)
        else 0.0
        for r, c in zip(refs, cands, strict=True)
    ]
    assert textmetrics.rexrank_bleu_2_mean(stats.sum(0)) == pytest.approx(float(np.mean(want)))
    assert textmetrics.rexrank_tokenize("Effusion, small.\nStable") == ["effusion,", "small", ".\nstable"]


def test_a_report_study_without_the_section_is_not_called_unknown(tmp_path):
    refs = tmp_path / "refs.parquet"
    pq.write_table(
        pa.table(
            {
                "study_id": [50000001, 50000002, 50000003],
                "findings": ["Lungs are clear.", None, "Small effusion."],
            }
        ),
        refs,
    )
    sub = tmp_path / "sub.jsonl"
    sub.write_text(
        "".join(
            json.dumps({"study_id": s, "report": "Lungs are clear."}) + "\n"
            for s in (50000001, 50000002, 50000003)
        )
    )
    result = score(sub, "mimic-cxr-report", refs, n_boot=0, processes=1)
    assert result.n_scored == 2 and result.coverage == 1.0 and result.skipped_unknown == 0
    assert result.extra["skipped_without_section"] == 1
    assert any("no findings section" in note for note in result.notes)
    assert "task references" in result.extra["cider_d_document_frequencies"]
    (tmp_path / "unknown.jsonl").write_text(json.dumps({"study_id": 50000009, "report": "x"}) + "\n")
    with pytest.raises(InputError, match="is not in the references"):
        score(tmp_path / "unknown.jsonl", "mimic-cxr-report", refs, n_boot=0, processes=1)
