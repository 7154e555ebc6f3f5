"""Length-sorted accumulation: each optimizer step's rows sorted by length before they are cut into
micro-batches (apo_train.data.sampling): the same rows and gradient per step, less padding."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from apo_train.data import ChatEncoder, LengthSortedSteps, load_split, sort_by_length, tokenize_sft
from apo_train.modeling import load_processor
from apo_train.trainer import run_sft
from cxrmax.core.schemas import SFT_SCHEMA
from tests.helpers.training import PROMPT, save_dataset, sft_config


def _padded_tokens(order: list[int], lengths: list[int], micro: int) -> int:
    return sum(
        len(order[i : i + micro]) * max(lengths[j] for j in order[i : i + micro])
        for i in range(0, len(order), micro)
    )


def test_every_pass_covers_each_row_once_in_sorted_steps():
    rng = random.Random(3)
    lengths = [rng.randint(5, 300) for _ in range(50)]
    sampler = LengthSortedSteps(lengths, step_rows=16, seed=7)
    first, second = list(sampler), list(sampler)
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second  # each pass is a new permutation
    assert list(LengthSortedSteps(lengths, 16, seed=7)) == first  # reproducible from the seed
    for order in (first, second):
        for start in range(0, 50, 16):
            step = [lengths[i] for i in order[start : start + 16]]
            assert step == sorted(step, reverse=True)
    # The same steps unsorted pad more when cut into micro-batches of 8.
    unsorted = list(range(50))
    random.Random(7).shuffle(unsorted)
    assert _padded_tokens(first[:48], lengths, 8) < _padded_tokens(unsorted[:48], lengths, 8)


def test_sort_by_length_keeps_drawn_order_among_ties():
    # lengths of 4, 1, 3, 0, 2: 7, 7, 1, 5, 5
    assert sort_by_length([4, 1, 3, 0, 2], [5, 7, 5, 1, 7]) == [4, 1, 0, 2, 3]


def test_tokenized_rows_carry_their_length(tiny_vlm_path, mini_mimic, tmp_path):
    image = sorted(p.relative_to(mini_mimic).as_posix() for p in Path(mini_mimic, "files").rglob("*.jpg"))[0]
    rows = [
        {
            "sample_id": f"s{i}",
            "split": "train",
            "image_path": image,
            "prompt": PROMPT.format(label="effusion"),
            "completion": "word " * (i + 1),
            "model": "m0",
        }
        for i in range(3)
    ]
    encoder = ChatEncoder(load_processor(tiny_vlm_path), image_root=mini_mimic, max_edge=112)
    tokenized, _ = tokenize_sft(load_split(save_dataset(rows, SFT_SCHEMA, tmp_path / "sft")), encoder)
    for row in tokenized:
        assert row["length"] == len(row["prompt_input_ids"]) + len(row["completion_input_ids"])
    assert tokenized[0]["length"] < tokenized[1]["length"] < tokenized[2]["length"]


@pytest.mark.slow
def test_sorted_micro_batches_train_as_the_whole_step(tiny_vlm_path, mini_mimic, tmp_path):
    """Four rows a step, as one batch or as two accumulated micro-batches of two: the same losses and
    weights, since the loss is normalised by the step's token count."""
    images = sorted(p.relative_to(mini_mimic).as_posix() for p in Path(mini_mimic, "files").rglob("*.jpg"))
    rng = random.Random(0)
    rows = [
        {
            "sample_id": f"s{i}",
            "split": "train",
            "image_path": images[i % len(images)],
            "prompt": PROMPT.format(label="effusion"),
            # Completions of very different lengths, so per-micro-batch token means would differ.
            "completion": " ".join(
                rng.choice(["left", "right", "effusion", "clear", "small"]) for _ in range(3 + 9 * (i % 4))
            ),
            "model": "m0",
        }
        for i in range(12)
    ]
    data = save_dataset(rows, SFT_SCHEMA, tmp_path / "sft")

    def train(name: str, batch: int, accumulation: int) -> tuple[list[float], dict[str, torch.Tensor]]:
        result = run_sft(
            sft_config(
                tmp_path / name,
                tiny_vlm_path,
                data,
                image_root=str(mini_mimic),
                max_edge=112,
                max_steps=4,
                learning_rate=1e-2,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                sort_accumulated_by_length=True,
                use_lora=False,
                seed=5,
            )
        )
        losses = [h["loss"] for h in result["log_history"] if "loss" in h]
        return losses, load_file(str(tmp_path / name / "model.safetensors"))

    whole_losses, whole = train("whole", 4, 1)
    micro_losses, micro = train("micro", 2, 2)
    assert len(whole_losses) == 4
    assert micro_losses == pytest.approx(whole_losses, rel=1e-4)
    assert whole.keys() == micro.keys()
    for key in whole:
        torch.testing.assert_close(micro[key], whole[key], rtol=1e-4, atol=1e-5)


def test_the_teachers_batch_stream_sorts_each_batch_and_keeps_its_rows():
    from cxrmax.toy.teachers import _BatchStream

    rng = random.Random(1)
    lengths = [rng.randint(40, 250) for _ in range(37)]  # 37 rows: batches straddle two passes
    stream = list(_BatchStream(lengths, steps=9, batch_size=8, seed=4))
    assert len(stream) == 9 * 8
    # The rows a step trains on are the unsorted stream's (the same draws), only reordered.
    unsorted: list[int] = []
    draw = random.Random(4)
    while len(unsorted) < 9 * 8:
        more = list(range(37))
        draw.shuffle(more)
        unsorted += more
    for step in range(9):
        batch = stream[step * 8 : (step + 1) * 8]
        assert sorted(batch) == sorted(unsorted[step * 8 : (step + 1) * 8])
        assert [lengths[i] for i in batch] == sorted((lengths[i] for i in batch), reverse=True)
