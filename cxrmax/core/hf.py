"""The one way cxrmax loads a model's processor: for generation, for training and for the toy models.

Rules, in order:

1. A LoRA adapter folder (``adapter_config.json``) is resolved to its base model for the config, and
   for the processor files too unless the adapter folder carries its own tokenizer.
2. A model without a vision tower (no ``vision_config``) gets its tokenizer.
3. A Qwen2-VL / Qwen2.5-VL model gets `TinyQwen2VLProcessor`, the stock processor without its video
   processor: the stock class requires one, which needs torchvision, and without torchvision
   ``AutoProcessor`` silently returns only the tokenizer. Images never need the video half.
4. Any other VLM gets ``AutoProcessor``, which itself falls back to the tokenizer where a model ships
   no processor.

transformers is imported inside the functions: importing it takes seconds, and the CLI and the HTTP
backends import this module without ever loading a local model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["QWEN2_VL_MODEL_TYPES", "adapter_base", "load_processor", "qwen2_vl_processor_class"]

#: config.model_type values served by the video-less Qwen2-VL processor.
QWEN2_VL_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")

_PROCESSOR_CLASS: type | None = None


def _make_qwen2_vl_processor_class() -> type:
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class TinyQwen2VLProcessor(Qwen2VLProcessor):
        """A Qwen2-VL processor with an image processor and a tokenizer only (no video processor)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    # Importable as cxrmax.core.hf.TinyQwen2VLProcessor (pickling, multiprocessing data loaders).
    TinyQwen2VLProcessor.__module__ = __name__
    TinyQwen2VLProcessor.__qualname__ = "TinyQwen2VLProcessor"
    return TinyQwen2VLProcessor


def qwen2_vl_processor_class() -> type:
    """The video-less Qwen2-VL processor class, created on first use (so that importing this module
    does not import transformers). Also reachable as ``cxrmax.core.hf.TinyQwen2VLProcessor``."""
    global _PROCESSOR_CLASS
    if _PROCESSOR_CLASS is None:
        _PROCESSOR_CLASS = _make_qwen2_vl_processor_class()
    return _PROCESSOR_CLASS


def __getattr__(name: str) -> Any:
    if name == "TinyQwen2VLProcessor":
        return qwen2_vl_processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def adapter_base(path: str | os.PathLike) -> str | None:
    """The base model of a LoRA adapter folder (its adapter_config.json), or None for anything else."""
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.exists():
        return json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    return None


def load_processor(path_or_id: str | os.PathLike, config: Any = None) -> Any:
    """The processor (VLM) or tokenizer (text-only LM) of a model folder, adapter folder or Hub id
    (see the module docstring for the rules). ``config``: the model's already loaded
    ``AutoConfig``, to skip reading it again."""
    from transformers import AutoConfig, AutoProcessor, AutoTokenizer

    path = str(path_or_id)
    config_source = adapter_base(path) or path
    local = Path(path)
    has_own_files = (local / "tokenizer_config.json").exists() or not local.exists()
    source = path if has_own_files else config_source
    if config is None:
        config = AutoConfig.from_pretrained(config_source)
    if getattr(config, "vision_config", None) is None:
        return AutoTokenizer.from_pretrained(source)
    if getattr(config, "model_type", None) in QWEN2_VL_MODEL_TYPES:
        return qwen2_vl_processor_class().from_pretrained(source)
    return AutoProcessor.from_pretrained(source)
