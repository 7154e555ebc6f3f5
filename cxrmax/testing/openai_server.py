"""A small OpenAI-compatible server (FastAPI + uvicorn) over a model loaded with transformers, with
switchable fault injection, for tests and demos (tiny teachers on loopback).

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (text and base64 ``image_url`` parts, ``n``,
``seed``, ``max_tokens``, ``temperature``, ``top_p``; answers with ``usage``), plus two test endpoints:
``POST /_faults`` (set the faults; JSON body with the fields of :class:`Faults`) and ``GET /_stats``.

Faults: ``script`` is a list consumed one entry per chat request: an HTTP status (429, 500, 503, 400...),
``"hang"``, ``"truncate"``, ``"malformed"``, ``"ok"``, or one of the response modes below; ``delay_s``
delays every answer; ``error_rate``/``error_status`` fail a random share of requests; ``hang``,
``truncate`` and ``malformed`` apply to every request while true. ``models`` replaces the ``data`` list
of ``GET /v1/models`` (and the ids the chat endpoint accepts), e.g. to list several models or a ``root``
that differs from the ``id``.

Response modes (script entries), to imitate what real servers and proxies send:

- ``{"status": 400, "json": {...}, "headers": {...}}``: exactly this JSON body (any status, 200 too);
- ``{"status": 502, "body": "<html>...", "content_type": "text/html"}``: exactly this raw body;
- ``{"delay": 2.0}``: answer normally after this many seconds (slower than a client timeout);
- ``"sse"``: answer normally but as a ``text/event-stream`` (as if ``stream`` were true);
- ``"cut"``: send the headers and half of a normal body, then close the connection;
- ``"die"``: shut the whole server down (later requests find the port closed) and answer 503.

In a test::

    with serve_in_thread(tiny_vlm_path, served_model_name="tiny") as server:
        server.set_faults(script=[429, 500])
        ... OpenAI client on server.base_url ...

From a shell (prints the URL, serves until Ctrl-C)::

    python -m cxrmax.testing.openai_server MODEL_DIR --served-model-name teacher-1 --port 0
"""

import argparse
import asyncio
import base64
import io
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image

from cxrmax.generate.backends import Sampling, TransformersEngine
from cxrmax.generate.responses import Completion

SERVER_READY_PREFIX = "cxrmax-openai-server listening on "


@dataclass
class Faults:
    """What the server does wrong (see the module docstring). Mutable at run time."""

    script: list[Any] = field(default_factory=list)
    delay_s: float = 0.0
    error_rate: float = 0.0
    error_status: int = 500
    hang: bool = False
    hang_s: float = 3600.0
    truncate: bool = False
    malformed: bool = False
    seed: int = 0
    models: list[dict[str, Any]] | None = None

    def update(self, **changes: Any) -> None:
        names = {f.name for f in fields(self)}
        for key, value in changes.items():
            if key not in names:
                raise ValueError(f"unknown fault {key!r}; known: {sorted(names)}")
            setattr(self, key, list(value) if key == "script" else value)


class ServerState:
    """The model, the faults and counters of one server."""

    def __init__(
        self, engine: Any, served_model_name: str, faults: Faults | None = None, stub_text: str | None = None
    ):
        self.engine = engine
        self.served_model_name = served_model_name
        self.faults = faults or Faults()
        self.stub_text = stub_text or "Stub answer: the findings support the diagnosis."
        self.stats: Counter[str] = Counter()
        self.lock = threading.Lock()
        self._rng = random.Random(self.faults.seed)
        #: called by the "die" fault to stop the server (set by serve_in_thread / main)
        self.on_die: Any = None

    def model_listing(self) -> list[dict[str, Any]]:
        """The ``data`` list of GET /v1/models."""
        if self.faults.models is not None:
            return list(self.faults.models)
        return [{"id": self.served_model_name, "object": "model", "created": 0, "owned_by": "cxrmax"}]

    def serves(self, model: Any) -> bool:
        return model == self.served_model_name or any(m.get("id") == model for m in self.faults.models or [])

    def next_action(self) -> Any:
        with self.lock:
            faults = self.faults
            if faults.script:
                return faults.script.pop(0)
            if faults.hang:
                return "hang"
            if faults.malformed:
                return "malformed"
            if faults.error_rate and self._rng.random() < faults.error_rate:
                return faults.error_status
            if faults.truncate:
                return "truncate"
            return "ok"


