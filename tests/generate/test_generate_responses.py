"""`cxrmax generate` against what real OpenAI-compatible servers answer (vLLM 0.6-0.11, SGLang, TGI,
llama.cpp server, Ollama's /v1, LM Studio) and what proxies in front of them do, over real HTTP on
loopback: the test server (cxrmax.testing, stub model) replays response bodies written here from those
servers' formats. Each case pins the classification (stored answer / retried / permanent failure in
the ledger / run stopped with a clear message) and that the store stays exactly-once."""

from __future__ import annotations

import email.utils
import json
import re
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cxrmax.core.errors import CxrmaxError
from cxrmax.generate import read_trajectories
from cxrmax.generate.orchestrator import GenerateOptions, GenerationAborted, generate
from cxrmax.generate.prompts import load_prompt
from cxrmax.generate.responses import parse_retry_after
from cxrmax.generate.roster import resolve_model
from cxrmax.generate.status import generation_status
from cxrmax.generate.store import FailureLedger

pytest.importorskip("fastapi")

MODEL = "stub-vlm"
STUB_TEXT = "The cardiac silhouette is enlarged and there is a small left pleural effusion."


@pytest.fixture(scope="module")
def stub_server():
    from cxrmax.testing import serve_in_thread

    handle = serve_in_thread(None, MODEL, stub_text=STUB_TEXT)
    yield handle
    handle.stop()


@pytest.fixture
def server(stub_server):
    stub_server.set_faults()
    stub_server.reset_stats()
    return stub_server


@pytest.fixture(scope="module")
def rows(mini_mimic, tmp_path_factory):
    """Selections of the first 2 and 6 rows of the mini MIMIC-CXR (small films first)."""
    from cxrmax.mimic import MimicCXR, write_selection

    folder = tmp_path_factory.mktemp("selection-responses")
    table = write_selection(MimicCXR(mini_mimic).select(), folder / "all.parquet")
    table = pq.read_table(table)
    paths = {}
    for n in (2, 6):
        paths[n] = folder / f"rows{n}.parquet"
        pq.write_table(table.slice(0, n), paths[n])
    return paths


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("image-cache")


def _options(selection, mimic_root, out, base_urls, image_cache, **overrides) -> GenerateOptions:
    settings = dict(
        model=resolve_model(MODEL),
        selection=Path(selection),
        mimic_root=Path(mimic_root),
        out=Path(out),
        prompt=load_prompt("rationale"),
        base_urls=list(base_urls),
        max_tokens=64,
        concurrency=1,  # one request at a time: the server's script is consumed in selection order
        backoff_base=0.01,
        backoff_max=0.05,
        max_attempts=3,
        timeout=5.0,
        image_cache=image_cache,
    )
    settings.update(overrides)
    return GenerateOptions(**settings)


def _ledger(out) -> list[dict]:
    [folder] = (Path(out) / "trajectories").iterdir()
    ledger = FailureLedger(folder / "failures.sqlite")
    try:
        return ledger.rows()
    finally:
        ledger.close()


def _answer(message: dict, finish_reason="stop", usage="default", **extra) -> dict:
    """A chat.completion body as vLLM writes it (plus ``extra`` top-level fields)."""
    body = {
        "id": "chatcmpl-5b0e2f7c9a3d4e1f8b6a0c2d4e6f8a1b",
        "object": "chat.completion",
        "created": 1731400000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "tool_calls": [], **message},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
        ],
        "usage": {
            "prompt_tokens": 812,
            "total_tokens": 990,
            "completion_tokens": 178,
            "prompt_tokens_details": None,
        }
        if usage == "default"
        else usage,
        "prompt_logprobs": None,
        **extra,
    }
    if usage == "absent":
        del body["usage"]
    return body


QWEN3_REASONING = (
    "Okay, let me look at this chest film. The left costophrenic angle is blunted with a meniscus, "
    "so there is fluid. The heart is more than half the thoracic width on this PA view."
)
R1_CUT_REASONING = "<think> is not echoed by the parser. First, the lungs: no focal consolidation. Then the"
NGINX_413 = (
    "<html>\r\n<head><title>413 Request Entity Too Large</title></head>\r\n<body>\r\n"
    "<center><h1>413 Request Entity Too Large</h1></center>\r\n<hr><center>nginx/1.24.0</center>\r\n"
    "</body>\r\n</html>\r\n"
)
NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
    "</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
)
CLOUDFLARE_504 = (
    '<!DOCTYPE html>\n<html lang="en-US"><head><title>example.org | 504: Gateway time-out</title></head>'
    "<body><h1>Gateway time-out</h1><p>Error code 504</p></body></html>"
)


def ok(body: dict) -> dict:
    return {"status": 200, "json": body}


def _sse(*chunks) -> str:
    """A vLLM event stream: one `data:` line per chunk (dicts as chat.completion.chunk), blank-line separated."""
    head = {"id": "chatcmpl-1f2e", "object": "chat.completion.chunk", "created": 1731400003, "model": MODEL}
    lines = []
    for chunk in chunks:
        lines.append(chunk if isinstance(chunk, str) else "data: " + json.dumps({**head, **chunk}))
    return "\n\n".join(lines) + "\n\n"


