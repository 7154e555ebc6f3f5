"""Loading models for training: VLM or causal LM, optional LoRA adapter merged in, LoRA attached."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cxrmax.core.errors import InputError, where
from cxrmax.core.hf import load_processor

__all__ = ["attach_lora", "load_model", "load_processor", "processor_source"]


def _dtype(name: str | None) -> Any:
    import torch

    if name in (None, "auto"):
        return "auto"
    try:
        return {
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
            "float32": torch.float32,
            "fp32": torch.float32,
        }[name]
    except KeyError:
        raise InputError(f"torch_dtype must be auto, bfloat16, float16 or float32, not {name!r}") from None


def _is_text_only(path: str | Path) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path))
    return getattr(config, "vision_config", None) is None


def load_model(
    path: str | Path, torch_dtype: str | None = "auto", attn_implementation: str | None = None
) -> Any:
    """Load a model for training. A LoRA adapter dir (adapter_config.json) is loaded onto its base and
    merged in memory, so a Stage-1 adapter can serve directly as the Stage-2 start and reference."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    local = Path(path)
    adapter_config = local / "adapter_config.json"
    if adapter_config.exists():
        from peft import PeftModel

        base_path = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
        if not base_path:
            raise InputError(f"{where(adapter_config, field='base_model_name_or_path')}: missing")
        base = load_model(base_path, torch_dtype, attn_implementation)
        return PeftModel.from_pretrained(base, str(local)).merge_and_unload()
    kwargs: dict[str, Any] = {"dtype": _dtype(torch_dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    cls = AutoModelForCausalLM if _is_text_only(path) else AutoModelForImageTextToText
    return cls.from_pretrained(str(path), **kwargs)


def processor_source(path: str | Path) -> str:
    """Where the processor lives (kept for callers; load_processor resolves adapter dirs itself)."""
    return str(path)


def attach_lora(model: Any, r: int, alpha: int, dropout: float, target_modules: str | list[str]) -> Any:
    """Wrap ``model`` with a fresh trainable LoRA adapter (peft); the base stays frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)
