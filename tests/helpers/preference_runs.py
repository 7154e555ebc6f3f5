"""Trajectory runs shaped like real `cxrmax generate` output (generate's own writer over samples
of the mini MIMIC-CXR), for the build-preferences and inspector tests."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from cxrmax.generate.roster import safe_dir_name
from cxrmax.generate.store import rows_to_table, write_shard_atomic

MODELS = (
    "claude-sonnet-4",
    "gpt-5 nano",  # a space in the name
    "Qwen/Qwen2.5-VL-7B-Instruct",  # a slash: its folder is Qwen__Qwen2.5-VL-7B-Instruct
    "glm-4.5v",
    "gemini-2.5-flash-lite",
    "moonshot-v1",
    "grok-4",
)
ANSWERS = {
    "claude-sonnet-4": "**Findings:**\n1. The cardiac silhouette is enlarged.\n"
    "2. There is a left pleural effusion with blunting of the left costophrenic angle.\n\n"
    "**Impression:** Cardiomegaly and left pleural effusion.",
    "gpt-5 nano": "The heart size is normal. No pleural effusion or pneumothorax. The lungs are clear.",
    "Qwen/Qwen2.5-VL-7B-Instruct": "Step 1: There is right lower lobe consolidation, concerning for "
    "pneumonia.\nStep 2: The heart appears enlarged.\nConclusion: cardiomegaly and right lower lobe pneumonia.",
    "glm-4.5v": "## Analysis\n- Cardiomegaly is present.\n- Small right pleural effusion.\n- No pneumothorax.",
    "gemini-2.5-flash-lite": "Enlarged cardiac silhouette consistent with cardiomegaly. "
    "Bilateral pleural effusions, left greater than right.",
    "moonshot-v1": "I'm sorry, but I cannot provide a medical diagnosis from this image. "
    "Please consult a qualified radiologist.",
    "grok-4": "Cardiomegaly. Possible mild pulmonary edema. Left pleural effusion.",
}
REFUSAL = ANSWERS["moonshot-v1"]
N_SAMPLES = 6


def generate_row(sample: dict, model: str, text: str | None, **extra) -> dict:
    """A journal row as generate records it (TRAJECTORY_SCHEMA names)."""
    index = extra.get("sample_index", 0)
    row = {
        "request_key": hashlib.sha256(f"{sample['sample_id']}|{model}|{index}".encode()).hexdigest(),
        "model": model,
        "served_model": model,
        "backend": "openai",
        "prompt_id": "cxrmax-explain",
        "prompt_hash": "0" * 64,
        "prompt": "This is a patient's chest DR image. Please explain the findings.",
        "sample_index": 0,
        "text": text,
        "finish_reason": "stop",
        "prompt_tokens": 812,
        "completion_tokens": 96,
        "latency_s": 2.5,
        "sampling": '{"temperature": 0.7, "max_tokens": 1024}',
        "seed": 7,
        "attempts": 1,
        "created_at": 1_764_000_000_000,
        "endpoint": "http://127.0.0.1:8000/v1",
        "image_max_edge": 1024,
        "reasoning": None,
        **{k: sample[k] for k in ("sample_id", "dicom_id", "subject_id", "study_id", "split", "view")},
        "image_path": sample["image_path"],
        "labels": sample["labels"],
    }
    row.update(extra)
    return row


def write_model(out: Path, model: str, rows: list[dict], name: str = "part-all-00001.arrow", drop=()) -> Path:
    """Commit rows as one shard of `model`, exactly as generate's store does."""
    directory = out / "trajectories" / safe_dir_name(model)
    directory.mkdir(parents=True, exist_ok=True)
    table = rows_to_table(rows)
    if drop:
        table = table.drop_columns(list(drop))
    path = directory / name
    write_shard_atomic(table, path)
    return path


def full_run(out: Path, samples: list[dict], text: Callable[[int, str], str | None] | None = None, **extra):
    for model in MODELS:
        rows = [
            generate_row(s, model, text(i, model) if text else ANSWERS[model], **extra)
            for i, s in enumerate(samples)
        ]
        write_model(out, model, rows)
