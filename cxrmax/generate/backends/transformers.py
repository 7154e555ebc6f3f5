"""``transformers``: a model loaded in-process (CPU or one GPU); generation runs in a worker thread.

torch and transformers are imported when a model is loaded, not when this module is: the CLI and
the HTTP backend import the backends package without ever loading a local model."""

from __future__ import annotations

import asyncio
import io
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cxrmax.core.errors import CxrmaxError
from cxrmax.core.hf import is_vlm_config, load_config, load_model, load_processor
from cxrmax.generate.backends.base import Backend, Sampling
from cxrmax.generate.responses import BackendError, Completion

__all__ = ["EngineRequest", "SeededSampler", "TransformersBackend", "TransformersEngine"]


def _decode_image(data: bytes) -> Any:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One request to :meth:`TransformersEngine.generate_batch`: chat ``messages`` in HF format (image
    parts are ``{"type": "image"}``), their PIL ``images`` in order, and its ``sampling``."""

    messages: list[dict[str, Any]]
    images: list[Any]
    sampling: Sampling


def _choice_seed(seed: int | None, choice: int) -> int:
    """The sampling seed of answer ``choice`` of a request: its own seed for the first answer, a seed
    derived from (seed, choice) for the others; a fresh random one without a seed."""
    if seed is None:
        return random.SystemRandom().getrandbits(63)
    if choice == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**63, choice]).generate_state(1, np.uint64)[0] >> 1)


def _text_only(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages with their image parts dropped, for a text-only model."""
    return [
        {
            "role": m["role"],
            "content": m["content"]
            if isinstance(m["content"], str)
            else "".join(p.get("text", "") for p in m["content"] if p.get("type") == "text"),
        }
        for m in messages
    ]


class SeededSampler:
    """A transformers logits processor that samples each row with its own ``torch.Generator``.

    transformers' sampling draws every row from the one global generator, so a row's answer would depend
    on which other requests share its batch. Here row ``i`` draws from ``generators[i]`` (seeded by its
    request), and the chosen token is returned as the only finite logit, so generation runs greedy
    (``do_sample=False``) over the forced choice. Temperature <= 0 is greedy; ``top_p`` < 1 keeps the
    smallest set of tokens whose probability reaches ``top_p`` (at least one)."""

    def __init__(self, generators: Sequence[Any], temperatures: Sequence[float], top_ps: Sequence[float]):
        self.generators = list(generators)
        self.temperatures = list(temperatures)
        self.top_ps = list(top_ps)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        chosen = torch.empty(scores.shape[0], dtype=torch.long)
        for row, (generator, temperature, top_p) in enumerate(
            zip(self.generators, self.temperatures, self.top_ps, strict=True)
        ):
            logits = scores[row].float().cpu()  # the generators are CPU ones, whatever the model's device
            if temperature <= 0:
                chosen[row] = int(torch.argmax(logits))
                continue
            probs = torch.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:
                ordered, order = torch.sort(probs, descending=True)
                # A token stays when the probability before it is below top_p: the first always stays.
                keep = (torch.cumsum(ordered, dim=-1) - ordered) < top_p
                probs = torch.zeros_like(probs).scatter_(0, order[keep], ordered[keep])
            chosen[row] = int(torch.multinomial(probs, 1, generator=generator))
        forced = torch.full_like(scores, float("-inf"))
        forced[torch.arange(scores.shape[0]), chosen.to(scores.device)] = 0.0
        return forced


