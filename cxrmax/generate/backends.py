"""Backends behind one interface: ``await backend.complete(prompt, image_jpeg, sampling) -> Completion``.

- ``openai``: any OpenAI-compatible chat server (``vllm serve``, the test server, ...) over HTTP. Several
  base URLs spread the requests (the least busy server gets the next one). Uses aiohttp with one
  connection pool per server and no hidden retries: the orchestrator owns retries, backoff and timeouts,
  and errors are classified into the kinds it understands.
- ``transformers``: a model loaded in-process (CPU or one GPU); generation runs in a worker thread.
- ``vllm``: vLLM's offline engine in-process, imported only when chosen.

Errors are raised as :class:`BackendError` with a ``kind``, an HTTP ``status`` when there is one, and
``retryable``. Kinds (what real OpenAI-compatible servers send, and what is done about it):

- retryable: ``rate_limit`` (429; Retry-After in seconds or as an HTTP date is honoured), ``server``
  (5xx, a 200 whose body is an error object, finish_reason ``abort``/``error``), ``timeout`` (no answer
  within the timeout, 408), ``connection`` (refused, reset, closed mid-body), ``malformed`` (not JSON,
  HTML from a proxy, no choices, a stream cut before its end);
- permanent for that request (kept in the failure ledger, redone with --retry-failed):
  ``context_length`` (prompt + max_tokens over the server's context), ``image_rejected`` (the server
  cannot load or accept the image), ``too_large`` (413), ``client`` (other 400/422), ``empty`` (no
  answer text and no reasoning), ``content_filter``, ``image`` (the local image cannot be read);
- about the whole run (the orchestrator stops): ``auth`` (401/403), ``not_found`` (404: the model is not
  served there; the message lists what GET /models says is served).

Answers: ``Completion.text`` is the message ``content`` (a string, or the text parts of a list);
``Completion.reasoning`` is the separate reasoning a reasoning parser returns (``reasoning_content``
in vLLM/SGLang/llama.cpp/LM Studio, ``reasoning`` in vLLM >= 0.10 and Ollama, a ``thinking`` field,
or the ``thinking`` parts of a content list as Mistral sends). When a server returns reasoning but no
content (vLLM's reasoning parsers do when the answer was cut while thinking, or when the model never
closed its think block) ``text`` repeats the reasoning, so readers of ``text`` still see what the
model wrote; ``reasoning`` always holds it. A
server without a reasoning parser leaves the think block in the content: a leading
``<think>...</think>`` (or ``◁think▷...◁/think▷``) is split off the same way (:func:`split_think_block`).
Finish reasons are normalised (``eos_token``/``stop_sequence``/``end_turn`` -> ``stop``,
``max_tokens``/``max_length`` -> ``length``). A body sent as server-sent events although ``stream`` was
false is assembled from its chunks.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import html
import io
import json
import os
import re
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrmax.errors import CxrmaxError

RETRYABLE_KINDS = {"rate_limit", "server", "timeout", "connection", "malformed"}
#: Errors about the whole run (credentials, the model/URL), not about one request.
RUN_LEVEL_KINDS = {"auth", "not_found"}


@dataclass(slots=True)
class Sampling:
    """Sampling parameters of one request (``seed`` is the per-request seed)."""

    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None


@dataclass(slots=True)
class Completion:
    """One answer."""

    text: str
    finish_reason: str | None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    endpoint: str | None = None
    #: reasoning the server returned apart from the answer (reasoning_content / reasoning); None if none
    reasoning: str | None = None


class BackendError(Exception):
    """A failed request, classified for the retry policy."""

    def __init__(
        self,
        kind: str,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
        endpoint: str | None = None,
    ):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.endpoint = endpoint

    @property
    def retryable(self) -> bool:
        return self.kind in RETRYABLE_KINDS

    @property
    def signature(self) -> tuple[str, int | None]:
        return (self.kind, self.status)

    def __str__(self) -> str:
        status = f" {self.status}" if self.status else ""
        where = f" from {self.endpoint}" if self.endpoint else ""
        return f"{self.kind}{status}{where}: {self.message}"


def classify_status(status: int) -> str:
    """The error kind of an HTTP status alone (messages refine 4xx/5xx; see :func:`classify_error`)."""
    if status == 429:
        return "rate_limit"
    if status == 408:
        return "timeout"
    if status >= 500:
        return "server"
    if status in (401, 403):
        return "auth"
    if status == 404:
        return "not_found"
    if status == 413:
        return "too_large"
    return "client"


#: Messages that mean "prompt + max_tokens do not fit the context": vLLM (0.6 and >= 0.9 wordings),
#: SGLang, TGI (422 validation), llama.cpp (exceed_context_size_error), LM Studio.
_CONTEXT_LENGTH = re.compile(
    r"maximum context length|context length|context window|context size|max_model_len|"
    r"maximum model length|too long to fit|longer than the model|prompt is too long|input is too long|"
    r"max_tokens.{0,40}too large|tokens \+ `?max_new_tokens`? must be|exceed_context_size",
    re.IGNORECASE,
)
_IMAGE_WORDS = re.compile(r"\bimages?\b|image_url|multi-?modal|mmproj|pixel", re.IGNORECASE)
_IMAGE_FAILURE = re.compile(
    r"load|decod|identify|invalid|not supported|unsupported|cannot|can't|could not|failed|at most|"
    r"exceed|too many|corrupt|truncated|broken",
    re.IGNORECASE,
)

HINTS = {
    "context_length": "lower --max-tokens or --image-max-edge, or serve the model with a larger --max-model-len",
    "image_rejected": "the server cannot use the image: is the model a vision model and does the server accept "
    "images (vllm serve --limit-mm-per-prompt '{\"image\": 1}'; llama.cpp needs --mmproj)? A damaged source "
    "image fails here too",
    "too_large": "the request body is too big for the server or a proxy in front of it; lower --image-max-edge "
    "(or raise the proxy's limit, e.g. nginx client_max_body_size)",
    "auth": "set --api-key (or OPENAI_API_KEY) to the key the server was started with (vllm serve --api-key)",
}


def classify_error(status: int, message: str) -> str:
    """The error kind of an HTTP error from its status and the server's message."""
    kind = classify_status(status)
    if kind == "client" or (kind == "server" and status == 500):
        if _CONTEXT_LENGTH.search(message):
            return "context_length"
        if _IMAGE_WORDS.search(message) and _IMAGE_FAILURE.search(message):
            return "image_rejected"
    return kind


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delay-seconds or an HTTP date (RFC 9110); None if absent
    or unreadable; never negative."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def image_data_url(jpeg: bytes) -> str:
    try:
        from cxrmax.images import to_data_url
    except ImportError:  # pragma: no cover - cxrmax.images is part of the package
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
                    f"{_error_message(response)}"
                )
            listing = _model_listing(response)
            if listing is None:
                continue
            served = [entry["id"] for entry in listing]
            endpoint.served = served
            name = _match_served_model([self.served_model, *self.candidates], listing)
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
            return _parse_chat_response(response, endpoint.base_url)
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
            listing = (
                _model_listing(response) if response is not None and response.status_code < 400 else None
            )
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


