"""Label one text: the 14 observations with status, laterality and evidence, per-step statuses,
refusal and hedging spans.

Rules (documented in ARCHITECTURE.md, tested in tests/test_labeler*.py):

- Mention status inside a clause: see cues.py (nearest governing cue; negation dominates weak
  uncertainty words; pseudo-negations negate nothing). A mention with no cue is positive, or
  uncertain under a heading that announces alternatives ("Differential diagnosis").
- Mentions inside a refusal clause ("As an AI, I cannot diagnose pneumonia") assert nothing.
- Conflict rule inside one text (the CheXpert aggregation): positive > uncertain > negative. The
  text's status is the strongest status of any mention; its laterality is the union of the sides
  of the mentions that have that status ({left, right} -> bilateral; no side -> unspecified).
  Laterality is given only for the observations in pathologies.LATERALIZABLE and only when the
  status is not absent.
- "No Finding" (CheXpert rule, pathologies.no_finding): positive when no other finding except
  Support Devices is positive or uncertain AND the text makes at least one recognised statement
  (a mention, a normal statement such as "heart size is normal", or a whole-study normal phrase
  such as "no acute cardiopulmonary process"); otherwise absent. A text that only refuses, or
  says nothing we recognise, gets no "No Finding".
- Bad input never raises: None, non-str, empty/whitespace-only, binary junk and over-long texts
  give every observation "absent" and a message in `error`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from cxrmax.labeler import matcher as mt
from cxrmax.labeler.segment import split_steps
from cxrmax.pathologies import FINDINGS, LATERALIZABLE, OBSERVATIONS

STATUSES = ("positive", "negative", "uncertain", "absent")
STATUS_VALUE: dict[str, int | None] = {"positive": 1, "negative": 0, "uncertain": -1, "absent": None}
_RANK = {"positive": 3, "uncertain": 2, "negative": 1}

#: Texts longer than this are not labelled (error set); 100k-character texts are fine.
MAX_CHARS = 2_000_000

# Gap (in spaces, i.e. about words + 1) a cue's scope may jump between consecutive tokens.
_SCOPE_GAP = 7
_POST_GAP = 7
_LAT_GAP = 5
_LOCATION_WORDS = frozenset(
    "and or , the a an lower upper middle mid lobe lobes base bases lung lungs apex apices apical basilar basal "
    "zone zones hemithorax hemithoraces side sides than greater slightly more less at in of on within both "
    "lateral medial posterior anterior lingula perihilar infrahilar retrocardiac costophrenic angle sulcus".split()
)
_UNCERTAIN_HEADING = re.compile(r"differential|possib|consider|uncertain|potential|alternative|rule[\s-]*out")
_UNCERTAIN_STATEMENT = re.compile(r"\b(?:likely|probably|possibly|borderline)\b")
_DROP_SPACES = str.maketrans("", "", " -\n\t\r")
_JUNK = re.compile(r"[\x00-\x08\x0e-\x1f\ufffd]")
_LETTER = re.compile(r"[^\W\d_]")
_ASCII_LETTER = re.compile(r"[A-Za-z]")


@dataclass(frozen=True, slots=True)
class Span:
    """A character span [start, end) of the original text and its text."""

    start: int
    end: int
    text: str


@dataclass(frozen=True, slots=True)
class Evidence:
    """One mention or statement that decided (part of) an observation's label."""

    step: int
    start: int
    end: int
    text: str
    status: str
    laterality: str | None
    cue: str | None


@dataclass(slots=True)
class ObservationLabel:
    """The label of one observation in one text."""

    status: str = "absent"
    laterality: str | None = None
    evidence: list[Evidence] = field(default_factory=list)

    @property
    def value(self) -> int | None:
        """1 positive, 0 negative, -1 uncertain, None absent (the MIMIC-CXR CSV coding)."""
        return STATUS_VALUE[self.status]


