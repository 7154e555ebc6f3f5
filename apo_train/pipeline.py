"""The `cxrmax train-apo` pipeline: config files + flags -> stage configs -> SFT, consensus, APO.

Config file (TOML or YAML), all keys optional; precedence: paper defaults < top-level keys < the
stage's section < command-line flags:

    model = "Qwen/Qwen2.5-VL-7B-Instruct"   # base model (Stage 1 input)
    out = "runs/apo"                        # Stage 1 -> out/sft, consensus -> out/consensus, Stage 2 -> out/apo
    mimic_root = "/data/mimic-cxr-jpg"      # images (image_path is relative to it)
    sft_data = "runs/cxrmax/sft"            # build-preferences' OUT/sft
    preferences = "runs/cxrmax/preferences" # build-preferences' OUT/preferences
    trajectories = "runs/cxrmax"            # generate's OUT (only for consensus = "model")
    consensus = "none"                      # none | model (rebuild positives with the Stage-1 model)
    bf16 = true                             # any field of both stage configs may be set here
    [sft]                                   # SFTStageConfig fields
    learning_rate = 1e-4
    [apo]                                   # APOConfig fields: beta, loss_type, precompute_ref_log_probs...
    loss_type = "plackett-luce"
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import yaml
from accelerate import PartialState

from apo_train.config import APOConfig, SFTStageConfig, config_field_names
from apo_train.data import load_split
from apo_train.trainer import completed_with, interrupted_checkpoint, run_apo, run_sft
from cxrmax.core.errors import InputError, where

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

#: Top-level keys that are not config fields.
PIPELINE_KEYS = {
    "model",
    "out",
    "mimic_root",
    "sft_data",
    "preferences",
    "trajectories",
    "consensus",
    "sft",
    "apo",
}
STAGES = ("sft", "apo", "all")


@dataclass
class PipelineSpec:
    """What to run: paths plus per-stage field overrides (already merged in precedence order)."""

    stage: str = "all"
    model: str | None = None
    out: str = "runs/apo"
    mimic_root: str | None = None
    sft_data: str | None = None
    preferences: str | None = None
    trajectories: str | None = None
    consensus: str = "none"
    sft: dict[str, Any] = field(default_factory=dict)
    apo: dict[str, Any] = field(default_factory=dict)
    resume: str | bool | None = None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Parse a TOML (.toml) or YAML (.yaml/.yml) config; InputError names the file on bad syntax."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where(path)}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            raise InputError(f"{where(path)}: config must be .toml, .yaml/.yml or .json")
    except InputError:
        raise
    except Exception as exc:  # tomllib/yaml/json errors carry the line number in their message
        raise InputError(f"{where(path)}: cannot parse config: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{where(path)}: the config must be a mapping of keys to values")
    return data


def _check_fields(values: dict[str, Any], allowed: set[str], source: str, section: str | None) -> None:
    for key in values:
        if key not in allowed:
            raise InputError(
                f"{where(source, field=key if section is None else f'{section}.{key}')}: unknown setting"
            )


def spec_from_config(data: dict[str, Any], source: str = "config") -> PipelineSpec:
    """Split a parsed config into a PipelineSpec (top-level fields go to both stages where valid)."""
    sft_fields, apo_fields = config_field_names(SFTStageConfig), config_field_names(APOConfig)
    spec = PipelineSpec()
    for key in ("model", "out", "mimic_root", "sft_data", "preferences", "trajectories", "consensus"):
        if key in data:
            setattr(spec, key, None if data[key] is None else str(data[key]))
    shared = {k: v for k, v in data.items() if k not in PIPELINE_KEYS}
    _check_fields(shared, sft_fields | apo_fields, source, None)
    spec.sft = {k: v for k, v in shared.items() if k in sft_fields}
    spec.apo = {k: v for k, v in shared.items() if k in apo_fields}
    for section, allowed, target in (("sft", sft_fields, spec.sft), ("apo", apo_fields, spec.apo)):
        values = data.get(section) or {}
        if not isinstance(values, dict):
            raise InputError(f"{where(source, field=section)}: must be a table/mapping")
        _check_fields(values, allowed, source, section)
        target.update(values)
    return spec


def _auto_bf16() -> bool:
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def stage_config(spec: PipelineSpec, stage: str, model: str | None, dataset: str | None) -> Any:
    """Build the SFTStageConfig or APOConfig for one stage from the spec (paths filled in)."""
    cls = SFTStageConfig if stage == "sft" else APOConfig
    values = dict(spec.sft if stage == "sft" else spec.apo)
    values.setdefault("output_dir", str(Path(spec.out) / stage))
    values.setdefault("model_name_or_path", model)
    values.setdefault("dataset_path", dataset)
    if spec.mimic_root is not None:
        values.setdefault("image_root", spec.mimic_root)
    if "bf16" not in values and "fp16" not in values:
        values["bf16"] = _auto_bf16()
    if not values.get("model_name_or_path"):
        raise InputError(f"{stage}: no model given (--model or `model` in the config)")
    if not values.get("dataset_path"):
        flag = "--sft-data" if stage == "sft" else "--preferences"
        raise InputError(f"{stage}: no data given ({flag} or the config)")
    try:
        return cls(**values)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{stage} settings: {exc}") from exc


def stage1_output(cfg: Any) -> str:
    """The Stage-1 result Stage 2 starts from: the merged model when saved, else the adapter dir."""
    merged = Path(cfg.output_dir) / "merged"
    return str(merged if merged.is_dir() else cfg.output_dir)


class RebuildPreferences(Protocol):
    """Rebuilds the preference data with model consensus: what ``consensus = "model"`` runs.

    Called on the main process only, with generate's OUT (``sources``), the folder to build in and
    the settings of the consensus model (the Stage-1 model, served in-process by the transformers
    backend); returns build-preferences' summary (its ``counts`` are printed). The training package
    does not import the data stage: the caller (``cxrmax train-apo``) supplies this, e.g.

        lambda sources, out, **kw: build_preferences(sources, out, BuildOptions(consensus="model", **kw))
    """

    def __call__(
        self, sources: list[str], out: Path, *, mimic_root: Path | None, model_backend: dict[str, Any]
    ) -> Any: ...


def rebuild_preferences_with_model(
    spec: PipelineSpec, stage1_model: str, rebuild: RebuildPreferences, console: Any | None = None
) -> str:
    """Model-based consensus (the paper's in-context extraction) with the Stage-1 student, through the
    ``rebuild`` callback (build-preferences' Python API). Returns the new preferences dir."""
    if not spec.trajectories:
        raise InputError("--consensus model needs --trajectories (generate's OUT)")
    out = Path(spec.out) / "consensus"
    if console is not None:
        console.print(f"[bold]consensus[/]: rebuilding positives with the Stage-1 model {stage1_model}")
    state = PartialState()
    if state.is_main_process:  # one writer under torchrun / accelerate launch; the others wait
        summary = rebuild(
            [spec.trajectories],
            out,
            mimic_root=Path(spec.mimic_root) if spec.mimic_root else None,
            model_backend={"backend": "transformers", "model": stage1_model, "image_root": spec.mimic_root},
        )
        counts = getattr(summary, "counts", {}) or {}
        if console is not None:
            console.print(
                f"[bold]consensus[/]: {counts.get('preference_rows', 0)} samples, "
                f"{counts.get('consensus_model_requests', 0)} model requests, "
                f"{counts.get('consensus_model_failures', 0)} failed (those keep the vote positive), "
                f"{counts.get('consensus_flagged_model', 0)} flagged"
            )
    state.wait_for_everyone()
    return str(out / "preferences")


def _check_data(spec: PipelineSpec, model_consensus: bool) -> None:
    """Open each stage's training split (memory-mapped, so cheap) before any model is loaded: a
    missing or empty split fails in a second instead of after loading the model. Stage 2's data is
    checked up front unless Stage 1's model rebuilds it."""
    if spec.stage in ("sft", "all"):
        cfg = stage_config(spec, "sft", spec.model, spec.sft_data)
        load_split(cfg.dataset_path, cfg.dataset_split, ("prompt", "completion"))
    if spec.stage == "apo" or (spec.stage == "all" and not model_consensus):
        # Under --stage all Stage 2's model is Stage 1's output: any name passes stage_config here.
        model = spec.model if spec.stage == "apo" else "stage-1"
        cfg = stage_config(spec, "apo", model, spec.preferences)
        load_split(cfg.dataset_path, cfg.dataset_split, ("prompt", "chosen", "rejected"))


def _resumes_stage2(
    spec: PipelineSpec, sft_cfg: Any, stage1_model: str, preferences: str | None, model_consensus: bool
) -> bool:
    """Whether ``--stage all`` picks up an interrupted Stage 2: Stage 1 finished with exactly these
    settings (its ``completed.json``) and Stage 2 left an interrupted checkpoint. Retraining Stage 1
    would throw away its model and make the checkpoint's reference model another one."""
    if spec.stage != "all" or completed_with(sft_cfg.output_dir, sft_cfg) is None:
        return False
    if model_consensus:  # Stage 2 trains on the rebuilt preferences; they must be there as well
        preferences = str(Path(spec.out) / "consensus" / "preferences")
        if not Path(preferences).is_dir():
            return False
    apo_cfg = stage_config(spec, "apo", stage1_model, preferences)
    return interrupted_checkpoint(apo_cfg.output_dir) is not None


def run_pipeline(
    spec: PipelineSpec, console: Any | None = None, rebuild: RebuildPreferences | None = None
) -> dict[str, Any]:
    """Run the requested stage(s). Returns {stage: result dict} (see trainer.run_sft / run_apo).

    ``rebuild`` rebuilds the preferences with the Stage-1 model between the stages (``--stage all``
    with ``consensus = "model"``); it is required there and unused otherwise."""
    if spec.stage not in STAGES:
        raise InputError(f"--stage must be one of {STAGES}, not {spec.stage!r}")
    if spec.consensus not in ("none", "model"):
        raise InputError(f"--consensus must be none or model, not {spec.consensus!r}")
    if spec.stage == "all" and spec.consensus == "model" and not spec.trajectories:
        # Checked before Stage 1 so a long SFT run does not end in this error.
        raise InputError("--consensus model needs --trajectories (generate's OUT)")
    model_consensus = spec.stage == "all" and spec.consensus == "model"
    if model_consensus and rebuild is None:
        raise InputError(
            "--consensus model needs a rebuild callback: run_pipeline(..., rebuild=...) with "
            "build-preferences (see apo_train.pipeline.RebuildPreferences)"
        )
    _check_data(spec, model_consensus)
    results: dict[str, Any] = {}
    apo_model = spec.model
    preferences = spec.preferences
    if spec.stage in ("sft", "all"):
        sft_cfg = stage_config(spec, "sft", spec.model, spec.sft_data)
        if model_consensus:
            sft_cfg.merge_adapter = True  # the consensus backend loads a full model dir
        if _resumes_stage2(spec, sft_cfg, stage1_output(sft_cfg), preferences, model_consensus):
            if console is not None:
                console.print(
                    f"[bold]sft[/]: kept: Stage 1 finished in {sft_cfg.output_dir} with these settings and "
                    "Stage 2 was interrupted; resuming Stage 2"
                )
            finished = completed_with(sft_cfg.output_dir, sft_cfg) or {}
            results["sft"] = {
                "skipped": "finished with the same settings",
                "saved": finished.get("saved") or {"model": sft_cfg.output_dir},
                "log_history": [],
            }
        else:
            results["sft"] = run_sft(
                sft_cfg, console=console, resume_from_checkpoint=spec.resume if spec.stage == "sft" else None
            )
        apo_model = stage1_output(sft_cfg)
        if model_consensus and "skipped" in results["sft"]:
            preferences = str(Path(spec.out) / "consensus" / "preferences")  # rebuilt by the first run
        elif model_consensus:
            assert rebuild is not None  # checked above, before Stage 1
            preferences = rebuild_preferences_with_model(spec, apo_model, rebuild, console)
    if spec.stage in ("apo", "all"):
        apo_cfg = stage_config(spec, "apo", apo_model, preferences)
        results["apo"] = run_apo(
            apo_cfg, console=console, resume_from_checkpoint=spec.resume if spec.stage == "apo" else None
        )
    return results