class TransformersEngine:
    """A VLM (or text-only LM) loaded with transformers, generating one batch at a time under a lock.

    Shared by the ``transformers`` backend and the OpenAI-compatible test server. Each row samples from
    its own generator seeded by its request (:class:`SeededSampler`), so an answer does not depend on the
    sampling of the rows it is batched with; batching still changes float rounding in the last bits
    (padding, matrix shapes), which is why the orchestrator batches requests in a fixed order."""

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
        # Prompts of a batch end where generation starts: pad on the left.
        self.tokenizer.padding_side = "left"
        self.model.to(self.device)
        self.model.eval()
        self._lock = threading.Lock()

    def generate(
        self, messages: list[dict[str, Any]], images: list[Any], sampling: Sampling, n: int = 1
    ) -> list[Completion]:
        """Generate ``n`` answers to chat ``messages`` (HF format: image parts are {"type": "image"})."""
        return self.generate_batch(
            [
                EngineRequest(
                    messages,
                    images,
                    Sampling(
                        sampling.temperature,
                        sampling.top_p,
                        sampling.max_tokens,
                        _choice_seed(sampling.seed, k),
                    ),
                )
                for k in range(n)
            ]
        )

    def generate_batch(self, requests: Sequence[EngineRequest]) -> list[Completion]:
        """One answer per request, generated together as one left-padded batch (in request order)."""
        import torch
        from transformers import LogitsProcessorList

        if not requests:
            return []
        texts, images = [], []
        for request in requests:
            messages = request.messages if self.is_vlm else _text_only(request.messages)
            texts.append(
                self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            )
            if self.is_vlm:
                images.extend(request.images)
        if self.is_vlm:
            inputs = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        else:
            inputs = self.tokenizer(texts, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        padded_len = int(inputs["input_ids"].shape[1])
        prompt_lens = inputs["attention_mask"].sum(dim=1).tolist()
        limits = [max(1, r.sampling.max_tokens) for r in requests]
        sampler = SeededSampler(
            [torch.Generator().manual_seed(_choice_seed(r.sampling.seed, 0)) for r in requests],
            [r.sampling.temperature for r in requests],
            [r.sampling.top_p for r in requests],
        )
        eos = self.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        with self._lock, torch.no_grad():
            output = self.model.generate(
                **inputs,
                max_new_tokens=max(limits),
                do_sample=False,
                logits_processor=LogitsProcessorList([sampler]),
                pad_token_id=self.tokenizer.pad_token_id,
            )
        completions = []
        for row, limit, prompt_len in zip(output[:, padded_len:].tolist(), limits, prompt_lens, strict=True):
            # Count up to and including the first end token; the rest is padding.
            row = row[:limit]
            length, stopped = len(row), False
            for i, token in enumerate(row):
                if token in eos_ids:
                    length, stopped = i + 1, True
                    break
            completions.append(
                Completion(
                    text=self.tokenizer.decode(row[:length], skip_special_tokens=True),
                    finish_reason="stop" if stopped else "length",
                    prompt_tokens=int(prompt_len),
                    completion_tokens=length,
                    endpoint="transformers",
                )
            )
        return completions


class TransformersBackend(Backend):
    """Runs a local model in-process (``--model`` is a folder or a Hub id already in the local cache),
    ``batch_size`` requests generated together."""

    kind = "transformers"

    def __init__(
        self,
        model_path: str | Path,
        served_model: str | None = None,
        device: str | None = None,
        batch_size: int = 1,
    ):
        self.model_path = str(model_path)
        self.served_model = served_model or self.model_path
        self._device = device
        self.batch_size = max(1, int(batch_size))
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
        return (await self.complete_batch([(prompt, image_jpeg, sampling)]))[0]

    async def complete_batch(
        self, requests: Sequence[tuple[str, bytes | None, Sampling]]
    ) -> list[Completion]:
        assert self.engine is not None, "start() first"
        batch = []
        for prompt, image_jpeg, sampling in requests:
            images = [_decode_image(image_jpeg)] if image_jpeg is not None else []
            content: list[dict[str, Any]] = [{"type": "image"} for _ in images] + [
                {"type": "text", "text": prompt}
            ]
            batch.append(EngineRequest([{"role": "user", "content": content}], images, sampling))
        try:
            return await asyncio.to_thread(self.engine.generate_batch, batch)
        except (ValueError, RuntimeError) as exc:
            raise BackendError("client", f"generation failed: {exc}", endpoint="transformers") from None

    async def close(self) -> None:
        self.engine = None
