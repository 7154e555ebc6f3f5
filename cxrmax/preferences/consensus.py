"""Consensus synthesis: the positive trajectory of each sample.

Two ways:

* ``vote`` (default; offline, deterministic): a per-observation and per-side plurality vote over
  the sources' labels (`vote`), then a positive trajectory composed from source steps that support
  the consensus (`compose`).
* ``model``: in-context extraction by a model through the generate backends (the paper's way):
  `cxrmax.preferences.model_consensus` (networked, so kept apart from this pure module).

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

import numpy as np

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