def _model_listing(response: Any) -> list[dict[str, Any]] | None:
    """The entries of a GET /models answer that have a string ``id`` (None when it is not a listing)."""
    try:
        data = response.json()
    except (ValueError, UnicodeDecodeError):
        return None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]


def _match_served_model(wanted: list[str], listing: list[dict[str, Any]]) -> str | None:
    """The served id to send for the first of ``wanted`` the listing offers: an exact ``id``; an id with
    Ollama's default ``:latest`` tag; a ``root`` (vLLM lists the model it loaded there when
    --served-model-name renames it); or a ``root`` whose last path part is the model's (a local copy)."""
    ids = [entry["id"] for entry in listing]
    for name in wanted:
        if name in ids:
            return name
        if f"{name}:latest" in ids:
            return f"{name}:latest"
        rooted = [entry["id"] for entry in listing if entry.get("root") == name]
        if rooted:
            return rooted[0]
    for name in wanted:
        tail = name.rstrip("/").rsplit("/", 1)[-1].lower()
        matches = [
            entry["id"]
            for entry in listing
            if isinstance(entry.get("root"), str)
            and entry["root"].rstrip("/").rsplit("/", 1)[-1].lower() == tail
        ]
        if len(matches) == 1:
            return matches[0]
    return None


#: A think block at the start of an answer from a server run without a reasoning parser: <think>...</think>
#: (DeepSeek-R1, QwQ, Qwen3, GLM-4.5V) or Kimi-VL-Thinking's ◁think▷...◁/think▷; unclosed when cut.
_THINK_BLOCK = re.compile(r"\s*(?:<think>|◁think▷)(.*?)(?:</think>|◁/think▷|\Z)(.*)", re.DOTALL)