def _delta(delta=None, finish=None) -> dict:
    return {"choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}]}


SSE_REASONING = _sse(
    _delta({"role": "assistant", "content": ""}),
    ": ping - 2024-11-12 08:00:00",
    _delta({"reasoning_content": "Meniscus at "}),
    _delta({"reasoning_content": "the left base."}),
    _delta({"content": "Small left "}),
    _delta({"content": "effusion."}, finish="stop"),
    {"choices": [], "usage": {"prompt_tokens": 812, "completion_tokens": 9, "total_tokens": 821}},
    "data: [DONE]",
)
#: a multi-byte character cut after two bytes (raw, invalid UTF-8) and a lone surrogate escape
BROKEN_UNICODE = (
    json.dumps(_answer({"content": "Effusion @@ and \ud83d end."})).encode().replace(b"@@", b"\xe2\x82")
)
SSE_CUT = _sse(_delta({"role": "assistant", "content": ""}), _delta({"content": "The heart"}))


# (case id, script for the second request, expected stored row fields)
STORED_CASES = [
    (
        "vllm-qwen3-reasoning-content-and-content",
        [
            ok(
                _answer(
                    {
                        "reasoning_content": QWEN3_REASONING,
                        "content": "Cardiomegaly and a left pleural effusion.",
                    }
                )
            )
        ],
        {
            "text": "Cardiomegaly and a left pleural effusion.",
            "reasoning": QWEN3_REASONING,
            "finish_reason": "stop",
        },
    ),
    (
        "vllm-deepseek-r1-parser-cut-while-thinking-content-null",
        [ok(_answer({"reasoning_content": R1_CUT_REASONING, "content": None}, finish_reason="length"))],
        {"text": R1_CUT_REASONING, "reasoning": R1_CUT_REASONING, "finish_reason": "length"},
    ),
    (
        "vllm-0.11-reasoning-field-name",
        [
            ok(
                _answer(
                    {
                        "reasoning": "Blunted left angle.",
                        "reasoning_content": "Blunted left angle.",
                        "content": "Effusion.",
                    }
                )
            )
        ],
        {"text": "Effusion.", "reasoning": "Blunted left angle."},
    ),
    (
        "ollama-v1-reasoning-field",
        [
            ok(
                {
                    "id": "chatcmpl-417",
                    "object": "chat.completion",
                    "created": 1731400001,
                    "model": MODEL,
                    "system_fingerprint": "fp_ollama",
                    "choices": [
                        {
                            "index": 0,
                            "message": {
                                "role": "assistant",
                                "content": "No acute findings.",
                                "reasoning": "Clear lungs.",
                            },
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 301, "completion_tokens": 24, "total_tokens": 325},
                }
            )
        ],
        {
            "text": "No acute findings.",
            "reasoning": "Clear lungs.",
            "prompt_tokens": 301,
            "completion_tokens": 24,
        },
    ),
    (
        "deepseek-r1-distill-without-reasoning-parser",
        [
            ok(
                _answer(
                    {
                        "content": "<think>\nBlunted left costophrenic angle.\n</think>\n\nLeft pleural effusion."
                    }
                )
            )
        ],
        {"text": "Left pleural effusion.", "reasoning": "Blunted left costophrenic angle."},
    ),
    (
        "kimi-vl-thinking-without-reasoning-parser",
        [ok(_answer({"content": "◁think▷The heart is wide.◁/think▷Cardiomegaly."}))],
        {"text": "Cardiomegaly.", "reasoning": "The heart is wide."},
    ),
    (
        "think-block-cut-by-max-tokens-without-parser",
        [ok(_answer({"content": "<think>\nFirst the lungs, then the"}, finish_reason="length"))],
        {
            "text": "First the lungs, then the",
            "reasoning": "First the lungs, then the",
            "finish_reason": "length",
        },
    ),
    (
        "think-word-inside-an-answer-is-left-alone",
        [ok(_answer({"content": "I think </think> is a tag; no effusion."}))],
        {"text": "I think </think> is a tag; no effusion.", "reasoning": None},
    ),
    (
        "content-as-list-of-text-parts",
        [
            ok(
                _answer(
                    {
                        "content": [
                            {"type": "text", "text": "Cardiomegaly "},
                            {"type": "text", "text": "is present."},
                        ]
                    }
                )
            )
        ],
        {"text": "Cardiomegaly is present.", "reasoning": None},
    ),
    (
        "mistral-magistral-thinking-part",
        [
            ok(
                _answer(
                    {
                        "content": [
                            {
                                "type": "thinking",
                                "thinking": [{"type": "text", "text": "The heart looks large."}],
                            },
                            {"type": "text", "text": "Cardiomegaly."},
                        ]
                    }
                )
            )
        ],
        {"text": "Cardiomegaly.", "reasoning": "The heart looks large."},
    ),
    (
        "finish-length-is-stored-as-truncated",
        [ok(_answer({"content": "The left costophrenic angle is"}, finish_reason="length"))],
        {"text": "The left costophrenic angle is", "finish_reason": "length"},
    ),
    (
        "finish-null-llama-cpp-style",
        [ok(_answer({"content": "Support devices in place."}, finish_reason=None))],
        {"text": "Support devices in place.", "finish_reason": None},
    ),
    (
        "tgi-eos-token-finish-reason",
        [
            ok(
                {
                    "object": "chat.completion",
                    "id": "",
                    "created": 1731400002,
                    "model": "Qwen/Qwen2-VL-7B-Instruct",
                    "system_fingerprint": "2.4.1-native",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "Mild edema.", "tool_calls": None},
                            "logprobs": None,
                            "finish_reason": "eos_token",
                        }
                    ],
                    "usage": {"prompt_tokens": 900, "completion_tokens": 5, "total_tokens": 905},
                }
            )
        ],
        {"text": "Mild edema.", "finish_reason": "stop", "completion_tokens": 5},
    ),
    (
        "usage-missing",
        [ok(_answer({"content": "Normal study."}, usage="absent"))],
        {"text": "Normal study.", "prompt_tokens": None, "completion_tokens": None},
    ),
    (
        "usage-null",
        [ok(_answer({"content": "Normal study."}, usage=None))],
        {"prompt_tokens": None, "completion_tokens": None},
    ),
    (
        "usage-with-nulls-and-only-a-total",
        [
            ok(
                _answer(
                    {"content": "Normal study."},
                    usage={"prompt_tokens": 812, "completion_tokens": None, "total_tokens": 820},
                )
            )
        ],
        {"prompt_tokens": 812, "completion_tokens": 8},
    ),
    (
        "sglang-extra-unknown-fields",
        [
            ok(
                _answer(
                    {"content": "Right lower lobe opacity.", "reasoning_content": None},
                    extra_field={"nested": [1, 2]},
                    system_fingerprint=None,
                    kv_transfer_params=None,
                    service_tier=None,
                )
            )
        ],
        {"text": "Right lower lobe opacity.", "reasoning": None},
    ),
    (
        "sse-although-stream-was-false",
        ["sse"],
        {
            "text": " ".join(STUB_TEXT.split()),
            "finish_reason": "stop",
            "completion_tokens": len(STUB_TEXT.split()),
        },
    ),
    (
        "sse-with-reasoning-deltas-and-keepalive-comments",
        [{"status": 200, "body": SSE_REASONING, "content_type": "text/event-stream; charset=utf-8"}],
        {"text": "Small left effusion.", "reasoning": "Meniscus at the left base.", "completion_tokens": 9},
    ),
    (
        "sse-cut-before-the-end-is-retried",
        [{"status": 200, "body": SSE_CUT, "content_type": "text/event-stream"}],
        {"attempts": 2},
    ),
    (
        "invalid-utf8-byte-and-lone-surrogate-escape",
        [{"status": 200, "body": BROKEN_UNICODE, "content_type": "application/json"}],
        {"text": "Effusion \ufffd and \ufffd end.", "reasoning": None},
    ),
    (
        "utf8-bom-before-the-json",
        [
            {
                "status": 200,
                "body": "\ufeff" + json.dumps(_answer({"content": "Clear lungs."})),
                "content_type": "application/json",
            }
        ],
        {"text": "Clear lungs."},
    ),
    # Retried, then stored (attempts counts them).
    (
        "vllm-finish-abort-is-retried",
        [
            ok(
                _answer(
                    {"content": ""},
                    finish_reason="abort",
                    usage={"prompt_tokens": 812, "completion_tokens": 0},
                )
            )
        ],
        {"text": " ".join(STUB_TEXT.split()), "attempts": 2},
    ),
    ("choices-empty-is-retried", [ok(_answer({"content": "x"}) | {"choices": []})], {"attempts": 2}),
    (
        "error-object-inside-a-200-is-retried",
        [
            ok(
                {
                    "error": {
                        "code": 500,
                        "message": "llama_decode failed: KV cache is full",
                        "type": "server_error",
                    }
                }
            )
        ],
        {"attempts": 2},
    ),
    (
        "vllm-0.6-error-object-with-status-200-is-retried",
        [
            ok(
                {
                    "object": "error",
                    "message": "Engine loop is not running",
                    "type": "InternalServerError",
                    "code": 500,
                }
            )
        ],
        {"attempts": 2},
    ),
    ("connection-closed-mid-body-is-retried", ["cut"], {"attempts": 2}),
    ("answer-slower-than-the-timeout-is-retried", [{"delay": 1.0}], {"attempts": 2}),
    (
        "5xx-and-proxy-pages-are-retried",
        [
            {
                "status": 500,
                "json": {
                    "object": "error",
                    "message": "Internal Server Error",
                    "type": "InternalServerError",
                    "param": None,
                    "code": 500,
                },
            },
            {"status": 502, "body": NGINX_502, "content_type": "text/html"},
        ],
        {"attempts": 3},
    ),
    (
        "503-and-504-are-retried",
        [
            {
                "status": 503,
                "json": {
                    "error": {
                        "message": "Service Unavailable",
                        "type": "ServiceUnavailableError",
                        "param": None,
                        "code": 503,
                    }
                },
                "headers": {"retry-after": "0"},
            },
            {"status": 504, "body": CLOUDFLARE_504, "content_type": "text/html; charset=UTF-8"},
        ],
        {"attempts": 3},
    ),
    (
        "429-without-retry-after-is-retried",
        [{"status": 429, "json": {"error": {"message": "Too Many Requests", "code": 429}}}],
        {"attempts": 2},
    ),
]


