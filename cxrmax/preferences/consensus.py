"""Consensus synthesis: the positive trajectory of each sample.

Two ways:

* ``vote`` (default; offline, deterministic): a per-observation and per-side plurality vote over
  the sources' labels (`vote`), then a positive trajectory composed from source steps that support
  the consensus (`compose`).
* ``model``: in-context extraction by a model through the generate backends (the paper's way):
  `ModelConsensus` with the prompt pipelines/prompts/consensus.txt (`ConsensusPrompt`).

Vote rules (documented in ARCHITECTURE.md). Refusing sources do not vote. For each observation,
with c = sources claiming it (positive or uncertain), g = sources negating it, a = sources not
mentioning it:

* c is the unique largest: the consensus claims it, **positive** when more claimants say positive
  than uncertain, otherwise **uncertain** (a tie between sure and hedged claimants hedges);
* c ties for the largest (with g or a): **uncertain** (contested claims are neither asserted nor
  silently dropped);
* otherwise g >= a: **negative** (explicit negations are kept); else **absent**;
* "No Finding" is not voted: it is positive when the consensus claims no finding other than
  Support Devices (the CheXpert No Finding rule, as the labeler applies it), else absent.

Side of a claimed observation: the plurality of the specific sides (left/right/bilateral) stated by
the voting claimants; a tie leaves the side unspecified and marks a side conflict, so that no step
stating either side is used to compose the positive.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from cxrmax.core.errors import InputError, where
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.preferences import drift as D

_NO_FINDING = OBSERVATIONS.index("No Finding")
_SUPPORT_DEVICES = OBSERVATIONS.index("Support Devices")


@dataclass
class Vote:
    """Result of `vote` for G samples."""

    states: np.ndarray  # (G, 14) int8 state codes
    sides: np.ndarray  # (G, 14) int8 side codes (0 where unspecified or not claimed)
    side_conflict: np.ndarray  # (G, 14) bool: claimed with tied sides
    voters: np.ndarray  # (G,) number of non-refusing sources


def vote(states: np.ndarray, sides: np.ndarray, valid: np.ndarray, refusal: np.ndarray) -> Vote:
    """Plurality vote per observation and per side over padded (G, K, 14) arrays (see module doc).

    `valid` (G, K) marks real sources; `refusal` (G, K) sources that refused (they do not vote)."""
    voters = valid & ~refusal
    counts = D.vote_counts(states, voters).astype(np.int32)  # (G, 14, 4)
    pos, unc, neg, absent = (
        counts[..., D.POSITIVE],
        counts[..., D.UNCERTAIN],
        counts[..., D.NEGATIVE],
        counts[..., D.ABSENT],
    )
    claim = pos + unc
    top = np.maximum(np.maximum(claim, neg), absent)
    claim_top = (claim == top) & (claim > 0)
    claim_unique = claim_top & (claim > neg) & (claim > absent)
    out = np.full(claim.shape, D.ABSENT, dtype=np.int8)
    out[(neg == top) & (neg > 0) & ~claim_top] = D.NEGATIVE
    out[claim_top] = D.UNCERTAIN
    out[claim_unique & (pos > unc)] = D.POSITIVE
    # "No Finding" is not voted: it follows from the voted findings by the CheXpert rule (as the
    # labeler derives it), so that the consensus and its re-labelled text use the same rule.
    findings_claimed = D.claimed(out)
    findings_claimed[:, [_NO_FINDING, _SUPPORT_DEVICES]] = False
    has_voters = voters.any(axis=1)
    out[:, _NO_FINDING] = np.where(has_voters & ~findings_claimed.any(axis=1), D.POSITIVE, D.ABSENT)

    claimants = D.claimed(states) & voters[:, :, None]
    side_counts = np.stack([(claimants & (sides == s)).sum(axis=1) for s in (1, 2, 3)], axis=-1)  # (G, 14, 3)
    best = side_counts.max(axis=-1)
    n_best = (side_counts == best[..., None]).sum(axis=-1)
    cons_claimed = D.claimed(out)
    side = np.where((best > 0) & (n_best == 1), side_counts.argmax(axis=-1) + 1, 0).astype(np.int8)
    side_conflict = cons_claimed & (best > 0) & (n_best > 1)
    side = np.where(cons_claimed, side, 0).astype(np.int8)
    return Vote(states=out, sides=side, side_conflict=side_conflict, voters=voters.sum(axis=1))


# --------------------------------------------------------------------------------------------
# Composing the positive trajectory from source steps
# --------------------------------------------------------------------------------------------


_NORMALISE = re.compile(r"[^a-z0-9]+")
_MARKDOWN = re.compile(r"(\*\*|__|^#+\s*|^\s*(?:[-*\u2022]|\d+[.)])\s+)", re.MULTILINE)


def _dedup_key(text: str) -> str:
    return _NORMALISE.sub(" ", text.lower()).strip()


def clean_step(text: str) -> str:
    """A step as one line of the composed answer: markdown bullets/bold/headings removed."""
    return " ".join(_MARKDOWN.sub("", text).split())


def support_mask(
    step_states: np.ndarray,
    step_sides: np.ndarray,
    cons_states: np.ndarray,
    cons_sides: np.ndarray,
    side_conflict: np.ndarray,
) -> np.ndarray:
    """(m,) bool for m steps, each given with its sample's consensus row (all arrays (m, 14)).

    A step supports the consensus when it asserts something and nothing it asserts contradicts it:
    every observation it claims is claimed by the consensus, with no other specific side and no
    side conflict; every observation it negates is negative or absent in the consensus; and it
    states at least one thing the consensus states (a shared claim or a shared negation)."""
    step_claims = D.claimed(step_states)
    cons_claims = D.claimed(cons_states)
    negated = step_states == D.NEGATIVE
    sided = step_claims & (step_sides > 0)
    contradiction = (
        (step_claims & ~cons_claims)
        | (negated & cons_claims)
        | (sided & side_conflict)
        | (sided & (cons_sides > 0) & (step_sides != cons_sides))
    ).any(axis=1)
    shared = ((step_claims & cons_claims) | (negated & (cons_states == D.NEGATIVE))).any(axis=1)
    return shared & ~contradiction


def observation_bits(states: np.ndarray) -> np.ndarray:
    """(m,) int64 bit mask of the observations each row asserts (state not absent)."""
    weights = 1 << np.arange(D.N_OBS, dtype=np.int64)
    return ((states > D.ABSENT).astype(np.int64) * weights).sum(axis=-1)


@dataclass
class CandidateStep:
    """One source step offered to `compose`, already checked against the consensus."""

    text: str
    supported: bool
    bits: int  # observations the step asserts (see observation_bits)


#: Plain-language names the labeler reads back as the observation (checked by the tests).
_PHRASES = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Consolidation": "consolidation",
    "Edema": "pulmonary edema",
    "Enlarged Cardiomediastinum": "an enlarged cardiomediastinum",
    "Fracture": "a rib fracture",
    "Lung Lesion": "a lung lesion",
    "Lung Opacity": "lung opacity",
    "Pleural Effusion": "pleural effusion",
    "Pleural Other": "pleural thickening",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Support Devices": "support devices",
}


def observation_phrase(index: int, state: int, side: int) -> str:
    """Plain-language phrase for a consensus observation ("possible left pleural effusion")."""
    name = OBSERVATIONS[index]
    if index == _NO_FINDING:
        return "no acute cardiopulmonary abnormality"
    words = _PHRASES.get(name, name.lower())
    if side:
        words = f"{D.SIDE_NAMES[side]} {words.removeprefix('a ').removeprefix('an ')}"
    if state == D.UNCERTAIN:
        words = f"possible {words}"
    return words


def compose(
    sources: Sequence[Sequence[CandidateStep]],
    cons_states: np.ndarray,
    cons_sides: np.ndarray,
    prompt: str | None = None,
    max_steps: int = 12,
) -> tuple[str, list[int]]:
    """Compose a positive trajectory for one sample with consensus row `cons_states`/`cons_sides`.

    `sources` come least drifting first (refusals left out by the caller, excluded refusal/hedge
    steps marked unsupported). A step is kept when it is supported, is not a duplicate (normalised
    text) and asserts an observation the consensus states that no kept step covers yet (greedy
    cover, so the answer stays short). The answer follows the style the elicitation prompt asks
    for: an opening line, one bullet per kept step, and a concluding sentence naming every claimed
    consensus observation (so that an observation no step supports still appears). Returns the
    text and, per kept step, the position of its source in `sources`."""
    claims = D.claimed(cons_states)
    targets = int(
        observation_bits(np.where(claims | (cons_states == D.NEGATIVE), D.POSITIVE, D.ABSENT)[None])[0]
    )
    covered = 0
    seen: set[str] = set()
    lines: list[str] = []
    used: list[int] = []
    for u, steps in enumerate(sources):
        for step in steps:
            if len(lines) >= max_steps:
                break
            if not step.supported or not (step.bits & targets & ~covered):
                continue
            line = clean_step(step.text)
            key = _dedup_key(line)
            if not key or key in seen:
                continue
            seen.add(key)
            covered |= step.bits
            lines.append(line)
            used.append(u)
    asks_basis = bool(prompt) and "basis" in (prompt or "").lower()
    opening = (
        "The basis for the diagnosis on this chest radiograph:"
        if asks_basis
        else "Findings on this chest radiograph:"
    )
    parts = [opening, ""]
    parts.extend(f"- {line}" for line in lines)
    # One sentence per observation: in a list, a side or a hedge would spill over to the
    # neighbouring items when the text is read back.
    sentences = []
    for i in range(D.N_OBS):
        if claims[i]:
            phrase = observation_phrase(i, int(cons_states[i]), int(cons_sides[i]))
            sentences.append(phrase[0].upper() + phrase[1:] + ".")
    negated = [
        _PHRASES.get(OBSERVATIONS[i], OBSERVATIONS[i].lower())
        for i in range(D.N_OBS)
        if cons_states[i] == D.NEGATIVE
    ]
    if negated:
        sentences.append(
            "There is no " + _join([n.removeprefix("a ").removeprefix("an ") for n in negated], "or") + "."
        )
    summary = "In summary: " + (
        " ".join(sentences) if sentences else "the sources agree on no specific finding."
    )
    if lines:
        parts.append("")
    parts.append(summary)
    return "\n".join(parts).strip(), used


def _join(items: Sequence[str], last: str = "and") -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {last} " + items[-1]


def disagrees(relabelled_states: np.ndarray, relabelled_sides: np.ndarray, cons: Vote) -> np.ndarray:
    """(G,) bool: the re-labelled consensus text claims a different set of observations than the
    consensus it was meant to state, or states a different specific side for one."""
    rel_claims = D.claimed(relabelled_states)
    cons_claims = D.claimed(cons.states)
    wrong_set = (rel_claims != cons_claims).any(axis=1)
    sided = rel_claims & cons_claims & (relabelled_sides > 0) & (cons.sides > 0)
    wrong_side = (sided & (relabelled_sides != cons.sides)).any(axis=1)
    return wrong_set | wrong_side


# --------------------------------------------------------------------------------------------
# --consensus model: in-context extraction through the generate backends
# --------------------------------------------------------------------------------------------


def default_prompt_path() -> Path:
    """pipelines/prompts/consensus.txt (honours $CXRMAX_PIPELINES like generate's prompts)."""
    from cxrmax.generate.prompts import prompts_dir

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
        import asyncio

        from cxrmax.generate import backends as B
        from cxrmax.generate.roster import safe_dir_name
        from cxrmax.generate.store import TrajectoryStore

        if not model:
            raise InputError(
                "--consensus model needs --consensus-model (a served model id or a model folder)"
            )
        if backend == "openai":
            # The sources' answers (and images with --mimic-root) are MIMIC-CXR derived data: only
            # servers the user controls, as for generate.
            from cxrmax.generate.governance import check_endpoints

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
            from cxrmax.mimic.images import ImageCache

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
        from cxrmax.generate.store import read_shard, shard_paths

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
        import asyncio

        from cxrmax.generate.backends import Sampling
        from cxrmax.generate.responses import BackendError

        sampling = Sampling(
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
        import asyncio
        import json
        import time

        from cxrmax.generate.prompts import prompt_hash
        from cxrmax.generate.responses import BackendError
        from cxrmax.generate.store import request_seed

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
        from cxrmax.generate.prompts import prompt_hash
        from cxrmax.generate.store import request_key
        from cxrmax.preferences.build import relabel

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
        return pa.RecordBatch.from_arrays(list(columns.values()), schema=preferences.schema)

    def close(self) -> None:
        """Commit outstanding answers, release the store lock and the backend."""
        try:
            self.store.close()
        finally:
            self.loop.run_until_complete(self.backend.close())
            self.loop.close()
