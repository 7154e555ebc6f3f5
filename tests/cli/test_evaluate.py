"""`cxrmax evaluate MODEL`: a real tiny model (a LoRA adapter, a base model folder) answering the
mini MIMIC-CXR's test images through generate's transformers backend, scored on the rationale and
label tasks, shown beside a source, submitted to a real SQLite board; and the command train-apo
prints after training, pasted and run."""

from __future__ import annotations

import json
import shlex

import pytest
from typer.testing import CliRunner

from cxrmax.cli import app
from cxrmax.core.schemas import SFT_SCHEMA
from cxrmax.leaderboard.store import Board
from tests.helpers.training import positive_sft_rows, save_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

runner = CliRunner()
#: Few images, short answers, few resamples: the run's logic, not its statistics.
FAST = ["--studies", "2", "--max-tokens", "6", "--n-boot", "20"]


@pytest.fixture
def adapter(tiny_vlm_path, tmp_path):
    """A LoRA adapter folder on the tiny VLM, as train-apo saves one."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm_path)
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    path = tmp_path / "apo"
    model.save_pretrained(path)
    return path


def _evaluate(*args: str) -> dict:
    result = runner.invoke(app, ["evaluate", *args, *FAST, "--json", "-"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft's call of a transformers deprecation
def test_an_adapter_beside_a_source_on_the_board(tiny_vlm_path, adapter, mini_mimic, tmp_path):
    # The base model's own evaluation is a generate output: it serves as the source here.
    source_run = tmp_path / "source-run"
    base = _evaluate(
        str(tiny_vlm_path), "--mimic-root", str(mini_mimic), "--out", str(source_run), "-n", "base"
    )
    assert base["model_kind"] == "model" and [r["kind"] for r in base["rows"]] == ["evaluated"]
    sources = source_run / "evaluate" / "base"
    board = tmp_path / "board.sqlite"
    args = [
        str(adapter),
        "--mimic-root",
        str(mini_mimic),
        "--out",
        str(tmp_path / "eval"),
        "--sources",
        str(sources),
    ]
    first = _evaluate(*args, "--submit", "apo-tiny", "--board", str(board))
    assert first["model"] == "apo" and first["model_kind"] == "adapter"
    assert [(r["model"], r["kind"]) for r in first["rows"]] == [("apo", "evaluated"), ("base", "source")]
    assert first["images"] == 2 and first["generation"]["done"] == 2
    assert first["sampling"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 6, "seed": 0}
    for row in first["rows"]:
        assert row["answers"] == 2
        assert {"precision", "recall", "similarity", "micro_f1_14", "micro_f1_5"} <= set(row)
        assert "similarity" in row["ci"] and "micro_f1_14" in row["ci"]
    assert set(first["submitted"]) == {"cxr-max-rationale", "mimic-cxr-labels"}
    with Board(board) as store:
        assert sorted((e.task, e.name) for e in store.entries()) == [
            ("cxr-max-rationale", "apo-tiny"),
            ("mimic-cxr-labels", "apo-tiny"),
        ]
    # Resumable exactly once: the same command answers nothing again and submits nothing twice.
    again = _evaluate(*args, "--submit", "apo-tiny", "--board", str(board))
    assert again["generation"]["done"] == 0 and again["generation"]["already_done"] == 2
    assert again["submitted"] == {} and any("already on" in note for note in again["notes"])
    assert again["rows"] == first["rows"]
    with Board(board) as store:
        assert store.count() == 2
    shown = runner.invoke(app, ["evaluate", *args, *FAST])
    assert shown.exit_code == 0, shown.output
    assert "apo" in shown.output and "base" in shown.output and "source" in shown.output


def test_train_apo_prints_the_evaluate_command_to_run_next(tiny_lm_path, mini_mimic, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = positive_sft_rows(2)
    sft = save_dataset(rows, SFT_SCHEMA, tmp_path / "sft-data")
    trained = runner.invoke(
        app,
        [
            "train-apo", "--stage", "sft", "--model", str(tiny_lm_path), "--sft-data", str(sft),
            "--mimic-root", str(mini_mimic), "--out", "run", "--max-steps", "1", "--global-batch", "2",
            "--per-device-batch", "2", "--cpu",
        ],
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    assert "saved a LoRA adapter in run/sft" in trained.output
    line = next(text for text in trained.output.splitlines() if text.startswith("cxrmax evaluate "))
    assert shlex.split(line) == [
        "cxrmax", "evaluate", "run/sft", "--mimic-root", str(mini_mimic), "--out", "run/eval",
    ]  # fmt: skip
    result = _evaluate(*shlex.split(line)[2:])
    assert result["model_kind"] == "adapter" and result["rows"][0]["model"] == "sft"
    assert (tmp_path / "run" / "eval" / "evaluate" / "sft" / "result.json").is_file()


def test_the_summary_names_a_merged_model_and_evaluates_it(tmp_path):
    from apo_train.pipeline import PipelineSpec
    from cxrmax.cli.train_cmd import _saved_what, evaluate_command

    adapter = tmp_path / "apo"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base"}))
    saved = {"model": str(adapter), "merged": str(adapter / "merged")}
    assert _saved_what(saved) == f"a LoRA adapter in {adapter} and the merged model in {adapter / 'merged'}"
    assert _saved_what({"model": str(tmp_path)}) == f"a full model in {tmp_path}"
    spec = PipelineSpec(out="runs/my apo", mimic_root="/data/mimic", trajectories="runs/cxrmax")
    assert shlex.split(evaluate_command(spec, saved)) == [
        "cxrmax", "evaluate", str(adapter / "merged"), "--mimic-root", "/data/mimic",
        "--out", "runs/my apo/eval", "--sources", "runs/cxrmax",
    ]  # fmt: skip


def test_evaluate_is_listed_with_its_conventions():
    result = runner.invoke(app, ["evaluate", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--mimic-root", "--out", "--json", "--submit", "--board", "--sources", "--verbose"):
        assert option in result.output


def test_the_model_samples_as_the_sources_did_unless_told(tiny_vlm_path, mini_mimic, tmp_path):
    """The sources' trajectories record their sampling: the evaluated model answers with it (its
    rows then compare with theirs), and a flag still overrides it."""
    source_run = tmp_path / "source-run"
    _evaluate(
        str(tiny_vlm_path), "--mimic-root", str(mini_mimic), "--out", str(source_run), "-n", "src",
        "--temperature", "0.3", "--top-p", "0.8",
    )  # fmt: skip
    sources = ["--sources", str(source_run / "evaluate" / "src"), "--mimic-root", str(mini_mimic)]
    follows = _evaluate(str(tiny_vlm_path), "-n", "model", "--out", str(tmp_path / "a"), *sources)
    assert follows["sampling"] == {"temperature": 0.3, "top_p": 0.8, "max_tokens": 6, "seed": 0}
    told = _evaluate(
        str(tiny_vlm_path), "-n", "model", "--out", str(tmp_path / "b"), *sources, "--top-p", "1"
    )
    assert told["sampling"] == {"temperature": 0.3, "top_p": 1.0, "max_tokens": 6, "seed": 0}
    alone = _evaluate(
        str(tiny_vlm_path), "-n", "model", "--out", str(tmp_path / "c"), "--mimic-root", str(mini_mimic)
    )
    assert alone["sampling"] == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 6, "seed": 0}  # the roster's
