"""--consensus model: the positive of each sample extracted in context by a model, through the
generate backends (the paper's way), with the prompt pipelines/prompts/consensus.txt.

`ModelConsensus.apply` replaces the vote-composed positives of a PREFERENCE_SCHEMA batch by the
model's answers, exactly once per request (generate's crash-safe store keeps them), re-labels
each answer and flags it when it disagrees with the vote consensus (`cxrmax.preferences.consensus`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cxrmax.core.errors import InputError, where
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.generate import backends as B
from cxrmax.generate.governance import check_endpoints
from cxrmax.generate.prompts import prompt_hash, prompts_dir
from cxrmax.generate.responses import BackendError
from cxrmax.generate.roster import safe_dir_name
from cxrmax.generate.store import TrajectoryStore, read_shard, request_key, request_seed, shard_paths
from cxrmax.mimic.images import ImageCache
from cxrmax.preferences import drift as D
from cxrmax.preferences.annotate import record_batch
from cxrmax.preferences.consensus import Vote, disagrees
from cxrmax.preferences.labels import relabel


def default_prompt_path() -> Path:
    """pipelines/prompts/consensus.txt (honours $CXRMAX_PIPELINES like generate's prompts)."""
    return prompts_dir() / "consensus.txt"


@dataclass(frozen=True)
class ConsensusPrompt:
    """The extraction prompt: a ``key: value`` header, a ``---`` line, a str.format body over
    ``{question}``, ``{sources}`` and ``{n_sources}``."""

    id: str
    body: str

    @classmethod
    def load(cls, path: str | Path | None = None) -> ConsensusPrompt:
        path = Path(path) if path is not None else default_prompt_path()
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(f"{where(path)}: cannot read the consensus prompt ({exc})") from None
        head, sep, body = text.partition("\n---\n")
        if not sep:
            raise InputError(f"{where(path)}: expected a header, a '---' line and the prompt body")
        header = dict(line.split(":", 1) for line in head.splitlines() if ":" in line)
        prompt_id = header.get("id", "").strip()
        if not prompt_id:
            raise InputError(f"{where(path, field='id')}: the header needs an id")
        try:
            body.format(question="", sources="", n_sources=0)
        except (KeyError, IndexError, ValueError) as exc:
            raise InputError(
                f"{where(path)}: bad template field {exc} (known: question, sources, n_sources)"
            ) from None
        return cls(prompt_id, body)

    def render(self, question: str | None, sources: Sequence[str]) -> str:
        """The exact text sent: each source as "Answer k:" followed by its text."""
        blocks = "".join(f"Answer {k}:\n{text.strip()}\n\n" for k, text in enumerate(sources, 1))
        return self.body.format(question=(question or "").strip(), sources=blocks, n_sources=len(sources))


class ModelConsensus:
    """Replace the composed positives by a model's in-context extraction, exactly once per request.

    Answers are kept in generate's crash-safe store (`cxrmax.generate.store.TrajectoryStore`) under
    ``directory/<model>/``, keyed by generate's request key over (sample_id, "consensus/<model>",
    prompt hash, sampling): a rerun sends only the requests without a committed or journalled
    answer. Every answer is re-labelled and flagged when it disagrees with the vote consensus it
    was meant to state. A request that still fails after `retries` keeps the vote-composed
    positive (chosen_source stays "consensus-vote") and is counted in `failures`; so does an answer
    cut at max_tokens (counted in `truncated` too, and not stored). As for generate,
    base URLs outside loopback/private networks are refused unless `allow_external_endpoint`."""

    def __init__(
        self,
        directory: str | Path,
        backend: str = "openai",
        model: str | None = None,
        base_urls: Sequence[str] = (),
        prompt_path: str | Path | None = None,
        image_root: str | Path | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_tokens: int = 1024,
        seed: int = 0,
        concurrency: int = 8,
        retries: int = 3,
        backoff_s: float = 0.5,
        api_key: str | None = None,
        allow_external_endpoint: bool = False,
    ) -> None:
        if not model:
            raise InputError(
                "--consensus model needs --consensus-model (a served model id or a model folder)"
            )
        if backend == "openai":
            # The sources' answers (and images with --mimic-root) are MIMIC-CXR derived data: only
            # servers the user controls, as for generate.
            if not base_urls:
                raise InputError("--consensus model with the openai backend needs --base-url")
            check_endpoints(list(base_urls), allow_external=allow_external_endpoint)
        self.prompt = ConsensusPrompt.load(prompt_path)
        self.model = model
        self.backend_kind = backend
        self.sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
        self.concurrency = concurrency
        self.retries = retries
        self.backoff_s = backoff_s
        self.image_root = Path(image_root) if image_root is not None else None
        self.images = None
        if self.image_root is not None:
            self.images = ImageCache(Path(directory) / ".image-cache", max_edge=1024)
        self.loop = asyncio.new_event_loop()
        kwargs = {"base_urls": list(base_urls), "api_key": api_key} if backend == "openai" else {}
        self.backend = B.make_backend(backend, model, **kwargs)
        self.loop.run_until_complete(self.backend.start())
        self.store = TrajectoryStore(Path(directory) / safe_dir_name(model), rows_per_shard=500).open()
        self.answers = self._committed_answers()
        self.requests = 0
        self.failures = 0
        self.truncated = 0  # answers cut at max_tokens: not stored, the vote positive kept
        self.last_flagged = 0

    def _committed_answers(self) -> dict[str, str]:
        answers: dict[str, str] = {}
        for path in shard_paths(self.store.dir):
            table = read_shard(path, ["request_key", "text"])
            answers.update(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))
        return answers

    def _image(self, image_path: str | None) -> bytes | None:
        if self.images is None or not image_path:
            return None
        path = self.image_root / image_path
        return self.images.jpeg(path) if path.exists() else None

    async def _ask(self, prompt: str, image: bytes | None, seed: int):
        sampling = B.Sampling(
            self.sampling["temperature"], self.sampling["top_p"], self.sampling["max_tokens"], seed
        )
        for attempt in range(1, self.retries + 1):
            try:
                return await self.backend.complete(prompt, image, sampling), attempt
            except BackendError as exc:
                if not exc.retryable or attempt == self.retries:
                    return exc, attempt
                await asyncio.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise AssertionError("unreachable")

    async def _answer_all(self, jobs: list[tuple[int, str, str, str, str | None]]) -> dict[int, str]:
        gate = asyncio.Semaphore(self.concurrency)
        out: dict[int, str] = {}

        async def one(index: int, key: str, sample_id: str, prompt: str, image_path: str | None) -> None:
            async with gate:
                started = time.perf_counter()
                seed = request_seed(int(self.sampling["seed"]), sample_id, 0)
                result, attempts = await self._ask(prompt, self._image(image_path), seed)
                self.requests += attempts
                if isinstance(result, BackendError) or not (result.text or "").strip():
                    self.failures += 1
                    return
                if (result.finish_reason or "").strip().lower() in ("length", "max_tokens"):
                    # A positive cut mid-sentence is no positive: keep the vote's, and do not store
                    # it, so a rerun with a larger --max-tokens asks again.
                    self.failures += 1
                    self.truncated += 1
                    return
                self.store.append(
                    {
                        "request_key": key,
                        "sample_id": sample_id,
                        "model": f"consensus/{self.model}",
                        "served_model": self.backend.served_model or self.model,
                        "backend": self.backend_kind,
                        "prompt_id": self.prompt.id,
                        "prompt_hash": prompt_hash(prompt),
                        "prompt": prompt,
                        "image_path": image_path,
                        "sample_index": 0,
                        "text": result.text,
                        "finish_reason": result.finish_reason,
                        "prompt_tokens": result.prompt_tokens,
                        "completion_tokens": result.completion_tokens,
                        "latency_s": time.perf_counter() - started,
                        "sampling": json.dumps(self.sampling, sort_keys=True),
                        "seed": seed,
                        "attempts": attempts,
                        "created_at": int(time.time() * 1000),
                    }
                )
                self.answers[key] = result.text
                out[index] = result.text

        await asyncio.gather(*(one(*job) for job in jobs))
        return out

    def apply(self, preferences: pa.RecordBatch, contexts: pa.RecordBatch) -> pa.RecordBatch:
        """Replace ``chosen`` in a PREFERENCE_SCHEMA batch by the model's answers; re-label and flag
        each answer. `contexts` is aligned with the rows: ``sources`` (the source texts the model
        reads) and ``consensus_sides`` (the vote's 14 side codes)."""
        rows = preferences.num_rows
        sample_ids = preferences.column("sample_id").to_pylist()
        questions = preferences.column("prompt").to_pylist()
        image_paths = preferences.column("image_path").to_pylist()
        chosen = preferences.column("chosen").to_pylist()
        sources = contexts.column("sources").to_pylist()
        texts: list[str | None] = [None] * rows
        jobs = []
        for i in range(rows):
            prompt = self.prompt.render(questions[i], sources[i] or [])
            key = request_key(sample_ids[i], f"consensus/{self.model}", prompt_hash(prompt), self.sampling, 0)
            if key in self.answers:
                texts[i] = self.answers[key]
            else:
                jobs.append((i, key, sample_ids[i], prompt, image_paths[i]))
        if jobs:
            for index, text in self.loop.run_until_complete(self._answer_all(jobs)).items():
                texts[index] = text
            self.store.commit()
        answered = np.array([t is not None for t in texts], dtype=bool)
        final = [t if t is not None else c for t, c in zip(texts, chosen, strict=True)]
        cons_states = D.labels_array_to_states(
            np.stack(
                [
                    preferences.column("consensus_labels").field(name).to_numpy(zero_copy_only=False)
                    for name in OBSERVATIONS
                ],
                axis=1,
            ).astype(np.float32)
        )
        # The vote's sides are not in the batch; compare claimed sets and certainty only.
        rel_states, _ = relabel([t or "" for t in final])
        target = Vote(
            cons_states, np.zeros_like(cons_states), np.zeros(cons_states.shape, bool), np.zeros(rows)
        )
        flagged = disagrees(rel_states, np.zeros_like(rel_states), target)
        old_flags = preferences.column("consensus_flagged").to_numpy(zero_copy_only=False)
        flags = np.where(answered, flagged, old_flags)
        self.last_flagged = int(flags[answered].sum())
        source = np.where(answered, "consensus-model", "consensus-vote")
        columns = {name: preferences.column(name) for name in preferences.schema.names}
        columns["chosen"] = pa.array(final, type=pa.string())
        columns["chosen_source"] = pa.array(source.tolist(), type=pa.string())
        columns["consensus_flagged"] = pa.array(flags.tolist(), type=pa.bool_())
        return record_batch(columns, preferences.schema)

    def close(self) -> None:
        """Commit outstanding answers, release the store lock and the backend."""
        try:
            self.store.close()
        finally:
            self.loop.run_until_complete(self.backend.close())
            self.loop.close()
