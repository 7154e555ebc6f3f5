"""CLI for the train area: `cxrmax train-apo` (Stage 1 SFT bootstrapping, Stage 2 APO).

APO here is Autonomous Preference Optimization (the paper's method: a consensus positive against the
drifting source trajectories, multi-negative Plackett-Luce). TRL's loss_type="apo_zero"/"apo_down"
is Anchored Preference Optimization, a different method with the same acronym.
"""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from typing import Any

import typer

from cxrmax.cli.common import console, interruptible, user_errors
from cxrmax.cli.options import REPORT_TO, Choice, choice_option, out_option, quiet_libraries, verbose_option
from cxrmax.core.hf import adapter_base

#: Flags that set a `apo_train.pipeline.PipelineSpec` attribute: parameter -> attribute.
SPEC_FLAGS = {
    "model": "model",
    "sft_data": "sft_data",
    "preferences": "preferences",
    "out": "out",
    "mimic_root": "mimic_root",
    "consensus": "consensus",
    "trajectories": "trajectories",
}
#: Flags that set one config field of both stages: parameter -> field (None leaves the field alone).
BOTH_STAGE_FLAGS = {
    "max_edge": "max_edge",
    "epochs": "num_train_epochs",
    "max_steps": "max_steps",
    "global_batch": "global_batch_size",
    "per_device_batch": "per_device_train_batch_size",
    "max_length": "max_length",
    "lora_r": "lora_r",
    "lora_alpha": "lora_alpha",
    "lora_targets": "lora_target_modules",
    "bf16": "bf16",
    "seed": "seed",
    "logging_steps": "logging_steps",
    "save_steps": "save_steps",
    "deepspeed": "deepspeed",
    "report_to": "report_to",
}
#: Switches (off by default) of both stages: parameter -> (field, the value it gets when on).
BOTH_STAGE_SWITCHES: dict[str, tuple[str, Any]] = {
    "full_finetune": ("use_lora", False),
    "merge": ("merge_adapter", True),
    "gradient_checkpointing": ("gradient_checkpointing", True),
    "lenient": ("lenient", True),
    "cpu": ("use_cpu", True),
    # The old spelling of --report-to tensorboard (hidden).
    "tensorboard": ("report_to", ["tensorboard"]),
}
#: Learning-rate flags: parameter -> the stage whose learning_rate it sets ("single": the --stage run).
LR_FLAGS = {"lr": "single", "sft_lr": "sft", "apo_lr": "apo"}
#: Stage-2 (APOConfig) flags: parameter -> field.
APO_FLAGS = {"loss": "loss_type", "beta": "beta", "nll_alpha": "nll_alpha", "max_negatives": "max_negatives"}
#: Stage-2 switches: parameter -> (field, the value it gets when on).
APO_SWITCHES: dict[str, tuple[str, Any]] = {"precompute_ref": ("precompute_ref_log_probs", True)}
#: Parameters that steer the command instead of naming one field.
CONTROL_FLAGS = ("stage", "config", "resume", "set_values", "verbose")
#: Fields defined by apo_train/config.py that have no flag of their own: set them in the TOML/YAML
#: config or with --set (every TrainingArguments field is reachable that way too). A new config
#: field goes either into a flag table above or here (tests/cli/test_train_flags.py checks it).
CONFIG_ONLY = {
    "model_name_or_path": "filled from --model (or the Stage-1 output for apo)",
    "dataset_path": "filled from --sft-data / --preferences",
    "image_root": "filled from --mimic-root",
    "dataset_split": "rarely changed (train)",
    "eval_split": "optional evaluation split",
    "max_pixels": "optional pixel cap",
    "image_jpeg_quality": "optional JPEG round trip of the training pixels (the demo: 90, as generate serves)",
    "image_cache_size": "vision tensors kept in memory per data loader worker (the demo: every image)",
    "system_prompt": "optional system message",
    "min_completion_tokens": "data filter",
    "dataset_num_proc": "tokenization processes",
    "lora_dropout": "LoRA detail",
    "torch_dtype": "model loading detail",
    "attn_implementation": "model loading detail",
    "jsonl_log": "logging detail",
    "warmup_steps": "schedule detail",
    "lr_scheduler_type": "schedule detail",
    "remove_unused_columns": "must stay False for the collators",
    "pairwise_reduction": "pairwise loss only",
    "reference_cache_dir": "default OUTPUT/reference_logps",
    "sort_accumulated_by_length": "Stage-1 padding saver with gradient accumulation (the demo's SFT students use it)",
}