def _error(status: int, message: str, kind: str = "error") -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(
        {"object": "error", "error": {"message": message, "type": kind, "code": status}}, status_code=status
    )


def _openai_to_hf(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI messages -> HF chat messages with {"type": "image"} parts, plus the decoded images."""
    converted, images = [], []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str) or content is None:
            converted.append({"role": message.get("role", "user"), "content": content or ""})
            continue
        parts = []
        for part in content:
            kind = part.get("type")
            if kind == "text":
                parts.append({"type": "text", "text": part.get("text", "")})
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url", "")
                if not url.startswith("data:"):
                    raise ValueError("only data: image URLs are supported by this server")
                payload = url.split(",", 1)[1]
                image = Image.open(io.BytesIO(base64.b64decode(payload)))
                image.load()
                images.append(image.convert("RGB"))
                parts.append({"type": "image"})
            else:
                raise ValueError(f"unsupported content part type {kind!r}")
        converted.append({"role": message.get("role", "user"), "content": parts})
    return converted, images


def create_app(state: ServerState) -> Any:
    """The FastAPI app serving ``state``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="cxrmax test OpenAI-compatible server")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": state.model_listing()}

    @app.get("/_stats")
    async def stats() -> dict[str, Any]:
        return dict(state.stats)

    @app.post("/_faults")
    async def set_faults(request: Request) -> dict[str, Any]:
        try:
            state.faults.update(**(await request.json()))
        except (ValueError, TypeError) as exc:
            return _error(400, str(exc))
        return asdict(state.faults)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        state.stats["requests"] += 1
        try:
            body = await request.json()
        except ValueError:
            state.stats["bad_request"] += 1
            return _error(400, "request body is not JSON", "invalid_request_error")
        if not state.serves(body.get("model")):
            state.stats["wrong_model"] += 1
            return _error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError")
        action = state.next_action()
        if state.faults.delay_s:
            await asyncio.sleep(state.faults.delay_s)
        action, fault = await _injected_fault(state, action)
        if fault is not None:
            return fault
        try:
            messages, images = _openai_to_hf(body.get("messages") or [])
        except (ValueError, KeyError, IndexError, OSError) as exc:
            state.stats["bad_request"] += 1
            return _error(400, f"bad messages: {exc}", "invalid_request_error")
        n = int(body.get("n") or 1)
        sampling = _sampling(body)
        if state.engine is None:
            completions = _stub_completions(state.stub_text, sampling, n, len(images))
        else:
            try:
                completions = await run_in_threadpool(state.engine.generate, messages, images, sampling, n)
            except (ValueError, RuntimeError) as exc:
                state.stats["bad_request"] += 1
                return _error(400, f"generation failed: {exc}", "invalid_request_error")
        if action == "truncate":
            state.stats["truncated"] += 1
            for completion in completions:
                completion.text = completion.text[: max(1, len(completion.text) // 2)]
                completion.finish_reason = "length"
        answer = _chat_completion(state.served_model_name, completions)
        if action == "cut":
            state.stats["cut"] += 1
            return _cut_response(json.dumps(answer).encode())
        state.stats["completed"] += 1
        if action == "sse":
            state.stats["sse"] += 1
            return Response(content=_as_event_stream(answer), media_type="text/event-stream")
        return answer

    return app


async def _injected_fault(state: ServerState, action: Any) -> tuple[Any, Any]:
    """Carry out a scripted fault: (the action left for the normal answer, a response that replaces
    it or None). A ``{"delay": s}`` entry waits, then answers normally."""
    from fastapi.responses import Response

    if isinstance(action, dict):
        if "delay" not in action:
            state.stats["canned"] += 1
            return action, _canned_response(action)
        await asyncio.sleep(float(action["delay"]))
        state.stats["slow"] += 1
        return "ok", None
    if action == "die":
        state.stats["died"] += 1
        if state.on_die is not None:
            state.on_die()
            await asyncio.sleep(0.3)  # uvicorn stops listening within 0.1 s: later connects are refused
        return action, _error(503, "the server is shutting down")
    if action == "hang":
        state.stats["hang"] += 1
        await asyncio.sleep(state.faults.hang_s)
        return action, _error(504, "hung")
    if isinstance(action, int):
        state.stats[f"status_{action}"] += 1
        response = _error(action, "injected fault")
        if action == 429:
            response.headers["retry-after"] = "0"
        return action, response
    if action == "malformed":
        state.stats["malformed"] += 1
        return action, Response(
            content=b'{"id": "x", "choices": [{"message": {"content": "trunc',
            media_type="application/json",
        )
    return action, None


def _sampling(body: dict[str, Any]) -> Sampling:
    """The sampling parameters of an OpenAI chat request body (OpenAI's defaults where absent)."""
    return Sampling(
        temperature=float(body.get("temperature", 1.0) if body.get("temperature") is not None else 1.0),
        top_p=float(body.get("top_p") or 1.0),
        max_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens") or 64),
        seed=body.get("seed"),
    )


def _stub_completions(stub_text: str, sampling: Sampling, n: int, n_images: int) -> list[Completion]:
    """The stub's answers: ``stub_text`` cut at max_tokens words (finish "length" when cut)."""
    words = stub_text.split()
    cut = words[: sampling.max_tokens]
    finish = "stop" if len(cut) == len(words) else "length"
    return [Completion(" ".join(cut), finish, 10 + 64 * n_images, len(cut)) for _ in range(n)]


def _chat_completion(model: str, completions: list[Completion]) -> dict[str, Any]:
    """An OpenAI ``chat.completion`` object with one choice per completion and the usage counts."""
    prompt_tokens = completions[0].prompt_tokens or 0
    completion_tokens = sum(c.completion_tokens or 0 for c in completions)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:16]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
            }
            for i, c in enumerate(completions)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def _canned_response(spec: dict[str, Any]) -> Any:
    """A response written by the test: ``json`` (any JSON value) or a raw ``body`` with ``content_type``."""
    from fastapi.responses import Response

    status = int(spec.get("status", 200))
    headers = dict(spec.get("headers") or {})
    if "json" in spec:
        return Response(json.dumps(spec["json"]).encode(), status, headers, media_type="application/json")
    body = spec.get("body", "")
    return Response(
        body.encode() if isinstance(body, str) else body,
        status,
        headers,
        media_type=spec.get("content_type", "text/plain"),
    )


