"""Backends behind one interface: ``await backend.complete(prompt, image_jpeg, sampling) -> Completion``.

- ``openai``: any OpenAI-compatible chat server (``vllm serve``, the test server, ...) over HTTP. Several
  base URLs spread the requests (the least busy server gets the next one). Uses aiohttp with one
  connection pool per server and no hidden retries: the orchestrator owns retries, backoff and timeouts,
  and errors are classified into the kinds it understands.
- ``transformers``: a model loaded in-process (CPU or one GPU); generation runs in a worker thread.
- ``vllm``: vLLM's offline engine in-process, imported only when chosen.

How a server's answer becomes a `Completion` or a classified `BackendError`: `cxrmax.generate.responses`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrmax.core.errors import CxrmaxError
from cxrmax.generate.responses import (
    BackendError,
    Completion,
    error_message,
    match_served_model,
    model_listing,
    parse_chat_response,
)


@dataclass(slots=True)
class Sampling:
    """Sampling parameters of one request (``seed`` is the per-request seed)."""

    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None


def image_data_url(jpeg: bytes) -> str:
    try:
        from cxrmax.mimic.images import to_data_url
    except ImportError:  # pragma: no cover - cxrmax.mimic.images is part of the package
        return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
    return to_data_url(jpeg)


def chat_messages(prompt: str, image_url: str | None) -> list[dict[str, Any]]:
    """OpenAI chat messages: one user turn with the image first, then the prompt text."""
    content: list[dict[str, Any]] = []
    if image_url is not None:
        content.append({"type": "image_url", "image_url": {"url": image_url}})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


class Backend(ABC):
    """What the orchestrator needs from a way of running a model."""

    kind: str = ""
    #: the id the server/engine knows the model by (recorded as served_model)
    served_model: str = ""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Check that the backend can serve the model (reachable, right model); raise CxrmaxError if not."""

    @abstractmethod
    async def complete(self, prompt: str, image_jpeg: bytes | None, sampling: Sampling) -> Completion:
        """One answer to ``prompt`` about the image; raises BackendError."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads, models."""

    def endpoints(self) -> list[str]:
        return [self.kind]


# --------------------------------------------------------------------------- openai-compatible HTTP
class _Endpoint:
    """One server and its aiohttp session (created inside the running event loop)."""

    __slots__ = ("base_url", "session", "in_flight", "sent", "down_until", "connection_failures", "served")

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.session: Any = None
        self.in_flight = 0
        self.sent = 0
        #: after a connection failure the server is skipped until then (time.monotonic()), while another
        #: server is up: a dead server fails instantly, so "least busy" would otherwise pick it every time
        self.down_until = 0.0
        self.connection_failures = 0
        #: model ids GET /models listed (None: not asked or not listed)
        self.served: list[str] | None = None

    def mark_down(self) -> None:
        self.connection_failures += 1
        self.down_until = time.monotonic() + min(30.0, 0.5 * 2 ** (self.connection_failures - 1))

    def mark_up(self) -> None:
        self.connection_failures = 0
        self.down_until = 0.0


