"""``vllm``: vLLM's offline engine in-process, imported only when chosen (it is an optional,
CUDA-only dependency)."""

from __future__ import annotations

import asyncio
from typing import Any

from cxrmax.core.errors import CxrmaxError
from cxrmax.generate.backends.base import Backend, Sampling, chat_messages, image_data_url
from cxrmax.generate.responses import BackendError, Completion

__all__ = ["VLLM_MISSING", "VLLMBackend", "vllm_engine_args"]


VLLM_MISSING = (
    "the vllm backend needs the `vllm` package, which is not installed here (it is CUDA-only and pins its own "
    "torch). Either install it in a separate GPU environment, or run `vllm serve MODEL` "
    "(see `cxrmax models serve-command NAME`) and use --backend openai --base-url http://HOST:PORT/v1"
)


class VLLMBackend(Backend):
    """vLLM's offline engine in-process; requests are submitted from worker threads."""

    kind = "vllm"

    def __init__(self, model: str, engine_args: dict[str, Any] | None = None):
        self.served_model = model
        self.engine_args = dict(engine_args or {})
        self.llm: Any = None

    async def start(self) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise CxrmaxError(VLLM_MISSING) from None
        from vllm import LLM

        self.llm = await asyncio.to_thread(LLM, model=self.served_model, **self.engine_args)

    async def complete(self, prompt: str, image_jpeg: bytes | None, sampling: Sampling) -> Completion:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
        )
        messages = chat_messages(prompt, image_data_url(image_jpeg) if image_jpeg is not None else None)
        try:
            outputs = await asyncio.to_thread(self.llm.chat, messages, params, use_tqdm=False)
        except ValueError as exc:
            raise BackendError("client", str(exc), endpoint="vllm") from None
        out = outputs[0]
        choice = out.outputs[0]
        return Completion(
            text=choice.text,
            finish_reason=choice.finish_reason,
            prompt_tokens=len(out.prompt_token_ids or []),
            completion_tokens=len(choice.token_ids),
            endpoint="vllm",
        )


def vllm_engine_args(serve: dict[str, Any]) -> dict[str, Any]:
    """Roster `serve` settings -> vllm.LLM keyword arguments."""
    names = (
        "tensor_parallel_size",
        "max_model_len",
        "max_num_seqs",
        "limit_mm_per_prompt",
        "mm_processor_kwargs",
        "trust_remote_code",
        "gpu_memory_utilization",
    )
    return {k: serve[k] for k in names if k in serve}