@pytest.mark.parametrize("script,expected", [c[1:] for c in STORED_CASES], ids=[c[0] for c in STORED_CASES])
def test_answers_that_are_stored(server, rows, mini_mimic, image_cache, tmp_path, script, expected):
    server.set_faults(script=["ok", *script])
    options = _options(rows[2], mini_mimic, tmp_path, [server.base_url], image_cache, timeout=0.5)
    stats = generate(options)
    assert (stats.done, stats.failed) == (2, 0)
    second_id = pq.read_table(rows[2], columns=["sample_id"])["sample_id"][1].as_py()
    [second] = [r for r in read_trajectories(tmp_path).to_pylist() if r["sample_id"] == second_id]
    for name, value in expected.items():
        assert second[name] == value, name
    assert second["attempts"] == expected.get("attempts", 1)
    [status] = generation_status(tmp_path)
    assert (status.distinct_keys, status.duplicates, status.failed, status.missing) == (2, 0, 0, 0)


VLLM_CONTEXT_NEW = {
    "error": {
        "message": "'max_tokens' or 'max_completion_tokens' is too large: 4096. This model's maximum context "
        "length is 4096 tokens and your request has 1210 input tokens (4096 > 4096 - 1210). None",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}
VLLM_CONTEXT_OLD = {
    "object": "error",
    "message": "This model's maximum context length is 4096 tokens. However, you requested 5306 tokens (1210 in "
    "the messages, 4096 in the completion). Please reduce the length of the messages or completion.",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}
TGI_CONTEXT = {
    "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 1210 `inputs` "
    "tokens and 4096 `max_new_tokens`",
    "error_type": "validation",
}
LLAMA_CPP_CONTEXT = {
    "error": {
        "code": 400,
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 5120,
        "n_ctx": 4096,
    }
}

SGLANG_CONTEXT = {
    "object": "error",
    "message": "The input (5120 tokens) is longer than the model's context length (4096 tokens).",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}
VLLM_V1_PROMPT_TOO_LONG = {
    "error": {
        "message": "The decoder prompt (length 5120) is longer than the maximum model length of 4096. Make sure "
        "that `max_model_len` is no smaller than the number of text tokens plus multimodal tokens. For image "
        "inputs, the number of image tokens depends on the number of images, and possibly their aspect ratios "
        "as well.",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}
LLAMA_CPP_NO_MMPROJ = {
    "error": {
        "code": 500,
        "message": "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj",
        "type": "server_error",
    }
}

# (case id, script for the second request, kind, retryable, message pattern)
FAILED_CASES = [
    (
        "vllm-context-length-new-wording",
        [{"status": 400, "json": VLLM_CONTEXT_NEW}],
        "context_length",
        False,
        r"maximum context length.*--max-tokens",
    ),
    (
        "vllm-0.6-context-length",
        [{"status": 400, "json": VLLM_CONTEXT_OLD}],
        "context_length",
        False,
        r"reduce the length.*--max-model-len",
    ),
    (
        "tgi-422-context-length",
        [{"status": 422, "json": TGI_CONTEXT}],
        "context_length",
        False,
        r"max_new_tokens",
    ),
    (
        "llama-cpp-context-size",
        [{"status": 400, "json": LLAMA_CPP_CONTEXT}],
        "context_length",
        False,
        r"context size",
    ),
    (
        "vllm-cannot-identify-image",
        [
            {
                "status": 400,
                "json": {
                    "error": {
                        "message": "cannot identify image file <_io.BytesIO object at 0x7f3a2c1b5f80>",
                        "type": "BadRequestError",
                        "param": None,
                        "code": 400,
                    }
                },
            }
        ],
        "image_rejected",
        False,
        r"cannot identify image.*limit-mm-per-prompt",
    ),
    (
        "vllm-image-limit-zero",
        [
            {
                "status": 400,
                "json": {
                    "object": "error",
                    "message": "At most 0 image(s) may be provided in one request. You can set `--limit-mm-per-prompt` to increase this limit if the model supports it.",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                },
            }
        ],
        "image_rejected",
        False,
        r"At most 0 image",
    ),
    (
        "nginx-413-html",
        [{"status": 413, "body": NGINX_413, "content_type": "text/html"}],
        "too_large",
        False,
        r"413 Request Entity Too Large.*--image-max-edge",
    ),
    (
        "fastapi-422-validation",
        [
            {
                "status": 422,
                "json": {
                    "detail": [
                        {"type": "missing", "loc": ["body", "messages"], "msg": "Field required", "input": {}}
                    ]
                },
            }
        ],
        "client",
        False,
        r"body\.messages: Field required",
    ),
    ("content-null-and-no-reasoning", [ok(_answer({"content": None}))], "empty", False, r"no answer text"),
    ("content-empty-string", [ok(_answer({"content": "  \n"}))], "empty", False, r"no answer text"),
    (
        "content-filter",
        [ok(_answer({"content": "I cannot"}, finish_reason="content_filter"))],
        "content_filter",
        False,
        r"content filter",
    ),
    ("every-attempt-slower-than-the-timeout", [{"delay": 1.0}] * 3, "timeout", True, r"no answer after 0.5s"),
    (
        "html-page-with-200",
        [
            {
                "status": 200,
                "body": "<!doctype html><html><head><title>Sign in - Corporate Proxy</title></head></html>",
                "content_type": "text/html",
            }
        ]
        * 3,
        "malformed",
        True,
        r"HTML page \('Sign in - Corporate Proxy'",
    ),
    (
        "nginx-502-on-every-attempt",
        [{"status": 502, "body": NGINX_502, "content_type": "text/html"}] * 3,
        "server",
        True,
        r"HTML page \('502 Bad Gateway'",
    ),
    (
        "sglang-input-longer-than-context",
        [{"status": 400, "json": SGLANG_CONTEXT}],
        "context_length",
        False,
        r"longer than the model's context length",
    ),
    (
        "vllm-v1-decoder-prompt-longer-than-max-model-len",
        [{"status": 400, "json": VLLM_V1_PROMPT_TOO_LONG}],
        "context_length",
        False,
        r"maximum model length of 4096",
    ),
    (
        "llama-cpp-500-without-mmproj",
        [{"status": 500, "json": LLAMA_CPP_NO_MMPROJ}],
        "image_rejected",
        False,
        r"image input is not supported.*--mmproj",
    ),
    (
        "ollama-400-invalid-image",
        [
            {
                "status": 400,
                "json": {"error": {"message": "invalid image input", "type": "invalid_request_error"}},
            }
        ],
        "image_rejected",
        False,
        r"invalid image input",
    ),
]


@pytest.mark.parametrize(
    "script,kind,retryable,pattern", [c[1:] for c in FAILED_CASES], ids=[c[0] for c in FAILED_CASES]
)
def test_answers_that_fail_are_recorded_once(
    server, rows, mini_mimic, image_cache, tmp_path, script, kind, retryable, pattern
):
    import re

    server.set_faults(script=["ok", *script])
    options = _options(rows[2], mini_mimic, tmp_path, [server.base_url], image_cache, timeout=0.5)
    stats = generate(options)
    assert (stats.done, stats.failed) == (1, 1)
    expected_attempts = 1 if not retryable else options.max_attempts
    assert server.stats["requests"] == 1 + expected_attempts
    [failure] = _ledger(tmp_path)
    assert (failure["kind"], bool(failure["retryable"]), failure["attempts"]) == (
        kind,
        retryable,
        expected_attempts,
    )
    assert re.search(pattern, failure["message"], re.DOTALL), failure["message"]
    [status] = generation_status(tmp_path)
    assert (status.distinct_keys, status.failed_of_planned, status.missing, status.duplicates) == (1, 1, 0, 0)

    # A plain rerun retries only transient failures; --retry-failed the others. Then all is done once.
    server.set_faults()
    server.reset_stats()
    rerun = generate(options)
    assert rerun.done == (1 if retryable else 0)
    if not retryable:
        assert server.stats["requests"] == 0
        assert (
            generate(
                _options(rows[2], mini_mimic, tmp_path, [server.base_url], image_cache, retry_failed=True)
            ).done
            == 1
        )
    [status] = generation_status(tmp_path)
    assert (status.distinct_keys, status.failed, status.missing, status.duplicates) == (2, 0, 0, 0)


# (case id, script for the second request, message pattern)
STOP_CASES = [
    (
        "vllm-404-model-gone-mid-run",
        [
            {
                "status": 404,
                "json": {
                    "error": {
                        "message": "The model `stub-vlm` does not exist.",
                        "type": "NotFoundError",
                        "param": None,
                        "code": 404,
                    }
                },
            }
        ],
        r"does not exist.*GET /models lists 'stub-vlm' itself.*--base-url",
    ),
    (
        "ollama-404-model-not-pulled",
        [
            {
                "status": 404,
                "json": {
                    "error": {
                        "message": 'model "stub-vlm" not found, try pulling it first',
                        "type": "api_error",
                    }
                },
            }
        ],
        r"not found, try pulling.*lists 'stub-vlm' itself",
    ),
    (
        "vllm-401-api-key",
        [{"status": 401, "json": {"error": "Unauthorized"}}],
        r"auth 401.*Unauthorized.*--api-key",
    ),
    (
        "proxy-403-html",
        [
            {
                "status": 403,
                "body": "<html><head><title>403 Forbidden</title></head></html>",
                "content_type": "text/html",
            }
        ],
        r"403 Forbidden.*--api-key",
    ),
]


@pytest.mark.parametrize("script,pattern", [c[1:] for c in STOP_CASES], ids=[c[0] for c in STOP_CASES])
def test_errors_about_the_whole_run_stop_it_at_once(
    server, rows, mini_mimic, image_cache, tmp_path, script, pattern
):
    server.set_faults(script=["ok", *script, *script])
    options = _options(rows[6], mini_mimic, tmp_path, [server.base_url], image_cache)
    with pytest.raises(GenerationAborted, match=pattern):
        generate(options)
    assert server.stats["requests"] == 2  # stopped at the first such answer, no retry
    [status] = generation_status(tmp_path)
    assert (status.distinct_keys, status.failed, status.missing) == (1, 0, 5)
    server.set_faults()
    assert generate(options).done == 5
    [status] = generation_status(tmp_path)
    assert (status.distinct_keys, status.failed, status.missing, status.duplicates) == (6, 0, 0, 0)


def test_retry_after_in_seconds_and_as_http_date_is_honoured(server, rows, mini_mimic, image_cache, tmp_path):
    started = time.monotonic()
    # An HTTP date (1 s resolution) 1-2 s from now, then 1 second: at least 2 s of waiting in all.
    soon = email.utils.formatdate(time.time() + 2, usegmt=True)
    too_many = {"error": {"message": "rate limit exceeded", "type": "rate_limit_error", "code": 429}}
    server.set_faults(
        script=[
            {"status": 429, "json": too_many, "headers": {"Retry-After": soon}},
            {"status": 429, "json": too_many, "headers": {"Retry-After": "1"}},
        ]
    )
    stats = generate(_options(rows[2], mini_mimic, tmp_path, [server.base_url], image_cache, backoff_max=5.0))
    assert stats.done == 2 and stats.errors == {"rate_limit": 2}
    assert time.monotonic() - started >= 1.95
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a past date: no wait
    assert parse_retry_after("soon") is None and parse_retry_after(" 7 ") == 7.0


def test_server_dying_mid_run_stops_the_run_then_a_rerun_completes(
    server, rows, mini_mimic, image_cache, tmp_path
):
    from cxrmax.testing import serve_in_thread

    dying = serve_in_thread(None, MODEL, stub_text=STUB_TEXT)
    try:
        dying.set_faults(script=["ok", "ok", "die"])
        options = _options(rows[6], mini_mimic, tmp_path, [dying.base_url], image_cache, fail_fast_after=2)
        with pytest.raises(
            GenerationAborted, match=r"last 2 requests each failed 3 times.*connection.*rerunning"
        ):
            generate(options)
    finally:
        dying.stop()
    [status] = generation_status(tmp_path)
    assert status.distinct_keys == 2 and status.failed_by_kind == {"connection": 2}
    assert status.distinct_keys + status.failed_of_planned + status.missing == 6
    # The server is back (on another port): a rerun of the same request set does the rest, once.
    rerun = generate(_options(rows[6], mini_mimic, tmp_path, [server.base_url], image_cache))
    assert rerun.done == 4 and rerun.already_done == 2
    [status] = generation_status(tmp_path)
    assert (status.distinct_keys, status.failed, status.missing, status.duplicates) == (6, 0, 0, 0)


def test_a_server_that_drops_connections_is_avoided_while_another_answers(
    server, rows, mini_mimic, image_cache, tmp_path
):
    from cxrmax.testing import serve_in_thread

    broken = serve_in_thread(None, MODEL, stub_text=STUB_TEXT)
    try:
        broken.set_faults(script=["cut"] * 50)
        options = _options(
            rows[6],
            mini_mimic,
            tmp_path,
            [broken.base_url, server.base_url],
            image_cache,
            concurrency=2,
            samples=2,
        )
        stats = generate(options)
        assert (stats.done, stats.failed) == (12, 0)
        assert broken.stats["requests"] <= 3  # each connection failure benches it for a while
        assert server.stats["completed"] == 12
    finally:
        broken.stop()


def test_models_listing_with_several_models_and_a_root_that_differs_from_the_id(
    server, rows, mini_mimic, image_cache, tmp_path
):
    listing = [
        {
            "id": "medgemma",
            "object": "model",
            "created": 1731400000,
            "owned_by": "vllm",
            "root": "google/medgemma-4b-it",
            "parent": None,
            "max_model_len": 8192,
        },
        {
            "id": "cxr-reader",
            "object": "model",
            "created": 1731400000,
            "owned_by": "vllm",
            "root": "Qwen/Qwen2-VL-7B-Instruct",
            "parent": None,
            "max_model_len": 32768,
        },
        {
            "id": "cxr-reader-lora",
            "object": "model",
            "created": 1731400000,
            "owned_by": "vllm",
            "root": "/adapters/cxr",
            "parent": "cxr-reader",
        },
    ]
    server.set_faults(models=listing)
    # --model qwen2-vl (roster: Qwen/Qwen2-VL-7B-Instruct), served with --served-model-name cxr-reader.
    options = _options(
        rows[2], mini_mimic, tmp_path, [server.base_url], image_cache, model=resolve_model("qwen2-vl")
    )
    assert generate(options).done == 2
    assert set(read_trajectories(tmp_path)["served_model"].to_pylist()) == {"cxr-reader"}

    server.set_faults(
        models=[{"id": "stub-vlm:latest", "object": "model", "created": 0, "owned_by": "library"}]
    )
    assert (
        generate(_options(rows[2], mini_mimic, tmp_path / "ollama", [server.base_url], image_cache)).done == 2
    )

    server.set_faults(models=listing)
    with pytest.raises(
        CxrmaxError,
        match=r"does not serve model 'nope'; it serves 'medgemma', 'cxr-reader', 'cxr-reader-lora'",
    ):
        generate(
            _options(
                rows[2],
                mini_mimic,
                tmp_path / "other",
                [server.base_url],
                image_cache,
                model=resolve_model("nope"),
            )
        )


def test_a_transient_error_on_the_first_requests_is_retried_not_taken_for_a_dead_server(
    server, rows, mini_mimic, image_cache, tmp_path
):
    html = {"status": 200, "body": "<html><title>502</title></html>", "content_type": "text/html"}
    server.set_faults(script=["cut", "cut", "ok", html])
    stats = generate(
        _options(rows[2], mini_mimic, tmp_path, [server.base_url], image_cache, fail_fast_after=2)
    )
    assert (stats.done, stats.failed) == (2, 0)
    assert stats.errors == {"connection": 2, "malformed": 1} and stats.retries == 3


def test_cli_reports_a_refused_api_key_mid_run_and_status_counts_the_rest_missing(
    server, rows, mini_mimic, image_cache, tmp_path
):
    from typer.testing import CliRunner

    from cxrmax.cli import app

    server.set_faults(script=["ok", {"status": 401, "json": {"error": "Unauthorized"}}])
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        [
            "generate", "--model", MODEL, "--selection", str(rows[6]), "--mimic-root", str(mini_mimic),
            "--out", str(out), "--base-url", server.base_url, "--concurrency", "1", "--quiet",
        ],
    )  # fmt: skip
    assert result.exit_code == 2
    assert "stopping: auth 401" in result.output and "--api-key" in result.output
    status = CliRunner().invoke(app, ["generate", "status", str(out), "--json", "-"])
    assert (
        '"distinct_keys": 1' in status.output
        and '"missing": 5' in status.output
        and '"failed": 0' in status.output
    )


def test_a_mix_of_every_kind_of_answer_with_concurrency_stays_exactly_once(
    server, rows, mini_mimic, image_cache, tmp_path
):
    mix = [
        "ok",
        ok(_answer({"reasoning_content": QWEN3_REASONING, "content": "Effusion."})),
        {"status": 400, "json": VLLM_CONTEXT_NEW},
        "cut",
        {"status": 503, "body": NGINX_502, "content_type": "text/html"},
        "sse",
        ok(_answer({"content": None})),
        {"status": 429, "json": {"error": {"message": "slow down"}}, "headers": {"Retry-After": "0"}},
        ok(_answer({"content": "Cut here"}, finish_reason="length")),
        {"status": 413, "body": NGINX_413, "content_type": "text/html"},
        {"delay": 1.0},
        ok(_answer({"content": [{"type": "text", "text": "Parts."}]})),
    ]
    server.set_faults(script=mix)
    options = _options(
        rows[6], mini_mimic, tmp_path, [server.base_url], image_cache, concurrency=4, samples=2, timeout=0.5,
        max_attempts=5,  # more than the 4 transient entries: no request can use up its attempts on them
    )  # fmt: skip
    stats = generate(options)
    failures = _ledger(tmp_path)
    assert stats.done + stats.failed == 12 and stats.failed == len(failures) == 3
    assert sorted(f["kind"] for f in failures) == ["context_length", "empty", "too_large"]
    [status] = generation_status(tmp_path)
    assert (status.distinct_keys, status.duplicates, status.missing) == (9, 0, 0)
    table = read_trajectories(tmp_path)
    assert QWEN3_REASONING in table["reasoning"].to_pylist() and status.length == 1

    server.set_faults()
    assert generate(options).done == 0  # permanent failures wait for --retry-failed
    options.retry_failed = True
    assert generate(options).done == 3
    [status] = generation_status(tmp_path)
    assert (status.distinct_keys, status.rows, status.failed, status.missing) == (12, 12, 0, 0)


class _HugeBodyServer:
    """A standard-library HTTP server on loopback: GET /v1/models lists MODEL; the first two POSTs answer
    a chat completion padded to over ``size`` bytes (with a Content-Length, then chunked without one),
    later ones a normal chat completion."""

    def __init__(self, size: int):
        import http.server
        import threading

        posts: list[int] = []
        answer = json.dumps(_answer({"content": "A normal answer."})).encode()
        padded = json.dumps(_answer({"content": "An answer buried in a huge body."})).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, data: bytes, chunked: bool = False) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if chunked:
                    self.send_header("Transfer-Encoding", "chunked")
                else:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    if not chunked:
                        self.wfile.write(data)
                        return
                    for start in range(0, len(data), 1 << 20):
                        piece = data[start : start + (1 << 20)]
                        self.wfile.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                except OSError:  # the client stopped reading: what it should do
                    self.close_connection = True

            def do_GET(self):
                self._reply(json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode())

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                posts.append(1)
                if len(posts) <= 2:
                    # a valid chat completion, padded: read whole, it would be stored as an answer
                    self._reply(padded + b" " * size, chunked=len(posts) == 2)
                else:
                    self._reply(answer)

        self.posts = posts
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_huge_body_is_refused_without_reading_it_whole_and_retried(rows, mini_mimic, image_cache, tmp_path):
    """A body far larger than any chat completion (a proxy serving a download, a broken server) was read
    whole into memory, at --concurrency 64 up to 64 such bodies at once; now reading stops past
    MAX_RESPONSE_BYTES, declared in Content-Length or not, and the request is retried."""
    from cxrmax.generate.backends.openai import MAX_RESPONSE_BYTES

    huge = _HugeBodyServer(MAX_RESPONSE_BYTES + (1 << 20))
    try:
        stats = generate(_options(rows[2], mini_mimic, tmp_path, [huge.base_url], image_cache))
    finally:
        huge.stop()
    assert (stats.done, stats.failed) == (2, 0)
    assert stats.errors == {"malformed": 2} and len(huge.posts) == 4
    table = read_trajectories(tmp_path)
    assert table["text"].to_pylist() == ["A normal answer."] * 2
    assert sorted(table["attempts"].to_pylist()) == [1, 3]