def split_think_block(text: str) -> tuple[str, str | None]:
    """(answer, reasoning) of an answer that starts with a think block; (text, None) otherwise. So that
    the ``reasoning`` column means the same with and without a server-side reasoning parser. An answer
    that is only (or was cut inside) its think block keeps the reasoning as its text too."""
    found = _THINK_BLOCK.match(text)
    if found is None:
        return text, None
    reasoning, answer = found.group(1).strip(), found.group(2).strip()
    if not reasoning:
        return (answer or text), None
    return (answer or reasoning), reasoning


_TITLE = re.compile(r"<title[^>]*>(.*?)</title>|<h1[^>]*>(.*?)</h1>", re.IGNORECASE | re.DOTALL)
_TAGS = re.compile(r"<[^>]+>")


def _describe_body(content: bytes, content_type: str = "") -> str:
    """A short readable account of a body that is not the expected JSON (an HTML page: its title)."""
    text = content.decode("utf-8", "replace").strip()
    if not text:
        return "an empty body"
    if "html" in content_type.lower() or text[:200].lstrip().lower().startswith(("<!doctype html", "<html")):
        found = _TITLE.search(text)
        title = next((g for g in found.groups() if g), "") if found else _TAGS.sub(" ", text)
        title = " ".join(html.unescape(_TAGS.sub(" ", title)).split())[:200]
        return f"an HTML page ({title!r}; a proxy or web server answered, not the model server?)"
    return repr(text[:300])


def _error_text(error: Any) -> str:
    """The message of an error value: OpenAI/vLLM ``{"message": ...}``, a string (TGI, vLLM --api-key),
    FastAPI's ``detail`` list of validation errors."""
    if isinstance(error, str):
        return error
    if isinstance(error, list):
        parts = []
        for item in error[:5]:
            if isinstance(item, dict) and "msg" in item:
                location = ".".join(str(x) for x in item.get("loc") or [])
                parts.append(f"{location}: {item['msg']}" if location else str(item["msg"]))
            else:
                parts.append(_error_text(item))
        return "; ".join(parts)
    if isinstance(error, dict):
        for name in ("message", "error", "detail", "msg"):
            if error.get(name):
                return _error_text(error[name])
    return json.dumps(error)[:500] if error is not None else ""


def _error_message(response: Any) -> str:
    """The server's own words for an HTTP error (JSON error object, plain text or an HTML page)."""
    content_type = str(response.headers.get("content-type", "")) if response.headers is not None else ""
    try:
        data = json.loads(response.content)
    except (ValueError, UnicodeDecodeError):
        described = _describe_body(response.content, content_type)
        reason = getattr(response, "reason_phrase", "")
        return f"{reason}: {described}" if reason and described == "an empty body" else described
    if isinstance(data, dict):
        for name in ("error", "message", "detail"):
            if name in data:
                return _error_text(data[name])[:500]
    return _error_text(data)[:500]


def _http_error(response: Any, endpoint: str) -> BackendError:
    status = response.status_code
    message = _error_message(response)
    headers = response.headers if response.headers is not None else {}
    retry_after = parse_retry_after(headers.get("retry-after"))
    kind = classify_error(status, message)
    if kind in HINTS:
        message = f"{message} ({HINTS[kind]})"
    return BackendError(kind, message, status, retry_after, endpoint)


