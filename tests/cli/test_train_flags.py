"""`cxrmax train-apo`'s flags against the config dataclasses: every flag names an existing field, and
every field apo_train/config.py defines is reachable by a flag or listed as config-file/--set only,
so a new config field cannot be forgotten."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import pytest
from transformers import TrainingArguments

from apo_train.config import APOConfig, SFTStageConfig, StageArguments, config_field_names
from apo_train.pipeline import PipelineSpec
from cxrmax.cli import train_cmd
from cxrmax.core.errors import InputError

SFT_FIELDS = config_field_names(SFTStageConfig)
APO_FIELDS = config_field_names(APOConfig)
SPEC_FIELDS = {f.name for f in dataclasses.fields(PipelineSpec)}


def _flag_targets() -> set[str]:
    """Every config field some flag sets."""
    targets = set(train_cmd.BOTH_STAGE_FLAGS.values())
    targets |= {key for key, _ in train_cmd.BOTH_STAGE_SWITCHES.values()}
    targets |= set(train_cmd.APO_FLAGS.values())
    targets |= {key for key, _ in train_cmd.APO_SWITCHES.values()}
    if train_cmd.LR_FLAGS:
        targets.add("learning_rate")
    return targets


def _cxrmax_fields() -> set[str]:
    """Fields apo_train/config.py declares itself (new ones, and TrainingArguments defaults it overrides)."""
    names: set[str] = set()
    for cls in (StageArguments, SFTStageConfig, APOConfig):
        names |= set(cls.__dict__.get("__annotations__", {}))
    return names & (SFT_FIELDS | APO_FIELDS)


def test_every_parameter_is_in_exactly_one_flag_table():
    parameters = list(inspect.signature(train_cmd.train_apo).parameters)
    tables = [
        train_cmd.SPEC_FLAGS,
        train_cmd.BOTH_STAGE_FLAGS,
        train_cmd.BOTH_STAGE_SWITCHES,
        train_cmd.LR_FLAGS,
        train_cmd.APO_FLAGS,
        train_cmd.APO_SWITCHES,
        train_cmd.CONTROL_FLAGS,
    ]
    for name in parameters:
        assert sum(name in table for table in tables) == 1, name
    listed = {name for table in tables for name in table}
    assert listed == set(parameters), listed ^ set(parameters)


def test_every_flag_maps_to_an_existing_field():
    assert set(train_cmd.SPEC_FLAGS.values()) <= SPEC_FIELDS
    assert {"stage", "resume"} <= SPEC_FIELDS  # the control flags that land on the spec
    both = set(train_cmd.BOTH_STAGE_FLAGS.values()) | {k for k, _ in train_cmd.BOTH_STAGE_SWITCHES.values()}
    assert both <= SFT_FIELDS & APO_FIELDS, both - (SFT_FIELDS & APO_FIELDS)
    apo = set(train_cmd.APO_FLAGS.values()) | {k for k, _ in train_cmd.APO_SWITCHES.values()}
    assert apo <= APO_FIELDS, apo - APO_FIELDS
    assert "learning_rate" in SFT_FIELDS & APO_FIELDS
    assert set(train_cmd.LR_FLAGS.values()) <= {"single", "sft", "apo"}


def test_every_config_field_is_reachable_by_a_flag_or_listed_as_config_only():
    declared = _cxrmax_fields()
    targets = _flag_targets()
    config_only = set(train_cmd.CONFIG_ONLY)
    forgotten = declared - targets - config_only
    assert not forgotten, f"config fields with no flag and not in train_cmd.CONFIG_ONLY: {sorted(forgotten)}"
    assert config_only <= SFT_FIELDS | APO_FIELDS, config_only - (SFT_FIELDS | APO_FIELDS)  # no stale entry
    assert not config_only & targets  # a field is either a flag or config-only
    assert all(reason.strip() for reason in train_cmd.CONFIG_ONLY.values())


def test_every_pipeline_field_is_reachable():
    reachable = set(train_cmd.SPEC_FLAGS.values()) | {"stage", "resume", "sft", "apo"}
    assert SPEC_FIELDS <= reachable, SPEC_FIELDS - reachable


def test_config_only_and_training_arguments_fields_are_settable_with_set():
    inherited = [f.name for f in dataclasses.fields(TrainingArguments) if f.init][:20]
    spec = PipelineSpec()
    names = sorted(train_cmd.CONFIG_ONLY) + inherited
    train_cmd._apply_set_values(spec, [f"{name}=1" for name in names])
    for name in names:
        assert spec.sft.get(name) == 1 or spec.apo.get(name) == 1, name
    with pytest.raises(InputError, match="unknown setting"):
        train_cmd._apply_set_values(spec, ["not_a_field=1"])


def _flags(**given):
    flags = {name: None for name in inspect.signature(train_cmd.train_apo).parameters}
    flags.update({"stage": "all", "set_values": []}, **given)
    return flags


def test_apply_flags_sets_the_mapped_fields():
    spec = PipelineSpec()
    train_cmd.apply_flags(
        spec,
        _flags(
            model="m",
            out=Path("runs/x"),
            epochs=2.0,
            deepspeed=Path("ds.json"),
            tensorboard=True,
            full_finetune=True,
            sft_lr=0.1,
            loss="listwise",
            precompute_ref=True,
            set_values=["apo.beta=0.5"],
            resume="latest",
        ),
    )
    assert (spec.model, spec.out, spec.resume) == ("m", "runs/x", True)
    for stage in (spec.sft, spec.apo):
        assert stage["num_train_epochs"] == 2.0 and stage["deepspeed"] == "ds.json"
        assert stage["report_to"] == ["tensorboard"] and stage["use_lora"] is False
    assert spec.sft["learning_rate"] == 0.1 and "learning_rate" not in spec.apo
    assert spec.apo["loss_type"] == "listwise" and "loss_type" not in spec.sft
    assert spec.apo["precompute_ref_log_probs"] is True and spec.apo["beta"] == 0.5
    single = PipelineSpec()
    train_cmd.apply_flags(single, _flags(stage="sft", lr=0.2))
    assert single.sft == {"learning_rate": 0.2} and single.apo == {}
    with pytest.raises(InputError, match="--lr is for a single --stage"):
        train_cmd.apply_flags(PipelineSpec(), _flags(lr=0.2))
