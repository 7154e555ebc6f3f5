"""`cxrmax demo --size small` end to end, and its outputs checked for content: the injected drift is
visible in the teachers' generated text (read back independently here with the labeler), the
preference shards are non-empty, and teachers and students are scored and on the board."""

from __future__ import annotations

import json
import sqlite3

import pytest

from cxrmax.labeler import label_text

pytestmark = pytest.mark.slow

TEACHERS = ["faithful", "swaps-sides", "hallucinates", "refuses", "verbose"]
STUDENTS = ["student-sft", "student-apo", "student-dpo"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from cxrmax.toy.demo import run_demo

    out = tmp_path_factory.mktemp("demo")
    return run_demo(out, size="small", seed=0)


def _answers(out, model, split_dir="eval"):
    from cxrmax.generate import read_trajectories

    table = read_trajectories(out / split_dir, model=model)
    return table.to_pylist()


def test_every_stage_ran_and_is_timed(demo):
    names = [t.name for t in demo.timings]
    assert names == ["data", "teachers", "preferences", "students", "score"]
    assert all(t.seconds > 0 for t in demo.timings)
    assert not any(t.skipped for t in demo.timings), [t.skipped for t in demo.timings]
    report = json.loads((demo.out / "demo_report.json").read_text())
    assert "TOY-SCALE" in report["notice"]
    assert report["total_seconds"] == pytest.approx(sum(t["seconds"] for t in report["timings"]))
    md = (demo.out / "DEMO.md").read_text()
    assert "TOY-SCALE SIMULATION" in md and "student-apo" in md


def test_teachers_trajectories_show_the_injected_drift(demo):
    def refusal_rate(model):
        rows = _answers(demo.out, model)
        return sum(label_text(r["text"]).is_refusal for r in rows) / len(rows)

    def mean_words(model):
        rows = _answers(demo.out, model)
        return sum(len(r["text"].split()) for r in rows) / len(rows)

    def claims_absent(model, observation):
        rows = [
            r for r in _answers(demo.out, model) if (r["labels"] or {}).get(observation) not in (1.0, -1.0)
        ]
        hits = 0
        for r in rows:
            obs = label_text(r["text"]).observations.get(observation)
            hits += obs is not None and obs.status == "positive"
        return hits / max(1, len(rows))

    for model in TEACHERS:
        rows = _answers(demo.out, model)
        assert rows and all(r["model"] == model and r["split"] == "test" for r in rows)
        assert {r["backend"] for r in rows} == {"transformers"}  # in-process, batched
    assert refusal_rate("refuses") >= refusal_rate("faithful") + 0.2
    assert mean_words("verbose") >= 1.5 * mean_words("faithful")
    assert claims_absent("hallucinates", "Pneumothorax") >= claims_absent("faithful", "Pneumothorax") + 0.3


def test_a_teacher_served_over_http_answers_as_it_does_in_process(demo, tmp_path):
    # --teacher-backend openai: the teacher behind the OpenAI-compatible server on 127.0.0.1, one request
    # at a time. Each answer is sampled from its request's own seed in both paths, so the answers are
    # the batched in-process ones except where float rounding of a batch moves a sampled token (rare).
    from cxrmax.toy.demo import SIZES, demo_prompt, generate_answers

    rows = _answers(demo.out, "faithful")
    stats = generate_answers(
        "faithful",
        demo.out / "teachers" / "faithful",
        demo.out / "selection-test.parquet",
        demo.out / "mimic",
        tmp_path / "eval",
        SIZES["small"],
        SIZES["small"].test_samples,
        0,
        "openai",
        demo_prompt(),  # the demo's prompt, so the request keys match
    )
    assert stats["done"] == len(rows)
    served = {r["request_key"]: r for r in _answers(tmp_path, "faithful")}
    assert {r["backend"] for r in served.values()} == {"openai"}
    same = sum(served[r["request_key"]]["text"] == r["text"] for r in rows)
    assert same >= 0.9 * len(rows), (same, len(rows))


def test_preference_and_sft_shards_are_non_empty(demo):
    from datasets import load_from_disk

    preferences = load_from_disk(str(demo.out / "data" / "preferences"))
    train = preferences["train"]
    assert train.num_rows > 0
    assert all(len(row["rejected"]) >= 1 for row in train)
    assert set(m for row in train for m in row["rejected_models"]) <= set(TEACHERS)
    # The positive is a teacher's own answer (the one closest to the consensus), never also a negative.
    answers = {(r["sample_id"], r["model"]): r["text"] for r in _answers(demo.out, None, "generate")}
    for row in train:
        model = row["chosen_source"].removeprefix("selected:")
        assert model in TEACHERS and answers[(row["sample_id"], model)] == row["chosen"]
        assert model not in row["rejected_models"] and row["chosen"] not in row["rejected"]
    sft = load_from_disk(str(demo.out / "data" / "sft"))
    assert sft["train"].num_rows >= train.num_rows
    assert (demo.out / "data" / "README.md").is_file()


def test_teachers_and_students_are_scored_and_on_the_board(demo):
    from cxrmax.toy.demo import SIZES, seed_model

    seeds = SIZES["small"].student_seeds
    rows = {row["model"]: row for row in demo.rows}
    assert set(rows) == set(TEACHERS + STUDENTS)
    for model in TEACHERS:
        assert rows[model]["answers"] == len(_answers(demo.out, model)) > 0
    for row in rows.values():
        assert row["precision"] is None or 0.0 <= row["precision"] <= 1.0
        assert 0.0 <= row["refusal_rate"] <= 1.0
    per_seed = {row["model"]: row for row in demo.seed_rows}
    assert set(per_seed) == {seed_model(s, k) for s in STUDENTS for k in range(seeds)}
    for student in STUDENTS:
        assert rows[student]["kind"] == "student"
        counts = [len(_answers(demo.out, seed_model(student, k))) for k in range(seeds)]
        assert all(counts) and rows[student]["answers"] == sum(counts)  # pooled over the seeds
        assert rows[student]["answers"] == len(_answers(demo.out, student, "eval-pooled"))
        answers = _answers(demo.out, seed_model(student, 0))
        assert {r["backend"] for r in answers} == {"transformers"}
    # the drift table agrees with what the answers say
    assert rows["refuses"]["refusal_rate"] > rows["faithful"]["refusal_rate"]
    # APO and DPO are compared with SFT film by film (their answers to the same test films, paired)
    for student, baseline in (("student-apo", "student-sft"), ("student-dpo", "student-sft")):
        paired = rows[student]["paired"][baseline]
        difference, low, high = paired["refusal_rate"]
        assert low <= difference <= high
        assert difference == pytest.approx(rows[student]["refusal_rate"] - rows[baseline]["refusal_rate"])
    assert rows["student-sft"]["paired"] == {} and rows["faithful"]["paired"] == {}
    with sqlite3.connect(demo.out / "leaderboard.sqlite") as db:
        names = {name for (name,) in db.execute("SELECT name FROM entries WHERE task = 'cxr-max-rationale'")}
    assert names == set(TEACHERS + STUDENTS) | set(per_seed)


def test_the_student_stage_runs_over_seeds_and_the_table_shows_their_spread(demo):
    """Every seed trains its own students (other weights), and a student's row carries each seed's
    figures, their mean and sd, and the interval over the pooled answers."""
    import numpy as np
    from safetensors.torch import load_file

    from cxrmax.toy.demo import SIZES, results_markdown, seed_model

    seeds = SIZES["small"].student_seeds
    assert seeds >= 2
    weights = [
        load_file(str(demo.out / "students" / f"seed-{k}" / "student-sft" / "model.safetensors"))
        for k in range(seeds)
    ]
    assert any(not (weights[0][key] == weights[1][key]).all() for key in weights[0])
    per_seed = {row["model"]: row for row in demo.seed_rows}
    for student in STUDENTS:
        row = demo.row(student)
        assert row["seeds"] == seeds
        for key in ("precision", "hallucination_rate", "mean_words"):
            values = [per_seed[seed_model(student, k)][key] for k in range(seeds)]
            assert row["per_seed"][key] == pytest.approx(values, nan_ok=True)
            assert row["seed_mean"][key] == pytest.approx(np.nanmean(values))
            assert row["seed_sd"][key] == pytest.approx(np.nanstd(values, ddof=1))
        low, high = row["ci"]["refusal_rate"]
        assert low <= row["refusal_rate"] <= high
    table = results_markdown(demo)
    assert " ± " in table
    md = (demo.out / "DEMO.md").read_text()
    assert f"{seeds} seeds of the student stage" in md and "Every seed's students" in md
    assert "floor" in md and demo.sft_floor["mixture"] > 0
    assert set(demo.sft_floor["students"]) == set(range(seeds))


def test_demo_cli_help_and_bad_size():
    from typer.testing import CliRunner

    from cxrmax.cli import app

    result = CliRunner().invoke(app, ["demo", "--help"])
    assert result.exit_code == 0 and "--size" in result.output
    result = CliRunner().invoke(app, ["demo", "--size", "huge", "--out", "/tmp/never-made"])
    assert result.exit_code == 2 and "--size" in result.output


def test_third_party_bars_are_hidden_during_the_demo_and_restored(monkeypatch):
    import os

    import datasets
    from transformers.utils import logging as hf_logging

    from cxrmax.toy.demo import _third_party_bars_off

    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()
    with _third_party_bars_off():
        assert not datasets.is_progress_bar_enabled() and not hf_logging.is_progress_bar_enabled()
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"  # inherited by spawned workers
    assert datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled()
    assert "HF_HUB_DISABLE_PROGRESS_BARS" not in os.environ


def test_the_student_stage_is_the_same_whatever_the_thread_count(demo, tmp_path):
    """The same seed gives the same students on an idle and on a busy machine: the stage pins its
    threads, so a caller's (or the load's) thread setting changes nothing."""
    import dataclasses

    import torch
    from safetensors.torch import load_file

    from cxrmax.toy.demo import SIZES, train_students
    from cxrmax.toy.reader import shipped_reader

    size = dataclasses.replace(SIZES["small"], sft_steps=6, apo_steps=3)
    base = shipped_reader()
    weights = []
    for threads, folder in ((2, tmp_path / "two"), (1, tmp_path / "one")):
        torch.set_num_threads(threads)
        students = train_students(folder, demo.out / "data", demo.out / "mimic", base, size, 0)
        weights.append(load_file(str(students["student-apo"] / "model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
