"""``openai``: any OpenAI-compatible chat server (``vllm serve``, the test server, ...) over HTTP.

Several base URLs spread the requests (the least busy server gets the next one). Uses aiohttp with one
connection pool per server and no hidden retries: the orchestrator owns retries, backoff and timeouts,
and errors are classified into the kinds it understands (`cxrmax.generate.responses`)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from cxrmax.core.errors import CxrmaxError
from cxrmax.generate.backends.base import Backend, Sampling, chat_messages, image_data_url
from cxrmax.generate.responses import (
    BackendError,
    Completion,
    error_message,
    match_served_model,
    model_listing,
    parse_chat_response,
)

__all__ = ["MAX_RESPONSE_BYTES", "OpenAIBackend"]


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


#: The most of one answer's body that is read. A chat completion is a few kB (a long answer with its
#: reasoning, well under 1 MiB); a body past this is not one (a misrouted download, a broken proxy), and
#: reading it whole at --concurrency 64 would hold gigabytes.
MAX_RESPONSE_BYTES = 32 * 1024 * 1024


async def _read_limited(response: Any, endpoint: str, limit: int | None = None) -> bytes:
    """The body, or BackendError(malformed) as soon as it is known to be longer than ``limit``."""
    limit = MAX_RESPONSE_BYTES if limit is None else limit
    too_big = BackendError(
        "malformed",
        f"the server sent a body of more than {limit // (1024 * 1024)} MiB (HTTP {response.status}); a chat "
        "completion is a few kB: is --base-url the model server?",
        response.status,
        endpoint=endpoint,
    )
    declared = response.content_length
    if declared is not None and declared > limit:
        raise too_big
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(1 << 20):
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


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
                content = await _read_limited(response, endpoint.base_url)
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
        if self.served_model in endpoint.served:  # listed, yet not found: not "pass another --model"
            return (
                f" (GET /models lists {self.served_model!r} itself, at {endpoint.base_url}: the server may be "
                "reloading its models, or the chat completions path is wrong: is --base-url right (it usually "
                "ends in /v1), or does a proxy in between rewrite paths?)"
            )
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
