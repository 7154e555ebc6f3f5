"""The source-model roster (pipelines/models.toml): Hugging Face ids, vllm serve settings, sampling."""

from __future__ import annotations

import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrmax.core.errors import InputError, where
from cxrmax.generate.prompts import pipelines_dir

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Sampling used when neither the roster nor the command line says otherwise.
DEFAULT_SAMPLING = {"temperature": 0.7, "top_p": 0.9, "max_tokens": 1024}


@dataclass(frozen=True)
class ModelSpec:
    """One source model: roster entry, or an ad-hoc served id not in the roster."""

    name: str
    hf_id: str
    params: str = ""
    min_gpus: int = 1
    serve: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_SAMPLING))
    notes: str = ""
    in_roster: bool = True

    @property
    def dir_name(self) -> str:
        """Folder name under OUT/trajectories/ (ids such as 'Qwen/Qwen2-VL-7B' become 'Qwen__Qwen2-VL-7B')."""
        return safe_dir_name(self.name)

    def serve_command(self, port: int = 8000, host: str = "0.0.0.0") -> str:
        """The `vllm serve` command line with the recommended arguments."""
        args = ["vllm", "serve", self.hf_id, "--host", host, "--port", str(port)]
        serve = self.serve
        simple = {
            "tensor_parallel_size": "--tensor-parallel-size",
            "max_model_len": "--max-model-len",
            "max_num_seqs": "--max-num-seqs",
            "gpu_memory_utilization": "--gpu-memory-utilization",
        }
        for key, flag in simple.items():
            if key in serve:
                args += [flag, str(serve[key])]
        for key, flag in (
            ("limit_mm_per_prompt", "--limit-mm-per-prompt"),
            ("mm_processor_kwargs", "--mm-processor-kwargs"),
        ):
            if serve.get(key):
                args += [flag, json.dumps(serve[key], separators=(",", ":"))]
        if serve.get("trust_remote_code"):
            args.append("--trust-remote-code")
        args += [str(a) for a in serve.get("extra", [])]
        return shlex.join(args)


def safe_dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("/", "__")).strip("._") or "model"


def roster_path() -> Path:
    return pipelines_dir() / "models.toml"


def load_roster(path: str | Path | None = None) -> dict[str, ModelSpec]:
    """Read the roster; a malformed entry raises InputError naming the file and field."""
    path = Path(path) if path is not None else roster_path()
    if not path.is_file():
        raise InputError(f"model roster not found: {path} (set CXRMAX_PIPELINES to the pipelines/ folder)")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML: {exc}") from None
    roster: dict[str, ModelSpec] = {}
    for name, entry in (data.get("models") or {}).items():
        if not isinstance(entry, dict) or not isinstance(entry.get("hf_id"), str):
            raise InputError(
                f"{where(path, field=f'models.{name}.hf_id')}: every model needs an hf_id string"
            )
        sampling = dict(DEFAULT_SAMPLING)
        sampling.update(entry.get("sampling") or {})
        roster[name] = ModelSpec(
            name=name,
            hf_id=entry["hf_id"],
            params=str(entry.get("params", "")),
            min_gpus=int(entry.get("min_gpus", 1)),
            serve=dict(entry.get("serve") or {}),
            sampling=sampling,
            notes=str(entry.get("notes", "")),
        )
    return roster


def resolve_model(name_or_id: str, roster: dict[str, ModelSpec] | None = None) -> ModelSpec:
    """A roster name ('qwen2-vl'), a roster model's HF id, or any served model id (ad-hoc spec)."""
    if roster is None:
        try:
            roster = load_roster()
        except InputError:
            roster = {}
    if name_or_id in roster:
        return roster[name_or_id]
    for spec in roster.values():
        if spec.hf_id == name_or_id:
            return spec
    if not name_or_id.strip():
        raise InputError("--model is empty: give a roster name (cxrmax models list) or a served model id")
    return ModelSpec(name=name_or_id, hf_id=name_or_id, in_roster=False, notes="not in the roster")
