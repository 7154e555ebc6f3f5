"""`cxrmax train-apo --report-to tensorboard` reaches transformers' TrainingArguments.report_to: a
real (tiny) SFT run writes TensorBoard event files; and the run's output is quiet without --verbose."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from cxrmax.cli import app
from cxrmax.core.schemas import SFT_SCHEMA
from tests.helpers.training import positive_sft_rows, save_dataset

pytest.importorskip("tensorboard", reason="tensorboard is in the train extra (pip install -e '.[train]')")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_report_to_tensorboard_writes_event_files(tiny_lm_path, tmp_path):
    rows = positive_sft_rows(4)
    sft = save_dataset(rows, SFT_SCHEMA, tmp_path / "sft-data")
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train-apo",
            "--stage",
            "sft",
            "--model",
            str(tiny_lm_path),
            "--sft-data",
            str(sft),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--global-batch",
            "2",
            "--per-device-batch",
            "2",
            "--logging-steps",
            "1",
            "--cpu",
            "--report-to",
            "tensorboard",
        ],
    )
    assert result.exit_code == 0, result.output
    events = list((out / "sft").rglob("events.out.tfevents.*"))
    assert events and all(path.stat().st_size > 0 for path in events), list((out / "sft").rglob("*"))
    args = torch.load(out / "sft" / "training_args.bin", weights_only=False)
    assert args.report_to == ["tensorboard"]
    for noise in ("Loading weights", "tokenizing sft", "FutureWarning"):
        assert noise not in result.output


def test_report_to_is_a_listed_choice():
    result = CliRunner().invoke(app, ["train-apo", "--report-to", "mlflow"])
    assert result.exit_code == 2
    assert "--report-to 'mlflow': unknown integration; use one of none, tensorboard, wandb" in " ".join(
        result.output.split()
    )
