"""``transformers``: a model loaded in-process (CPU or one GPU); generation runs in a worker thread.

torch and transformers are imported when a model is loaded, not when this module is: the CLI and
the HTTP backend import the backends package without ever loading a local model."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path
from typing import Any

from PIL import Image

from cxrmax.core.errors import CxrmaxError
from cxrmax.core.hf import is_vlm_config, load_config, load_model, load_processor
from cxrmax.generate.backends.base import Backend, Sampling
from cxrmax.generate.responses import BackendError, Completion

__all__ = ["TransformersBackend", "TransformersEngine"]


def _decode_image(data: bytes) -> Any:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


class TransformersEngine:
    """A VLM (or text-only LM) loaded with transformers, generating one request at a time under a lock.

    Shared by the ``transformers`` backend and the OpenAI-compatible test server."""

    def __init__(self, model_path: str | Path, device: str | None = None, dtype: str | None = None):
        import torch

        self.path = str(model_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = load_config(self.path)
        self.is_vlm = is_vlm_config(config)
        # A LoRA adapter folder (train-apo's output) is merged onto its base here, as for training.
        self.model = load_model(self.path, torch_dtype=dtype or "auto")
        self.processor = load_processor(self.path, config=config)
        self.tokenizer = self.processor.tokenizer if self.is_vlm else self.processor
        self.model.to(self.device)
        self.model.eval()
        self._lock = threading.Lock()

    def generate(
        self, messages: list[dict[str, Any]], images: list[Any], sampling: Sampling, n: int = 1
    ) -> list[Completion]:
        """Generate ``n`` answers to chat ``messages`` (HF format: image parts are {"type": "image"})."""
        import torch

        if not self.is_vlm:
            images = []
            messages = [
                {
                    "role": m["role"],
                    "content": m["content"]
                    if isinstance(m["content"], str)
                    else "".join(p.get("text", "") for p in m["content"] if p.get("type") == "text"),
                }
                for m in messages
            ]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        if self.is_vlm:
            inputs = self.processor(text=[text], images=images or None, return_tensors="pt")
        else:
            inputs = self.tokenizer([text], return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        prompt_len = int(inputs["input_ids"].shape[1])
        do_sample = sampling.temperature > 0
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": max(1, sampling.max_tokens),
            "do_sample": do_sample,
            "num_return_sequences": n,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if do_sample:
            gen_kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p)
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        with self._lock, torch.no_grad():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            output = self.model.generate(**inputs, **gen_kwargs)
        completions = []
        for row in output[:, prompt_len:].tolist():
            # Count up to and including the first end token; the rest is padding.
            length, stopped = len(row), False
            for i, token in enumerate(row):
                if token in eos_ids:
                    length, stopped = i + 1, True
                    break
            answer = self.tokenizer.decode(row[:length], skip_special_tokens=True)
            completions.append(
                Completion(
                    text=answer,
                    finish_reason="stop" if stopped else "length",
                    prompt_tokens=prompt_len,
                    completion_tokens=length,
                    endpoint="transformers",
                )
            )
        return completions


class TransformersBackend(Backend):
    """Runs a local model in-process (``--model`` is a folder or a Hub id already in the local cache)."""

    kind = "transformers"

    def __init__(self, model_path: str | Path, served_model: str | None = None, device: str | None = None):
        self.model_path = str(model_path)
        self.served_model = served_model or self.model_path
        self._device = device
        self.engine: TransformersEngine | None = None

    async def start(self) -> None:
        try:
            self.engine = await asyncio.to_thread(TransformersEngine, self.model_path, self._device)
        except OSError as exc:
            raise CxrmaxError(
                f"cannot load {self.model_path!r} with transformers: {exc}. Give a local model folder (or a Hub id "
                "already downloaded), or serve the model and use --backend openai --base-url URL"
            ) from None

    async def complete(self, prompt: str, image_jpeg: bytes | None, sampling: Sampling) -> Completion:
        assert self.engine is not None, "start() first"
        images = [_decode_image(image_jpeg)] if image_jpeg is not None else []
        content: list[dict[str, Any]] = [{"type": "image"} for _ in images] + [
            {"type": "text", "text": prompt}
        ]
        messages = [{"role": "user", "content": content}]
        try:
            result = await asyncio.to_thread(self.engine.generate, messages, images, sampling, 1)
        except (ValueError, RuntimeError) as exc:
            raise BackendError("client", f"generation failed: {exc}", endpoint="transformers") from None
        return result[0]

    async def close(self) -> None:
        self.engine = None
