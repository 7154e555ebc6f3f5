"""The generation loop: stream the selection, skip what is done, send the rest with bounded concurrency,
retry what is transient, store every answer exactly once.

Data flow::

    selection (Parquet/Arrow, read in record batches)
      -> plan: one request per (row, sample index) in this --shard, key = store.request_key(...)
      -> skip keys already in committed shards (and permanent failures unless --retry-failed)
      -> bounded asyncio.Queue (2 x concurrency x batch size) <- one producer task
      -> `concurrency` worker tasks: image (ImageCache, thread pool) -> rate limiter -> backend
         -> retry with exponential backoff and full jitter on 429 / 5xx / timeouts / connection errors
         (a backend with batch_size > 1, the in-process transformers engine, gets consecutive requests
         of the plan together instead; a batch that fails is retried one request at a time)
      -> TrajectoryStore.append (journal line now, Arrow shard every rows_per_shard answers)

Memory stays flat in the number of requests: the queue and the shard buffer are bounded, rows are read
batch by batch, and done keys are a sorted array of 16-byte digests.

Fail fast: until the first success, identical non-transient errors (wrong model, auth, bad request,
unreachable server, missing images) are counted; after ``fail_fast_after`` of them and no success the run
stops with one message that says what to fix. Those failures are not written to the ledger, so a fixed
rerun does them again.

Stop at any time: a 401/403 or a 404 for the model (kinds in responses.RUN_LEVEL_KINDS) is about the
whole run, not the request, so the run stops at once and records nothing for it. ``fail_fast_after``
requests in a row that used up all their attempts on the same transient error (a server that died or
hangs, endless 429/5xx) with no success in between also stop the run; they stay in the ledger as
retryable, so rerunning the same command retries them.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from array import array
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrmax.core.errors import CxrmaxError, InputError, where
from cxrmax.core.io import atomic_write_json
from cxrmax.core.shards import shard_of
from cxrmax.generate.backends import Backend, Sampling, make_backend, vllm_engine_args
from cxrmax.generate.governance import check_endpoints
from cxrmax.generate.progress import NullProgress, ProgressReporter, RunStats
from cxrmax.generate.prompts import PromptTemplate, prompt_hash
from cxrmax.generate.ratelimit import RateLimiter
from cxrmax.generate.responses import RUN_LEVEL_KINDS, BackendError, Completion
from cxrmax.generate.roster import ModelSpec
from cxrmax.generate.store import (
    FailureRecord,
    TrajectoryStore,
    key_digest,
    request_key,
    request_seed,
    shard_tag,
)
from cxrmax.mimic.images import ImageCache
from cxrmax.mimic.selection import iter_selection

#: Selection columns generate reads (the report texts are not needed and not read).
SELECTION_COLUMNS = [
    "sample_id",
    "dicom_id",
    "subject_id",
    "study_id",
    "split",
    "view",
    "image_path",
    "labels",
]

#: Permanent errors that end a run early when every first request fails with them (transient ones are
#: retried and end a run through the streak rule instead; auth/not_found end it at once).
FAIL_FAST_KINDS = {
    "auth",
    "not_found",
    "client",
    "image",
    "context_length",
    "image_rejected",
    "too_large",
    "empty",
    "content_filter",
}

FAIL_FAST_HINTS = {
    "connection": "is the model server running and reachable at --base-url?",
    "auth": "check the API key (OPENAI_API_KEY or --api-key).",
    "not_found": "is --model the id the server serves (GET /v1/models lists it)? Is the base URL right (it usually ends in /v1)?",
    "client": "the server rejected the request; check --max-tokens against the server's --max-model-len and the model's image limits.",
    "malformed": "the server's answers are not OpenAI chat completions; is --base-url an OpenAI-compatible /v1 endpoint?",
    "image": "are --mimic-root and the selection's image_path right?",
    "empty": "the model answers nothing: is it the right model, and does its chat template suit images?",
    "timeout": "the server stopped answering within --timeout (hung, or overloaded: lower --concurrency).",
    "server": "the server keeps failing (5xx); check its log.",
    "rate_limit": "the server keeps refusing with 429: lower --concurrency or set --rpm/--tpm.",
}
#: Transient errors that, when every attempt of several requests in a row ends with them, stop the run.
STREAK_KINDS = {"connection", "timeout", "server", "rate_limit", "malformed"}
#: Transient errors that, before any request ever succeeded, stop the run after a few attempts of any
#: requests: a server that has never answered is broken, not busy (429 is left out: that server is alive).
NEVER_ANSWERED_KINDS = {"connection", "timeout", "server", "malformed"}


class GenerationAborted(CxrmaxError):
    """The run stopped early because its first requests all failed the same way."""


@dataclass
class GenerateOptions:
    """Everything one `cxrmax generate` run needs (the CLI builds this; Python callers may too)."""

    model: ModelSpec
    selection: Path
    mimic_root: Path
    out: Path
    prompt: PromptTemplate
    backend: str = "openai"
    base_urls: list[str] = field(default_factory=list)
    api_key: str | None = None
    model_path: str | None = None  # transformers backend: a local folder (default: the model id)
    samples: int = 1
    seed: int = 0
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    concurrency: int = 64
    batch_size: int = 8  # transformers backend: requests generated together
    rpm: float | None = None
    tpm: float | None = None
    timeout: float = 600.0
    shard: tuple[int, int] | None = None
    retry_failed: bool = False
    retry_length: bool = False
    image_max_edge: int = 1024
    image_max_pixels: int | None = None
    image_cache: Path | None = None  # default OUT/cache/images
    max_attempts: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    fail_fast_after: int = 5
    rows_per_shard: int = 2000
    batch_rows: int = 1024
    allow_external_endpoint: bool = False

    def sampling_key(self) -> dict[str, Any]:
        """The sampling parameters that enter the request key (and the `sampling` column)."""
        defaults = self.model.sampling
        return {
            "temperature": float(
                self.temperature if self.temperature is not None else defaults.get("temperature", 0.7)
            ),
            "top_p": float(self.top_p if self.top_p is not None else defaults.get("top_p", 1.0)),
            "max_tokens": int(
                self.max_tokens if self.max_tokens is not None else defaults.get("max_tokens", 1024)
            ),
            "seed": int(self.seed),
        }

    @property
    def model_dir(self) -> Path:
        return self.out / "trajectories" / self.model.dir_name


@dataclass(slots=True)
class PlannedRequest:
    key: str
    digest: bytes
    row: dict[str, Any]
    prompt: str
    prompt_hash: str
    sample_index: int
    seed: int
    row_number: int


def plan_requests(options: GenerateOptions) -> Iterator[PlannedRequest]:
    """Every request of this run (this shard), in selection order, before skipping done ones."""
    sampling = options.sampling_key()
    template = options.prompt
    model = options.model.name
    shard = options.shard
    row_number = 0
    for batch in iter_selection(options.selection, SELECTION_COLUMNS, options.batch_rows):
        for row in batch.to_pylist():
            row_number += 1
            sample_id = row.get("sample_id")
            if not sample_id:
                raise InputError(f"{where(options.selection, row_number, 'sample_id')}: empty sample_id")
            if shard is not None and shard_of(sample_id, shard[1]) != shard[0]:
                continue
            if not row.get("image_path"):
                raise InputError(f"{where(options.selection, row_number, 'image_path')}: empty image_path")
            text = template.render(row)
            phash = prompt_hash(text)
            for index in range(options.samples):
                key = request_key(sample_id, model, phash, sampling, index)
                yield PlannedRequest(
                    key,
                    key_digest(key),
                    row,
                    text,
                    phash,
                    index,
                    request_seed(options.seed, sample_id, index),
                    row_number,
                )


def _check_duplicates(options: GenerateOptions) -> np.ndarray:
    """All key digests of the run (16 bytes each); a duplicated sample_id in the selection is an error."""
    buffer = bytearray()
    rows = array("q")  # row number of each sample (compact: 8 bytes per row)
    for planned in plan_requests(options):
        buffer += planned.digest
        if planned.sample_index == 0:
            rows.append(planned.row_number)
    digests = np.frombuffer(bytes(buffer), dtype="S16")
    unique, first_index, counts = np.unique(digests, return_index=True, return_counts=True)
    if len(unique) != len(digests):
        duplicate = unique[counts > 1][0]
        positions = np.nonzero(digests == duplicate)[0]
        row = rows[positions[1] // options.samples] if options.samples else None
        raise InputError(
            f"{where(options.selection, row, 'sample_id')}: duplicate sample_id in the selection "
            "(each sample must appear once; requests are keyed by sample_id)"
        )
    return digests


class Orchestrator:
    """Runs one model over a selection (use :func:`generate` unless you need the pieces)."""

    def __init__(self, options: GenerateOptions, backend: Backend, progress: ProgressReporter | None = None):
        self.options = options
        self.backend = backend
        self.progress = progress or NullProgress()
        self.stats = RunStats()
        self.sampling_key = options.sampling_key()
        self.sampling_json = json.dumps(self.sampling_key, sort_keys=True)
        self.limiter = RateLimiter(options.rpm, options.tpm)
        self.store: TrajectoryStore | None = None
        self._images: Any = None
        self._image_pool: ThreadPoolExecutor | None = None
        self._image_lru: OrderedDict[str, bytes] = OrderedDict()
        self._succeeded = False
        self._early_failures: list[tuple[PlannedRequest, BackendError, int]] = []
        self._early_errors: list[BackendError] = []
        self._never_answered: list[BackendError] = []
        self._abort: GenerationAborted | None = None
        #: requests in a row that used up their attempts on transient errors (reset by any success)
        self._failure_streak: list[BackendError] = []
        self._image_tokens = (options.image_max_edge // 28) ** 2
        self._take_lock = asyncio.Lock()

    # ------------------------------------------------------------------ entry point
    async def run(self) -> RunStats:
        options = self.options
        self._images = ImageCache(
            options.image_cache or options.out / "cache" / "images",
            max_edge=options.image_max_edge,
            max_pixels=options.image_max_pixels,
        )
        self._image_pool = ThreadPoolExecutor(
            max_workers=min(8, (os.cpu_count() or 2) * 2), thread_name_prefix="images"
        )
        store = TrajectoryStore(options.model_dir, options.shard, rows_per_shard=options.rows_per_shard)
        self.store = store
        store.open()
        try:
            self.stats.recovered = store.recovered_rows
            run_digests = _check_duplicates(options)
            if options.retry_length:
                self._drop_length_rows(run_digests)
            self._count(run_digests)
            self._write_manifest(len(run_digests))
            if self.stats.total:
                _check_image_root(options)
                await self.backend.start()
                self._write_manifest(len(run_digests))  # now with the served id the backend found
            self.progress.start(self.stats, options.model.name)
            self.stats.started = time.monotonic()
            if self.stats.total:
                await self._run_queue()
        finally:
            self.stats.finished = time.monotonic()
            try:
                self._flush_early_failures(final=True)
                store.close()
            finally:
                self._image_pool.shutdown(wait=False, cancel_futures=True)
                self.progress.stop(self.stats)
                await self.backend.close()
        if self._abort is not None:
            raise self._abort
        return self.stats

    def _count(self, run_digests: np.ndarray) -> None:
        store = self.store
        assert store is not None
        done = np.isin(run_digests, store.done.array)
        skipped = np.zeros_like(done)
        if not self.options.retry_failed:
            skipped = np.isin(run_digests, store.failed_permanent.array) & ~done
        self.stats.already_done = int(done.sum())
        self.stats.skipped_failed = int(skipped.sum())
        self.stats.total = len(run_digests) - self.stats.already_done - self.stats.skipped_failed

    def _drop_length_rows(self, run_digests: np.ndarray) -> None:
        """--retry-length: remove this run's truncated answers so that they are requested again."""
        store = self.store
        assert store is not None
        run_keys = set(run_digests.tolist())  # numpy strips trailing NUL bytes; compare stripped

        def predicate(table: pa.Table) -> pa.Array:
            length = pc.fill_null(pc.equal(table["finish_reason"], "length"), False)
            keys = [bytes.fromhex(k[:32]).rstrip(b"\0") in run_keys for k in table["request_key"].to_pylist()]
            return pc.and_(length, pa.array(keys, pa.bool_()))

        for row in store.remove_rows(predicate):
            store.record_failure(
                FailureRecord(
                    row["request_key"],
                    row["sample_id"],
                    row["sample_index"] or 0,
                    "length",
                    None,
                    "answer cut at max_tokens; removed for --retry-length",
                    0,
                    True,
                )
            )

    def _write_manifest(self, n_keys: int) -> None:
        """OUT/trajectories/<model>/run-<tag>.json: what this run was asked to do (read by `status`)."""
        options = self.options
        manifest = {
            "model": options.model.name,
            "served_model": self.backend.served_model,
            "backend": self.backend.kind,
            "endpoints": self.backend.endpoints(),
            "selection": str(Path(options.selection).resolve()),
            "mimic_root": str(Path(options.mimic_root).resolve()),
            "prompt_id": options.prompt.id,
            "prompt_body": options.prompt.body,
            "prompt_empty_labels": options.prompt.empty_labels,
            "sampling": self.sampling_key,
            "samples": options.samples,
            "shard": list(options.shard) if options.shard else None,
            "requests": n_keys,
            "image_max_edge": options.image_max_edge,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        path = options.model_dir / f"run-{shard_tag(options.shard)}.json"
        atomic_write_json(path, manifest)

    # ------------------------------------------------------------------ queue
    async def _run_queue(self) -> None:
        concurrency = max(1, self.options.concurrency)
        if self.backend.kind in ("transformers", "vllm"):
            concurrency = min(concurrency, 4)  # in-process engines serialise; more tasks only queue
        batch = self.backend.batch_size
        if batch > 1:
            # Two batch workers: one prepares its batch's images while the engine runs the other's.
            concurrency = 2
        queue: asyncio.Queue[PlannedRequest | None] = asyncio.Queue(maxsize=2 * concurrency * batch)
        producer = asyncio.create_task(self._produce(queue, concurrency))
        workers = [
            asyncio.create_task(self._batch_worker(queue, batch) if batch > 1 else self._worker(queue))
            for _ in range(concurrency)
        ]
        ticker = asyncio.create_task(self._tick())
        tasks = [producer, *workers]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        finally:
            for task in [*tasks, ticker]:
                task.cancel()
            await asyncio.gather(*tasks, ticker, return_exceptions=True)

    async def _produce(self, queue: asyncio.Queue, n_workers: int) -> None:
        store = self.store
        assert store is not None
        retry_failed = self.options.retry_failed
        for planned in plan_requests(self.options):
            if store.is_done(planned.digest):
                continue
            if not retry_failed and planned.digest in store.failed_permanent:
                continue
            await queue.put(planned)
        for _ in range(n_workers):
            await queue.put(None)

    async def _tick(self) -> None:
        while True:
            self.progress.update(self.stats)
            await asyncio.sleep(0.25)

    async def _worker(self, queue: asyncio.Queue) -> None:
        while True:
            planned = await queue.get()
            if planned is None:
                return
            await self._process(planned)

    async def _batch_worker(self, queue: asyncio.Queue, size: int) -> None:
        while True:
            # One worker at a time takes ``size`` consecutive requests of the plan: the batches, and so
            # the float rounding of each answer, are the same on every run, whatever the timing.
            async with self._take_lock:
                chunk: list[PlannedRequest] = []
                ended = False
                while len(chunk) < size:
                    planned = await queue.get()
                    if planned is None:
                        ended = True
                        break
                    chunk.append(planned)
            if chunk:
                await self._process_batch(chunk)
            if ended:
                return

    # ------------------------------------------------------------------ one request
    async def _image(self, relative: str) -> bytes:
        cached = self._image_lru.get(relative)
        if cached is not None:
            self._image_lru.move_to_end(relative)
            return cached
        path = Path(relative)
        if not path.is_absolute():
            path = self.options.mimic_root / relative
        try:
            # Cached already (the common case): a small file read, cheaper inline than a thread hop.
            data = self._images.path_for(path).read_bytes()
        except FileNotFoundError:
            loop = asyncio.get_running_loop()
            data = await loop.run_in_executor(self._image_pool, self._images.jpeg, path)
        self._image_lru[relative] = data
        if len(self._image_lru) > 16:
            self._image_lru.popitem(last=False)
        return data

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        options = self.options
        ceiling = min(options.backoff_max, options.backoff_base * (2 ** (attempt - 1)))
        if not self._succeeded:
            # Until a first answer, retries stay short: a server that never answered is reported in
            # seconds rather than after minutes of growing waits (at concurrency 1 too).
            ceiling = min(ceiling, 2 * options.backoff_base)
        delay = random.uniform(0, ceiling)  # full jitter: spreads retries of many clients apart
        if retry_after is not None:
            delay = max(delay, min(retry_after, options.backoff_max))
        return delay

    def _estimate(self, planned: PlannedRequest) -> int:
        """Tokens a request is expected to cost (prompt, image and answer), for the TPM bucket."""
        return len(planned.prompt) // 4 + self._image_tokens + self.sampling_key["max_tokens"]

    def _sampling(self, planned: PlannedRequest) -> Sampling:
        key = self.sampling_key
        return Sampling(key["temperature"], key["top_p"], key["max_tokens"], planned.seed)

    async def _process_batch(self, chunk: list[PlannedRequest]) -> None:
        ready: list[tuple[PlannedRequest, bytes]] = []
        for planned in chunk:
            try:
                ready.append((planned, await self._image(planned.row["image_path"])))
            except (CxrmaxError, OSError, ValueError) as exc:
                self._failed(planned, BackendError("image", str(exc)), 0)
        if not ready:
            return
        estimates = [self._estimate(planned) for planned, _ in ready]
        if self.limiter.active:
            for estimate in estimates:
                await self.limiter.acquire(estimate)
        started = time.perf_counter()
        try:
            completions = await self.backend.complete_batch(
                [(planned.prompt, image, self._sampling(planned)) for planned, image in ready]
            )
        except BackendError:
            # Each request on its own, with its retries and its own failure record.
            for planned, _ in ready:
                await self._process(planned)
            return
        latency = time.perf_counter() - started  # the batch's: every answer in it waited for all of it
        self._succeeded_once()
        self._failure_streak.clear()
        for (planned, _), completion, estimate in zip(ready, completions, estimates, strict=True):
            self._store(planned, completion, latency, 1)
            if self.limiter.active:
                self.limiter.settle(
                    estimate, (completion.prompt_tokens or 0) + (completion.completion_tokens or 0)
                )

    async def _process(self, planned: PlannedRequest) -> None:
        options = self.options
        sampling = self._sampling(planned)
        try:
            image = await self._image(planned.row["image_path"])
        except (CxrmaxError, OSError, ValueError) as exc:
            self._failed(planned, BackendError("image", str(exc)), 0)
            return
        estimate = self._estimate(planned)
        attempt = 0
        while True:
            attempt += 1
            if self.limiter.active:
                await self.limiter.acquire(estimate)
            started = time.perf_counter()
            try:
                completion = await self.backend.complete(planned.prompt, image, sampling)
            except BackendError as error:
                self.stats.errors[error.kind] += 1
                if error.kind in RUN_LEVEL_KINDS:
                    self._stop_run(error)
                if not self._succeeded:
                    self._early_error(error)
                    self._never_answered_error(error)
                if error.retryable and attempt < options.max_attempts:
                    self.stats.retries += 1
                    await asyncio.sleep(self._backoff(attempt, error.retry_after))
                    continue
                self._failed(planned, error, attempt)
                return
            latency = time.perf_counter() - started
            self._succeeded_once()
            self._failure_streak.clear()
            self._store(planned, completion, latency, attempt)
            if self.limiter.active:
                self.limiter.settle(
                    estimate, (completion.prompt_tokens or 0) + (completion.completion_tokens or 0)
                )
            return

    def _store(self, planned: PlannedRequest, completion: Completion, latency: float, attempts: int) -> None:
        row = planned.row
        self.store.append(
            {
                "request_key": planned.key,
                "sample_id": row["sample_id"],
                "dicom_id": row.get("dicom_id"),
                "subject_id": row.get("subject_id"),
                "study_id": row.get("study_id"),
                "split": row.get("split"),
                "view": row.get("view"),
                "image_path": row.get("image_path"),
                "labels": row.get("labels"),
                "model": self.options.model.name,
                "served_model": self.backend.served_model,
                "backend": self.backend.kind,
                "prompt_id": self.options.prompt.id,
                "prompt_hash": planned.prompt_hash,
                "prompt": planned.prompt,
                "sample_index": planned.sample_index,
                "text": completion.text,
                "finish_reason": completion.finish_reason,
                "reasoning": completion.reasoning,
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
                "latency_s": round(latency, 4),
                "sampling": self.sampling_json,
                "seed": planned.seed,
                "attempts": attempts,
                "created_at": int(time.time() * 1000),
                "endpoint": completion.endpoint,
                "image_max_edge": self.options.image_max_edge,
            }
        )
        stats = self.stats
        stats.done += 1
        stats.prompt_tokens += completion.prompt_tokens or 0
        stats.completion_tokens += completion.completion_tokens or 0
        if completion.finish_reason == "length":
            stats.length += 1

    # ------------------------------------------------------------------ failures and fail-fast
    def _succeeded_once(self) -> None:
        if not self._succeeded:
            self._succeeded = True
            self._flush_early_failures(final=False)

    def _failed(self, planned: PlannedRequest, error: BackendError, attempts: int) -> None:
        self.stats.failed += 1
        if error.kind == "image":
            self.stats.errors["image"] += 1
            if not self._succeeded:
                self._early_error(error)
        if not self._succeeded:
            self._early_failures.append((planned, error, attempts))
        else:
            self._record(planned, error, attempts)
        if error.kind in STREAK_KINDS and attempts >= self.options.max_attempts:
            self._failure_streak.append(error)
            self._check_streak()

    def _check_streak(self) -> None:
        """Stop when the last ``fail_fast_after`` requests all used up their attempts on one transient error."""
        streak = self._failure_streak
        needed = max(1, self.options.fail_fast_after)
        if len(streak) < needed or self._abort is not None:
            return
        last = streak[-needed:]
        if len({e.kind for e in last}) != 1:
            return
        error = last[-1]
        self._flush_early_failures(final=False)
        self._abort = GenerationAborted(
            f"stopping: the last {needed} requests each failed {self.options.max_attempts} times the same way "
            f"({error}). {FAIL_FAST_HINTS.get(error.kind, '')} Answers already stored are kept and these failures "
            "are retryable: rerunning the same command continues where this one stopped."
        )
        raise self._abort

    def _stop_run(self, error: BackendError) -> None:
        """Stop the run at once for an error about the whole run (credentials, the model or the URL)."""
        if self._abort is None:
            self._abort = GenerationAborted(
                f"stopping: {error}. Nothing was recorded for this request; "
                "answers already stored are kept, and rerunning the same command continues where this one stopped."
            )
        raise self._abort

    def _record(self, planned: PlannedRequest, error: BackendError, attempts: int) -> None:
        self.store.record_failure(
            FailureRecord(
                planned.key,
                planned.row["sample_id"],
                planned.sample_index,
                error.kind,
                error.status,
                str(error),
                attempts,
                error.retryable,
            )
        )

    def _early_error(self, error: BackendError) -> None:
        """Count an error seen before any success; abort when the first ones all have the same cause.
        Transient errors are not counted here (one cut connection must not end a short run): they are
        retried, and stop the run only when several requests in a row use up their attempts on them."""
        if error.retryable:
            return
        errors = self._early_errors
        threshold = min(self.options.fail_fast_after, max(1, self.stats.total))
        if len(errors) >= threshold or self._abort is not None:
            return  # only the first errors decide
        errors.append(error)
        if len(errors) < threshold:
            return
        kinds = {(e.kind, e.status) for e in errors}
        kind, _ = next(iter(kinds))
        if len(kinds) != 1 or kind not in FAIL_FAST_KINDS:
            return
        self._abort = GenerationAborted(
            f"stopping: the first {len(errors)} requests all failed the same way ({error}). "
            f"{FAIL_FAST_HINTS.get(kind, '')} Nothing was recorded for them; answers already stored are kept, "
            "and rerunning the same command continues where this one stopped."
        )
        raise self._abort

    def _never_answered_error(self, error: BackendError) -> None:
        """Abort when no request has ever succeeded and the last ``2 x fail_fast_after`` attempts, of
        whichever requests, all failed with the same transient error."""
        if not error.retryable or error.kind not in NEVER_ANSWERED_KINDS or self._abort is not None:
            return
        seen = self._never_answered
        seen.append(error)
        needed = 2 * max(1, self.options.fail_fast_after)
        if len(seen) < needed or len({e.kind for e in seen[-needed:]}) != 1:
            return
        self._abort = GenerationAborted(
            f"stopping: no request has succeeded and the first {len(seen)} attempts all failed the same way "
            f"({error}). {FAIL_FAST_HINTS.get(error.kind, '')} Nothing was recorded for them; rerunning the "
            "same command once the server answers starts where this one stopped."
        )
        raise self._abort

    def _flush_early_failures(self, final: bool) -> None:
        """Write the failures held back while no request had succeeded (unless the run aborted)."""
        if self._abort is None and self.store is not None and self.store.ledger is not None:
            for planned, error, attempts in self._early_failures:
                self._record(planned, error, attempts)
        self._early_failures = []


def _check_image_root(options: GenerateOptions) -> None:
    """Before any request: --mimic-root exists and holds the selection's first image, so a wrong root
    is one clear error now rather than a failure per request."""
    root = Path(options.mimic_root)
    for batch in iter_selection(options.selection, ["image_path"], 1):
        if not batch.num_rows:
            continue
        relative = batch.column(0)[0].as_py()
        path = Path(relative) if Path(relative).is_absolute() else root / relative
        if not Path(relative).is_absolute() and not root.is_dir():
            raise InputError(
                f"--mimic-root {root}: no such folder (it should hold the selection's files/ tree)"
            )
        if not path.is_file():
            raise InputError(
                f"{where(options.selection, 1, 'image_path')}: image {path} not found "
                f"(is --mimic-root {root} the folder that holds files/?)"
            )
        return


def build_backend(options: GenerateOptions) -> Backend:
    """The backend the options ask for (the CLI's --backend / --base-url)."""
    spec = options.model
    if options.backend == "openai":
        check_endpoints(options.base_urls, options.allow_external_endpoint)
        return make_backend(
            "openai",
            spec.hf_id,
            base_urls=options.base_urls,
            api_key=options.api_key,
            timeout=options.timeout,
            max_connections=max(16, options.concurrency),
            candidates=[spec.name],
        )
    if options.backend == "transformers":
        return make_backend(
            "transformers",
            spec.name,
            model_path=options.model_path or spec.hf_id,
            batch_size=options.batch_size,
        )
    if options.backend == "vllm":
        return make_backend("vllm", spec.hf_id, engine_args=vllm_engine_args(spec.serve))
    raise CxrmaxError(f"unknown backend {options.backend!r}: use openai, transformers or vllm")


async def generate_async(
    options: GenerateOptions, backend: Backend | None = None, progress: ProgressReporter | None = None
) -> RunStats:
    """Run one model over the selection (see the module docstring); returns the run's counters."""
    if options.samples < 1:
        raise InputError("--samples must be at least 1")
    backend = backend or build_backend(options)
    return await Orchestrator(options, backend, progress).run()


def generate(
    options: GenerateOptions, backend: Backend | None = None, progress: ProgressReporter | None = None
) -> RunStats:
    """Synchronous :func:`generate_async`."""
    return asyncio.run(generate_async(options, backend, progress))


__all__ = [
    "GenerateOptions",
    "GenerationAborted",
    "Orchestrator",
    "generate",
    "generate_async",
    "plan_requests",
]
