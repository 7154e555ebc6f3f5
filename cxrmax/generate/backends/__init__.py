"""Backends behind one interface: ``await backend.complete(prompt, image_jpeg, sampling) -> Completion``.

One file per backend: `openai` (any OpenAI-compatible server over HTTP), `transformers` (a model
loaded in-process) and `vllm` (vLLM's offline engine in-process); `base` holds the interface. How a
server's answer becomes a `Completion` or a classified `BackendError`: `cxrmax.generate.responses`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cxrmax.core.errors import CxrmaxError
from cxrmax.generate.backends.base import Backend, Sampling, chat_messages, image_data_url
from cxrmax.generate.backends.openai import OpenAIBackend
from cxrmax.generate.backends.transformers import TransformersBackend, TransformersEngine
from cxrmax.generate.backends.vllm import VLLM_MISSING, VLLMBackend, vllm_engine_args

__all__ = [
    "VLLM_MISSING",
    "Backend",
    "OpenAIBackend",
    "Sampling",
    "TransformersBackend",
    "TransformersEngine",
    "VLLMBackend",
    "chat_messages",
    "image_data_url",
    "make_backend",
    "vllm_engine_args",
]


def make_backend(
    kind: str,
    model: str,
    *,
    base_urls: list[str] | None = None,
    api_key: str | None = None,
    timeout: float = 600.0,
    max_connections: int = 256,
    model_path: str | Path | None = None,
    candidates: list[str] | None = None,
    engine_args: dict[str, Any] | None = None,
    device: str | None = None,
    batch_size: int = 1,
) -> Backend:
    """Build a backend: ``openai`` (needs ``base_urls``), ``transformers`` (``model_path`` or ``model``
    as a folder / cached Hub id; ``batch_size`` requests generated together) or ``vllm``. Call ``await backend.start()`` before use."""
    if kind == "openai":
        return OpenAIBackend(model, base_urls or [], api_key, timeout, max_connections, candidates)
    if kind == "transformers":
        return TransformersBackend(
            model_path or model, served_model=model, device=device, batch_size=batch_size
        )
    if kind == "vllm":
        return VLLMBackend(str(model_path or model), engine_args)
    raise CxrmaxError(f"unknown backend {kind!r}: use openai, transformers or vllm")
