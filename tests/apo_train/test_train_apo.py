"""APO / SFT training on tiny models built in code: data, collation, reference, training, resume."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pyarrow as pa
import pytest
import torch

from apo_train.config import SFTStageConfig
from apo_train.data import (
    IGNORE_INDEX,
    APOCollator,
    ChatEncoder,
    SFTCollator,
    load_split,
    tokenize_preferences,
    tokenize_sft,
)
from apo_train.modeling import attach_lora, load_model, load_processor
from apo_train.trainer import APOTrainer, completed_with, completion_logps, run_apo, run_sft, split_rows
from cxrmax.core.errors import InputError
from cxrmax.core.schemas import PREFERENCE_SCHEMA, SFT_SCHEMA
from tests.helpers.training import (
    POSITIVE,
    PROMPT,
    apo_config,
    preference_rows,
    save_dataset,
    sft_rows,
)


@pytest.fixture(scope="module")
def lm_encoder(tiny_lm_path):
    return ChatEncoder(load_processor(tiny_lm_path))


@pytest.fixture(scope="module")
def pref_path(tmp_path_factory):
    return save_dataset(
        preference_rows(16), PREFERENCE_SCHEMA, tmp_path_factory.mktemp("prefs") / "preferences"
    )


# ------------------------------------------------------------------------------------------------ data
def test_collator_has_one_positive_row_per_sample_and_labels_on_completions_only(lm_encoder, pref_path):
    ds, stats = tokenize_preferences(load_split(pref_path), lm_encoder, max_length=256)
    assert stats.samples_kept == 16 and stats.truncated_chosen == 0
    features = [ds[0], ds[1]]
    batch = APOCollator(lm_encoder)(features)
    n0, n1 = len(features[0]["rejected_input_ids"]), len(features[1]["rejected_input_ids"])
    assert batch["input_ids"].shape[0] == 2 + n0 + n1  # positives once, not once per negative
    assert batch["chosen_index"].tolist() == [0, 1 + n0]
    assert batch["rejected_mask"].sum(dim=1).tolist() == [n0, n1]
    assert batch["rejected_index"][0, :n0].tolist() == list(range(1, 1 + n0))
    for row in range(batch["input_ids"].shape[0]):
        p = int(batch["prompt_lengths"][row])
        assert (batch["labels"][row, :p] == IGNORE_INDEX).all()
        length = int(batch["attention_mask"][row].sum())
        assert torch.equal(batch["labels"][row, p:length], batch["input_ids"][row, p:length])
        assert (batch["labels"][row, length:] == IGNORE_INDEX).all()
    # The positive row decodes to the chat-formatted positive ending with the end-of-turn token.
    p = int(batch["prompt_lengths"][0])
    completion = lm_encoder.tokenizer.decode(batch["input_ids"][0, p : int(batch["attention_mask"][0].sum())])
    assert completion.startswith(POSITIVE) and "<|im_end|>" in completion


def test_negatives_ordered_least_drifting_first(lm_encoder, tmp_path):
    row = preference_rows(1)[0]
    row["rejected"] = ["left base opacity", "right lung nodule", "heart size normal"]
    row["rejected_drift"] = [0.9, 0.2, 0.5]
    ds, _ = tokenize_preferences(
        load_split(save_dataset([row], PREFERENCE_SCHEMA, tmp_path / "p")), lm_encoder
    )
    decoded = [lm_encoder.tokenizer.decode(ids) for ids in ds[0]["rejected_input_ids"]]
    assert [d.split("<|im_end|>")[0] for d in decoded] == [
        "right lung nodule",
        "heart size normal",
        "left base opacity",
    ]


def test_truncation_policy_counts_and_never_cuts_prompts(lm_encoder, tmp_path):
    rows = preference_rows(4)
    rows[1]["chosen"] = " ".join([POSITIVE] * 20)
    rows[2]["prompt"] = " ".join([PROMPT] * 20)  # prompt alone exceeds max_length
    rows[3]["rejected"] = ["", None]
    path = save_dataset(rows, PREFERENCE_SCHEMA, tmp_path / "p")
    prompt_len = len(lm_encoder.encode_prompt(rows[0]["prompt"], None))
    max_length = prompt_len + 20
    ds, stats = tokenize_preferences(load_split(path), lm_encoder, max_length=max_length)
    assert stats.samples_in == 4 and stats.samples_kept == 2
    assert stats.dropped_prompt_too_long == 1 and stats.dropped_no_rejected == 1 and stats.empty_rejected == 2
    assert stats.truncated_chosen == 1
    assert stats.rejected_kept == 2 + 3 and stats.max_prompt_tokens == prompt_len  # dropped rows not counted
    for row in ds:
        assert len(row["prompt_input_ids"]) == prompt_len
        for ids in [row["chosen_input_ids"], *row["rejected_input_ids"]]:
            assert len(row["prompt_input_ids"]) + len(ids) <= max_length
    long_row = next(r for r in ds if r["sample_id"] == "s1")
    assert len(long_row["chosen_input_ids"]) == 20


def test_invalid_rows_raise_with_location_or_are_counted_when_lenient(lm_encoder, tmp_path):
    rows = preference_rows(3)
    rows[1]["chosen"] = None
    path = save_dataset(rows, PREFERENCE_SCHEMA, tmp_path / "p")
    with pytest.raises(InputError, match=r"row 2 field 'chosen'"):
        tokenize_preferences(load_split(path), lm_encoder, source=path)
    ds, stats = tokenize_preferences(load_split(path), lm_encoder, lenient=True)
    assert stats.dropped_invalid == 1 and len(ds) == 2
    with pytest.raises(InputError, match="missing column"):
        load_split(path, required=("completion",))
    with pytest.raises(InputError, match="no split"):
        load_split(path, split="validate")


def test_sft_tokenize_and_collate(lm_encoder, tmp_path):
    rows = [
        {
            "sample_id": f"s{i}",
            "split": "train",
            "image_path": None,
            "prompt": PROMPT.format(label="edema"),
            "completion": POSITIVE,
            "model": "m0",
        }
        for i in range(3)
    ]
    ds, stats = tokenize_sft(
        load_split(save_dataset(rows, SFT_SCHEMA, tmp_path / "sft")), lm_encoder, max_length=128
    )
    assert stats.samples_kept == 3
    batch = SFTCollator(lm_encoder)([ds[0], ds[1]])
    p = len(ds[0]["prompt_input_ids"])
    assert (batch["labels"][:, :p] == IGNORE_INDEX).all()
    assert (batch["labels"][:, p:] != IGNORE_INDEX).sum() == 2 * len(ds[0]["completion_input_ids"])


# ------------------------------------------------------------------------------------------ reference
def _collated(encoder, path, n=3):
    ds, _ = tokenize_preferences(load_split(path), encoder, max_length=128)
    return ds, APOCollator(encoder)([ds[i] for i in range(n)])


def test_disabled_adapter_reference_equals_base_model_logps(tiny_lm_path, lm_encoder, pref_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    _, batch = _collated(lm_encoder, pref_path)
    base = load_model(tiny_lm_path, "float32")
    with torch.no_grad():
        base_logps, _ = completion_logps(base, batch)
    policy = get_peft_model(
        load_model(tiny_lm_path, "float32"),
        LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    )
    trainer = APOTrainer(
        policy, apo_config(tmp_path, tiny_lm_path, pref_path), data_collator=APOCollator(lm_encoder)
    )
    with torch.no_grad():
        policy_logps, _ = completion_logps(policy, batch)
    ref_chosen, ref_rejected = trainer.reference_logps(batch)
    base_chosen, base_rejected = split_rows(base_logps, batch)
    assert not torch.allclose(policy_logps, base_logps, atol=1e-3)  # the adapter does change the model
    assert torch.allclose(ref_chosen, base_chosen, atol=1e-5)
    assert torch.allclose(ref_rejected, base_rejected, atol=1e-5)
    # logits_to_keep (LM head on completions only) gives the same log-probs as the full forward.
    with torch.no_grad():
        full, _ = completion_logps(base, batch, logits_to_keep=False)
    assert torch.allclose(full, base_logps, atol=1e-5)


def test_precomputed_reference_equals_on_the_fly(tiny_lm_path, lm_encoder, pref_path, tmp_path):
    from peft import LoraConfig, get_peft_model

    ds, _ = tokenize_preferences(load_split(pref_path), lm_encoder, max_length=128)
    policy = get_peft_model(
        load_model(tiny_lm_path, "float32"),
        LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False),
    )
    cfg = apo_config(
        tmp_path, tiny_lm_path, pref_path, precompute_ref_log_probs=True, per_device_eval_batch_size=3
    )
    trainer = APOTrainer(policy, cfg, data_collator=APOCollator(lm_encoder), train_dataset=ds)
    with_ref = trainer.precompute_reference_logps(ds)
    cache = list((Path(cfg.output_dir) / "reference_logps").glob("train-*.arrow"))
    assert len(cache) == 1
    batch = APOCollator(lm_encoder)([with_ref[i] for i in range(5)])
    cached_chosen, cached_rejected = batch.pop("ref_chosen_logps"), batch.pop("ref_rejected_logps")
    fly_chosen, fly_rejected = trainer.reference_logps(batch)
    assert torch.allclose(cached_chosen, fly_chosen, atol=1e-4)
    assert torch.allclose(cached_rejected, fly_rejected, atol=1e-4)
    # Second call reads the cache file (same values, no recomputation needed).
    again = trainer.precompute_reference_logps(ds)
    assert again["ref_chosen_logps"] == with_ref["ref_chosen_logps"]


# ------------------------------------------------------------------------------------------- training
def test_apo_training_on_separable_set_loss_falls_accuracy_rises(tiny_lm_path, tmp_path):

    # Judged on a fixed held-out set before and after training: single-step training losses are too
    # noisy (two samples a batch, 2 or 3 negatives each) to compare first against last.
    path = tmp_path / "prefs"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset(pa.Table.from_pylist(preference_rows(16), schema=PREFERENCE_SCHEMA)),
            "validate": datasets.Dataset(
                pa.Table.from_pylist(preference_rows(8, seed=1), schema=PREFERENCE_SCHEMA)
            ),
        }
    ).save_to_disk(str(path))
    cfg = apo_config(
        tmp_path,
        tiny_lm_path,
        path,
        max_steps=8,
        learning_rate=2e-2,
        lora_r=8,
        eval_split="validate",
        eval_strategy="steps",
        eval_steps=8,
        eval_on_start=True,
        per_device_eval_batch_size=4,
    )
    result = run_apo(cfg)
    logs = [h for h in result["log_history"] if "rewards/accuracies" in h]
    assert len(logs) == 8
    first, last = logs[0], logs[-1]
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert last["rewards/margins_max"] > 0
    before, after = (h for h in result["log_history"] if "eval_loss" in h)
    assert after["eval_loss"] < before["eval_loss"] - 0.2  # measured drops 0.29-0.51 over seeds 0-3
    assert after["eval_rewards/accuracies"] > before["eval_rewards/accuracies"]
    out = Path(cfg.output_dir)
    assert (out / "adapter_model.safetensors").exists() and (out / "apo_data_stats.json").exists()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r][:8] == list(range(1, 9))


def test_eval_split_logs_eval_metrics(tiny_lm_path, tmp_path):

    table = pa.Table.from_pylist(preference_rows(8), schema=PREFERENCE_SCHEMA)
    held_out = pa.Table.from_pylist(preference_rows(4, seed=1), schema=PREFERENCE_SCHEMA)
    path = tmp_path / "prefs"
    datasets.DatasetDict(
        {"train": datasets.Dataset(table), "validate": datasets.Dataset(held_out)}
    ).save_to_disk(str(path))
    cfg = apo_config(
        tmp_path,
        tiny_lm_path,
        path,
        eval_split="validate",
        eval_strategy="steps",
        eval_steps=2,
        max_steps=2,
        per_device_eval_batch_size=2,
    )
    history = run_apo(cfg)["log_history"]
    evals = [h for h in history if "eval_loss" in h]
    assert len(evals) == 1
    assert 0.0 <= evals[0]["eval_rewards/accuracies"] <= 1.0 and "eval_rewards/margins_max" in evals[0]
    train_logs = [h for h in history if "rewards/accuracies" in h]
    assert len(train_logs) == 2 and not any(k.startswith("eval_") for h in train_logs for k in h)


@pytest.mark.parametrize("loss_type", ["pairwise", "listwise"])
def test_other_losses_train(tiny_lm_path, pref_path, tmp_path, loss_type):
    result = run_apo(
        apo_config(tmp_path, tiny_lm_path, pref_path, loss_type=loss_type, max_steps=3, nll_alpha=0.5)
    )
    logs = [h for h in result["log_history"] if "loss" in h and "nll_loss" in h]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(h["loss"])) for h in logs)


def test_checkpoint_then_resume_gives_same_next_step_loss(tiny_lm_path, pref_path, tmp_path):
    from transformers import TrainerCallback

    straight = run_apo(apo_config(tmp_path / "a", tiny_lm_path, pref_path, max_steps=4))
    straight_losses = [h["loss"] for h in straight["log_history"] if "rewards/chosen" in h]

    class StopAtTwo(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                control.should_save = True
                control.should_training_stop = True

    cfg = apo_config(
        tmp_path / "b", tiny_lm_path, pref_path, max_steps=4, save_strategy="steps", save_steps=100
    )
    from apo_train.trainer import _prepare_model

    model, processor = _prepare_model(cfg)
    encoder = ChatEncoder(processor)
    ds, _ = tokenize_preferences(load_split(pref_path), encoder, max_length=cfg.max_length)
    trainer = APOTrainer(
        model, cfg, train_dataset=ds, data_collator=APOCollator(encoder), callbacks=[StopAtTwo()]
    )
    trainer.train()
    checkpoint = Path(cfg.output_dir) / "checkpoint-2"
    assert checkpoint.is_dir()
    resumed = run_apo(cfg, resume_from_checkpoint=str(checkpoint))
    # log_history carries the first run's steps 1-2 (from trainer_state.json), then the resumed 3-4.
    resumed_losses = {h["step"]: h["loss"] for h in resumed["log_history"] if "rewards/chosen" in h}
    assert sorted(resumed_losses) == [1, 2, 3, 4]
    assert resumed_losses[2] == pytest.approx(straight_losses[1], abs=1e-6)
    assert resumed_losses[3] == pytest.approx(straight_losses[2], abs=1e-5)
    assert resumed_losses[4] == pytest.approx(straight_losses[3], abs=1e-5)


@pytest.mark.parametrize("precompute", [False, True])
def test_full_finetuning_reference_is_the_starting_model(tiny_lm_path, pref_path, tmp_path, precompute):
    cfg = apo_config(
        tmp_path,
        tiny_lm_path,
        pref_path,
        use_lora=False,
        max_steps=2,
        learning_rate=1e-3,
        precompute_ref_log_probs=precompute,
    )
    result = run_apo(cfg)
    logs = [h for h in result["log_history"] if "rewards/chosen" in h]
    assert logs[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    assert logs[1]["rewards/margins"] != 0.0
    assert (Path(tmp_path / "out") / "model.safetensors").exists()


def test_sft_then_apo_from_adapter_dir_reference_is_stage1(tiny_lm_path, pref_path, tmp_path):
    rows = sft_rows(8)
    sft_path = save_dataset(rows, SFT_SCHEMA, tmp_path / "sft")
    sft_cfg = SFTStageConfig(
        output_dir=str(tmp_path / "sft_out"),
        model_name_or_path=str(tiny_lm_path),
        dataset_path=str(sft_path),
        max_steps=4,
        learning_rate=1e-2,
        per_device_train_batch_size=2,
        global_batch_size=None,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        merge_adapter=True,
        lora_dropout=0.0,
    )
    sft = run_sft(sft_cfg)
    losses = [h["loss"] for h in sft["log_history"] if "loss" in h]
    assert losses[-1] < losses[0]
    assert (tmp_path / "sft_out" / "merged" / "model.safetensors").exists()
    apo = run_apo(apo_config(tmp_path, Path(sft["saved"]["model"]), pref_path, max_steps=1))
    first = next(h for h in apo["log_history"] if "rewards/chosen" in h)
    # Policy starts at the Stage-1 model, which is also the reference: zero rewards at step 1.
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    base_first = next(
        h
        for h in run_apo(apo_config(tmp_path / "b", tiny_lm_path, pref_path, max_steps=1))["log_history"]
        if "logps/chosen" in h
    )
    assert first["logps/chosen"] != pytest.approx(base_first["logps/chosen"], abs=1e-3)


def test_lora_attach_targets_all_linear(tiny_lm_path):
    model = attach_lora(load_model(tiny_lm_path, "float32"), 8, 32, 0.0, "all-linear")
    names = {n.split(".lora_A")[0].split(".")[-1] for n, _ in model.named_parameters() if "lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def test_same_seed_same_fresh_adapter_within_one_process(tiny_lm_path, pref_path, tmp_path):
    """Two runs in one process with the same seed start from the same LoRA weights."""
    from apo_train.trainer import _prepare_model

    def lora_weights(seed):
        model, _ = _prepare_model(apo_config(tmp_path, tiny_lm_path, pref_path, seed=seed))
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    torch.manual_seed(123)  # whatever the global state was
    first = lora_weights(0)
    torch.rand(10)
    second, other = lora_weights(0), lora_weights(1)
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert not all(torch.equal(first[n], other[n]) for n in first)


def test_data_summaries_name_only_counters_that_apply():
    from apo_train.data import TruncationStats
    from apo_train.trainer import data_summary

    stats = TruncationStats(samples_in=10, samples_kept=8, dropped_invalid=2, dropped_no_rejected=3)
    assert data_summary(stats, preferences=False) == "8/10 samples kept; dropped: invalid 2"
    assert "dropped: no negatives 3" in data_summary(stats, preferences=True)
    assert data_summary(TruncationStats(samples_in=4, samples_kept=4), preferences=True) == "4/4 samples kept"


def test_a_finished_stage_records_its_settings_and_other_settings_do_not_match(
    tiny_lm_path, pref_path, tmp_path
):
    cfg = apo_config(tmp_path, tiny_lm_path, pref_path, max_steps=1)
    assert completed_with(cfg.output_dir, cfg) is None  # nothing finished yet
    run_apo(cfg)
    record = completed_with(cfg.output_dir, cfg)
    assert record is not None and record["step"] == 1 and record["saved"]["model"] == cfg.output_dir
    assert completed_with(cfg.output_dir, apo_config(tmp_path, tiny_lm_path, pref_path, max_steps=2)) is None
    assert (
        completed_with(cfg.output_dir, apo_config(tmp_path, tiny_lm_path, pref_path, max_steps=1, beta=0.5))
        is None
    )
