"""build-preferences on trajectory sets shaped like real `cxrmax generate` runs.

Every shard here is written by generate's own writer (rows_to_table + write_shard_atomic into
OUT/trajectories/<safe model dir>/) over samples selected from the mini MIMIC-CXR, and the build is
the real one (`build_preferences`, one process, no card). Each case names what a real run throws
at the build and asserts the documented outcome: correct counted outputs or an InputError naming
the file (and row/field)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow as pa
import pytest

from cxrmax.core.errors import InputError
from cxrmax.preferences.build import BuildOptions, build_preferences
from tests.helpers.preference_runs import (
    ANSWERS,
    MODELS,
    N_SAMPLES,
    REFUSAL,
    full_run,
    generate_row,
    write_model,
)


@pytest.fixture(scope="module")
def selection(mini_mimic) -> list[dict]:
    from cxrmax.mimic.reader import MimicCXR

    return MimicCXR(mini_mimic).select().slice(0, N_SAMPLES).to_pylist()


def build(tmp_path: Path, mimic: Path, **options):
    options.setdefault("processes", 1)
    options.setdefault("card", False)
    options.setdefault("export_swift", False)
    return build_preferences([tmp_path / "run"], tmp_path / "data", BuildOptions(mimic_root=mimic, **options))


def load(tmp_path: Path, name: str) -> list[dict]:
    dd = datasets.load_from_disk(str(tmp_path / "data" / name))
    return [row for split in dd for row in dd[split]]


def annotations(tmp_path: Path) -> list[dict]:
    return (
        pa.ipc.open_file(str(tmp_path / "data" / "annotations" / "trajectories.arrow")).read_all().to_pylist()
    )


# --- cases that must build, with the documented counts -------------------------------------------


def case_one_model_failed(run: Path, samples: list[dict]) -> None:
    """grok-4 answered 1 sample; samples 0-2 have 1, 2 and 3 sources only."""
    for model in MODELS[:6]:
        write_model(run, model, [generate_row(s, model, ANSWERS[model]) for s in samples[3:]])
    for i, sample in enumerate(samples[:3]):
        for model in MODELS[: i + 1]:
            write_model(
                run, model, [generate_row(sample, model, ANSWERS[model])], name=f"part-all-9{i}.arrow"
            )
    write_model(run, "grok-4", [generate_row(samples[3], "grok-4", ANSWERS["grok-4"])])


def case_blank_answers(run: Path, samples: list[dict]) -> None:
    blanks = ["", "   \n\t ", "\u200b\u200b", "**", "\n---\n", " NaN "]  # and None, "null" below
    full_run(
        run,
        samples,
        lambda i, m: blanks[i] if m == "grok-4" else None if i == 0 and m == "glm-4.5v" else ANSWERS[m],
    )
    write_model(
        run,
        "gemini-2.5-flash-lite",
        [generate_row(samples[0], "gemini-2.5-flash-lite", "null")],
        "part-2.arrow",
    )


def case_reasoning_parser(run: Path, samples: list[dict]) -> None:
    """Even samples: reasoning and a short answer; odd: cut while thinking (text repeats it)."""
    for model in MODELS:
        rows = []
        for i, s in enumerate(samples):
            if i % 2:
                rows.append(
                    generate_row(s, model, ANSWERS[model], reasoning=ANSWERS[model], finish_reason="length")
                )
            else:
                rows.append(generate_row(s, model, "Final answer: see above.", reasoning=ANSWERS[model]))
        write_model(run, model, rows)


def case_old_shard_without_reasoning(run: Path, samples: list[dict]) -> None:
    full_run(run, samples)
    model = MODELS[0]
    old = [generate_row(s, model, ANSWERS[model]) for s in samples]
    write_model(run, model, old, drop=("reasoning",))  # replaces the new-format shard


def case_sharded_merge(run: Path, samples: list[dict]) -> None:
    half = len(samples) // 2
    for model in MODELS:
        write_model(
            run, model, [generate_row(s, model, ANSWERS[model]) for s in samples[:half]], "part-0of2-1.arrow"
        )
        write_model(
            run, model, [generate_row(s, model, ANSWERS[model]) for s in samples[half:]], "part-1of2-1.arrow"
        )


def case_unicode_markdown_long(run: Path, samples: list[dict]) -> None:
    decorated = (
        "# 🩻 Befund\n\n| Finding | Side |\n|---|---|\n| Effusion | **left** |\n\n> CTR ≈ 0.6 ✅ 中文\n\n"
    )
    full_run(
        run,
        samples,
        lambda i, m: (ANSWERS[m] + " ") * 60 if m == "glm-4.5v" else decorated + ANSWERS[m],
    )


BUILD_CASES = {
    # name: (setup, expected load counts, expected build counts)
    "one_model_failed": (case_one_model_failed, {}, {"samples": 5, "trajectories": 24}),
    "blank_answers": (
        case_blank_answers,
        {"empty_texts": N_SAMPLES + 2},
        {"trajectories": 6 * N_SAMPLES - 1},
    ),
    "reasoning_parser": (
        case_reasoning_parser,
        {"truncated_texts": 7 * (N_SAMPLES // 2), "reasoning_joined": 7 * (N_SAMPLES // 2)},
        {"sft_rows": 7 * (N_SAMPLES // 2), "sft_truncated_excluded": 7 * (N_SAMPLES // 2)},
    ),
    "old_shard_without_reasoning": (case_old_shard_without_reasoning, {}, {"trajectories": 7 * N_SAMPLES}),
    "sharded_merge": (case_sharded_merge, {}, {"trajectories": 7 * N_SAMPLES, "preference_rows": N_SAMPLES}),
    "unicode_markdown_long": (case_unicode_markdown_long, {}, {"trajectories": 7 * N_SAMPLES}),
}


@pytest.mark.parametrize("name", list(BUILD_CASES))
def test_realistic_runs_build_with_documented_counts(name, tmp_path, mini_mimic, selection):
    setup, load_expected, counts_expected = BUILD_CASES[name]
    setup(tmp_path / "run", selection)
    summary = build(tmp_path, mini_mimic)
    for key, value in load_expected.items():
        assert summary.load[key] == value, key
    for key, value in counts_expected.items():
        assert summary.counts[key] == value, key
    preferences = load(tmp_path, "preferences")
    assert len(preferences) == summary.counts["preference_rows"]
    for row in preferences:
        assert row["chosen"].strip()
        assert all(text and text.strip() for text in row["rejected"])
        assert row["chosen"] not in row["rejected"]
        assert set(row["rejected_models"]) <= set(MODELS)
    sft = load(tmp_path, "sft")
    assert all(row["completion"].strip() for row in sft)


def test_one_model_failed_skips_single_source_samples(tmp_path, mini_mimic, selection):
    case_one_model_failed(tmp_path / "run", selection)
    summary = build(tmp_path, mini_mimic)
    assert summary.skipped_few_sources == 1
    assert summary.skipped_few_sources_examples == [selection[0]["sample_id"]]
    assert "grok-4" in summary.models and "Qwen/Qwen2.5-VL-7B-Instruct" in summary.models


def test_reasoning_is_the_trajectory_and_truncated_answers_are_negatives_only(
    tmp_path, mini_mimic, selection
):
    case_reasoning_parser(tmp_path / "run", selection)
    build(tmp_path, mini_mimic)
    sft = load(tmp_path, "sft")
    joined = [row for row in sft if row["model"] == "claude-sonnet-4"]
    # the reasoning comes first, then the answer; the cut (odd) samples are not SFT targets
    assert len(joined) == N_SAMPLES // 2
    assert all(row["completion"].startswith("**Findings:**") for row in joined)
    assert all(row["completion"].endswith("Final answer: see above.") for row in joined)
    rows = annotations(tmp_path)
    cut = [row for row in rows if row["truncated"]]
    assert len(cut) == 7 * (N_SAMPLES // 2)
    assert all(row["negative_rank"] is not None for row in cut)  # still negatives
    sonnet = [row for row in rows if row["model"] == "claude-sonnet-4"]
    # the labeler read the reasoning (not only "Final answer: see above.")
    assert all(row["labels"]["Cardiomegaly"] == 1.0 for row in sonnet)
    # the data card says how many answers were cut and how many had their reasoning joined
    from cxrmax.preferences.datacard import render_card

    card = render_card(tmp_path / "data")
    n_cut = 7 * (N_SAMPLES // 2)
    assert 'answers cut at the token limit (finish_reason "length"; kept as negatives' in card
    assert f"positive): {n_cut}; answers whose separate reasoning was put before them: {n_cut}" in card


def test_all_refuse_and_all_agree_samples(tmp_path, mini_mimic, selection):
    sonnet = ANSWERS["claude-sonnet-4"]
    full_run(
        tmp_path / "run",
        selection,
        lambda i, m: REFUSAL if i == 0 else sonnet if i == 1 else ANSWERS[m],
    )
    summary = build(tmp_path, mini_mimic, drop_non_drifting=True)
    # every source refused sample 0: no preference row; every source agrees on sample 1: no negative
    assert summary.counts["samples_without_consensus"] == 1
    assert summary.counts["samples_without_negatives"] == 1
    assert summary.counts["consensus_flagged"] == 0  # no consensus to disagree with where all refused
    ids = {row["sample_id"] for row in load(tmp_path, "preferences")}
    assert selection[0]["sample_id"] not in ids and selection[1]["sample_id"] not in ids
    assert len(ids) == N_SAMPLES - 2
    # their SFT rows stay (refusals go only with --exclude-refusals-from-sft)
    assert sum(row["sample_id"] == selection[1]["sample_id"] for row in load(tmp_path, "sft")) == 7


def test_sample_not_in_mimic_is_counted_and_kept_without_labels(tmp_path, mini_mimic, selection):
    full_run(tmp_path / "run", selection)
    stranger = dict(selection[0], sample_id="ffffffff-00000000", dicom_id="ffffffff-00000000")
    stranger.update(study_id=59_999_999, subject_id=19_999_999, labels=None)
    for model in MODELS:
        write_model(
            tmp_path / "run", model, [generate_row(stranger, model, ANSWERS[model])], "part-all-9.arrow"
        )
    summary = build(tmp_path, mini_mimic)
    assert summary.studies_not_in_mimic == 7
    row = next(r for r in load(tmp_path, "preferences") if r["sample_id"] == "ffffffff-00000000")
    assert row["labels"] is None  # no ground truth: never labels of another study


# --- cases that must stop with an InputError naming the file (or be counted skips) --------------


def corrupt_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def cut_at_batch_boundary(path: Path) -> None:
    """What an interrupted copy leaves: whole batches, no end-of-stream marker."""
    data = path.read_bytes()
    path.write_bytes(data[:-8])


ERROR_CASES = {
    # name: (mutation of claude-sonnet-4's shard, words the message must contain, lenient result)
    "corrupt_half": (corrupt_half, ["part-all-00001.arrow", "corrupt or truncated"], "skip"),
    "no_end_of_stream": (cut_at_batch_boundary, ["part-all-00001.arrow", "end-of-stream"], "skip"),
    "not_arrow": (lambda p: p.write_bytes(b"PK\x03\x04 zip, not arrow"), ["part-all-00001.arrow"], "skip"),
    "empty_file": (lambda p: p.write_bytes(b""), ["part-all-00001.arrow"], "skip"),
    "rerun_with_other_answers": (
        lambda p: write_model(
            p.parents[2],
            "claude-sonnet-4",
            [
                dict(r, text=r["text"] + " Possible small pneumothorax.", created_at=None)
                for r in pa.ipc.open_stream(str(p)).read_all().to_pylist()
            ],
            "part-all-00002.arrow",
        ),
        ["part-all-00002.arrow", "duplicate key", "different answer", "claude-sonnet-4", "--lenient"],
        "keep_first",
    ),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_bad_shards_name_the_file_or_are_counted_with_lenient(name, tmp_path, mini_mimic, selection):
    mutate, words, lenient_result = ERROR_CASES[name]
    full_run(tmp_path / "run", selection)
    mutate(tmp_path / "run" / "trajectories" / "claude-sonnet-4" / "part-all-00001.arrow")
    with pytest.raises(InputError) as info:
        build(tmp_path, mini_mimic)
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "data" / "preferences").exists()
    summary = build(tmp_path, mini_mimic, lenient=True, export_trl=False)
    if lenient_result == "skip":
        assert len(summary.load["unreadable_files"]) == 1
        assert "part-all-00001.arrow" in summary.load["unreadable_files"][0]
        assert "claude-sonnet-4" not in summary.models
    else:
        assert summary.load["duplicates_skipped"] == N_SAMPLES
        assert summary.counts["trajectories"] == 7 * N_SAMPLES
        sft = [row["completion"] for row in load(tmp_path, "sft") if row["model"] == "claude-sonnet-4"]
        assert sft and all("pneumothorax" not in text for text in sft)  # the first file's answers


def test_a_merged_copy_of_a_shard_is_dropped_and_counted(tmp_path, mini_mimic, selection):
    full_run(tmp_path / "run", selection)
    shard = tmp_path / "run" / "trajectories" / "claude-sonnet-4" / "part-all-00001.arrow"
    shard.with_name("part-all-00001 (copy).arrow").write_bytes(shard.read_bytes())
    summary = build(tmp_path, mini_mimic, export_trl=False)
    assert (
        summary.load["identical_duplicates_skipped"] == N_SAMPLES and summary.load["duplicates_skipped"] == 0
    )
    assert summary.counts["trajectories"] == 7 * N_SAMPLES


def test_run_without_trajectories_is_an_input_error(tmp_path, mini_mimic):
    (tmp_path / "run" / "trajectories").mkdir(parents=True)
    with pytest.raises(InputError, match="no trajectory files"):
        build(tmp_path, mini_mimic)


# --- CXR-MAX-style JSONL exports with values a hand-made or converted file really has -----------

JSONL_ERRORS = {
    # name: (rows, words the InputError must contain)
    "label_word_flat": (
        [{"sample_id": "s1", "model": "a", "text": "Cardiomegaly.", "Cardiomegaly": "yes"}],
        ["row 1", "'Cardiomegaly'", "'yes'"],
    ),
    "label_word_struct": (
        [
            {"sample_id": "s1", "model": "a", "text": "Edema.", "labels": {"Edema": "1.0"}},
            {"sample_id": "s1", "model": "b", "text": "Edema.", "labels": {"Edema": "positive"}},
        ],
        ["row 2", "labels.Edema", "'positive'"],
    ),
    "label_out_of_range": (
        [
            {"sample_id": "s1", "model": "a", "text": "Edema.", "Edema": 1},
            {"sample_id": "s1", "model": "b", "text": "Edema.", "Edema": 2},
        ],
        ["row 2", "'Edema'", "2.0", "not 1, 0, -1"],
    ),
    "blank_model": (
        [
            {"sample_id": "s1", "model": "   ", "text": "Edema."},
            {"sample_id": "s1", "model": "b", "text": "Edema."},
        ],
        ["row 1", "'model'", "empty model"],
    ),
    "blank_sample_id": ([{"sample_id": "", "model": "a", "text": "Edema."}], ["row 1", "'sample_id'"]),
    "chat_content_parts": (
        [{"sample_id": "s1", "model": "a", "text": [{"type": "text", "text": "Edema."}]}],
        ["row 1", "'text'", "as string"],
    ),
    "unknown_split": (
        [
            {"sample_id": "s1", "model": "a", "text": "Edema.", "split": "testing"},
            {"sample_id": "s1", "model": "b", "text": "No edema.", "split": "testing"},
        ],
        ["row 1", "'split'", "'testing'", "--lenient"],
    ),
}


@pytest.mark.parametrize("name", list(JSONL_ERRORS))
def test_cxr_max_style_jsonl_errors_name_row_and_field(name, tmp_path):
    import json

    rows, words = JSONL_ERRORS[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = BuildOptions(processes=1, card=False, export_trl=False, export_swift=False)
    with pytest.raises(InputError) as info:
        build_preferences([path], tmp_path / "data", options)
    message = str(info.value)
    assert message.startswith(str(path))
    for word in words:
        assert word in message


def test_unknown_split_rows_are_dropped_with_lenient_and_padded_names_are_one_source(tmp_path):
    import json

    rows = [
        {"sample_id": "s1", "model": "sonnet", "text": "Cardiomegaly.", "split": "test"},
        {"sample_id": "s1 ", "model": " gemini", "text": "Cardiomegaly is present.", "split": "TEST"},
        {"sample_id": "s2", "model": "sonnet", "text": "Edema.", "split": "holdout"},
        {"sample_id": "s2", "model": "gemini", "text": "Edema.", "split": "holdout"},
    ]
    path = tmp_path / "cxr-max.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = BuildOptions(processes=1, card=False, export_trl=False, export_swift=False, lenient=True)
    summary = build_preferences([path], tmp_path / "data", options)
    assert summary.split_invalid_rows_skipped == 2
    assert summary.models == ["gemini", "sonnet"] and summary.counts["samples"] == 1
    assert summary.split_rows["sft"] == {"test": 2}


# --- the card and drift-report on what real runs and real folders contain ----------------------


def test_card_tables_survive_model_names_with_markdown_characters(tmp_path, mini_mimic, selection):
    names = {
        "gpt|5 *nano*": ANSWERS["gpt-5 nano"],
        "<b>vlm</b>": ANSWERS["grok-4"],
        "Qwen/Qwen2_VL": ANSWERS["glm-4.5v"],
    }
    for model, text in names.items():
        write_model(tmp_path / "run", model, [generate_row(s, model, text) for s in selection])
    build(tmp_path, mini_mimic, card=True, figures=False, export_trl=False)
    card = (tmp_path / "data" / "README.md").read_text()
    rows = [line for line in card.splitlines() if line.startswith("| gpt")]
    assert rows and rows[0].startswith("| gpt\\|5 \\*nano\\* | 6 |")
    # the per-model table row has the header's 10 cells (escaped pipes do not split)
    header = next(line for line in card.splitlines() if line.startswith("| model | trajectories"))
    cells = header.count(" | ")
    assert rows[0].replace("\\|", "").count(" | ") == cells
    assert "<b>" not in card and "\\<b\\>vlm\\</b\\>" in card


@pytest.mark.parametrize(
    "damage, words",
    [
        (
            lambda d: (d / "annotations" / "samples.arrow").write_bytes(b"garbage"),
            ["samples.arrow", "corrupt"],
        ),
        (lambda d: (d / "annotations" / "trajectories.arrow").unlink(), ["trajectories.arrow", "missing"]),
    ],
)
def test_drift_report_on_damaged_outputs_is_a_clear_error(damage, words, tmp_path, mini_mimic, selection):
    from typer.testing import CliRunner

    from cxrmax.cli import app

    full_run(tmp_path / "run", selection)
    build(tmp_path, mini_mimic, export_trl=False)
    damage(tmp_path / "data")
    # a narrow "terminal" must not matter: off a terminal the error is one unwrapped line
    result = CliRunner().invoke(app, ["drift-report", str(tmp_path / "data")], env={"COLUMNS": "30"})
    assert result.exit_code == 2 and not isinstance(result.exception, (KeyError, pa.ArrowInvalid))
    error_lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.output
    for word in words:
        assert word in error_lines[0]


def test_mixed_prompts_and_uncommitted_journals_are_reported(tmp_path, mini_mimic, selection):
    run = tmp_path / "run"
    full_run(run, selection)
    other = "Describe the chest radiograph."  # a second prompt template for one model
    write_model(
        run, "grok-4", [generate_row(s, "grok-4", ANSWERS["grok-4"], prompt=other) for s in selection]
    )
    journal = run / "trajectories" / "grok-4" / "wal-all-20261127T080000-abc123-00002.jsonl"
    journal.write_text('{"sample_id": "x", "text": "an answer not committed yet"}\n')
    summary = build(tmp_path, mini_mimic, export_trl=False)
    assert summary.load["samples_with_mixed_prompts"] == N_SAMPLES
    assert summary.load["mixed_prompt_examples"][0] == min(s["sample_id"] for s in selection)
    assert summary.load["uncommitted_journals"] == [str(journal)]
    assert summary.counts["trajectories"] == 7 * N_SAMPLES  # the journal is not input


@pytest.mark.parametrize("make_out", [lambda d: d / "a-file", lambda d: d / "a-file" / "below-a-file"])
def test_output_folder_that_cannot_be_created_is_an_input_error(make_out, tmp_path, selection):
    full_run(tmp_path / "run", selection[:2])
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(InputError, match="cannot create the output folder"):
        build_preferences([tmp_path / "run"], make_out(tmp_path), BuildOptions(processes=1, card=False))


@pytest.mark.parametrize("field, lenient", [("split", False), ("subject_id", False), ("subject_id", True)])
def test_ids_that_disagree_with_the_mimic_root(field, lenient, tmp_path, mini_mimic, selection):
    """A selection edited by hand or taken from another release: the official split wins (a test
    study never lands in train); a study under another subject is a wrong id."""
    test_sample = next(s for s in selection if s["split"] == "test")
    wrong = dict(test_sample, split="train") if field == "split" else dict(test_sample, subject_id=10_000_000)
    samples = [wrong if s is test_sample else s for s in selection]
    full_run(tmp_path / "run", samples)
    if field == "subject_id" and not lenient:
        with pytest.raises(InputError) as info:
            build(tmp_path, mini_mimic)
        assert " row " in str(info.value) and "field 'subject_id'" in str(info.value)
        assert str(test_sample["study_id"]) in str(info.value)
        return
    summary = build(tmp_path, mini_mimic, lenient=lenient, export_trl=False)
    rows = {row["sample_id"]: row for row in load(tmp_path, "preferences")}
    if field == "split":
        assert summary.split_from_mimic_rows == 7
        assert rows[test_sample["sample_id"]]["split"] == "test"
    else:
        assert summary.subject_mismatch_rows_skipped == 7
        assert test_sample["sample_id"] not in rows and len(rows) == N_SAMPLES - 1


def test_samples_whose_image_is_not_under_the_root_are_reported(tmp_path, mini_mimic, selection):
    samples = [dict(s) for s in selection]
    samples[0]["image_path"] = "files/p10/p10000000/s50000000/not-there.jpg"
    samples[1]["image_path"] = None
    full_run(tmp_path / "run", samples)
    summary = build(tmp_path, mini_mimic, export_trl=False)
    assert summary.samples_without_image == 2
    assert summary.samples_without_image_examples == sorted(s["sample_id"] for s in samples[:2])
    assert summary.counts["preference_rows"] == N_SAMPLES  # built, but reported


def test_machines_given_as_separate_inputs_and_overlapping_inputs(tmp_path, mini_mimic, selection):
    """`build-preferences m0 m1 m0/trajectories`: two machines' --shard outputs, one named twice."""
    half = N_SAMPLES // 2
    for machine, part in (("m0", selection[:half]), ("m1", selection[half:])):
        for model in MODELS:
            rows = [generate_row(s, model, ANSWERS[model]) for s in part]
            write_model(tmp_path / machine, model, rows, f"part-{machine[-1]}of2-1.arrow")
    summary = build_preferences(
        [tmp_path / "m0", tmp_path / "m1", tmp_path / "m0" / "trajectories"],
        tmp_path / "data",
        BuildOptions(processes=1, card=False, export_trl=False, mimic_root=mini_mimic),
    )
    assert summary.counts["trajectories"] == 7 * N_SAMPLES and len(summary.load["files"]) == 14