@dataclass(slots=True)
class Step:
    """One reasoning step (sentence, bullet, numbered item or heading) and what it asserts."""

    index: int
    text: str
    start: int
    end: int
    kind: str
    heading: str | None
    statuses: dict[str, str] = field(default_factory=dict)
    lateralities: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class LabeledText:
    """Everything the labeler read in one text."""

    text: str
    observations: dict[str, ObservationLabel]
    steps: list[Step]
    refusal: list[Span]
    hedging: list[Span]
    error: str | None = None

    @property
    def is_refusal(self) -> bool:
        """True when the text contains a refusal to interpret ("As an AI, I cannot ...")."""
        return bool(self.refusal)

    @property
    def n_steps(self) -> int:
        """Number of reasoning steps, headings not counted."""
        return sum(1 for step in self.steps if step.kind != "heading")

    def labels(self) -> dict[str, int | None]:
        """Observation name -> 1 / 0 / -1 / None."""
        return {name: label.value for name, label in self.observations.items()}

    def positives(self) -> list[str]:
        """Observations labelled positive, in canonical order."""
        return [name for name, label in self.observations.items() if label.status == "positive"]


# A found assertion: (step index, start, end, observation, status, side or None, cue text or None).
Assertion = tuple[int, int, int, str, str, str | None, str | None]


def _lowered(text: str) -> str:
    low = text.lower()
    if len(low) != len(text):  # a few Unicode letters change length when lowered; keep offsets exact
        low = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
    if "\u2019" in low:
        low = low.replace("\u2019", "'")
    return low


def _scan(low: str) -> list[tuple[int, int, int, object]]:
    """All tokens of the text in order: (start, end, kind, payload)."""
    lexicon = mt.LEXICON
    table = lexicon.table
    flex = lexicon.flex
    flex_match = lexicon.flex_pattern.match
    prefixes = mt.FLEX_PREFIXES
    trigger = mt.TRIGGER
    tokens: list[tuple[int, int, int, object]] = []
    append = tokens.append
    covered = -1  # end of the last flexible statement: tokens inside it are dropped
    for match in lexicon.pattern.finditer(low):
        start, end = match.span()
        if start < covered:
            continue
        if match.lastgroup == "s":
            append((start, end, mt.SEMI, None))
            continue
        if low.startswith(prefixes, start):
            statement = flex_match(low, start)
            if statement is not None:
                covered = statement.end()
                append((start, covered, mt.STATEMENT, flex[int(statement.lastgroup[1:])]))
                continue
        entry = table.get(match.group().translate(_DROP_SPACES))
        if entry is None or entry[0] == trigger:
            continue
        append((start, end, entry[0], entry[1]))
    return tokens


def _gap(low: str, a: int, b: int) -> int:
    return low.count(" ", a, b) + low.count("\n", a, b)


def _is_location_gap(low: str, a: int, b: int) -> bool:
    words = low[a:b].replace(",", " , ").split()
    return len(words) <= 6 and all(w in _LOCATION_WORDS for w in words)


def _sides(low: str, tokens: list, index: int) -> str | None:
    """Laterality of the mention tokens[index]: laterality words just before it, else just after."""
    sides: list[str] = []
    edge = tokens[index][0]
    j = index - 1
    while j >= 0:
        tok = tokens[j]
        kind = tok[2]
        if kind == mt.LAT and (
            _gap(low, tok[1], edge) <= _LAT_GAP if not sides else _is_location_gap(low, tok[1], edge)
        ):
            sides.append(tok[3])
            edge = tok[0]
            j -= 1
            continue
        break
    if not sides:
        edge = tokens[index][1]
        j = index + 1
        while j < len(tokens):
            tok = tokens[j]
            kind = tok[2]
            if kind == mt.TERM or (kind == mt.CUE and not tok[3][0] & (mt.NEG_PRE | mt.UNC_PRE)):
                j += 1
                continue
            if kind == mt.LAT and (
                _gap(low, edge, tok[0]) <= _LAT_GAP if not sides else _is_location_gap(low, edge, tok[0])
            ):
                sides.append(tok[3])
                edge = tok[1]
                j += 1
                continue
            break
    if not sides:
        return None
    if "bilateral" in sides or ("left" in sides and "right" in sides):
        return "bilateral"
    return sides[0]