def apply_flags(spec: Any, flags: dict[str, Any]) -> None:
    """Apply train-apo's flag values (parameter name -> value; None or False: not given) onto ``spec``
    through the tables above, in precedence order: shared fields, learning rates, stage-2 fields,
    then --set."""
    from cxrmax.core.errors import InputError

    stage = flags["stage"]
    spec.stage = stage
    for name, attribute in SPEC_FLAGS.items():
        if flags.get(name) is not None:
            setattr(spec, attribute, str(flags[name]))
    if flags.get("lr") is not None and stage == "all":
        raise InputError("--lr is for a single --stage; use --sft-lr / --apo-lr with --stage all")
    both = {key: _plain(flags[name]) for name, key in BOTH_STAGE_FLAGS.items() if flags.get(name) is not None}
    # Copy list values: the tables are module constants and stage configs may be edited later.
    both.update(
        {key: copy.copy(value) for name, (key, value) in BOTH_STAGE_SWITCHES.items() if flags.get(name)}
    )
    spec.sft.update(both)
    spec.apo.update(both)
    for name, target in LR_FLAGS.items():
        if flags.get(name) is not None:
            if target == "single":
                target = "sft" if stage == "sft" else "apo"
            getattr(spec, target)["learning_rate"] = flags[name]
    spec.apo.update({key: flags[name] for name, key in APO_FLAGS.items() if flags.get(name) is not None})
    spec.apo.update({key: value for name, (key, value) in APO_SWITCHES.items() if flags.get(name)})
    _apply_set_values(spec, flags.get("set_values") or [])
    resume = flags.get("resume")
    if resume is not None:
        spec.resume = True if resume == "latest" else resume


def _plain(value: Any) -> Any:
    """Paths as strings (the config fields are str)."""
    return str(value) if isinstance(value, Path) else value


