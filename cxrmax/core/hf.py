"""The one way cxrmax loads a model and its processor: for generation, for training and for the toy
models.

`load_model` takes a model folder, a Hub id or a LoRA adapter folder (as train-apo writes it: the
adapter is loaded onto its base and merged in memory), and turns "no such model" into one InputError
instead of the Hub client's connection traceback. `load_processor` follows these rules, in order:

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

from cxrmax.core.errors import InputError, where

__all__ = [
    "QWEN2_VL_MODEL_TYPES",
    "adapter_base",
    "is_vlm_config",
    "load_config",
    "load_model",
    "load_processor",
    "linear_patch_embeds",
    "qwen2_vl_processor_class",
]

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


_DTYPES = ("auto", "bfloat16", "bf16", "float16", "fp16", "float32", "fp32")


def _torch_dtype(name: str | None) -> Any:
    import torch

    if name in (None, "auto"):
        return "auto"
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
    }
    if name not in table:
        raise InputError(f"torch_dtype must be auto, bfloat16, float16 or float32, not {name!r}")
    return table[name]


def load_config(path_or_id: str | os.PathLike) -> Any:
    """The ``AutoConfig`` of a model folder, adapter folder (its base's) or Hub id; a model that is
    neither a local folder nor reachable on the Hub is an InputError saying so."""
    from transformers import AutoConfig

    path = str(path_or_id)
    source = adapter_base(path) or path
    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        local = Path(path)
        if local.is_dir() and not (local / "config.json").exists() and adapter_base(path) is None:
            raise InputError(
                f"{where(local)}: not a model folder (no config.json, and no adapter_config.json of a LoRA adapter)"
            ) from None
        if not local.exists() and not Path(source).exists():
            raise InputError(
                f"model {path!r} not found: no such local folder, and the Hugging Face Hub does not have it or "
                f"cannot be reached (offline?). Pass a model folder, a LoRA adapter folder or a Hub id "
                f"({type(exc).__name__})"
            ) from None
        raise InputError(f"{where(source)}: cannot read the model's config: {exc}") from None


def is_vlm_config(config: Any) -> bool:
    """True for a vision-language model's config (it has a vision tower)."""
    return getattr(config, "vision_config", None) is not None


def load_model(
    path_or_id: str | os.PathLike, torch_dtype: str | None = "auto", attn_implementation: str | None = None
) -> Any:
    """A VLM (``AutoModelForImageTextToText``) or causal LM (``AutoModelForCausalLM``), chosen from the
    config. A LoRA adapter folder (adapter_config.json) is loaded onto its base and merged in memory,
    so a Stage-1 adapter serves directly as a Stage-2 start, as a reference, or for generation."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    path = str(path_or_id)
    base = adapter_base(path)
    if base is not None:
        from peft import PeftModel

        if not base:
            raise InputError(
                f"{where(Path(path) / 'adapter_config.json', field='base_model_name_or_path')}: missing"
            )
        return PeftModel.from_pretrained(
            load_model(base, torch_dtype, attn_implementation), path
        ).merge_and_unload()
    config = load_config(path)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(torch_dtype)}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    cls = AutoModelForImageTextToText if is_vlm_config(config) else AutoModelForCausalLM
    return linear_patch_embeds(cls.from_pretrained(path, config=config, **kwargs))


def _patch_embed_as_linear(self: Any, hidden_states: Any) -> Any:
    """PatchEmbed.forward as one matrix product: the same weights, the same sums (to rounding)."""
    import torch.nn.functional as F

    weight = self.proj.weight
    flat = hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype)
    return F.linear(flat, weight.reshape(weight.shape[0], -1), self.proj.bias)


def linear_patch_embeds(model: Any) -> Any:
    """Run every patch embedding whose Conv3d kernel equals its stride (the Qwen2-VL family's) as a
    linear layer over the flattened patches, in place; returns ``model``.

    Such a convolution is a matrix product over patches already cut by the image processor, but
    PyTorch's CPU Conv3d runs it a few times slower, forward and backward, than the product itself,
    and builds a new kernel for every new number of patches (every batch of differently sized films).
    On the demo's tiny VLM it saves about 2% of a warmed-up training step (benchmark/perf/
    bench_train_step.py), more while batch shapes are new. The weights keep their Conv3d shape, so
    checkpoints and state dicts are unchanged."""
    import types

    import torch

    for module in model.modules():
        proj = getattr(module, "proj", None)
        if (
            isinstance(proj, torch.nn.Conv3d)
            and tuple(proj.kernel_size) == tuple(proj.stride)
            and tuple(proj.padding) == (0, 0, 0)
            and tuple(proj.dilation) == (1, 1, 1)
            and proj.groups == 1
            and type(module).__name__.endswith("PatchEmbed")
        ):
            module.forward = types.MethodType(_patch_embed_as_linear, module)
    return model
