"""Config dataclasses for the two training stages, TRL-style: each extends transformers' TrainingArguments.

Because they *are* TrainingArguments, everything the HF stack offers works unchanged: ``accelerate
launch`` / torchrun, DeepSpeed ZeRO-2/3 (``deepspeed=ds_config.json``), FSDP, bf16, gradient
checkpointing, gradient accumulation, checkpointing and resuming, report_to=tensorboard.

Defaults are the paper's settings (method.md): LoRA r=8, alpha=32 on all linear layers, 1 epoch,
global batch 32, SFT lr 1e-4 with 5% warmup and max length 2304; APO lr 5e-7, beta 0.1, max length 4096.

APO here is *Autonomous Preference Optimization* (one consensus positive vs several drifting negatives,
a Plackett-Luce objective). TRL's ``loss_type="apo_zero"`` / ``"apo_down"`` are *Anchored* Preference
Optimization, an unrelated method sharing the acronym.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any

from transformers import TrainingArguments

from apo_train.losses import LOSS_TYPES


@dataclass
class StageArguments:
    """Model, LoRA and data settings shared by both stages (mixed into the TrainingArguments subclasses)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Model dir or hub id. For APO: the Stage-1 model (merged dir, or a LoRA adapter dir "
            "that is merged into its base in memory). It is also the reference model."
        },
    )
    dataset_path: str | None = field(
        default=None, metadata={"help": "OUT/sft or OUT/preferences (save_to_disk dir)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Optional split to evaluate on (e.g. validate)."}
    )
    image_root: str | None = field(
        default=None, metadata={"help": "MIMIC-CXR root that image_path is relative to (None: text only)."}
    )
    max_edge: int = field(
        default=1024, metadata={"help": "Longest image edge after preprocessing (as generate)."}
    )
    max_pixels: int | None = field(default=None, metadata={"help": "Optional pixel cap for preprocessing."})
    image_jpeg_quality: int | None = field(
        default=None,
        metadata={
            "help": "Re-encode each preprocessed image as JPEG at this quality (generate's backends "
            "send quality 90), so the model trains on the pixels it is served; None: as decoded."
        },
    )
    image_cache_size: int = field(
        default=0,
        metadata={
            "help": "Keep the vision tensors of this many images in memory (least recently used out), so "
            "an image seen again is not decoded and processed again; 0: none. Each costs its pixel "
            "tensor (about 0.3 MB at 112 pixels, 5 MB at 512), per data loader worker."
        },
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message."})
    max_length: int = field(
        default=4096, metadata={"help": "Max tokens per row (prompt + image + completion)."}
    )
    min_completion_tokens: int = field(
        default=1, metadata={"help": "Drop samples leaving fewer completion tokens."}
    )
    lenient: bool = field(
        default=False, metadata={"help": "Drop (and count) invalid rows instead of failing."}
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenization."})
    use_lora: bool = field(default=True, metadata={"help": "Train a LoRA adapter (False: full fine-tuning)."})
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "'all-linear' or a comma-separated list of module names."}
    )
    merge_adapter: bool = field(
        default=False, metadata={"help": "Also save the adapter merged into the base."}
    )
    torch_dtype: str = field(default="auto", metadata={"help": "auto | bfloat16 | float16 | float32."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, flash_attention_2."})
    global_batch_size: int | None = field(
        default=32,
        metadata={
            "help": "Samples per optimizer step over all processes; sets gradient_accumulation_steps "
            "(None: use gradient_accumulation_steps as given)."
        },
    )
    jsonl_log: bool = field(default=True, metadata={"help": "Append every log record to OUTPUT/log.jsonl."})

    def lora_targets(self) -> str | list[str]:
        if self.lora_target_modules.strip() == "all-linear":
            return "all-linear"
        return [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _apply_global_batch(args: Any) -> None:
    if args.global_batch_size is not None and args.global_batch_size < 1:
        raise ValueError(f"global_batch_size must be at least 1 (or unset), not {args.global_batch_size}")
    if args.global_batch_size:
        per_step = args.per_device_train_batch_size * _world_size()
        args.gradient_accumulation_steps = max(1, args.global_batch_size // per_step)
        effective = per_step * args.gradient_accumulation_steps
        if effective != args.global_batch_size:
            # Silently training with another batch size changes the effective learning rate.
            warnings.warn(
                f"global_batch_size {args.global_batch_size} is not a multiple of per-device batch "
                f"{args.per_device_train_batch_size} x {_world_size()} processes: training with "
                f"{effective} samples per optimizer step (gradient_accumulation_steps="
                f"{args.gradient_accumulation_steps})",
                stacklevel=3,
            )


def _check_data_settings(args: Any) -> None:
    """Reject data settings that would silently train on nothing or on empty completions."""
    if args.max_length < 2:
        raise ValueError(f"max_length must be at least 2 tokens, not {args.max_length}")
    if args.min_completion_tokens < 1:
        # 0 would keep rows whose completions were cut to nothing: log-prob 0 for every candidate.
        raise ValueError(f"min_completion_tokens must be at least 1, not {args.min_completion_tokens}")
    if args.max_edge is not None and args.max_edge < 1:
        raise ValueError(f"max_edge must be a positive number of pixels, not {args.max_edge}")
    if getattr(args, "max_negatives", None) is not None and args.max_negatives < 1:
        raise ValueError(f"max_negatives must be at least 1 (or unset for all), not {args.max_negatives}")


@dataclass
class SFTStageConfig(StageArguments, TrainingArguments):
    """Stage 1: supervised bootstrapping (next-token loss on the completion tokens only)."""

    learning_rate: float = 1e-4
    warmup_steps: float = 0.05  # < 1 means a ratio of the total steps (transformers convention)
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 1
    max_length: int = 2304
    logging_steps: float = 10
    save_steps: float = 500
    remove_unused_columns: bool = False
    report_to: None | str | list[str] = "none"
    lr_scheduler_type: str = "cosine"
    sort_accumulated_by_length: bool = field(
        default=False,
        metadata={
            "help": "Sort each optimizer step's randomly drawn rows by length before cutting them into "
            "the gradient-accumulation micro-batches, so short rows are not padded to the step's "
            "longest (apo_train.data.sampling). The step's rows and gradient stay the same; only "
            "padding is saved. Useful with gradient_accumulation_steps > 1."
        },
    )

    def __post_init__(self) -> None:
        _check_data_settings(self)
        _apply_global_batch(self)
        super().__post_init__()


@dataclass
class APOConfig(StageArguments, TrainingArguments):
    """Stage 2: APO (Autonomous Preference Optimization) with a multi-negative Plackett-Luce loss.

    Not TRL's apo_zero/apo_down (Anchored Preference Optimization)."""

    learning_rate: float = 5e-7
    warmup_steps: float = 0.0
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 1  # samples; each carries 1 positive + N negative rows
    max_length: int = 4096
    logging_steps: float = 10
    save_steps: float = 500
    remove_unused_columns: bool = False
    report_to: None | str | list[str] = "none"
    lr_scheduler_type: str = "linear"
    beta: float = field(default=0.1, metadata={"help": "Reward scale beta in r = beta * (logp - ref logp)."})
    loss_type: str = field(default="plackett-luce", metadata={"help": "plackett-luce | pairwise | listwise."})
    pairwise_reduction: str = field(default="mean", metadata={"help": "mean | sum (pairwise loss only)."})
    nll_alpha: float = field(default=0.0, metadata={"help": "Weight of the token-mean NLL of the positive."})
    max_negatives: int | None = field(
        default=None, metadata={"help": "Keep at most K (most drifting) negatives."}
    )
    precompute_ref_log_probs: bool = field(
        default=False, metadata={"help": "Compute reference log-probs in one pass first, cached on disk."}
    )
    reference_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where precomputed reference log-probs go (default OUTPUT/reference_logps)."},
    )

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(
                f"loss_type must be one of {LOSS_TYPES} (APO = Autonomous Preference "
                f"Optimization; TRL's apo_zero/apo_down are a different method), not {self.loss_type!r}"
            )
        if self.pairwise_reduction not in ("mean", "sum"):
            raise ValueError("pairwise_reduction must be 'mean' or 'sum'")
        _check_data_settings(self)
        _apply_global_batch(self)
        super().__post_init__()


def config_field_names(cls: type) -> set[str]:
    """Names a config file or CLI flag may set on ``cls``."""
    return {f.name for f in fields(cls) if f.init}
