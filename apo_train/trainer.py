"""Stage 1 (SFT bootstrapping) and Stage 2 (APO, Autonomous Preference Optimization) on transformers' Trainer.

Both stages are ``transformers.Trainer`` subclasses, so ``accelerate launch`` / torchrun, DeepSpeed
ZeRO-2/3, bf16, gradient checkpointing, gradient accumulation, checkpoints and ``resume_from_checkpoint``
work as they do for any HF training run.

APOTrainer: each batch holds B samples; per sample one positive row and N negative rows (APOCollator).
One forward pass over all rows gives policy log-probs (summed over completion tokens); the reference
log-probs come from (a) the same model with its LoRA adapter disabled (no second copy in memory), (b)
a frozen copy for full fine-tuning, or (c) a one-pass precomputation cached on disk
(``precompute_ref_log_probs``). The positive is computed once per sample, not once per negative.

Metrics use TRL's names: loss, rewards/chosen, rewards/rejected (mean over negatives), rewards/margins
(vs that mean), rewards/margins_max (vs the strongest negative), rewards/accuracies (positive beats every
negative), logps/chosen, logps/rejected.

Not TRL's apo_zero/apo_down (Anchored Preference Optimization): a different method.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import os
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
import torch
from torch.utils.data import DataLoader
from transformers import Trainer, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from apo_train.callbacks import InterruptCallback, JsonlLogCallback, RichProgressCallback, TrainingInterrupted
from apo_train.config import APOConfig, SFTStageConfig
from apo_train.data import (
    APO_BOOKKEEPING_KEYS,
    IGNORE_INDEX,
    APOCollator,
    ChatEncoder,
    LengthSortedSteps,
    SFTCollator,
    TruncationStats,
    load_split,
    tokenize_preferences,
    tokenize_sft,
)
from apo_train.losses import apo_loss, reward_metrics
from apo_train.modeling import attach_lora, load_model, load_processor, processor_source
from cxrmax.core.errors import InputError
from cxrmax.core.io import atomic_path, atomic_write_json


# ----------------------------------------------------------------------------------------- log-probs
def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return inner


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    """Whether the model can skip the LM head on prompt positions (``logits_to_keep``)."""
    try:
        return "logits_to_keep" in inspect.signature(_base_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def completion_logps(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], logits_to_keep: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each row's completion tokens (float32, [rows]) and their token counts.

    Only positions from the earliest completion on are sent through the LM head when the model supports
    ``logits_to_keep`` (the prompt and image tokens of a VLM are often most of a row). Log-softmax is
    taken one row at a time in float32 so memory stays at one [length, vocab] float32 slab."""
    inputs = {k: v for k, v in batch.items() if k not in APO_BOOKKEEPING_KEYS}
    labels = batch["labels"]
    length = labels.shape[1]
    if logits_to_keep and "prompt_lengths" in batch:
        first = int(batch["prompt_lengths"].min().item())
        inputs["logits_to_keep"] = min(length, max(1, length - first + 1))
    logits = model(**inputs, use_cache=False).logits
    kept = logits.shape[1]
    targets = labels[:, length - kept + 1 :]
    logits = logits[:, :-1]
    mask = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)
    per_row = []
    for row in range(logits.shape[0]):
        row_logits = logits[row].float()
        token_logps = row_logits.gather(-1, safe_targets[row].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(
            row_logits, dim=-1
        )
        per_row.append(torch.where(mask[row], token_logps, 0.0).sum())
    return torch.stack(per_row), mask.sum(dim=1)


def split_rows(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row values -> (chosen [B], rejected [B, Nmax]) using the collator's row indices."""
    chosen = values[batch["chosen_index"]]
    rejected = values[batch["rejected_index"].clamp(min=0)]
    return chosen, torch.where(batch["rejected_mask"], rejected, torch.zeros_like(rejected))


def _callbacks(args: Any, console: Any | None, description: str) -> list[Any]:
    callbacks: list[Any] = [RichProgressCallback(console=console, description=description)]
    if getattr(args, "jsonl_log", False) and args.output_dir:
        callbacks.append(JsonlLogCallback(Path(args.output_dir) / "log.jsonl"))
    return callbacks


def _use_rich_progress(trainer: Trainer) -> None:
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)


# ------------------------------------------------------------------------------------------ trainers
class SFTStageTrainer(Trainer):
    """Stage 1: next-token loss on completion tokens (labels != -100), as the model's own loss computes
    it, but with the LM head run only from the batch's first completion position on (see
    :func:`sft_loss`)."""

    def __init__(self, *args: Any, console: Any | None = None, **kwargs: Any) -> None:
        cfg = kwargs.get("args")
        kwargs.setdefault("callbacks", _callbacks(cfg, console, "SFT"))
        super().__init__(*args, **kwargs)
        _use_rich_progress(self)

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if not getattr(self.args, "sort_accumulated_by_length", False) or dataset is None:
            return super()._get_train_sampler(train_dataset)
        if "length" not in dataset.column_names:
            raise InputError(
                "sort_accumulated_by_length needs the tokenized rows' `length` column (tokenize_sft writes it)"
            )
        step_rows = (
            self.args.per_device_train_batch_size
            * self.args.gradient_accumulation_steps
            * self.args.world_size
        )
        return LengthSortedSteps(dataset["length"], step_rows, self.args.seed)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if "labels" not in inputs or self.label_smoother is not None or not supports_logits_to_keep(model):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # As Trainer: the token count normalises the loss only for a model that takes loss kwargs;
        # for any other the Trainer divides a per-batch mean by the accumulation steps itself.
        if not self.model_accepts_loss_kwargs:
            num_items_in_batch = None
        loss, outputs = sft_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # As Trainer.compute_loss: num_items_in_batch counts every process's tokens, and DDP
            # averages the gradients over processes.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def sft_loss(
    model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
) -> tuple[torch.Tensor, Any]:
    """The causal LM loss over ``inputs["labels"]`` (!= -100, shifted by one), summed over tokens and
    divided by ``num_items_in_batch`` (the Trainer's count over all accumulated batches and
    processes) or, without it, by this batch's label tokens: what the model's own loss gives.

    Only positions from the batch's earliest label on go through the LM head (``logits_to_keep``):
    on a VLM the image and prompt tokens are a large part of every row (about half on the demo's), and
    the head's matrix product and log-softmax over the vocabulary need not run there (5% of the demo
    teacher's step: benchmark/perf/bench_train_step.py)."""
    labels = inputs["labels"]
    length = labels.shape[1]
    labelled = (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero()
    first = int(labelled[0]) + 1 if len(labelled) else length - 1  # position of the first label
    keep = length - first + 1  # logits from position first - 1, which predicts it
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    outputs = model(**model_inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits[:, :-1]
    targets = labels[:, length - keep + 1 :].to(logits.device)
    total = torch.nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    if num_items_in_batch is None:
        count: Any = (targets != IGNORE_INDEX).sum().clamp(min=1)
    else:
        count = (
            num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
        )
    return total / count, outputs


class APOTrainer(Trainer):
    """Stage 2: APO (Autonomous Preference Optimization), one positive vs N negatives per sample.

    ``model`` is the policy (normally a peft LoRA model on top of the Stage-1 model). ``ref_model``: an
    explicit reference; when None the reference is the policy with its adapter disabled (LoRA) or a frozen
    copy of the starting weights (full fine-tuning), unless ``args.precompute_ref_log_probs``."""

    def __init__(
        self,
        model: torch.nn.Module,
        args: APOConfig,
        ref_model: torch.nn.Module | None = None,
        console: Any | None = None,
        **kwargs: Any,
    ) -> None:
        label = "APO" if args.loss_type == "plackett-luce" else f"APO ({args.loss_type})"
        kwargs.setdefault("callbacks", _callbacks(args, console, label))
        self._is_peft = hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
        if ref_model is None and not self._is_peft and not args.precompute_ref_log_probs:
            # Full fine-tuning: the reference is the starting point, frozen.
            ref_model = copy.deepcopy(model)
        super().__init__(model=model, args=args, **kwargs)
        _use_rich_progress(self)
        self.ref_model = ref_model
        if self.ref_model is not None:
            self.ref_model.eval()
            self.ref_model.requires_grad_(False)
            self.ref_model.to(self.args.device)
        # Our loss is a per-sample mean; let Trainer scale it for gradient accumulation.
        self.model_accepts_loss_kwargs = False
        self.console = console
        self._keep_logits = supports_logits_to_keep(model)
        self._metrics: dict[str, dict[str, list[float]]] = {
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self._reference_ready: set[str] = set()
        self._precomputing = False

    # ------------------------------------------------------------------ reference
    @contextlib.contextmanager
    def reference_model(self) -> Iterator[torch.nn.Module]:
        """The module that computes reference log-probs (policy with adapter disabled, or ref_model)."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        if not hasattr(unwrapped, "disable_adapter"):
            if self._precomputing:
                # Full fine-tuning, precomputed before the first step: the model is still the reference.
                yield self.model
                return
            raise RuntimeError("no reference: give ref_model, use LoRA, or precompute_ref_log_probs")
        with unwrapped.disable_adapter():
            yield self.model_wrapped if self.model_wrapped is not None else self.model

    def reference_logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference (chosen [B], rejected [B, N]) summed log-probs for a collated batch."""
        if "ref_chosen_logps" in batch:
            return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        with torch.no_grad(), self.reference_model() as ref:
            logps, _ = completion_logps(ref, batch, self._keep_logits)
        return split_rows(logps.detach(), batch)

    def _reference_cache_path(self, dataset: Any, name: str) -> Path:
        args = self.args
        key = json.dumps(
            {
                "fingerprint": getattr(dataset, "_fingerprint", None),
                "rows": len(dataset),
                "model": str(args.model_name_or_path),
                "max_length": args.max_length,
            },
            sort_keys=True,
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        root = Path(args.reference_cache_dir or Path(args.output_dir) / "reference_logps")
        return root / f"{name}-{digest}.arrow"

    def precompute_reference_logps(self, dataset: Any, name: str = "train") -> Any:
        """Add ``ref_chosen_logps`` / ``ref_rejected_logps`` columns, computed in one pass (cached on disk).

        The cache file is keyed by the tokenized dataset's fingerprint, the model and max_length, written
        atomically, and reused by later runs and resumes."""
        if "ref_chosen_logps" in dataset.column_names:
            return dataset
        path = self._reference_cache_path(dataset, name)
        if not path.exists():
            indexed = dataset.add_column("sample_index", list(range(len(dataset))))
            loader = DataLoader(
                indexed,
                batch_size=self.args.per_device_eval_batch_size,
                collate_fn=self.data_collator,
                shuffle=False,
                num_workers=self.args.dataloader_num_workers,
            )
            loader = self.accelerator.prepare(loader)
            chosen_all: dict[int, float] = {}
            rejected_all: dict[int, list[float]] = {}
            was_training = self.model.training
            self.model.eval()
            if self.state.global_step > 0 and self.ref_model is None and not self._is_peft:
                raise RuntimeError(
                    "full fine-tuning: reference log-probs must be precomputed before training"
                )
            self._precomputing = True
            for batch in loader:
                batch = self._prepare_inputs(batch)
                chosen, rejected = self.reference_logps(
                    {k: v for k, v in batch.items() if not k.startswith("ref_")}
                )
                rejected = rejected.masked_fill(~batch["rejected_mask"], float("nan"))
                rejected = self.accelerator.pad_across_processes(rejected, dim=1, pad_index=float("nan"))
                index, chosen, rejected = self.accelerator.gather_for_metrics(
                    (batch["sample_index"], chosen, rejected)
                )
                for i, c, r in zip(index.tolist(), chosen.tolist(), rejected.tolist(), strict=True):
                    chosen_all[i] = c
                    rejected_all[i] = [v for v in r if v == v]  # drop nan padding
            self._precomputing = False
            self.model.train(was_training)
            if self.accelerator.is_main_process:
                order = sorted(chosen_all)
                table = pa.table(
                    {
                        "sample_index": pa.array(order, pa.int64()),
                        "ref_chosen_logps": pa.array([chosen_all[i] for i in order], pa.float32()),
                        "ref_rejected_logps": pa.array(
                            [rejected_all[i] for i in order], pa.list_(pa.float32())
                        ),
                    }
                )
                # Atomic: a run killed mid-write must not leave a cache file later runs would trust.
                with (
                    atomic_path(path) as tmp,
                    pa.OSFile(str(tmp), "wb") as sink,
                    ipc.new_file(sink, table.schema) as writer,
                ):
                    writer.write_table(table)
            self.accelerator.wait_for_everyone()
        with pa.memory_map(str(path), "r") as source:
            table = ipc.open_file(source).read_all()
        if table.num_rows != len(dataset):
            raise RuntimeError(f"{path}: {table.num_rows} cached reference rows for {len(dataset)} samples")
        dataset = dataset.add_column("ref_chosen_logps", table.column("ref_chosen_logps").to_pylist())
        return dataset.add_column("ref_rejected_logps", table.column("ref_rejected_logps").to_pylist())

    def get_train_dataloader(self) -> Any:
        if self.args.precompute_ref_log_probs and "train" not in self._reference_ready:
            self.train_dataset = self.precompute_reference_logps(self.train_dataset, "train")
            self._reference_ready.add("train")
        return super().get_train_dataloader()

    def get_eval_dataloader(self, eval_dataset: Any = None) -> Any:
        if self.args.precompute_ref_log_probs and eval_dataset is None and self.eval_dataset is not None:
            if "eval" not in self._reference_ready:
                self.eval_dataset = self.precompute_reference_logps(self.eval_dataset, "eval")
                self._reference_ready.add("eval")
        return super().get_eval_dataloader(eval_dataset)

    # ------------------------------------------------------------------ loss
    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        args = self.args
        policy, counts = completion_logps(model, inputs, self._keep_logits)
        policy_chosen, policy_rejected = split_rows(policy, inputs)
        chosen_counts = counts[inputs["chosen_index"]]
        ref_chosen, ref_rejected = self.reference_logps(inputs)
        out = apo_loss(
            policy_chosen,
            policy_rejected,
            ref_chosen,
            ref_rejected,
            inputs["rejected_mask"],
            beta=args.beta,
            loss_type=args.loss_type,
            pairwise_reduction=args.pairwise_reduction,
            nll_alpha=args.nll_alpha,
            chosen_token_counts=chosen_counts,
        )
        loss = out.loss.mean()
        mode = "train" if model.training else "eval"
        metrics = reward_metrics(out, policy_chosen, policy_rejected)
        metrics["negatives"] = inputs["rejected_mask"].sum(dim=1).float()
        for key, value in metrics.items():
            gathered = self.accelerator.gather_for_metrics(value.detach())
            self._metrics[mode][key].append(gathered.float().mean().item())
        if return_outputs:
            return loss, {"chosen_rewards": out.chosen_rewards, "rejected_rewards": out.rejected_rewards}
        return loss

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: Any = None,
    ) -> tuple[torch.Tensor, None, None]:
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        averaged = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        prefix = "eval_" if mode == "eval" else ""
        logs = {**logs, **{prefix + k: v for k, v in averaged.items()}}
        self._metrics[mode].clear()
        super().log(logs, start_time)


# --------------------------------------------------------------------------------- stage runners
def is_main_process() -> bool:
    """Rank 0 (or a single process): the one that prints and writes shared files."""
    return int(os.environ.get("RANK", "0")) == 0


def _report_stats(stats: TruncationStats, console: Any | None, label: str, output_dir: str | None) -> None:
    if not is_main_process():
        return
    if output_dir:
        atomic_write_json(Path(output_dir) / f"{label}_data_stats.json", stats.as_dict())
    if console is not None:
        console.print(f"[bold]{label} data[/]: {data_summary(stats, preferences=label != 'sft')}")


#: The counters a data summary names, in order; preference-only ones are left out of SFT summaries.
_SUMMARY_COUNTERS = (
    ("dropped_prompt_too_long", "dropped: prompt too long", False),
    ("dropped_no_rejected", "dropped: no negatives", True),
    ("dropped_invalid", "dropped: invalid", False),
    ("dropped_bad_image", "dropped: bad image", False),
    ("truncated_chosen", "truncated completions", False),
    ("truncated_rejected", "truncated negatives", True),
    ("empty_rejected", "empty negatives", True),
    ("identical_rejected", "negatives identical to the positive", True),
)


def data_summary(stats: TruncationStats, preferences: bool) -> str:
    """One line: samples kept, then only the counters that apply to the stage and are not zero."""
    d = stats.as_dict()
    parts = [
        f"{name} {d[key]}"
        for key, name, apo_only in _SUMMARY_COUNTERS
        if d[key] and (preferences or not apo_only)
    ]
    return f"{d['samples_kept']}/{d['samples_in']} samples kept" + (f"; {', '.join(parts)}" if parts else "")


def _prepare_model(cfg: SFTStageConfig | APOConfig) -> tuple[Any, Any]:
    if not cfg.model_name_or_path:
        raise InputError("model_name_or_path is required")
    processor = load_processor(processor_source(cfg.model_name_or_path))
    # Seeded here, not only in Trainer.__init__: the fresh LoRA weights are drawn before the trainer exists.
    set_seed(cfg.seed)
    model = load_model(cfg.model_name_or_path, cfg.torch_dtype, cfg.attn_implementation)
    if cfg.use_lora:
        model = attach_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets())
    if cfg.gradient_checkpointing:
        model.config.use_cache = False
        if cfg.use_lora and hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return model, processor


def _encoder(
    cfg: SFTStageConfig | APOConfig, processor: Any, dataset: Any, console: Any | None
) -> ChatEncoder:
    """The chat encoder of a stage; a vision-language model given rows with images but no image root
    (``--mimic-root``) trains on text only, which it says rather than doing silently."""
    encoder = ChatEncoder(
        processor,
        cfg.image_root,
        cfg.max_edge,
        cfg.max_pixels,
        cfg.system_prompt,
        cfg.image_jpeg_quality,
        cfg.image_cache_size,
    )
    if encoder.is_vlm and encoder.image_root is None and "image_path" in dataset.column_names:
        with_image = sum(path is not None for path in dataset["image_path"])
        if with_image and is_main_process():
            message = (
                f"warning: {cfg.model_name_or_path} is a vision-language model and {with_image} rows have "
                "an image, but no image root was given (--mimic-root): training on text only"
            )
            if console is not None:
                console.print(message, style="yellow", markup=False, highlight=False)
            else:
                print(message, file=sys.stderr)
    return encoder


def save_outputs(trainer: Trainer, processor: Any, cfg: SFTStageConfig | APOConfig) -> dict[str, str]:
    """Save the adapter (or full model) + processor to output_dir; with merge_adapter also OUTPUT/merged."""
    out = Path(cfg.output_dir)
    trainer.save_model(str(out))
    saved = {"model": str(out)}
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(str(out))
    model = trainer.accelerator.unwrap_model(trainer.model)
    if cfg.merge_adapter and hasattr(model, "merge_and_unload"):
        merged_dir = out / "merged"
        if trainer.accelerator.is_main_process:
            # Training is over and the adapter is saved: merge in place (no second copy of the weights).
            merged = model.merge_and_unload()
            merged.save_pretrained(str(merged_dir))
            processor.save_pretrained(str(merged_dir))
        saved["merged"] = str(merged_dir)
    return saved


#: Written to a stage's output folder when training is interrupted: the checkpoint a rerun resumes from.
INTERRUPTED_FILE = "interrupted.json"


def interrupted_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint an interrupted run of this stage saved (None when the last run was not
    interrupted, or its checkpoint is gone)."""
    marker = Path(output_dir) / INTERRUPTED_FILE
    try:
        checkpoint = Path(output_dir) / json.loads(marker.read_text(encoding="utf-8"))["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return checkpoint if checkpoint.is_dir() else None


#: Written to a stage's output folder when its training finished and its outputs were saved: the
#: settings it ran with, so a rerun of ``--stage all`` that resumes Stage 2 can keep Stage 1.
COMPLETED_FILE = "completed.json"


def stage_settings(cfg: Any) -> dict[str, Any]:
    """A stage's settings as JSON values (what :data:`COMPLETED_FILE` records and reruns compare)."""
    return json.loads(cfg.to_json_string())


def completed_with(output_dir: str | Path, cfg: Any) -> dict[str, Any] | None:
    """What the stage in ``output_dir`` recorded when it finished (its step and saved paths), when it
    finished with exactly ``cfg``'s settings; else None."""
    try:
        recorded = json.loads((Path(output_dir) / COMPLETED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("settings") != stage_settings(cfg):
        return None
    return recorded


def _stop_interrupted(trainer: Any, cfg: Any, signum: int) -> TrainingInterrupted:
    """Record the checkpoint the interrupted training saved; the error says how to resume."""
    step = trainer.state.global_step
    checkpoint = Path(cfg.output_dir) / f"checkpoint-{step}"
    if trainer.is_world_process_zero():
        atomic_write_json(
            Path(cfg.output_dir) / INTERRUPTED_FILE, {"checkpoint": checkpoint.name, "step": step}
        )
    return TrainingInterrupted(
        f"checkpoint saved at {checkpoint} (step {step} of {trainer.state.max_steps}); "
        "run the same command again to resume from it",
        signum,
    )


def _train_and_save(
    trainer: Any,
    processor: Any,
    cfg: Any,
    stats: Any,
    resume_from_checkpoint: str | bool | None,
    console: Any | None = None,
) -> dict[str, Any]:
    """Train either stage, save its outputs and return paths, data counts, metrics and the log.

    Ctrl-C or SIGTERM while training saves a checkpoint and raises TrainingInterrupted; the next run
    of the stage (without an explicit ``resume_from_checkpoint``) resumes from that checkpoint."""
    if resume_from_checkpoint is None:
        checkpoint = interrupted_checkpoint(cfg.output_dir)
        if checkpoint is not None:
            resume_from_checkpoint = str(checkpoint)
            if console is not None and is_main_process():
                console.print(f"resuming the interrupted run from {checkpoint}")
    if trainer.is_world_process_zero():  # a retrain that stops half way is not a finished stage
        (Path(cfg.output_dir) / COMPLETED_FILE).unlink(missing_ok=True)
    interrupt = InterruptCallback()
    trainer.add_callback(interrupt)
    try:
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    finally:
        interrupt.restore()
    if interrupt.signum is not None:
        raise _stop_interrupted(trainer, cfg, interrupt.signum)
    if trainer.is_world_process_zero():
        (Path(cfg.output_dir) / INTERRUPTED_FILE).unlink(missing_ok=True)
    saved = save_outputs(trainer, processor, cfg)
    if trainer.is_world_process_zero():
        atomic_write_json(
            Path(cfg.output_dir) / COMPLETED_FILE,
            {"step": trainer.state.global_step, "saved": saved, "settings": stage_settings(cfg)},
        )
    return {
        "saved": saved,
        "stats": stats.as_dict(),
        "metrics": result.metrics,
        "log_history": trainer.state.log_history,
    }


def run_sft(
    cfg: SFTStageConfig,
    console: Any | None = None,
    resume_from_checkpoint: str | bool | None = None,
) -> dict[str, Any]:
    """Stage 1: load model + OUT/sft, tokenize (reporting truncation), train, save. Returns paths + stats."""
    train_raw = load_split(cfg.dataset_path, cfg.dataset_split, ("prompt", "completion"))
    model, processor = _prepare_model(cfg)
    encoder = _encoder(cfg, processor, train_raw, console)
    train, stats = tokenize_sft(
        train_raw,
        encoder,
        cfg.max_length,
        cfg.min_completion_tokens,
        cfg.lenient,
        cfg.dataset_num_proc,
        source=Path(cfg.dataset_path) / cfg.dataset_split,
    )
    _report_stats(stats, console, "sft", cfg.output_dir)
    eval_ds = None
    if cfg.eval_split:
        eval_raw = load_split(cfg.dataset_path, cfg.eval_split, ("prompt", "completion"))
        eval_ds, _ = tokenize_sft(
            eval_raw, encoder, cfg.max_length, cfg.min_completion_tokens, True, cfg.dataset_num_proc
        )
    trainer = SFTStageTrainer(
        model=model,
        args=cfg,
        train_dataset=train,
        eval_dataset=eval_ds,
        data_collator=SFTCollator(encoder),
        console=console,
    )
    return _train_and_save(trainer, processor, cfg, stats, resume_from_checkpoint, console)


def run_apo(
    cfg: APOConfig,
    console: Any | None = None,
    resume_from_checkpoint: str | bool | None = None,
) -> dict[str, Any]:
    """Stage 2: load the Stage-1 model (also the reference) + OUT/preferences, tokenize, train APO, save."""
    needed = ("prompt", "chosen", "rejected")
    train_raw = load_split(cfg.dataset_path, cfg.dataset_split, needed)
    model, processor = _prepare_model(cfg)
    encoder = _encoder(cfg, processor, train_raw, console)
    train, stats = tokenize_preferences(
        train_raw,
        encoder,
        cfg.max_length,
        cfg.max_negatives,
        cfg.min_completion_tokens,
        cfg.lenient,
        cfg.dataset_num_proc,
        source=Path(cfg.dataset_path) / cfg.dataset_split,
    )
    _report_stats(stats, console, "apo", cfg.output_dir)
    eval_ds = None
    if cfg.eval_split:
        eval_raw = load_split(cfg.dataset_path, cfg.eval_split, needed)
        eval_ds, _ = tokenize_preferences(
            eval_raw,
            encoder,
            cfg.max_length,
            cfg.max_negatives,
            cfg.min_completion_tokens,
            True,
            cfg.dataset_num_proc,
        )
    trainer = APOTrainer(
        model=model,
        args=cfg,
        train_dataset=train,
        eval_dataset=eval_ds,
        data_collator=APOCollator(encoder),
        console=console,
    )
    return _train_and_save(trainer, processor, cfg, stats, resume_from_checkpoint, console)


#: The names other engineers' interface notes use.
SFTStage = SFTStageTrainer
