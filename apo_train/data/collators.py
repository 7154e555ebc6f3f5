"""Collation: tokenized samples -> padded tensors for the SFT and APO trainers.

A sample's positive and all of its negatives go in the same batch as separate rows of one padded
tensor: the positive is ONE row per sample (not one per negative, as a pairwise split would do),
followed by its negatives; ``chosen_index`` / ``rejected_index`` map rows back to samples. Images are
processed at collation time, once per sample, and repeated for the sample's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from apo_train.data.tokenize import ChatEncoder

IGNORE_INDEX = -100


def _pad_rows(rows: list[list[int]], value: int, multiple_of: int | None) -> torch.Tensor:
    length = max(len(r) for r in rows)
    if multiple_of:
        length = -(-length // multiple_of) * multiple_of
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class _VisionMixin:
    encoder: ChatEncoder

    def _vision(self, image_path: str | None, copies: int) -> dict[str, torch.Tensor]:
        """Vision tensors for ``copies`` rows sharing one image (processed once, repeated)."""
        if not self.encoder.uses_images or not image_path:
            return {}
        vision = self.encoder.image_inputs(image_path)
        return {k: torch.cat([v] * copies, dim=0) for k, v in vision.items()}


def _merge_vision(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    parts = [p for p in parts if p]
    if not parts:
        return {}
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


@dataclass
class APOCollator(_VisionMixin):
    """Collate tokenized preference samples: per sample one positive row followed by its negatives.

    Output: ``input_ids``, ``attention_mask``, ``labels`` (IGNORE_INDEX outside completions) of shape
    [rows, length] (right padding); ``chosen_index`` [B] and ``rejected_index`` [B, Nmax] (row numbers,
    -1 = no such negative); ``rejected_mask`` [B, Nmax]; ``prompt_lengths`` [rows]; vision tensors when
    the model has images (one image per row, in row order); ``ref_chosen_logps`` / ``ref_rejected_logps``
    when the features carry precomputed reference log-probs; ``sample_index`` when present."""

    encoder: ChatEncoder
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows: list[list[int]] = []
        types: list[list[int]] = []
        labels: list[list[int]] = []
        prompt_lengths: list[int] = []
        chosen_index: list[int] = []
        rejected_index: list[list[int]] = []
        vision_parts = []
        for f in features:
            prompt = list(f["prompt_input_ids"])
            completions = [f["chosen_input_ids"], *f["rejected_input_ids"]]
            chosen_index.append(len(rows))
            rejected_index.append(list(range(len(rows) + 1, len(rows) + len(completions))))
            prompt_types = list(f.get("prompt_mm_token_type_ids") or [])
            for completion in completions:
                rows.append(prompt + list(completion))
                types.append(prompt_types + [0] * len(completion))
                labels.append([IGNORE_INDEX] * len(prompt) + list(completion))
                prompt_lengths.append(len(prompt))
            vision_parts.append(self._vision(f.get("image_path"), len(completions)))
        n_max = max(len(r) for r in rejected_index)
        rejected_tensor = torch.full((len(features), n_max), -1, dtype=torch.long)
        for i, r in enumerate(rejected_index):
            rejected_tensor[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        input_ids = _pad_rows(rows, self.encoder.pad_token_id, self.pad_to_multiple_of)
        batch = {
            "input_ids": input_ids,
            "attention_mask": _pad_rows([[1] * len(r) for r in rows], 0, self.pad_to_multiple_of),
            "labels": _pad_rows(labels, IGNORE_INDEX, self.pad_to_multiple_of),
            "prompt_lengths": torch.tensor(prompt_lengths, dtype=torch.long),
            "chosen_index": torch.tensor(chosen_index, dtype=torch.long),
            "rejected_index": rejected_tensor,
            "rejected_mask": rejected_tensor >= 0,
            **_merge_vision(vision_parts),
        }
        if any(f.get("prompt_mm_token_type_ids") for f in features):
            batch["mm_token_type_ids"] = _pad_rows(types, 0, self.pad_to_multiple_of)
        if "ref_chosen_logps" in features[0]:
            batch["ref_chosen_logps"] = torch.tensor(
                [f["ref_chosen_logps"] for f in features], dtype=torch.float32
            )
            ref_rej = torch.zeros((len(features), n_max), dtype=torch.float32)
            for i, f in enumerate(features):
                values = f["ref_rejected_logps"]
                ref_rej[i, : len(values)] = torch.tensor(values, dtype=torch.float32)
            batch["ref_rejected_logps"] = ref_rej
        if "sample_index" in features[0]:
            batch["sample_index"] = torch.tensor([f["sample_index"] for f in features], dtype=torch.long)
        return batch


@dataclass
class SFTCollator(_VisionMixin):
    """Collate tokenized SFT rows: prompt + completion, labels only on the completion tokens."""

    encoder: ChatEncoder
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows, types, labels, vision_parts = [], [], [], []
        for f in features:
            prompt, completion = list(f["prompt_input_ids"]), list(f["completion_input_ids"])
            rows.append(prompt + completion)
            types.append(list(f.get("prompt_mm_token_type_ids") or []) + [0] * len(completion))
            labels.append([IGNORE_INDEX] * len(prompt) + completion)
            vision_parts.append(self._vision(f.get("image_path"), 1))
        batch = {
            "input_ids": _pad_rows(rows, self.encoder.pad_token_id, self.pad_to_multiple_of),
            "attention_mask": _pad_rows([[1] * len(r) for r in rows], 0, self.pad_to_multiple_of),
            "labels": _pad_rows(labels, IGNORE_INDEX, self.pad_to_multiple_of),
            **_merge_vision(vision_parts),
        }
        if any(f.get("prompt_mm_token_type_ids") for f in features):
            batch["mm_token_type_ids"] = _pad_rows(types, 0, self.pad_to_multiple_of)
        return batch


#: Batch keys that are bookkeeping for the loss, not model inputs.
APO_BOOKKEEPING_KEYS = (
    "labels",
    "prompt_lengths",
    "chosen_index",
    "rejected_index",
    "rejected_mask",
    "ref_chosen_logps",
    "ref_rejected_logps",
    "sample_index",
)