def _clause_bounds(tokens: list, index: int) -> tuple[int, int]:
    """Token index range [lo, hi) of the clause around tokens[index] (cut at ';' and terminators)."""
    lo = index
    while lo > 0 and tokens[lo - 1][2] not in (mt.SEMI, mt.TERM):
        lo -= 1
    hi = index + 1
    while hi < len(tokens) and tokens[hi][2] not in (mt.SEMI, mt.TERM):
        hi += 1
    return lo, hi


def _mention_status(
    low: str, tokens: list, index: int, lo: int, hi: int, default: str
) -> tuple[str, str | None]:
    """Status of the mention tokens[index] from the cues of its clause tokens[lo:hi]."""
    # Post cues: after the mention, over list-like gaps and laterality words.
    edge = tokens[index][1]
    j = index + 1
    while j < hi:
        tok = tokens[j]
        kind = tok[2]
        if kind == mt.LAT or kind == mt.IGNORE:
            j += 1
            continue
        if _gap(low, edge, tok[0]) > _POST_GAP:
            break
        if kind == mt.MENTION:
            edge = tok[1]
            j += 1
            continue
        if kind == mt.CUE:
            bits, word = tok[3]
            if bits & mt.UNC_POST:
                return "uncertain", word
            if bits & mt.NEG_POST:
                return "negative", word
        break
    # Pre cues: the nearest one before the mention whose scope reaches it.
    edge = tokens[index][0]
    j = index - 1
    while j >= lo:
        tok = tokens[j]
        kind = tok[2]
        if kind == mt.LAT or kind == mt.IGNORE:
            j -= 1
            continue
        if _gap(low, tok[1], edge) > _SCOPE_GAP:
            break
        if kind == mt.MENTION:
            edge = tok[0]
            j -= 1
            continue
        if kind == mt.CUE:
            bits, word = tok[3]
            if bits & mt.NEG_PRE:
                return "negative", word
            if bits & mt.UNC_PRE:
                if bits & mt.WEAK:
                    # "no opacity to suggest pneumonia": a negation before a weak word dominates it.
                    k = j - 1
                    edge2 = tok[0]
                    while k >= lo:
                        prev = tokens[k]
                        if (
                            prev[2] in (mt.LAT, mt.IGNORE, mt.MENTION)
                            and _gap(low, prev[1], edge2) <= _SCOPE_GAP
                        ):
                            edge2 = prev[0]
                            k -= 1
                            continue
                        if (
                            prev[2] == mt.CUE
                            and prev[3][0] & mt.NEG_PRE
                            and _gap(low, prev[1], edge2) <= _SCOPE_GAP
                        ):
                            return "negative", prev[3][1]
                        break
                return "uncertain", word
            # A post-only cue belongs to an earlier mention: it closes the scope.
        break
    return default, None


def _statement_status(low: str, tokens: list, index: int, lo: int, default: str) -> tuple[str, str | None]:
    """Status of a flexible statement used as a mention ("heart size is mildly enlarged")."""
    start, end = tokens[index][0], tokens[index][1]
    if _UNCERTAIN_STATEMENT.search(low, start, end):
        return "uncertain", None
    if index - 1 >= lo:
        tok = tokens[index - 1]
        if tok[2] == mt.CUE and _gap(low, tok[1], start) <= 2:
            bits, word = tok[3]
            if bits & mt.NEG_PRE:
                return "negative", word
            if bits & mt.UNC_PRE:
                return "uncertain", word
    return default, None