def test_label_cells_as_strings_with_blanks_read_as_labels(tmp_path):
    import json

    from cxrmax.preferences.load import load_trajectories

    rows = [
        {
            "sample_id": "s1",
            "model": "a",
            "text": "Edema.",
            "Edema": "1.0",
            "Cardiomegaly": "",
            "Atelectasis": " -1 ",
        },
        {
            "sample_id": "s1",
            "model": "b",
            "text": "Edema.",
            "Edema": "1",
            "Cardiomegaly": "0.0",
            "Atelectasis": "NaN",
        },
    ]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table, _ = load_trajectories([path])
    labels = table.column("labels").to_pylist()
    assert [(r["Edema"], r["Cardiomegaly"], r["Atelectasis"]) for r in labels] == [
        (1.0, None, -1.0),
        (1.0, 0.0, None),
    ]


def test_cxr_max_style_reasoning_and_answer_columns_are_one_trajectory(tmp_path):
    import json

    from cxrmax.preferences.load import load_trajectories

    rows = [
        {"id": "s1", "model": "a", "reasoning": "The heart is enlarged.", "answer": "Cardiomegaly."},
        {"id": "s1", "model": "b", "reasoning": None, "answer": "Normal study."},
        {"id": "s1", "model": "c", "reasoning": "Left effusion.", "answer": None},
        {"id": "s1", "model": "d", "reasoning": "Left effusion.", "answer": "Left effusion."},
    ]
    path = tmp_path / "cxr-max.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    table, report = load_trajectories([path])
    assert table.column("text").to_pylist() == [
        "The heart is enlarged.\n\nCardiomegaly.",
        "Normal study.",
        "Left effusion.",
        "Left effusion.",
    ]
    assert report.reasoning_joined == 1 and report.ignored_columns == {}