def test_a_huge_body_on_every_attempt_is_one_clear_failure(rows, mini_mimic, image_cache, tmp_path):
    from cxrmax.generate.backends.openai import MAX_RESPONSE_BYTES

    huge = _HugeBodyServer(MAX_RESPONSE_BYTES + 1)
    try:
        options = _options(rows[2], mini_mimic, tmp_path, [huge.base_url], image_cache, max_attempts=2)
        stats = generate(options)
    finally:
        huge.stop()
    [failure] = _ledger(tmp_path)
    assert stats.failed == 1 and failure["kind"] == "malformed" and failure["attempts"] == 2
    assert re.search(r"more than 32 MiB \(HTTP 200\).*is --base-url the model server", failure["message"])


def _cli_command(selection, mimic_root, out, base_url, *extra) -> list[str]:
    import sys

    return [
        sys.executable, "-m", "cxrmax", "generate", "--model", MODEL, "--selection", str(selection),
        "--mimic-root", str(mimic_root), "--out", str(out), "--base-url", base_url, "--quiet", *extra,
    ]  # fmt: skip


def _wait_for_answers(folder: Path, n: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = sum(p.read_bytes().count(b"\n") for p in folder.glob("wal-*.jsonl")) if folder.exists() else 0
        if lines >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"fewer than {n} answers journalled in {timeout} s")


