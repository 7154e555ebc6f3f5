"""Test helpers that ship with cxrmax: an OpenAI-compatible server over a local model with fault
injection (:mod:`cxrmax.testing.openai_server`). Imported lazily so that fastapi/uvicorn are only needed
when a server is started."""

from __future__ import annotations

from typing import Any

__all__ = ["Faults", "ServerHandle", "ServerProcess", "serve_in_thread", "serve_subprocess"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from cxrmax.testing import openai_server

        return getattr(openai_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