def _assertions(text: str, low: str, segments: list, detail: bool):
    """Walk the steps; return (assertions, refusal spans, hedging spans, recognised_any, step info)."""
    tokens = _scan(low)
    assertions: list[Assertion] = []
    refusal: list[tuple[int, int]] = []
    hedging: list[tuple[int, int]] = []
    recognised = False
    n_tokens = len(tokens)
    t = 0
    for step_index, segment in enumerate(segments):
        # Tokens of this step.
        while t < n_tokens and tokens[t][0] < segment.start:
            kind = tokens[t][2]
            if kind == mt.REFUSAL:
                refusal.append((tokens[t][0], tokens[t][1]))
            elif kind == mt.HEDGE:
                hedging.append((tokens[t][0], tokens[t][1]))
            t += 1
        first = t
        while t < n_tokens and tokens[t][0] < segment.end:
            t += 1
        step_tokens = tokens[first:t]
        if not step_tokens:
            continue
        heading = segment.heading
        default = "uncertain" if heading and _UNCERTAIN_HEADING.search(heading.lower()) else "positive"
        refusal_clauses: set[int] = set()
        for i, tok in enumerate(step_tokens):
            if tok[2] == mt.REFUSAL:
                refusal.append((tok[0], tok[1]))
                lo, _ = _clause_bounds(step_tokens, i)
                refusal_clauses.add(lo)
            elif tok[2] == mt.HEDGE:
                hedging.append((tok[0], tok[1]))
        for i, tok in enumerate(step_tokens):
            kind = tok[2]
            if kind == mt.MENTION:
                lo, hi = _clause_bounds(step_tokens, i)
                if lo in refusal_clauses:
                    continue
                status, cue = _mention_status(low, step_tokens, i, lo, hi, default)
                side = _sides(low, step_tokens, i)
                for observation in tok[3]:
                    assertions.append((step_index, tok[0], tok[1], observation, status, side, cue))
                recognised = True
            elif kind == mt.STATEMENT:
                lo, hi = _clause_bounds(step_tokens, i)
                if lo in refusal_clauses:
                    continue
                recognised = True
                for observation, effect in tok[3].items():
                    if effect == "mention":
                        status, cue = _statement_status(low, step_tokens, i, lo, default)
                        assertions.append((step_index, tok[0], tok[1], observation, status, None, cue))
                    else:
                        assertions.append((step_index, tok[0], tok[1], observation, effect, None, None))
            elif kind == mt.NORMAL_STUDY:
                lo, _ = _clause_bounds(step_tokens, i)
                if lo not in refusal_clauses:
                    recognised = True
    while t < n_tokens:
        kind = tokens[t][2]
        if kind == mt.REFUSAL:
            refusal.append((tokens[t][0], tokens[t][1]))
        elif kind == mt.HEDGE:
            hedging.append((tokens[t][0], tokens[t][1]))
        t += 1
    return assertions, refusal, hedging, recognised


def _combine(items) -> tuple[str, str | None]:
    """Conflict rule: strongest status wins; laterality = union of that status's sides."""
    best = "absent"
    best_rank = 0
    for item in items:
        rank = _RANK[item[4]]
        if rank > best_rank:
            best, best_rank = item[4], rank
    sides = {item[5] for item in items if item[4] == best and item[5] is not None}
    if not sides:
        side = "unspecified"
    elif "bilateral" in sides or len(sides) > 1:
        side = "bilateral"
    else:
        side = next(iter(sides))
    return best, side


def _input_problem(text: object) -> tuple[str | None, str | None]:
    """(usable text, error). Bytes are decoded as UTF-8; anything unusable gets an error message."""
    if text is None:
        return None, "text is None"
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            return None, "binary data (not UTF-8 text)"
    if not isinstance(text, str):
        return None, f"not a text: {type(text).__name__}"
    if not text.strip():
        return None, "empty text"
    if len(text) > MAX_CHARS:
        return None, f"text too long ({len(text)} characters > {MAX_CHARS})"
    junk = len(_JUNK.findall(text, 0, 20000))
    if junk and junk > 0.05 * min(len(text), 20000):
        return None, "binary or control characters (not text)"
    return text, None