def test_a_shard_run_beside_an_unsharded_run_on_the_same_folder_is_refused(
    server, rows, mini_mimic, tmp_path
):
    """Two `generate` processes on one --out: an unsharded run and a --shard 0/2 run plan the same
    requests. Before, only runs with the same shard tag were kept apart, so both ran and the shard's
    requests were asked and stored twice."""
    import subprocess

    server.set_faults(delay_s=0.15)
    out = tmp_path / "out"
    first = subprocess.Popen(
        _cli_command(rows[6], mini_mimic, out, server.base_url, "--samples", "2", "--concurrency", "1"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_answers(out / "trajectories" / MODEL, 1)
        second = subprocess.run(
            _cli_command(rows[6], mini_mimic, out, server.base_url, "--shard", "0/2", "--samples", "2"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        _, first_err = first.communicate(timeout=60)
    assert first.returncode == 0, first_err
    assert second.returncode == 2, second.stderr
    assert "whose requests overlap this run's (--shard 0/2)" in second.stderr
    assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
    assert server.stats["requests"] == 12
    [status] = generation_status(out)
    assert (status.distinct_keys, status.rows, status.duplicates, status.missing) == (12, 12, 0, 0)


def test_ctrl_c_keeps_every_answer_received_and_the_rerun_asks_each_missing_one_once(
    server, rows, mini_mimic, tmp_path
):
    """A real SIGINT to a `generate` process over HTTP; then the same command again."""
    import signal
    import subprocess

    server.set_faults(delay_s=0.2)
    out = tmp_path / "out"
    command = _cli_command(rows[6], mini_mimic, out, server.base_url, "--samples", "3", "--concurrency", "3")
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_answers(out / "trajectories" / MODEL, 4)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    folder = out / "trajectories" / MODEL
    assert not list(folder.glob("wal-*.jsonl"))  # committed to a shard on the way out
    [status] = generation_status(out)
    kept = status.distinct_keys
    assert 4 <= kept < 18 and status.duplicates == 0
    answered_before = server.stats["completed"]
    assert kept <= answered_before <= kept + 3  # at most the 3 in flight were answered but not received

    server.reset_stats()
    server.set_faults()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{18 - kept} requests to do, {kept} already done" in rerun.stderr
    assert server.stats["requests"] == 18 - kept  # each missing one asked once, nothing asked again
    [status] = generation_status(out)
    assert (status.distinct_keys, status.rows, status.duplicates, status.missing) == (18, 18, 0, 0)