def _as_event_stream(answer: dict[str, Any]) -> bytes:
    """A complete non-streamed answer rewritten as the chunks vLLM streams (role, content pieces, the
    finish reason, a usage chunk, [DONE])."""
    base = {"id": answer["id"], "object": "chat.completion.chunk", "created": answer["created"]}
    base["model"] = answer["model"]
    choice = answer["choices"][0]
    text = choice["message"]["content"] or ""
    middle = len(text) // 2
    deltas = [{"role": "assistant", "content": ""}, {"content": text[:middle]}, {"content": text[middle:]}]
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]})
    chunks.append({**base, "choices": [], "usage": answer["usage"]})
    lines = [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
    return "".join(lines).encode()


def _cut_response(body: bytes) -> Any:
    """Headers promising the whole body, half of it, then the connection closes (a crashed proxy or
    server): the ASGI app returns without completing the response, so uvicorn drops the connection."""
    from starlette.responses import Response

    class CutResponse(Response):
        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})

    return CutResponse()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class ServerHandle:
    """A server running in a thread of this process. Use as a context manager or call stop()."""

    def __init__(self, state: ServerState, server: Any, thread: threading.Thread, host: str, port: int):
        self.state = state
        self._server = server
        self._thread = thread
        self.host = host
        self.port = port
        self.base_url = f"http://{host}:{port}/v1"

    @property
    def faults(self) -> Faults:
        return self.state.faults

    @property
    def stats(self) -> Counter[str]:
        return self.state.stats

    def set_faults(self, **changes: Any) -> None:
        """Replace the faults: fields not given return to their defaults."""
        defaults = asdict(Faults())
        defaults.update(changes)
        self.state.faults.update(**defaults)

    def reset_stats(self) -> None:
        self.state.stats.clear()

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def load_engine(model_path: str | Path | None, device: str | None = None) -> Any:
    if model_path is None:
        return None
    return TransformersEngine(model_path, device=device or "cpu")