@dataclass(slots=True)
class _Response:
    """What the parser needs from an HTTP response (status, headers, body bytes)."""

    status_code: int
    headers: Any
    content: bytes
    reason_phrase: str = ""

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class OpenAIBackend(Backend):
    """Any OpenAI-compatible /v1/chat/completions server; requests spread over ``base_urls``.

    aiohttp with one keep-alive connection pool per server: its per-request cost is a fraction of
    httpx's (whose pool scans every connection on each request), which matters at thousands of
    requests per second against fast servers."""

    kind = "openai"

    def __init__(
        self,
        model: str,
        base_urls: list[str],
        api_key: str | None = None,
        timeout: float = 600.0,
        max_connections: int = 256,
        candidates: list[str] | None = None,
    ):
        if not base_urls:
            raise CxrmaxError(
                "the openai backend needs at least one --base-url (e.g. http://127.0.0.1:8000/v1)"
            )
        self.served_model = model
        #: other ids the model may be served under (the roster name when the HF id is not listed)
        self.candidates = [c for c in (candidates or []) if c != model]
        key = api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
        self._headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.timeout = timeout
        self.max_connections = max_connections
        self._endpoints = [_Endpoint(url.rstrip("/")) for url in base_urls]
        self._next = 0

    def endpoints(self) -> list[str]:
        return [e.base_url for e in self._endpoints]

    def sent_per_endpoint(self) -> dict[str, int]:
        return {e.base_url: e.sent for e in self._endpoints}

    def _session(self, endpoint: _Endpoint) -> Any:
        if endpoint.session is None:
            import aiohttp

            endpoint.session = aiohttp.ClientSession(
                headers=self._headers,
                connector=aiohttp.TCPConnector(limit=self.max_connections, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=self.timeout, connect=min(self.timeout, 10.0)),
                # Server answers are parsed here (json.loads), never by aiohttp; no cookies needed.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return endpoint.session

    async def _request(
        self,
        endpoint: _Endpoint,
        method: str,
        path: str,
        body: bytes | None = None,
        timeout: float | None = None,
    ) -> _Response:
        """One HTTP exchange; transport problems become BackendError(connection | timeout)."""
        import aiohttp

        session = self._session(endpoint)
        kwargs: dict[str, Any] = {}
        if timeout is not None:
            kwargs["timeout"] = aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 10.0))
        try:
            async with session.request(method, endpoint.base_url + path, data=body, **kwargs) as response:
                content = await response.read()
                return _Response(response.status, response.headers, content, response.reason or "")
        except asyncio.TimeoutError:
            raise BackendError(
                "timeout", f"no answer after {timeout or self.timeout:g}s", endpoint=endpoint.base_url
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise BackendError(
                "connection", f"cannot connect ({exc.os_error or exc})", endpoint=endpoint.base_url
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise BackendError(
                "connection", f"{type(exc).__name__}: {exc}", endpoint=endpoint.base_url
            ) from None

    async def start(self) -> None:
        """GET /models on every server: unreachable servers and a model they do not serve fail here, once,
        with a message that says what to fix."""
        chosen: str | None = None
        for endpoint in self._endpoints:
            try:
                response = await self._request(endpoint, "GET", "/models", timeout=min(self.timeout, 15.0))
            except BackendError as exc:
                raise CxrmaxError(
                    f"cannot reach the model server at {endpoint.base_url} ({exc.kind}: {exc.message}). "
                    "Is `vllm serve` running there? (`cxrmax models serve-command NAME` prints the command; "
                    "the URL usually ends in /v1)"
                ) from None
            if response.status_code in (401, 403):
                raise CxrmaxError(
                    f"the server at {endpoint.base_url} refused the API key (HTTP {response.status_code}); set "
                    "OPENAI_API_KEY or --api-key to the key it was started with"
                )
            if response.status_code == 404:
                continue  # a server without /models: nothing to check, requests will tell
            if response.status_code >= 400:
                raise CxrmaxError(
                    f"the server at {endpoint.base_url} answered GET /models with HTTP {response.status_code}: "
                    f"{error_message(response)}"
                )
            listing = model_listing(response)
            if listing is None:
                continue
            served = [entry["id"] for entry in listing]
            endpoint.served = served
            name = match_served_model([self.served_model, *self.candidates], listing)
            if name is None:
                raise CxrmaxError(
                    f"the server at {endpoint.base_url} does not serve model {self.served_model!r}; it serves "
                    f"{', '.join(map(repr, served)) or 'nothing'}. Pass one of those to --model, or start the "
                    "server with the right model (or --served-model-name)"
                )
            if chosen is not None and name != chosen:
                raise CxrmaxError(
                    f"the servers serve the model under different ids ({chosen!r} and {name!r})"
                )
            chosen = name
        if chosen:
            self.served_model = chosen

    def _pick(self) -> _Endpoint:
        endpoints = self._endpoints
        if len(endpoints) == 1:
            return endpoints[0]
        # Least busy server that is up; ties broken round-robin so idle servers share the work evenly.
        # When every server had a connection failure lately, the one that comes back first is tried.
        now = time.monotonic()
        up = [e for e in endpoints if e.down_until <= now]
        if not up:
            return min(endpoints, key=lambda e: e.down_until)
        n = len(endpoints)
        start = self._next
        self._next = (start + 1) % n
        best = None
        for i in range(n):
            candidate = endpoints[(start + i) % n]
            if candidate.down_until <= now and (best is None or candidate.in_flight < best.in_flight):
                best = candidate
        return best

    async def complete(self, prompt: str, image_jpeg: bytes | None, sampling: Sampling) -> Completion:
        body: dict[str, Any] = {
            "model": self.served_model,
            "messages": chat_messages(prompt, image_data_url(image_jpeg) if image_jpeg is not None else None),
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        endpoint = self._pick()
        endpoint.in_flight += 1
        endpoint.sent += 1
        try:
            response = await self._request(endpoint, "POST", "/chat/completions", json.dumps(body).encode())
        except BackendError as error:
            if error.kind == "connection" and len(self._endpoints) > 1:
                endpoint.mark_down()
            raise
        finally:
            endpoint.in_flight -= 1
        endpoint.mark_up()
        try:
            return parse_chat_response(response, endpoint.base_url)
        except BackendError as error:
            if error.kind == "not_found":
                error.message += await self._served_hint(endpoint)
            raise

    async def _served_hint(self, endpoint: _Endpoint) -> str:
        """What the server says it serves, for a 404 (asked once per server)."""
        if endpoint.served is None:
            try:
                response = await self._request(endpoint, "GET", "/models", timeout=min(self.timeout, 10.0))
            except BackendError:
                response = None
            listing = model_listing(response) if response is not None and response.status_code < 400 else None
            if listing is None:
                return (
                    f" (GET {endpoint.base_url}/models lists no models either: is --base-url right? It usually "
                    "ends in /v1)"
                )
            endpoint.served = [entry["id"] for entry in listing]
        served = ", ".join(map(repr, endpoint.served)) or "nothing"
        return (
            f" (model {self.served_model!r} is not served at {endpoint.base_url}; GET /models lists {served}: "
            "pass one of those to --model, or restart the server with this model)"
        )

    async def close(self) -> None:
        for endpoint in self._endpoints:
            if endpoint.session is not None:
                await endpoint.session.close()
                endpoint.session = None


# --------------------------------------------------------------------------- transformers in-process
def _decode_image(data: bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image.convert("RGB")


class TransformersEngine:
    """A VLM (or text-only LM) loaded with transformers, generating one request at a time under a lock.

    Shared by the ``transformers`` backend and the OpenAI-compatible test server."""

    def __init__(self, model_path: str | Path, device: str | None = None, dtype: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

        from cxrmax.toy import tinyvlm

        self.path = str(model_path)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        config = AutoConfig.from_pretrained(self.path)
        self.is_vlm = hasattr(config, "vision_config")
        kwargs: dict[str, Any] = {}
        if dtype:
            kwargs["dtype"] = getattr(torch, dtype)
        if self.is_vlm:
            self.model = AutoModelForImageTextToText.from_pretrained(self.path, **kwargs)
            if config.model_type in ("qwen2_vl", "qwen2_5_vl"):
                # AutoProcessor needs torchvision for these; the video-less subclass does not.
                self.processor = tinyvlm.processor_class().from_pretrained(self.path)
            else:
                self.processor = AutoProcessor.from_pretrained(self.path)
            self.tokenizer = self.processor.tokenizer
        else:
            from transformers import AutoTokenizer

            self.model = AutoModelForCausalLM.from_pretrained(self.path, **kwargs)
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
            self.processor = self.tokenizer
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


# --------------------------------------------------------------------------- vllm in-process
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
) -> Backend:
    """Build a backend: ``openai`` (needs ``base_urls``), ``transformers`` (``model_path`` or ``model``
    as a folder / cached Hub id) or ``vllm``. Call ``await backend.start()`` before use."""
    if kind == "openai":
        return OpenAIBackend(model, base_urls or [], api_key, timeout, max_connections, candidates)
    if kind == "transformers":
        return TransformersBackend(model_path or model, served_model=model, device=device)
    if kind == "vllm":
        return VLLMBackend(str(model_path or model), engine_args)
    raise CxrmaxError(f"unknown backend {kind!r}: use openai, transformers or vllm")
