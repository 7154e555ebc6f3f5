"""Scoring submissions made from a mini MIMIC-CXR (engineer A's fixture) end to end: label values,
free text through the labeler, reports, MS-CXR-T, CXR-MAX rationales from trajectory shards, and
the `cxrmax leaderboard` commands."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest
from typer.testing import CliRunner

from cxrmax.core.errors import InputError
from cxrmax.core.pathologies import MS_CXR_T_FINDINGS, OBSERVATIONS
from cxrmax.leaderboard import score

runner = CliRunner()


@pytest.fixture(scope="module")
def mimic(mini_mimic):
    from cxrmax.mimic.reader import MimicCXR

    return MimicCXR(mini_mimic)


def _labels_csv(path, table, flip: dict[int, str] | None = None):
    """Write a labels submission from a study_labels table; ``flip`` changes one observation per row."""
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_id", *OBSERVATIONS])
        for i, row in enumerate(table.to_pylist()):
            values = {o: row[o] for o in OBSERVATIONS}
            if flip and i in flip:
                obs = flip[i]
                values[obs] = 0.0 if values[obs] in (1.0, -1.0) else 1.0
            writer.writerow(
                [row["study_id"], *("" if values[o] is None else int(values[o]) for o in OBSERVATIONS)]
            )
    return path


def test_label_submission_from_mini_mimic_matches_sklearn(tmp_path, mini_mimic, mimic):
    from sklearn.metrics import f1_score

    truth = mimic.study_labels(splits=["test"])
    assert truth.num_rows >= 3
    perfect = score(_labels_csv(tmp_path / "perfect.csv", truth), "mimic-cxr-labels", mini_mimic, n_boot=0)
    assert perfect.headline["micro_f1_14"] == pytest.approx(1.0)
    assert perfect.coverage == 1.0 and perfect.n_references == truth.num_rows
    flips = {i: OBSERVATIONS[(3 * i) % 14] for i in range(truth.num_rows)}
    for policy, uncertain_as in (("positive", 1), ("negative", 0)):
        result = score(
            _labels_csv(tmp_path / "flip.csv", truth, flips),
            "mimic-cxr-labels",
            mini_mimic,
            uncertain=policy,
            n_boot=200,
        )
        ref = np.array(
            [[row[o] if row[o] is not None else np.nan for o in OBSERVATIONS] for row in truth.to_pylist()]
        )
        pred = ref.copy()
        for i, obs in flips.items():
            j = OBSERVATIONS.index(obs)
            pred[i, j] = 0.0 if pred[i, j] in (1.0, -1.0) else 1.0
        y_true = np.where(ref == -1, uncertain_as, np.nan_to_num(ref)).astype(int)
        y_pred = np.where(pred == -1, uncertain_as, np.nan_to_num(pred)).astype(int)
        assert result.headline["micro_f1_14"] == pytest.approx(f1_score(y_true, y_pred, average="micro"))
        assert result.uncertain == policy
        low, high = result.ci["micro_f1_14"]
        assert low <= result.headline["micro_f1_14"] <= high


def test_free_text_labels_and_report_task(tmp_path, mini_mimic, mimic):
    selection = mimic.select(splits=["test"])
    studies = selection.column("study_id").to_pylist()
    findings = selection.column("findings").to_pylist()
    impressions = selection.column("impression").to_pylist()
    # Free text labelled by the labeler: the reports themselves.
    with open(tmp_path / "text.jsonl", "w") as fh:
        for study, f, i in zip(studies, findings, impressions, strict=True):
            fh.write(json.dumps({"study_id": study, "report": " ".join(t for t in (f, i) if t)}) + "\n")
    text_result = score(tmp_path / "text.jsonl", "mimic-cxr-labels", mini_mimic, n_boot=0)
    assert text_result.input_kind == "text"
    assert text_result.headline["micro_f1_14"] > 0.5  # reports agree with their own labels, mostly
    # Report generation, ReXrank-style JSON: the findings themselves score perfectly.
    entries = {str(s): {"model_prediction": f} for s, f in zip(studies, findings, strict=True) if f}
    (tmp_path / "same.json").write_text(json.dumps(entries))
    same = score(tmp_path / "same.json", "mimic-cxr-report", mini_mimic, n_boot=100)
    assert same.headline["bleu_4"] == pytest.approx(1.0)
    assert same.headline["rouge_l"] == pytest.approx(1.0)
    assert same.headline["ce_micro_f1_14"] == pytest.approx(1.0)
    assert same.coverage == 1.0
    # METEOR: a value with WordNet, otherwise None and a plain note (never a silent 0).
    from cxrmax.leaderboard.textmetrics import METEOR_MISSING, wordnet_available

    if wordnet_available():
        assert same.headline["meteor"] > 0.9
    else:
        assert same.headline["meteor"] is None and METEOR_MISSING in same.notes
    # Shuffled predictions (each study gets another study's findings) score lower on every metric.
    keys = list(entries)
    shuffled = {k: entries[keys[(i + 1) % len(keys)]] for i, k in enumerate(keys)}
    (tmp_path / "shuffled.json").write_text(json.dumps(shuffled))
    worse = score(tmp_path / "shuffled.json", "mimic-cxr-report", mini_mimic, n_boot=0)
    for metric in ("bleu_1", "rouge_l", "cider_d"):
        assert worse.headline[metric] < same.headline[metric]
    # A text column is required for reports.
    (tmp_path / "nocol.jsonl").write_text(json.dumps({"study_id": studies[0], "Edema": 1}) + "\n")
    with pytest.raises(InputError, match="field 'Edema': unexpected column for a report submission"):
        score(tmp_path / "nocol.jsonl", "mimic-cxr-report", mini_mimic, n_boot=0)


def test_ms_cxr_t_answers_and_free_text(tmp_path, mini_mimic):
    from cxrmax.mimic.reader import read_ms_cxr_t

    truth = read_ms_cxr_t(mini_mimic / "MS_CXR_T_temporal_image_classification_v1.0.0.csv")
    rows = truth.to_pylist()
    other = {"improving": "worsening", "worsening": "stable", "stable": "improving"}
    # Answers as labels: correct for every annotated finding except pneumothorax (wrong).
    with open(tmp_path / "answers.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_id", *(f"{p}_progression" for p in MS_CXR_T_FINDINGS)])
        for row in rows:
            cells = []
            for prefix in MS_CXR_T_FINDINGS:
                value = row[f"{prefix}_progression"] or ""
                cells.append(other[value] if value and prefix == "pneumothorax" else value)
            writer.writerow([row["study_id"], *cells])
    result = score(tmp_path / "answers.csv", "ms-cxr-t", mini_mimic, n_boot=50)
    annotated = {p: sum(1 for r in rows if r[f"{p}_progression"]) for p in MS_CXR_T_FINDINGS}
    for prefix in MS_CXR_T_FINDINGS:
        if annotated[prefix]:
            assert result.headline[prefix] == (0.0 if prefix == "pneumothorax" else 1.0)
        else:
            assert result.headline[prefix] is None
    defined = [v for k, v in result.headline.items() if k != "avg" and v is not None]
    assert result.headline["avg"] == pytest.approx(np.mean(defined))
    # Free text naming each finding's progression in its own sentence.
    words = {"improving": "has improved", "stable": "is unchanged", "worsening": "has worsened"}
    names = {
        "consolidation": "consolidation",
        "edema": "pulmonary edema",
        "pleural_effusion": "pleural effusion",
        "pneumonia": "pneumonia",
        "pneumothorax": "pneumothorax",
    }
    with open(tmp_path / "text.jsonl", "w") as fh:
        for row in rows:
            sentences = [
                f"The {names[p]} {words[row[f'{p}_progression']]}."
                for p in MS_CXR_T_FINDINGS
                if row[f"{p}_progression"]
            ]
            fh.write(json.dumps({"study_id": row["study_id"], "answer": " ".join(sentences)}) + "\n")
    text = score(tmp_path / "text.jsonl", "ms-cxr-t", mini_mimic, n_boot=0)
    assert text.input_kind == "text"
    assert text.headline["avg"] == pytest.approx(1.0)


def _write_shards(out, mimic, models=("alpha", "beta")):
    from cxrmax.core.schemas import TRAJECTORY_SCHEMA
    from cxrmax.generate.store import write_shard_atomic

    labels = mimic.study_labels().to_pylist()[:12]
    texts = {
        "alpha": lambda row: (
            " ".join(f"There is {o.lower()}." for o in OBSERVATIONS if row[o] == 1 and o != "No Finding")
            or "No acute findings."
        ),
        "beta": lambda row: "There is a large right pneumothorax. Cardiomegaly is present.",
    }
    for model in models:
        rows = []
        for i, row in enumerate(labels):
            rows.append(
                {
                    "request_key": f"{model}-{i}",
                    "sample_id": f"d{i}",
                    "study_id": row["study_id"],
                    "subject_id": row["subject_id"],
                    "model": model,
                    "text": texts[model](row),
                    "labels": {o: row[o] for o in OBSERVATIONS}
                    if i % 2 == 0
                    else None,  # half need the references
                }
            )
        folder = out / "trajectories" / model
        folder.mkdir(parents=True, exist_ok=True)
        write_shard_atomic(pa.Table.from_pylist(rows, schema=TRAJECTORY_SCHEMA), folder / "part-000.arrow")


def test_rationale_task_from_trajectory_shards(tmp_path, mini_mimic, mimic):
    _write_shards(tmp_path / "OUT", mimic)
    result = score(tmp_path / "OUT", "cxr-max-rationale", mini_mimic, n_boot=50)
    assert set(result.per_model) == {"alpha", "beta"}
    alpha, beta = result.per_model["alpha"], result.per_model["beta"]
    assert alpha["n"] == beta["n"] == 12
    # alpha restates the ground truth; beta claims the same two findings for every study.
    assert alpha["precision"] > 0.8 and alpha["recall"] > 0.8
    assert beta["precision"] < alpha["precision"]
    assert alpha["similarity"] is not None and 0 <= alpha["similarity"] <= 1
    assert result.format == "arrow" and len(result.sha256) == 64
    # One model's folder (as the demo scores them) and the trajectories/ folder itself also work.
    single = score(tmp_path / "OUT" / "trajectories" / "beta", "cxr-max-rationale", mini_mimic, n_boot=0)
    assert set(single.per_model) == {"beta"} and single.per_model["beta"]["precision"] == pytest.approx(
        beta["precision"]
    )
    assert set(
        score(tmp_path / "OUT" / "trajectories", "cxr-max-rationale", mini_mimic, n_boot=0).per_model
    ) == {"alpha", "beta"}


def test_cli_score_submit_show_export(tmp_path, mini_mimic, mimic):
    from cxrmax.cli import app

    truth = mimic.study_labels(splits=["test"])
    sub = _labels_csv(tmp_path / "sub.csv", truth)
    store = tmp_path / "board.sqlite"
    result = runner.invoke(
        app,
        [
            "leaderboard",
            "score",
            str(sub),
            "-t",
            "mimic-cxr-labels",
            "-r",
            str(mini_mimic),
            "--uncertain",
            "ignore",
            "--bootstrap",
            "50",
            "--json",
            str(tmp_path / "r.json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "uncertain policy: ignore" in result.output and "coverage:" in result.output
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["headline"]["micro_f1_14"] == pytest.approx(1.0) and data["uncertain"] == "ignore"
    piped = runner.invoke(
        app,
        [
            "leaderboard",
            "score",
            str(sub),
            "-t",
            "mimic-cxr-labels",
            "-r",
            str(mini_mimic),
            "--bootstrap",
            "0",
            "--json",
            "-",
        ],
    )
    assert piped.exit_code == 0 and json.loads(piped.stdout)["coverage"] == 1.0
    args = [
        "leaderboard",
        "submit",
        str(sub),
        "-t",
        "mimic-cxr-labels",
        "-r",
        str(mini_mimic),
        "--name",
        "oracle",
        "--model-info",
        "params=0",
        "--store",
        str(store),
        "--bootstrap",
        "0",
    ]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already on the mimic-cxr-labels board" in again.output
    shown = runner.invoke(
        app,
        ["leaderboard", "show", "--task", "mimic-cxr-labels", "--task", "ms-cxr-t", "--store", str(store)],
        terminal_width=160,
    )
    assert shown.exit_code == 0 and "oracle" in shown.output and "GPT-5 *" in shown.output
    out = tmp_path / "board.html"
    exported = runner.invoke(
        app, ["leaderboard", "export", "--format", "html", "-o", str(out), "--store", str(store)]
    )
    assert exported.exit_code == 0 and "<table" in out.read_text()
    offline = runner.invoke(
        app,
        [
            "leaderboard",
            "export",
            "-f",
            "md",
            "-o",
            str(tmp_path / "b.md"),
            "--store",
            str(store),
            "--push-to-hub",
            "me/board",
        ],
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert offline.exit_code == 2 and "offline" in offline.output
    assert "oracle" in (tmp_path / "b.md").read_text()  # the export itself is written first
    partial = _labels_csv(tmp_path / "partial.csv", truth.slice(0, truth.num_rows - 1))
    failed = runner.invoke(
        app,
        [
            "leaderboard",
            "score",
            str(partial),
            "-t",
            "mimic-cxr-labels",
            "-r",
            str(mini_mimic),
            "--require-complete",
        ],
    )
    assert failed.exit_code == 2 and "1 of" in failed.output and "missing" in failed.output
    bad_policy = runner.invoke(
        app,
        [
            "leaderboard",
            "score",
            str(sub),
            "-t",
            "mimic-cxr-labels",
            "-r",
            str(mini_mimic),
            "--uncertain",
            "maybe",
        ],
    )
    assert bad_policy.exit_code == 2 and "use one of positive, negative, ignore" in bad_policy.output


@pytest.mark.slow
def test_two_cli_processes_submitting_at_once_both_land(tmp_path, mini_mimic, mimic):
    truth = mimic.study_labels(splits=["test"])
    store = tmp_path / "board.sqlite"
    subs = [_labels_csv(tmp_path / f"s{i}.csv", truth, {0: OBSERVATIONS[i]}) for i in range(2)]
    cmd = [sys.executable, "-m", "cxrmax", "leaderboard", "submit"]
    procs = [
        subprocess.Popen(
            cmd
            + [
                str(s),
                "-t",
                "mimic-cxr-labels",
                "-r",
                str(mini_mimic),
                "-n",
                f"m{i}",
                "--store",
                str(store),
                "--bootstrap",
                "2000",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i, s in enumerate(subs)
    ]
    deadline = time.time() + 120
    outputs = [p.communicate(timeout=max(1, deadline - time.time()))[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    from cxrmax.leaderboard.store import Board

    with Board(store) as board:
        assert sorted(e.name for e in board.entries()) == ["m0", "m1"]


def test_ms_cxr_t_keyed_by_dicom_id_when_a_study_repeats(tmp_path):
    """Real MS-CXR-T may pair one current study with several previous images: rows are then keyed by
    dicom_id, and a submission keyed by study_id alone is refused with a clear message."""
    header = ["dicom_id", "previous_dicom_id", "study_id", "previous_study_id", "subject_id"]
    header += [f"{p}_{k}" for p in MS_CXR_T_FINDINGS for k in ("progression", "label_quality")]
    rows = []
    for i, (study, answer) in enumerate(
        [(51111111, "worsening"), (51111111, "improving"), (52222222, "stable")]
    ):
        cells = [f"dcm-{i}", f"prev-{i}", study, 50000000 + i, 10000000]
        for prefix in MS_CXR_T_FINDINGS:
            cells += [answer, "one_expert"] if prefix == "edema" else ["", ""]
        rows.append(cells)
    ref = tmp_path / "ms.csv"
    with open(ref, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *rows])
    sub = tmp_path / "answers.csv"
    with open(sub, "w", newline="") as fh:
        csv.writer(fh).writerows(
            [
                ["dicom_id", "study_id", "edema"],
                ["dcm-0", 51111111, "worse"],
                ["dcm-1", 51111111, "stable"],
                ["dcm-2", 52222222, "stable"],
            ]
        )
    result = score(sub, "ms-cxr-t", ref, n_boot=0)
    assert result.headline["edema"] == pytest.approx(2 / 3)
    assert result.n_references == 3
    with open(tmp_path / "by_study.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["study_id", "edema"], [51111111, "worse"]])
    with pytest.raises(InputError, match="rows must be keyed by dicom_id"):
        score(tmp_path / "by_study.csv", "ms-cxr-t", ref, n_boot=0)
    with open(tmp_path / "dup.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([["dicom_id", "edema"], ["dcm-0", "worse"], ["dcm-0", "stable"]])
    with pytest.raises(
        InputError, match=r"row 2 field 'dicom_id': duplicate dicom_id dcm-0 \(first given in row 1\)"
    ):
        score(tmp_path / "dup.csv", "ms-cxr-t", ref, n_boot=0)


def test_rationale_file_submission_and_shards_without_references(tmp_path, mini_mimic, mimic):
    labels = mimic.study_labels().to_pylist()[:8]
    with open(tmp_path / "rationales.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_id", "model", "rationale"])
        for row in labels:
            writer.writerow(
                [
                    row["study_id"],
                    "echo",
                    " ".join(f"There is {o.lower()}." for o in OBSERVATIONS if row[o] == 1),
                ]
            )
            writer.writerow([row["study_id"], "silent", "I cannot interpret medical images."])
    result = score(tmp_path / "rationales.csv", "cxr-max-rationale", mini_mimic, n_boot=20)
    assert result.per_model["echo"]["recall"] > result.per_model["silent"]["recall"]
    assert result.per_model["silent"]["precision"] is None  # claims nothing: precision undefined
    # Shards carrying their own labels score without references (similarity then not computed).
    _write_shards(tmp_path / "OUT", mimic, models=("alpha",))
    with pytest.raises(InputError, match="no ground-truth labels for study"):
        score(tmp_path / "OUT", "cxr-max-rationale", None, n_boot=0)  # half the rows carry no labels
    lenient = score(tmp_path / "OUT", "cxr-max-rationale", None, n_boot=0, lenient=True)
    assert lenient.per_model["alpha"]["n"] == 6 and lenient.skipped_unknown == 6
    assert lenient.per_model["alpha"]["similarity"] is None
    assert any("similarity not computed" in note for note in lenient.notes)
    # Missing model column in a file submission.
    (tmp_path / "nomodel.csv").write_text("study_id,rationale\n50000000,text\n")
    with pytest.raises(InputError, match="field 'model'"):
        score(tmp_path / "nomodel.csv", "cxr-max-rationale", mini_mimic, n_boot=0)


def test_rationale_intervals_do_not_depend_on_the_submissions_row_order(tmp_path, mini_mimic, mimic):
    """The same answers in another order (as concurrent generation commits them) give the same
    figures and the same bootstrap intervals."""
    import random

    labels = mimic.study_labels().to_pylist()[:12]
    rows = []
    for i, row in enumerate(labels):
        found = [o.lower() for o in OBSERVATIONS if row[o] == 1]
        rows.append([row["study_id"], "m", " ".join(f"There is {o}." for o in found[: i % 3 + 1])])
        rows.append([row["study_id"], "m", "There is pneumothorax." if i % 2 else "No acute findings."])
    results = []
    for order in range(2):
        random.Random(order).shuffle(rows)
        path = tmp_path / f"rationales-{order}.csv"
        with open(path, "w", newline="") as fh:
            csv.writer(fh).writerows([["study_id", "model", "rationale"], *rows])
        results.append(score(path, "cxr-max-rationale", mini_mimic, n_boot=200).per_model["m"])
    assert results[0] == results[1]
    assert results[0]["ci"]["recall"][0] < results[0]["recall"] < results[0]["ci"]["recall"][1]


def test_radiologist_label_task_on_a_2_1_0_mini_mimic(tmp_path):
    from cxrmax.mimic.reader import MimicCXR
    from cxrmax.testing.mini_mimic import make_mini_mimic

    root = make_mini_mimic(tmp_path / "mimic210", studies=24, seed=3, version="2.1.0", large_images=0)
    truth = MimicCXR(root).study_labels(splits=["test"], source="test-set-labeled")
    assert truth.num_rows > 0
    sub = _labels_csv(tmp_path / "rad.csv", truth)
    result = score(sub, "mimic-cxr-labels-radiologist", root, n_boot=0)
    assert result.headline["micro_f1_14"] == pytest.approx(1.0)
    assert "test-set-labeled" in result.extra["references"]
    # A 2.0.0 root has no radiologist labels: a clear error naming the missing file, not a crash.
    from cxrmax.core.errors import CxrmaxError

    old = make_mini_mimic(tmp_path / "mimic200", studies=8, seed=4, large_images=0)
    with pytest.raises(CxrmaxError, match="test-set-labeled"):
        score(sub, "mimic-cxr-labels-radiologist", old, n_boot=0)