def serve_in_thread(
    model_path: str | Path | None = None,
    served_model_name: str | None = None,
    *,
    engine: Any = None,
    faults: Faults | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    stub_text: str | None = None,
) -> ServerHandle:
    """Start the server in a background thread on ``host`` (a free port when ``port`` is 0) and return
    once it accepts connections. ``model_path=None`` and no ``engine``: a stub that returns ``stub_text``."""
    import uvicorn

    if engine is None and model_path is not None:
        engine = load_engine(model_path)
    name = served_model_name or (Path(model_path).name if model_path is not None else "stub")
    state = ServerState(engine, name, faults, stub_text)
    sock = _bind(host, port)
    config = uvicorn.Config(
        create_app(state), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    state.on_die = lambda: setattr(server, "should_exit", True)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"openai-server-{name}"
    )
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    return ServerHandle(state, server, thread, host, sock.getsockname()[1])


class ServerProcess:
    """A server running as a subprocess (``python -m cxrmax.testing.openai_server``)."""

    def __init__(self, process: subprocess.Popen, base_url: str):
        self.process = process
        self.base_url = base_url

    def set_faults(self, **changes: Any) -> None:
        import httpx

        defaults = asdict(Faults())
        defaults.update(changes)
        httpx.post(
            self.base_url.removesuffix("/v1") + "/_faults", json=defaults, timeout=10
        ).raise_for_status()

    def stats(self) -> dict[str, int]:
        import httpx

        return httpx.get(self.base_url.removesuffix("/v1") + "/_stats", timeout=10).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_subprocess(
    model_path: str | Path | None = None,
    served_model_name: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    timeout: float = 120.0,
    extra_args: list[str] | None = None,
) -> ServerProcess:
    """Start the server in a subprocess and return once it listens (its URL is read from its stdout)."""
    command = [sys.executable, "-m", "cxrmax.testing.openai_server", "--host", host, "--port", str(port)]
    if model_path is not None:
        command.append(str(model_path))
    if served_model_name:
        command += ["--served-model-name", served_model_name]
    command += extra_args or []
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith(SERVER_READY_PREFIX):
            return ServerProcess(process, line[len(SERVER_READY_PREFIX) :].strip())
    process.kill()
    raise RuntimeError(f"the server subprocess did not start: {' '.join(command)}")


def main(argv: list[str] | None = None) -> None:
    """Serve a model folder (or a stub) until interrupted."""
    import uvicorn

    parser = argparse.ArgumentParser(description="OpenAI-compatible test server over a transformers model.")
    parser.add_argument("model", nargs="?", help="model folder (omit for a stub that returns fixed text)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added to every answer")
    args = parser.parse_args(argv)
    engine = load_engine(args.model, args.device)
    name = args.served_model_name or (Path(args.model).name if args.model else "stub")
    state = ServerState(engine, name, Faults(delay_s=args.delay))
    sock = _bind(args.host, args.port)
    print(f"{SERVER_READY_PREFIX}http://{args.host}:{sock.getsockname()[1]}/v1", flush=True)
    config = uvicorn.Config(
        create_app(state), log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1
    )
    server = uvicorn.Server(config)
    state.on_die = lambda: setattr(server, "should_exit", True)
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
