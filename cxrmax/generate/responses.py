"""What an OpenAI-compatible server sent back, read: a `Completion`, or a `BackendError` classified for
the retry policy.

Errors are raised as :class:`BackendError` with a ``kind``, an HTTP ``status`` when there is one, and
``retryable``. Kinds (what real OpenAI-compatible servers send, and what is done about it):

- retryable: ``rate_limit`` (429; Retry-After in seconds or as an HTTP date is honoured), ``server``
  (5xx, a 200 whose body is an error object, finish_reason ``abort``/``error``), ``timeout`` (no answer
  within the timeout, 408), ``connection`` (refused, reset, closed mid-body), ``malformed`` (not JSON,
  HTML from a proxy, no choices, a stream cut before its end, a body over
  ``backends.openai.MAX_RESPONSE_BYTES`` (32 MiB), which is not read further);
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

import email.utils
import html
import json
import re
import time
from dataclasses import dataclass
from typing import Any

RETRYABLE_KINDS = {"rate_limit", "server", "timeout", "connection", "malformed"}
#: Errors about the whole run (credentials, the model/URL), not about one request.
RUN_LEVEL_KINDS = {"auth", "not_found"}


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


def model_listing(response: Any) -> list[dict[str, Any]] | None:
    """The entries of a GET /models answer that have a string ``id`` (None when it is not a listing)."""
    try:
        data = response.json()
    except (ValueError, UnicodeDecodeError):
        return None
    entries = data.get("data") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        return None
    return [e for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)]


def match_served_model(wanted: list[str], listing: list[dict[str, Any]]) -> str | None:
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


def error_message(response: Any) -> str:
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
    message = error_message(response)
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


def parse_chat_response(response: Any, endpoint: str) -> Completion:
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