#: finish_reason spellings of other servers -> the OpenAI ones (TGI: eos_token, stop_sequence; others).
FINISH_REASON_ALIASES = {
    "eos_token": "stop",
    "eos": "stop",
    "stop_sequence": "stop",
    "end_turn": "stop",
    "max_tokens": "length",
    "max_length": "length",
    "model_length": "length",
}


def _finish_reason(value: Any) -> str | None:
    if isinstance(value, dict):  # SGLang's native form {"type": "stop", "matched": ...}
        value = value.get("type")
    if value is None:
        return None
    reason = str(value).strip().lower()
    return FINISH_REASON_ALIASES.get(reason, reason) or None


def _text_parts(content: Any) -> tuple[str | None, str | None]:
    """(answer text, reasoning text) of a message content: a string, None, or a list of parts
    (``{"type": "text"}`` / ``"output_text"``; Mistral's ``{"type": "thinking", "thinking": [...]}``)."""
    if content is None or isinstance(content, str):
        return content, None
    if isinstance(content, dict):
        content = [content]
    if not isinstance(content, list):
        raise TypeError(f"message content is a {type(content).__name__}")
    texts: list[str] = []
    thoughts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind in ("thinking", "reasoning"):
                inner = part.get("thinking", part.get("reasoning", part.get("text")))
                text, _ = _text_parts(inner)
                thoughts.append(text or "")
            elif isinstance(part.get("text"), str):
                texts.append(part["text"])
    return ("".join(texts) if texts else None), ("".join(thoughts) if thoughts else None)


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 <= number < 2**31 else None


def _assemble_event_stream(content: bytes) -> dict[str, Any]:
    """A chat.completion built from server-sent ``chat.completion.chunk`` events (a server or proxy that
    streams although ``stream`` was false). A stream that stops before a finish reason or [DONE] is an
    incomplete answer (ValueError)."""
    texts: list[str] = []
    thoughts: list[str] = []
    finish: Any = None
    usage: Any = None
    done = False
    for line in content.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line.startswith("data:"):
            continue  # comments (": ping"), event:/id: lines, blank separators
        payload = line[5:].strip()
        if payload == "[DONE]":
            done = True
            continue
        chunk = json.loads(payload)
        if not isinstance(chunk, dict):
            raise ValueError("an event is not a JSON object")
        if "error" in chunk and not chunk.get("choices"):
            return chunk  # vLLM reports errors inside the stream this way
        for choice in chunk.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or choice.get("message") or {}
            text, thought = _text_parts(delta.get("content"))
            texts.append(text or "")
            reasoning = delta.get("reasoning_content") or delta.get("reasoning") or thought
            if isinstance(reasoning, str):
                thoughts.append(reasoning)
            if choice.get("finish_reason") is not None:
                finish = choice["finish_reason"]
        if chunk.get("usage"):
            usage = chunk["usage"]
    if finish is None and not done:
        raise ValueError("the event stream ended before the answer did")
    message = {
        "role": "assistant",
        "content": "".join(texts) or None,
        "reasoning_content": "".join(thoughts) or None,
    }
    return {"choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": usage}


def _loads_lenient(content: bytes) -> Any:
    """JSON from a body that may carry a UTF-8 BOM or invalid UTF-8 bytes (a token boundary inside a
    multi-byte character, as some servers emit): those bytes become U+FFFD instead of failing."""
    text = content.decode("utf-8", "replace").removeprefix("\ufeff")
    return json.loads(text)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean_text(value: str | None) -> str | None:
    """Lone surrogates (from ``\\udXXX`` escapes) cannot be stored as UTF-8: replace them with U+FFFD."""
    if value is None:
        return None
    return _LONE_SURROGATE.sub("\ufffd", value)


