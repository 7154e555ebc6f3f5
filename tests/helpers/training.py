"""Preference and SFT rows, saved datasets and APO configs shared by the training tests."""

from __future__ import annotations

import random
from pathlib import Path

import datasets
import pyarrow as pa

from apo_train.config import APOConfig, SFTStageConfig

PROMPT = "This is a patient's chest DR image. Please explain the basis for the diagnosis of {label}."
POSITIVE = "bilateral pleural effusion with mild edema and no pneumothorax"
NEGATIVE_WORDS = (
    "left right lung base opacity pneumonia atelectasis nodule fracture heart size normal".split()
)


def negative_answer(rng: random.Random) -> str:
    return " ".join(rng.choice(NEGATIVE_WORDS) for _ in range(rng.randint(4, 9)))


def preference_rows(
    n: int, seed: int = 0, negatives: int = 3, image_paths: list[str] | None = None
) -> list[dict]:
    """A separable toy set: the same consensus positive, random drifting negatives (2..negatives each)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        k = 2 + (i % max(1, negatives - 1))
        rejected = [negative_answer(rng) for _ in range(k)]
        rows.append(
            {
                "sample_id": f"s{i}",
                "split": "train",
                "image_path": image_paths[i % len(image_paths)] if image_paths else None,
                "prompt": PROMPT.format(label="pleural effusion"),
                "chosen": POSITIVE,
                "chosen_source": "consensus-vote",
                "rejected": rejected,
                "rejected_models": [f"m{j}" for j in range(k)],
                "rejected_drift": [1.0 - j / k for j in range(k)],  # most drifting first
            }
        )
    return rows


def save_dataset(rows: list[dict], schema: pa.Schema, path: Path, split: str = "train") -> Path:
    table = pa.Table.from_pylist(rows, schema=schema)
    datasets.DatasetDict({split: datasets.Dataset(table)}).save_to_disk(str(path))
    return path


def positive_sft_rows(n: int) -> list[dict]:
    """``n`` SFT rows whose completion is the positive (one model)."""
    return [
        {
            "sample_id": f"s{i}",
            "split": "train",
            "image_path": None,
            "prompt": PROMPT.format(label="effusion"),
            "completion": POSITIVE,
            "model": "m0",
        }
        for i in range(n)
    ]


def sft_rows(n: int = 8) -> list[dict]:
    """SFT rows: the positive on odd samples, a random negative answer on even ones, three models."""
    return [
        {
            "sample_id": f"s{i}",
            "split": "train",
            "image_path": None,
            "prompt": PROMPT.format(label="effusion"),
            "completion": POSITIVE if i % 2 else negative_answer(random.Random(i)),
            "model": f"m{i % 3}",
        }
        for i in range(n)
    ]


def apo_config(tmp_path: Path, model: Path, data: Path, **overrides) -> APOConfig:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        model_name_or_path=str(model),
        dataset_path=str(data),
        max_steps=4,
        learning_rate=5e-3,
        per_device_train_batch_size=2,
        global_batch_size=None,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        max_length=96,
        lora_dropout=0.0,
        seed=0,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return APOConfig(**settings)


def sft_config(output_dir: Path, model: Path, data: Path, **overrides) -> SFTStageConfig:
    """A Stage-1 config for a few logged CPU steps, one optimizer step per batch; ``overrides`` set the rest."""
    settings = dict(
        output_dir=str(output_dir),
        model_name_or_path=str(model),
        dataset_path=str(data),
        global_batch_size=None,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
    )
    settings.update(overrides)
    return SFTStageConfig(**settings)