def _parse_value(text: str) -> Any:
    """--set values: JSON when it parses (numbers, true/false, null, lists), else the plain string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _apply_set_values(spec: Any, items: list[str]) -> None:
    """Apply --set KEY=VALUE / sft.KEY=VALUE / apo.KEY=VALUE, rejecting unknown fields like config files do."""
    from apo_train.config import APOConfig, SFTStageConfig, config_field_names
    from cxrmax.core.errors import InputError

    allowed = {"sft": config_field_names(SFTStageConfig), "apo": config_field_names(APOConfig)}
    for item in items:
        key, sep, raw = item.partition("=")
        scope, _, name = key.strip().rpartition(".")
        if not sep or not name:
            raise InputError(f"--set {item!r}: expected KEY=VALUE")
        stages = {"": ("sft", "apo"), "sft": ("sft",), "apo": ("apo",)}.get(scope)
        if stages is None:
            raise InputError(f"--set {item!r}: the scope must be sft. or apo.")
        valid = [s for s in stages if name in allowed[s]]
        if not valid:
            raise InputError(f"--set {item!r}: unknown setting {name!r}")
        for stage_name in valid:
            getattr(spec, stage_name)[name] = _parse_value(raw)


def train_apo(
    stage: str = choice_option(
        "all",
        "--stage",
        # apo_train checks it (a config file's stage too): one message for both.
        choices=Choice(("sft", "apo", "all"), check=False),
        help="all: SFT, the optional model consensus, then APO.",
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="TOML or YAML config (flags override it)."
    ),
    model: str | None = typer.Option(
        None, "--model", "-m", help="Base model (sft/all) or Stage-1 model (apo)."
    ),
    sft_data: Path | None = typer.Option(None, "--sft-data", help="build-preferences' OUT/sft."),
    preferences: Path | None = typer.Option(
        None, "--preferences", help="build-preferences' OUT/preferences."
    ),
    out: Path | None = out_option("Run folder: OUT/sft, OUT/apo (default runs/apo)."),
    mimic_root: Path | None = typer.Option(
        None, "--mimic-root", help="MIMIC-CXR root for images (omit: text only)."
    ),
    max_edge: int | None = typer.Option(
        None, "--max-edge", help="Image longest edge (default 1024, as generate)."
    ),
    loss: str | None = choice_option(
        None,
        "--loss",
        choices=Choice(("plackett-luce", "pairwise", "listwise")),
        help="APO loss (default plackett-luce).",
    ),
    beta: float | None = typer.Option(None, "--beta", help="APO reward scale (default 0.1)."),
    lr: float | None = typer.Option(
        None, "--lr", help="Learning rate of a single --stage (sft 1e-4, apo 5e-7)."
    ),
    sft_lr: float | None = typer.Option(None, "--sft-lr", help="Stage-1 learning rate (default 1e-4)."),
    apo_lr: float | None = typer.Option(None, "--apo-lr", help="Stage-2 learning rate (default 5e-7)."),
    epochs: float | None = typer.Option(None, "--epochs", help="Epochs per stage (default 1)."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimizer steps per stage."),
    global_batch: int | None = typer.Option(
        None, "--global-batch", help="Samples per optimizer step (default 32)."
    ),
    per_device_batch: int | None = typer.Option(
        None, "--per-device-batch", help="Samples per device per micro-step."
    ),
    max_length: int | None = typer.Option(
        None, "--max-length", help="Tokens per row (default 2304 sft / 4096 apo)."
    ),
    lora_r: int | None = typer.Option(None, "--lora-r", help="LoRA rank (default 8)."),
    lora_alpha: int | None = typer.Option(None, "--lora-alpha", help="LoRA alpha (default 32)."),
    lora_targets: str | None = typer.Option(
        None, "--lora-targets", help="'all-linear' (default) or q_proj,v_proj,..."
    ),
    full_finetune: bool = typer.Option(False, "--full-finetune", help="Train all weights instead of LoRA."),
    precompute_ref: bool = typer.Option(
        False, "--precompute-ref", help="Compute reference log-probs in one pass first (cached on disk)."
    ),
    nll_alpha: float | None = typer.Option(
        None, "--nll-alpha", help="Add alpha x NLL of the positive (default 0)."
    ),
    max_negatives: int | None = typer.Option(
        None, "--max-negatives", help="Keep at most K most drifting negatives."
    ),
    merge: bool = typer.Option(
        False, "--merge", help="Also save the adapter merged into the model (OUT/<stage>/merged)."
    ),
    bf16: bool | None = typer.Option(
        None, "--bf16/--no-bf16", help="bf16 mixed precision (default: on when the GPU has it)."
    ),
    gradient_checkpointing: bool = typer.Option(
        False, "--gradient-checkpointing", help="Trade compute for memory."
    ),
    deepspeed: Path | None = typer.Option(None, "--deepspeed", help="DeepSpeed JSON config (e.g. ZeRO-2)."),
    consensus: str | None = choice_option(
        None,
        "--consensus",
        choices=Choice(("none", "model")),
        help="--stage all: model rebuilds the positives with the Stage-1 model (default none).",
    ),
    trajectories: Path | None = typer.Option(
        None, "--trajectories", help="generate's OUT (for --consensus model)."
    ),
    resume: str | None = typer.Option(None, "--resume", help="Checkpoint dir, or 'latest' (single stage)."),
    report_to: str | None = choice_option(
        None,
        "--report-to",
        choices=Choice(REPORT_TO),
        help="Where transformers reports the training logs (default none; tensorboard writes OUT/<stage>/runs).",
    ),
    tensorboard: bool = typer.Option(
        False, "--tensorboard", hidden=True, help="Old spelling of --report-to tensorboard."
    ),
    lenient: bool = typer.Option(False, "--lenient", help="Drop and count invalid rows instead of failing."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed (default 42)."),
    logging_steps: int | None = typer.Option(None, "--logging-steps", help="Log every N steps (default 10)."),
    save_steps: int | None = typer.Option(
        None, "--save-steps", help="Checkpoint every N steps (default 500)."
    ),
    cpu: bool = typer.Option(False, "--cpu", help="Force CPU even when a GPU is present."),
    set_values: list[str] = typer.Option(
        [],
        "--set",
        help="Any config field: KEY=VALUE for both stages, sft.KEY=VALUE or apo.KEY=VALUE (repeatable).",
    ),
    verbose: bool = verbose_option(),
) -> None:
    """Train with APO (Autonomous Preference Optimization): SFT bootstrapping, then a consensus positive against the drifting source trajectories with a multi-negative Plackett-Luce loss.

    Defaults are the paper's: LoRA r=8 alpha=32 on all linear layers, 1 epoch, global batch 32; SFT lr 1e-4 with 5% warmup and max length 2304; APO lr 5e-7, beta 0.1, max length 4096. Runs on transformers' Trainer: `accelerate launch -m cxrmax train-apo ...` or torchrun for several GPUs, --deepspeed for ZeRO-2/3. Not TRL's apo_zero/apo_down, which are Anchored Preference Optimization.

    Examples:

      cxrmax train-apo --stage all --model Qwen/Qwen2.5-VL-7B-Instruct --sft-data runs/cxrmax/sft --preferences runs/cxrmax/preferences --mimic-root /data/mimic-cxr-jpg --out runs/apo

      cxrmax train-apo --stage apo --config apo.toml --loss listwise --precompute-ref

      cxrmax train-apo --stage apo --model runs/apo/sft --preferences prefs --set apo.nll_alpha=0.2
    """
    flags = dict(locals())  # every parameter above, by name: the flag tables map them onto fields
    from apo_train.pipeline import PipelineSpec, read_config_file, run_pipeline, spec_from_config
    from cxrmax.preferences.build import rebuild_with_model_consensus

    with (
        user_errors(),
        quiet_libraries(verbose),
        interruptible("no checkpoint was saved; run the same command again"),
    ):
        spec = spec_from_config(read_config_file(config), str(config)) if config else PipelineSpec()
        apply_flags(spec, flags)
        results = run_pipeline(spec, console=console, rebuild=rebuild_with_model_consensus)
        from apo_train.trainer import is_main_process

        for name, result in results.items() if is_main_process() else ():
            if "skipped" in result:
                console.print(f"[green]{name} kept[/]: {_saved_what(result['saved'])} ({result['skipped']})")
                continue
            history = [h for h in result["log_history"] if "loss" in h]
            last = history[-1] if history else {}
            shown = ", ".join(
                f"{k}={last[k]:.4g}" for k in ("loss", "rewards/accuracies", "rewards/margins") if k in last
            )
            console.print(
                f"[green]{name} done[/]: saved {_saved_what(result['saved'])}"
                + (f" ({shown})" if shown else "")
            )
        if results and is_main_process():
            console.print("next, evaluate it on the test split beside the sources:")
            # Plain print, no markup or folding: the line is meant to be copied into a shell.
            typer.echo(evaluate_command(spec, list(results.values())[-1]["saved"]))


def _evaluated_path(saved: dict[str, str]) -> str:
    """What `cxrmax evaluate` should load of a stage's outputs: the merged model when saved (no
    merge at load time), else the adapter (or full model) folder."""
    return saved.get("merged") or saved["model"]


def _saved_what(saved: dict[str, str]) -> str:
    """Whether a stage saved a LoRA adapter, a full model, or an adapter and its merged model."""
    kind = "a LoRA adapter" if adapter_base(saved["model"]) else "a full model"
    text = f"{kind} in {saved['model']}"
    if saved.get("merged"):
        text += f" and the merged model in {saved['merged']}"
    return text


def evaluate_command(spec: Any, saved: dict[str, str]) -> str:
    """The `cxrmax evaluate` command line for a stage's outputs, quoted for a POSIX shell: the
    training's MIMIC-CXR root (a placeholder when it had none), OUT/eval, and the sources' generate
    output when the run was given one."""
    args = ["cxrmax", "evaluate", _evaluated_path(saved)]
    args += ["--mimic-root", spec.mimic_root or "MIMIC_ROOT"]
    args += ["--out", str(Path(spec.out) / "eval")]
    if spec.trajectories:
        args += ["--sources", str(spec.trajectories)]
    return shlex.join(args)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command(
        "train-apo",
        help=(train_apo.__doc__ or "").strip(),
    )(train_apo)