def _not_english(text: str) -> bool:
    letters = _LETTER.findall(text, 0, 5000)
    if not letters:
        return True
    ascii_letters = sum(1 for c in letters if c < "\x80")
    return ascii_letters < 0.5 * len(letters)


def label_codes(text: object) -> tuple[list[int | None], list[str | None], bool, bool, int, str | None]:
    """Fast path for batches: (14 values, 14 lateralities, refusal, hedging, n_steps, error)."""
    usable, error = _input_problem(text)
    if usable is None:
        return [None] * len(OBSERVATIONS), [None] * len(OBSERVATIONS), False, False, 0, error
    low = _lowered(usable)
    segments = split_steps(usable)
    assertions, refusal, hedging, recognised = _assertions(usable, low, segments, detail=False)
    by_observation: dict[str, list[Assertion]] = {}
    for item in assertions:
        by_observation.setdefault(item[3], []).append(item)
    statuses: dict[str, str] = {}
    sides: dict[str, str | None] = {}
    for name, items in by_observation.items():
        status, side = _combine(items)
        statuses[name] = status
        sides[name] = side if name in LATERALIZABLE else None
    if not recognised and _not_english(usable):
        error = "no English text recognised"
    statuses["No Finding"] = _no_finding(statuses, recognised)
    values = [STATUS_VALUE[statuses.get(name, "absent")] for name in OBSERVATIONS]
    lats = [
        sides.get(name) if name in statuses and statuses[name] != "absent" else None for name in OBSERVATIONS
    ]
    n_steps = sum(1 for s in segments if s.kind != "heading")
    return values, lats, bool(refusal), bool(hedging), n_steps, error


def _no_finding(statuses: dict[str, str], recognised: bool) -> str:
    if not recognised:
        return "absent"
    for name in FINDINGS:
        if name != "Support Devices" and statuses.get(name) in ("positive", "uncertain"):
            return "absent"
    return "positive"


def label_text(text: object) -> LabeledText:
    """Label one report or model answer: 14 observations (status, laterality, evidence), the steps
    with what each asserts, refusal and hedging spans. Never raises on bad input (see `error`).

    >>> label_text("Small left pleural effusion. No pneumothorax.").labels()["Pleural Effusion"]
    1
    """
    usable, error = _input_problem(text)
    empty = {name: ObservationLabel() for name in OBSERVATIONS}
    if usable is None:
        return LabeledText(text if isinstance(text, str) else "", empty, [], [], [], error)
    low = _lowered(usable)
    segments = split_steps(usable)
    assertions, refusal, hedging, recognised = _assertions(usable, low, segments, detail=True)
    steps = [
        Step(i, usable[s.start : s.end], s.start, s.end, s.kind, s.heading) for i, s in enumerate(segments)
    ]
    by_observation: dict[str, list[Assertion]] = {}
    by_step: dict[tuple[int, str], list[Assertion]] = {}
    for item in assertions:
        by_observation.setdefault(item[3], []).append(item)
        by_step.setdefault((item[0], item[3]), []).append(item)
    for (step_index, name), items in by_step.items():
        status, side = _combine(items)
        steps[step_index].statuses[name] = status
        if name in LATERALIZABLE:
            steps[step_index].lateralities[name] = side
    observations = dict(empty)
    statuses: dict[str, str] = {}
    for name, items in by_observation.items():
        status, side = _combine(items)
        statuses[name] = status
        evidence = [
            Evidence(it[0], it[1], it[2], usable[it[1] : it[2]], it[4], it[5], it[6])
            for it in items
            if it[4] == status
        ]
        observations[name] = ObservationLabel(status, side if name in LATERALIZABLE else None, evidence)
    nf = _no_finding(statuses, recognised)
    if nf == "positive":
        observations["No Finding"] = ObservationLabel("positive", None, [])
    if not recognised and _not_english(usable):
        error = "no English text recognised"
    return LabeledText(
        usable,
        observations,
        steps,
        [Span(a, b, usable[a:b]) for a, b in refusal],
        [Span(a, b, usable[a:b]) for a, b in hedging],
        error,
    )
