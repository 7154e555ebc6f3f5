"""The adapter onto the rule labeler (`cxrmax.labeler`): texts in, state/side code arrays out.

`label_trajectories` reads whole trajectories, steps included (for the drift annotations and the
composed positive); `relabel` reads texts without steps through the labeler's batch fast path (the
composed positives, the ground-truth reports, the model consensus's answers). The codings are those
of `cxrmax.preferences.drift`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.labeler import label_text as _label_text
from cxrmax.labeler.core import label_codes
from cxrmax.preferences import drift as D


@dataclass
class LabelArrays:
    """The labeler's reading of n texts as arrays (see cxrmax.preferences.drift for the codings)."""

    states: np.ndarray  # (n, 14) int8
    sides: np.ndarray  # (n, 14) int8
    refusal: np.ndarray  # (n,) bool
    hedging: np.ndarray  # (n,) bool
    errors: list[str | None]
    step_offsets: np.ndarray  # (n + 1,) int64
    step_states: np.ndarray  # (total_steps, 14) int8
    step_sides: np.ndarray  # (total_steps, 14) int8
    step_excluded: np.ndarray  # (total_steps,) bool: inside a refusal or hedging span
    step_texts: list[str]


def _spans(items: object) -> list[tuple[int, int]]:
    out = []
    for item in items or ():  # type: ignore[attr-defined]
        if hasattr(item, "start") and hasattr(item, "end"):
            out.append((int(item.start), int(item.end)))
        elif isinstance(item, (tuple, list)) and len(item) >= 2:
            out.append((int(item[0]), int(item[1])))
    return out


def _status_of(observation: object) -> str | None:
    if isinstance(observation, str):
        return observation
    return getattr(observation, "status", None)


class _Sparse:
    """Sparse (row, observation, code) coordinates, scattered into an (rows, 14) array at the end:
    far cheaper than numpy item assignment per mention."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.obs: list[int] = []
        self.codes: list[int] = []

    def add(self, row: int, obs: int, code: int) -> None:
        self.rows.append(row)
        self.obs.append(obs)
        self.codes.append(code)

    def to_array(self, n_rows: int) -> np.ndarray:
        out = np.zeros((n_rows, D.N_OBS), dtype=np.int8)
        out[self.rows, self.obs] = self.codes
        return out


_OBS_INDEX = {name: i for i, name in enumerate(OBSERVATIONS)}
_STATE_OF = D._STATUS_TO_STATE
_SIDE_OF = D._SIDE_TO_CODE


class _StepCollector:
    """The steps of every text, in order, as sparse codes plus their texts and exclusion flags."""

    def __init__(self) -> None:
        self.states = _Sparse()
        self.sides = _Sparse()
        self.excluded: list[bool] = []
        self.texts: list[str] = []

    @property
    def count(self) -> int:
        return len(self.texts)

    def add(self, steps: object, bad_spans: list[tuple[int, int]]) -> None:
        """Add one text's steps; a step overlapping a refusal or hedging span is marked excluded."""
        for step in steps or ():  # type: ignore[attr-defined]
            if getattr(step, "kind", None) == "heading":  # headings are not reasoning steps
                continue
            row = self.count
            for name, status in (step.statuses or {}).items():
                code = _STATE_OF.get(_status_of(status), 0)
                i = _OBS_INDEX.get(name)
                if code and i is not None:
                    self.states.add(row, i, code)
            for name, side in (step.lateralities or {}).items():
                code = _SIDE_OF.get(side or "", 0)
                i = _OBS_INDEX.get(name)
                if code and i is not None:
                    self.sides.add(row, i, code)
            self.excluded.append(any(s < step.end and step.start < e for s, e in bad_spans))
            self.texts.append(step.text)


def label_trajectories(texts: Sequence[str | None], label_text: Callable | None = None) -> LabelArrays:
    """Label texts with `cxrmax.labeler.label_text` (or `label_text`), steps included. A text the
    labeler fails on is kept with every observation absent and its error recorded."""
    label_text = label_text or _label_text
    n = len(texts)
    refusal = np.zeros(n, dtype=bool)
    hedging = np.zeros(n, dtype=bool)
    errors: list[str | None] = [None] * n
    offsets = np.zeros(n + 1, dtype=np.int64)
    states, sides = _Sparse(), _Sparse()
    steps = _StepCollector()
    for t, text in enumerate(texts):
        try:
            labelled = label_text(text or "")
        except Exception as exc:  # a junk text must not stop a 170k-row build
            errors[t] = f"{type(exc).__name__}: {exc}"
            offsets[t + 1] = steps.count
            continue
        errors[t] = getattr(labelled, "error", None)
        for name, obs in labelled.observations.items():
            code = _STATE_OF.get(_status_of(obs), 0)
            i = _OBS_INDEX.get(name)
            if code and i is not None:
                states.add(t, i, code)
                sides.add(t, i, _SIDE_OF.get(getattr(obs, "laterality", None) or "", 0))
        refusal[t] = bool(getattr(labelled, "is_refusal", False))
        hedges = _spans(getattr(labelled, "hedging", ()))
        hedging[t] = bool(hedges)
        steps.add(getattr(labelled, "steps", ()), _spans(getattr(labelled, "refusal", ())) + hedges)
        offsets[t + 1] = steps.count
    return LabelArrays(
        states=states.to_array(n),
        sides=sides.to_array(n),
        refusal=refusal,
        hedging=hedging,
        errors=errors,
        step_offsets=offsets,
        step_states=steps.states.to_array(steps.count),
        step_sides=steps.sides.to_array(steps.count),
        step_excluded=np.array(steps.excluded, dtype=bool),
        step_texts=steps.texts,
    )


def relabel(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(states, sides) of texts without steps, through the labeler's batch fast path (label_codes)."""
    n = len(texts)
    states = np.zeros((n, D.N_OBS), dtype=np.int8)
    sides = np.zeros((n, D.N_OBS), dtype=np.int8)
    value_to_state = {1: D.POSITIVE, 0: D.NEGATIVE, -1: D.UNCERTAIN}
    for t, text in enumerate(texts):
        values, lateralities = label_codes(text)[:2]
        for i, (value, side) in enumerate(zip(values, lateralities, strict=True)):
            if value is not None:
                states[t, i] = value_to_state[value]
                if side:
                    sides[t, i] = D.side_to_code(side)
    return states, sides