def _malformed(reason: str, response: Any, endpoint: str) -> BackendError:
    content_type = str(response.headers.get("content-type", "")) if response.headers is not None else ""
    return BackendError(
        "malformed",
        f"{reason}: {_describe_body(response.content, content_type)}",
        response.status_code,
        endpoint=endpoint,
    )


def _parse_chat_response(response: Any, endpoint: str) -> Completion:
    """A chat completions HTTP response -> Completion, or the BackendError that describes it (module
    docstring: kinds, reasoning, finish reasons)."""
    status = response.status_code
    if status >= 400:
        raise _http_error(response, endpoint)
    headers = response.headers if response.headers is not None else {}
    content_type = str(headers.get("content-type", "")).lower()
    try:
        if "text/event-stream" in content_type or response.content.lstrip().startswith(b"data:"):
            data = _assemble_event_stream(response.content)
        else:
            data = _loads_lenient(response.content)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _malformed(f"the answer is not a chat completion ({exc})", response, endpoint) from None
    if not isinstance(data, dict):
        raise _malformed("the answer is not a JSON object", response, endpoint)
    if (data.get("error") or data.get("object") == "error") and not data.get("choices"):
        # An error inside a 200 (llama.cpp, some proxies, errors inside a stream; vLLM 0.6's top-level
        # {"object": "error", "message", "code"} form): classify it by its code.
        error = data.get("error") or data
        code = _as_int(error.get("code")) if isinstance(error, dict) else None
        code = code if code is not None and 400 <= code < 600 else 500
        message = _error_text(error)[:500]
        kind = classify_error(code, message)
        if kind in HINTS:
            message = f"{message} ({HINTS[kind]})"
        raise BackendError(kind, message, code, endpoint=endpoint)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise _malformed("the answer has no choices", response, endpoint)
    choice = choices[0]
    message = choice.get("message")
    if message is None:
        message = {"content": choice.get("text")}  # completions-style choice
    if not isinstance(message, dict):
        raise _malformed("choices[0].message is not an object", response, endpoint)
    try:
        text, thought = _text_parts(message.get("content"))
        reasonings = []
        for name in ("reasoning_content", "reasoning", "thinking"):
            value = message.get(name)
            value = _text_parts(value)[0] if not isinstance(value, dict) else value.get("text")
            if isinstance(value, str) and value and value not in reasonings:
                reasonings.append(value)
    except TypeError as exc:
        raise _malformed(str(exc), response, endpoint) from None
    if thought and thought not in reasonings:
        reasonings.insert(0, thought)
    reasoning = _clean_text("\n\n".join(reasonings)) or None
    text = _clean_text(text)
    if reasoning is None and text:
        text, reasoning = split_think_block(text)
    finish = _finish_reason(choice.get("finish_reason"))
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt_tokens = _as_int(usage.get("prompt_tokens"))
    completion_tokens = _as_int(usage.get("completion_tokens"))
    total = _as_int(usage.get("total_tokens"))
    if (
        completion_tokens is None
        and total is not None
        and prompt_tokens is not None
        and total >= prompt_tokens
    ):
        completion_tokens = total - prompt_tokens
    has_text = bool(text and text.strip())
    if finish in ("abort", "error", "cancelled"):
        raise BackendError(
            "server",
            f"the server gave up on the request (finish_reason {finish!r}, {len(text or '')} characters kept)",
            status,
            endpoint=endpoint,
        )
    if finish == "content_filter":
        raise BackendError(
            "content_filter",
            f"the server's content filter stopped the answer ({len(text or '')} characters kept)",
            status,
            endpoint=endpoint,
        )
    if not has_text and not (reasoning and reasoning.strip()):
        raise BackendError(
            "empty",
            f"the server returned no answer text (content {repr(message.get('content'))[:80]}, "
            f"finish_reason {finish!r}, "
            f"completion_tokens {completion_tokens})",
            status,
            endpoint=endpoint,
        )
    return Completion(
        text=text if has_text else (reasoning or ""),
        finish_reason=finish,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        endpoint=endpoint,
        reasoning=reasoning,
    )


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

        from cxrmax import tinyvlm

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
