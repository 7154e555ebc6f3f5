"""What every backend is: the `Backend` interface, `Sampling` and the OpenAI chat message shape."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cxrmax.generate.responses import Completion
from cxrmax.mimic.images import to_data_url

__all__ = ["Backend", "Sampling", "chat_messages", "image_data_url"]


@dataclass(slots=True)
class Sampling:
    """Sampling parameters of one request (``seed`` is the per-request seed)."""

    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None


def image_data_url(jpeg: bytes) -> str:
    """A JPEG as the ``data:`` URL of an OpenAI ``image_url`` part."""
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
    #: requests the orchestrator hands over together (complete_batch); 1: one at a time (complete)
    batch_size: int = 1

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Check that the backend can serve the model (reachable, right model); raise CxrmaxError if not."""

    @abstractmethod
    async def complete(self, prompt: str, image_jpeg: bytes | None, sampling: Sampling) -> Completion:
        """One answer to ``prompt`` about the image; raises BackendError."""

    async def complete_batch(
        self, requests: Sequence[tuple[str, bytes | None, Sampling]]
    ) -> list[Completion]:
        """One answer per (prompt, image_jpeg, sampling), in order; raises BackendError for the batch.
        Backends that batch (``batch_size`` > 1) override it; the default completes them in turn."""
        return [await self.complete(prompt, image, sampling) for prompt, image, sampling in requests]

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections, threads, models."""

    def endpoints(self) -> list[str]:
        """Where requests go (URLs for HTTP backends, the kind for in-process ones)."""
        return [self.kind]
