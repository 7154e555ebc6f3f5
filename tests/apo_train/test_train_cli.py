"""`cxrmax train-apo`: config files (TOML/YAML), flags over config, --stage all, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from apo_train.pipeline import PipelineSpec, spec_from_config, stage_config
from cxrmax.cli import app
from cxrmax.core.errors import InputError
from cxrmax.core.schemas import PREFERENCE_SCHEMA, SFT_SCHEMA
from tests.helpers.training import PROMPT, preference_rows, save_dataset, sft_rows

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-data")
    prefs = save_dataset(preference_rows(8), PREFERENCE_SCHEMA, root / "preferences")
    sft = save_dataset(sft_rows(8), SFT_SCHEMA, root / "sft")
    return prefs, sft


def test_defaults_are_the_paper_settings(tmp_path):
    spec = PipelineSpec(model="m", out=str(tmp_path))
    sft = stage_config(spec, "sft", "m", "d")
    apo = stage_config(spec, "apo", "m", "d")
    assert (sft.lora_r, sft.lora_alpha, sft.lora_target_modules) == (8, 32, "all-linear")
    assert (sft.learning_rate, sft.warmup_steps, sft.max_length, sft.num_train_epochs) == (
        1e-4,
        0.05,
        2304,
        1.0,
    )
    assert (apo.learning_rate, apo.beta, apo.max_length, apo.loss_type) == (5e-7, 0.1, 4096, "plackett-luce")
    assert apo.per_device_train_batch_size * apo.gradient_accumulation_steps == 32
    assert sft.output_dir == str(tmp_path / "sft") and apo.output_dir == str(tmp_path / "apo")


def test_config_precedence_and_unknown_keys(tmp_path):
    spec = spec_from_config({"model": "base", "beta": 0.3, "max_length": 100, "apo": {"max_length": 200}})
    assert (
        spec.model == "base"
        and spec.apo == {"beta": 0.3, "max_length": 200}
        and spec.sft == {"max_length": 100}
    )
    with pytest.raises(InputError, match=r"field 'apo.betta'"):
        spec_from_config({"apo": {"betta": 0.3}}, "cfg.toml")
    with pytest.raises(InputError, match="loss_type"):
        stage_config(PipelineSpec(apo={"loss_type": "apo_zero"}), "apo", "m", "d")


def test_stage_all_from_toml_with_flag_overrides(tiny_lm_path, data, tmp_path):
    prefs, sft = data
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{tiny_lm_path}"\nout = "{tmp_path / "run"}"\nsft_data = "{sft}"\npreferences = "{prefs}"\n'
        'global_batch_size = 2\nper_device_train_batch_size = 2\nlogging_steps = 1\nsave_strategy = "no"\n'
        "lora_dropout = 0.0\n[sft]\nlearning_rate = 0.01\nmax_length = 128\n[apo]\nlearning_rate = 0.01\nmax_length = 128\n"
    )
    result = runner.invoke(
        app,
        [
            "train-apo",
            "--stage",
            "all",
            "--config",
            str(config),
            "--max-steps",
            "2",
            "--cpu",
            "--loss",
            "listwise",
            "--set",
            "apo.nll_alpha=0.1",
            "--merge",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "sft done" in result.output and "apo done" in result.output
    run = tmp_path / "run"
    assert (run / "sft" / "merged" / "model.safetensors").exists()
    assert (run / "apo" / "adapter_model.safetensors").exists()
    records = [json.loads(line) for line in (run / "apo" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rewards/accuracies" in r]
    assert len(steps) == 2 and all("nll_loss" in r for r in steps)
    # APO started from the Stage-1 model, which is also its reference: zero rewards at step 1.
    assert steps[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    args = torch.load(run / "apo" / "training_args.bin", weights_only=False)
    assert args.loss_type == "listwise" and args.nll_alpha == 0.1 and args.learning_rate == 0.01
    assert args.model_name_or_path == str(run / "sft" / "merged")


def test_stage_apo_yaml_precompute_ref(tiny_lm_path, data, tmp_path):
    prefs, _ = data
    config = tmp_path / "apo.yaml"
    config.write_text(
        f"model: {tiny_lm_path}\npreferences: {prefs}\nout: {tmp_path / 'r'}\napo:\n  max_length: 96\n"
    )
    result = runner.invoke(
        app,
        [
            "train-apo",
            "--stage",
            "apo",
            "-c",
            str(config),
            "--max-steps",
            "2",
            "--global-batch",
            "2",
            "--per-device-batch",
            "2",
            "--precompute-ref",
            "--cpu",
            "--save-steps",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert list((tmp_path / "r" / "apo" / "reference_logps").glob("train-*.arrow"))
    assert (tmp_path / "r" / "apo" / "checkpoint-2").is_dir()
    assert (tmp_path / "r" / "apo" / "apo_data_stats.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--stage", "apo", "--preferences", "nowhere"], "no model"),
        (["--stage", "apo", "--model", "m", "--preferences", "/nonexistent/prefs"], "no such dataset"),
        (["--stage", "all", "--lr", "0.1", "--model", "m"], "--sft-lr"),
        (["--stage", "apo", "--set", "apo.bogus=1"], "unknown setting"),
        (["--stage", "apo", "--config", "/nonexistent.toml"], "config file not found"),
        (["--stage", "sideways", "--model", "m"], "--stage must be"),
        (["--stage", "all", "--model", "m", "--consensus", "model"], "needs --trajectories"),
    ],
)
def test_user_errors_exit_2_with_message(args, message, tmp_path, tiny_lm_path):
    args = [a if a != "m" else str(tiny_lm_path) for a in args]
    result = runner.invoke(app, ["train-apo", *args, "--out", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert message in result.output.replace("\n", " ")


def test_config_file_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    result = runner.invoke(app, ["train-apo", "--config", str(bad)])
    assert result.exit_code == 2 and "bad.toml" in result.output.replace("\n", "")


def test_help_names_the_method_and_the_trl_difference():
    result = runner.invoke(app, ["train-apo", "--help"])
    text = " ".join(result.output.split())
    assert "Autonomous Preference Optimization" in text and "Anchored Preference Optimization" in text


def test_reads_real_preferences_layout_from_path(tmp_path):
    # A dataset dir without splits (a bare Dataset) is accepted too.
    import datasets
    import pyarrow as pa

    from apo_train.data import load_split

    table = pa.Table.from_pylist(preference_rows(2), schema=PREFERENCE_SCHEMA)
    datasets.Dataset(table).save_to_disk(str(tmp_path / "bare"))
    assert len(load_split(Path(tmp_path / "bare"), "train", ("chosen",))) == 2


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_precomputed_reference(tiny_lm_path, data, tmp_path):
    """`torchrun` (DDP over gloo) runs the same command unchanged; metrics and the reference cache are
    gathered across ranks, and only rank 0 writes the logs."""
    import os
    import shutil
    import signal
    import subprocess
    import sys

    import pyarrow.ipc as ipc

    prefs, _ = data
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    command = [
        torchrun,
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "cxrmax",
        "train-apo",
        "--stage",
        "apo",
        "--model",
        str(tiny_lm_path),
        "--preferences",
        str(prefs),
        "--out",
        str(tmp_path),
        "--cpu",
        "--max-steps",
        "2",
        "--global-batch",
        "4",
        "--per-device-batch",
        "1",
        "--precompute-ref",
        "--logging-steps",
        "1",
        "--max-length",
        "128",
    ]
    # A session of its own, so that a timeout kills torchrun's workers too instead of orphaning them.
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail("torchrun did not finish in 240 s:\n" + stdout[-2000:] + stderr[-4000:])
    assert process.returncode == 0, stdout[-2000:] + stderr[-4000:]
    assert stdout.count("apo done") == 1
    records = [json.loads(line) for line in (tmp_path / "apo" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "rewards/accuracies" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[-1]["epoch"] == pytest.approx(1.0)  # 2 steps x 4 samples = the 8 samples, split over ranks
    (cache,) = (tmp_path / "apo" / "reference_logps").glob("train-*.arrow")
    with open(cache, "rb") as handle:
        table = ipc.open_file(handle).read_all()
    assert table.column("sample_index").to_pylist() == list(range(8))


@pytest.mark.slow
def test_stage_all_with_model_consensus_through_build_preferences(tiny_lm_path, tmp_path):
    """SFT, then build-preferences' model consensus with the merged Stage-1 model, then APO on its output."""
    import pyarrow as pa

    from cxrmax.core import schemas
    from cxrmax.preferences.build import BuildOptions, build_preferences

    texts = {
        "A": "There is left lower lobe atelectasis. Bilateral pleural effusions are present. No pneumothorax.",
        "B": "Left lower lobe atelectasis is seen. There are bilateral pleural effusions. There is no pneumothorax.",
        "C": "Right lower lobe atelectasis. A right pleural effusion. The heart is enlarged.",
    }
    rows = []
    for i in range(2):
        for model, text in texts.items():
            rows.append(
                {
                    "request_key": f"{model}:{i}",
                    "sample_id": f"s{i}",
                    "dicom_id": f"s{i}",
                    "subject_id": 10000001 + i,
                    "study_id": 50000001 + i,
                    "split": "train",
                    "view": "PA",
                    "image_path": None,
                    "labels": schemas.labels_to_struct({"Atelectasis": 1, "Pleural Effusion": 1}),
                    "model": model,
                    "prompt": PROMPT.format(label="atelectasis and pleural effusion"),
                    "sample_index": 0,
                    "text": text,
                    "finish_reason": "stop",
                }
            )
    run = tmp_path / "gen"
    for model in texts:
        directory = run / "trajectories" / model
        directory.mkdir(parents=True)
        table = pa.Table.from_pylist(
            [r for r in rows if r["model"] == model], schema=schemas.TRAJECTORY_SCHEMA
        )
        with pa.ipc.new_stream(str(directory / "part-0.arrow"), table.schema) as writer:
            writer.write_table(table)
    build_preferences([run], run, BuildOptions(processes=1, card=False, export_trl=False, export_swift=False))
    result = runner.invoke(
        app,
        [
            "train-apo",
            "--stage",
            "all",
            "--model",
            str(tiny_lm_path),
            "--sft-data",
            str(run / "sft"),
            "--preferences",
            str(run / "preferences"),
            "--trajectories",
            str(run),
            "--consensus",
            "model",
            "--out",
            str(tmp_path / "out"),
            "--cpu",
            "--max-steps",
            "1",
            "--global-batch",
            "2",
            "--per-device-batch",
            "2",
            "--max-length",
            "256",
            "--set",
            "apo.learning_rate=0.01",
        ],
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    import re

    requests = re.search(r"consensus: 2 samples, (\d+) model requests", text)
    assert requests and int(requests.group(1)) >= 2, text  # one per sample at least (retries add more)
    assert (tmp_path / "out" / "consensus" / "preferences").is_dir()
    args = torch.load(tmp_path / "out" / "apo" / "training_args.bin", weights_only=False)
    assert args.dataset_path == str(tmp_path / "out" / "consensus" / "preferences")
    assert args.model_name_or_path == str(tmp_path / "out" / "sft" / "merged")
