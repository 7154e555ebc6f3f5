"""Models for training: loading (cxrmax.core.hf.load_model: VLM or causal LM, a LoRA adapter merged in) and
attaching a fresh LoRA adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrmax.core.hf import load_model, load_processor

__all__ = ["attach_lora", "load_model", "load_processor", "processor_source"]


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