def test_a_run_where_every_sample_is_skipped_still_gives_a_clean_card(tmp_path, mini_mimic, selection):
    import warnings

    write_model(tmp_path / "run", "grok-4", [generate_row(s, "grok-4", ANSWERS["grok-4"]) for s in selection])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. matplotlib's "no artists with labels"
        summary = build(tmp_path, mini_mimic, card=True, export_trl=False)
    assert summary.skipped_few_sources == N_SAMPLES and summary.counts.get("preference_rows", 0) == 0
    assert (tmp_path / "data" / "figures" / "drift_profile.png").read_bytes()[:4] == b"\x89PNG"
    assert load(tmp_path, "preferences") == [] and load(tmp_path, "sft") == []


def test_model_consensus_answers_cut_at_max_tokens_keep_the_vote_positive(tmp_path, mini_mimic, selection):
    """The student server cuts its answers (finish_reason length): no half positive is used or
    stored; once it answers whole, a rerun asks again and uses the answers."""
    from cxrmax.testing.openai_server import serve_in_thread

    full_run(tmp_path / "run", selection[:2])
    whole = "There is cardiomegaly. There is a left pleural effusion. No pneumothorax."

    def build_with(server):
        backend = {"backend": "openai", "model": "student", "base_urls": [server.base_url]}
        options = BuildOptions(
            processes=1,
            consensus="model",
            card=False,
            export_trl=False,
            export_swift=False,
            model_backend=backend,
        )
        return build_preferences([tmp_path / "run"], tmp_path / "data", options)

    with serve_in_thread(served_model_name="student", stub_text=whole) as server:
        server.set_faults(truncate=True)
        summary = build_with(server)
        assert (
            summary.counts["consensus_model_truncated"] == 2
            and summary.counts["consensus_model_failures"] == 2
        )
        assert {row["chosen_source"] for row in load(tmp_path, "preferences")} == {"consensus-vote"}
        server.set_faults(truncate=False)
        summary = build_with(server)
        assert summary.counts["consensus_model_truncated"] == 0
        rows = load(tmp_path, "preferences")
        assert {row["chosen_source"] for row in rows} == {"consensus-model"}
        assert all(row["chosen"] == whole for row in rows)


def test_upper_case_suffixes_are_read_named_and_found_in_a_folder(tmp_path):
    """A copy made on a case-insensitive file system may name its files SHARD.ARROW / ANSWERS.JSONL."""
    import json

    import pyarrow.feather as feather

    from cxrmax.preferences.load import load_trajectories

    rows = [
        {"sample_id": "s1", "model": "a", "text": "Edema."},
        {"sample_id": "s1", "model": "b", "text": "No edema."},
    ]
    folder = tmp_path / "copy"
    folder.mkdir()
    feather.write_feather(pa.Table.from_pylist(rows[:1]), folder / "SHARD-A.ARROW")
    (folder / "ANSWERS-B.JSONL").write_text(json.dumps(rows[1]) + "\n")
    table, _ = load_trajectories([folder])
    assert sorted(table.column("model").to_pylist()) == ["a", "b"]
    table, _ = load_trajectories([folder / "SHARD-A.ARROW", folder / "ANSWERS-B.JSONL"])
    assert table.num_rows == 2
