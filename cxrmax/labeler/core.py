"""Label one text: the 14 observations with status, laterality and evidence, per-step statuses,
refusal and hedging spans.

Rules (documented in ARCHITECTURE.md, tested in tests/test_labeler*.py):

- Mention status inside a clause: see cues.py (nearest governing cue; negation dominates weak
  uncertainty words; pseudo-negations negate nothing). A mention with no cue is positive, or
  uncertain under a heading that announces alternatives ("Differential diagnosis").
- Clauses that refuse ("As an AI, I cannot diagnose pneumonia"), speak in general ("atelectasis
  typically appears as ...") or are hypothetical ("if you have concerns about pneumonia") assert
  nothing. Radiographic signs (pleural line, deep sulcus sign) count only when their step does not
  interpret them; costophrenic blunting never asserts an effusion by itself (CheXpert's
  definition), it only lends its side to one the text asserts.
- Negation reaches over a coordination: "No focal consolidation, pneumothorax or large pleural
  effusion" (a list closed by "or" keeps size words inside it), "clear of / free of / without A, B,
  or C", and backward from predicates of normality ("X and Y appear within limits of normal").
  A finding explained as a mimic ("this nodule is consistent with a nipple shadow") asserts nothing.
- Alternatives are uncertain: "consistent with pneumonia or atelectasis", "ARDS or pulmonary
  edema"; a hedge pointing at an artifact ("which may simply reflect the AP projection", "may
  represent a nipple shadow") makes the finding before it uncertain. A short label before a colon
  ("Pneumothorax: there is no pneumothorax") is a topic when the step says more about it.
- Laterality of a mention: the laterality words right before or right after it, whichever is
  nearer ("left lower lobe opacity", "opacity in the left lower lobe", "effusions are present
  bilaterally"), never across a conjunction, and not side words that lead into the next finding
  ("consolidation and right upper lobe nodule"); capital "L"/"R" and lobe abbreviations ("RLL")
  count; "left ... and right ..." -> bilateral; failing that,
  the side of an earlier (else a later) mention of the same step ("left lower lobe opacity may
  represent atelectasis" -> left atelectasis), not across a fresh negation. At text level a
  positive/uncertain pneumonia, consolidation, opacity or atelectasis without a side takes the one
  side the others of that family agree on ("pneumonia ... consolidation in the right lower lobe").
- Request sections (INDICATION, HISTORY, COMPARISON, TECHNIQUE, "Clinical history: ...") assert
  nothing (segment.py decides where they end).
- Key-value verdicts decide the finding they follow, whatever cue came before: "Edema": "negative",
  | Effusion | No |, "X: yes / Y: no", "Effusion - absent", "Cardiomegaly": 1, "Atelectasis ✅"; a
  side written after the verdict on the same line counts ("Pleural effusion - yes, small on the left").
- A question step ("Is there a pneumothorax?") asserts nothing by itself; an answer that starts the
  next step ("No.", "A: Yes", "Possibly, ...") gives what was asked its status.
- Conflict rule inside one text (the CheXpert aggregation): positive > uncertain > negative. The
  text's status is the strongest status of any mention; its laterality is the union of the sides
  of the mentions that have that status ({left, right} -> bilateral; no side -> unspecified).
  Laterality is given only for the observations in pathologies.LATERALIZABLE and only when the
  status is not absent. Exception: a finding only mused about ("I wondered about a pneumothorax",
  cues.TENTATIVE) and negated later in the text is negative (the model took the musing back).
- "No Finding" (CheXpert rule, pathologies.no_finding): positive when no other finding except
  Support Devices is positive or uncertain; absent otherwise, and absent for a text that has an
  `error`, that refuses without making any recognised statement, or that recognises nothing in
  fewer than three words or in another language ("no English text recognised").
- Bad input never raises: None, non-str, empty/whitespace-only, binary junk and over-long texts
  give every observation "absent" and a message in `error`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

from cxrmax.core.pathologies import FINDINGS, LATERALIZABLE, OBSERVATIONS
from cxrmax.labeler import cues
from cxrmax.labeler import matcher as mt
from cxrmax.labeler.matcher import (
    CONTRAST,
    COPULA,
    CUE,
    GENERIC,
    HEDGE,
    HYPO,
    IGNORE,
    LAT,
    MENTION,
    MIMIC,
    NEG_POST,
    NEG_PRE,
    NORMAL_STUDY,
    OTHER,
    REFUSAL,
    SEMI,
    SIGN,
    STATEMENT,
    TERM,
    TRIGGER,
    UNC_POST,
    UNC_PRE,
    WEAK,
)
from cxrmax.labeler.phrases import SIDE_ONLY_SIGNS, SIGN_ALTERNATIVES, UNCERTAIN_MENTIONS
from cxrmax.labeler.segment import CONTEXT_HEADINGS, split_steps

STATUSES = ("positive", "negative", "uncertain", "absent")
STATUS_VALUE: dict[str, int | None] = {"positive": 1, "negative": 0, "uncertain": -1, "absent": None}
_RANK = {"positive": 3, "uncertain": 2, "negative": 1}

#: Texts longer than this are not labelled (error set); 100k-character texts are fine.
MAX_CHARS = 2_000_000

# Gap (in spaces, i.e. about words + 1) a cue's scope may jump between consecutive tokens.
_SCOPE_GAP = 7
_POST_GAP = 7
_LAT_GAP = 6
# Most tokens any backward/forward walk from a mention visits. A sentence has far fewer; the bound
# keeps degenerate texts ("effusion effusion effusion ..." for 100k characters, a model stuck in a
# loop) linear instead of quadratic.
_MAX_WALK = 32
_LOCATION_WORDS = frozenset(
    "and or , the a an lower upper middle mid lobe lobes base bases lung lungs apex apices apical basilar basal "
    "zone zones hemithorax hemithoraces side sides than greater slightly more less at in of on within both "
    "lateral medial posterior anterior lingula perihilar infrahilar retrocardiac costophrenic angle sulcus "
    "small moderate large mild tiny trace minimal severe moderately mildly > < & +".split()
)
_HEADING_DEFAULTS: dict[str, str] = {}  # heading -> status of a mention without a cue under it


def _heading_default(heading: str) -> str:
    """Status of an uncued mention under `heading`: uncertain under a heading that announces
    alternatives ("Differential diagnosis"), else positive; cached for a few thousand headings."""
    default = "uncertain" if _UNCERTAIN_HEADING.search(heading.lower()) else "positive"
    if len(_HEADING_DEFAULTS) < 4096:
        _HEADING_DEFAULTS[heading] = default
    return default


_UNCERTAIN_HEADING = re.compile(r"differential|possib|consider|uncertain|potential|alternative|rule[\s-]*out")
_UNCERTAIN_STATEMENT = re.compile(r"\b(?:likely|probably|possibly|borderline|may|might|could)\b")
_DROP_SPACES = str.maketrans("", "", " -\n\t\r")
_JUNK = re.compile(r"[\x00-\x08\x0e-\x1f\ufffd]")
_CONTROL_CHARS = tuple(chr(c) for c in (*range(0, 9), *range(14, 32))) + ("\ufffd",)
_LETTER = re.compile(r"[^\W\d_]")
# A whole answer that only says the study is normal.
_NORMAL_ANSWER = re.compile(
    r"[\W_]*(?:(?:final\s+)?(?:answer|diagnosis|impression|conclusion|findings?|result|abnormalities)\s*[:\-=]\s*)?"
    r"[\W_]*(?:normal|none|no\s+findings?|negative|unremarkable|nothing\s+abnormal)[\W_]*$"
)
_WORD_RE = re.compile(r"[^\W\d_]+")
_ENGLISH_WORDS = frozenset(
    "the a an is are was of and or in on with no not there this that to for be at as by it its".split()
)
_FOREIGN_WORDS = frozenset(
    "der die das und im ist nicht kein keine mit ein eine den dem des "  # German
    "le la les et est une pas sur avec dans du aucun "  # French
    "el los las y es una con sin del hay ningun "  # Spanish
    "il lo gli che non della nel sono "  # Italian
    "não uma com sem".split()  # Portuguese
)
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
    #: For an uncertain observation, how the text hedges it: "probable" (the probable reading: "likely
    #: atelectasis", "atelectasis versus scarring", "borderline cardiomegaly") or "possible" ("may represent
    #: pneumonia", "cannot exclude a nodule"); None otherwise. The status (and the CSV value -1) is CheXpert's
    #: either way; see cues.PROBABLE.
    certainty: str | None = None

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
    if "_" in low:  # "pleural_effusion" (JSON keys), "___" (de-identification blanks): word breaks
        low = low.replace("_", " ")
    return low


def _scan(low: str, text: str) -> list[tuple[int, int, int, object]]:
    """All tokens of the text in order: (start, end, kind, payload). The same tokens as
    ``mt.LEXICON.pattern.finditer(low)`` gives (phrases at word starts, and ";", ":", "|"), found
    with a faster phrase pattern plus a search for the three separators, merged in order."""
    lexicon = mt.LEXICON
    spelled = lexicon.spelled
    flex = lexicon.flex
    flex_by_char = lexicon.flex_by_char
    trigger = TRIGGER
    tokens: list[tuple[int, int, int, object]] = []
    append = tokens.append
    covered = -1  # end of the last flexible statement: tokens inside it are dropped
    semis = _separators(low)
    n_semis = len(semis)
    k = 0  # next separator to emit
    first = lexicon.at_start.match(low)
    if first is None:
        matches = lexicon.after_break.finditer(low)
    else:  # the next phrase starts after the first one (matches do not overlap)
        matches = itertools.chain((first,), lexicon.after_break.finditer(low, first.end()))
    for match in matches:
        group = match.lastindex or 0
        start, end = match.span(group)
        while k < n_semis and semis[k] < start:
            if semis[k] >= covered:
                append((semis[k], semis[k] + 1, SEMI, low[semis[k]]))
            k += 1
        if start < covered:
            continue
        word = match.group(group)
        known = spelled.get(word)
        if known is None:
            known = _spelling(lexicon, word)
            if known is None:  # cannot happen: every trie word is in the table
                continue
        kind, payload, flexible = known
        if flexible:
            flex_pattern = flex_by_char.get(low[start])
            statement = None if flex_pattern is None else flex_pattern.match(low, start)
            if statement is not None:
                covered = statement.end()
                append((start, covered, STATEMENT, flex[int(statement.lastgroup[1:])]))
                continue
        if kind != trigger:
            if kind == LAT and end - start == 1 and not text[start].isupper():
                continue  # "L"/"R" are sides, "l"/"r" are not ("2 l", "r/o" is a cue anyway)
            append((start, end, kind, payload))
    while k < n_semis:
        if semis[k] >= covered:
            append((semis[k], semis[k] + 1, SEMI, low[semis[k]]))
        k += 1
    return tokens


def _separators(low: str) -> list[int]:
    """Sorted positions of ";", ":" and "|" in the text."""
    found: list[int] = []
    for char in ";:|":
        at = low.find(char)
        while at >= 0:
            found.append(at)
            at = low.find(char, at + 1)
    if len(found) > 1:
        found.sort()
    return found


def _spelling(lexicon: mt.Lexicon, word: str) -> tuple[int, object, bool] | None:
    """(kind, payload, may start a flexible statement) of a matched text that is not spelled as in
    the phrase lists ("pleural  effusion", "air-space"); remembered (up to 100,000 spellings)."""
    key = word.translate(_DROP_SPACES)
    entry = lexicon.table.get(key)
    if entry is None:
        return None
    known = (entry[0], entry[1], key in lexicon.flex_keys)
    if len(lexicon.spelled) < 100_000:
        lexicon.spelled[word] = known
    return known


def _gap(low: str, a: int, b: int) -> int:
    return low.count(" ", a, b) + low.count("\n", a, b)


def _is_location_gap(low: str, a: int, b: int) -> bool:
    words = low[a:b].replace(",", " , ").split()
    return len(words) <= 6 and all(w in _LOCATION_WORDS for w in words)


_MENTION_KINDS = (MENTION, SIGN)


def _is_modifier_gap(low: str, a: int, b: int) -> bool:
    """True when low[a:b] only carries location words that modify what follows ("upper lobe")."""
    words = low[a:b].split()
    return len(words) <= 4 and all(w in _LOCATION_WORDS and w not in ("and", "or", ",") for w in words)


_SIDE_WORDS = frozenset(
    {"left", "right", "bilateral", "bilaterally", "left-sided", "right-sided", "lingula", "side"}
)
# One-word answers after a label: "Pneumothorax: no.", "Effusion: yes (left)", "Edema - possible".
_VERDICT = re.compile(
    r"[\s*_]*(no|none|negative|absent|yes|present|positive|possible|possibly|maybe|equivocal|uncertain|"
    r"indeterminate)\b[\s*_|]*(?:\([^)]{0,30}\))?[\s*_|]*[.;!]?[\s*_|]*$"
)
_VERDICTS = {
    "no": "negative",
    "none": "negative",
    "negative": "negative",
    "absent": "negative",
    "yes": "positive",
    "present": "positive",
    "positive": "positive",
    "possible": "uncertain",
    "possibly": "uncertain",
    "maybe": "uncertain",
    "equivocal": "uncertain",
    "uncertain": "uncertain",
    "indeterminate": "uncertain",
    "probable": "uncertain",
    "true": "positive",
    "false": "negative",
    "null": "drop",  # a JSON field left empty asserts nothing
    "1": "positive",
    "0": "negative",
    "-1": "uncertain",
    "\u2705": "positive",
    "\u2714": "positive",
    "\u2713": "positive",
    "\u2611": "positive",
    "\u274c": "negative",
    "\u2717": "negative",
    "\u2718": "negative",
    "\u2716": "negative",
    "\u274e": "negative",
}
# A verdict right after a finding's name in key-value answers (JSON, markdown tables, "X: yes / Y: no",
# "Effusion - absent"), ended by a delimiter: it states that finding's status, whatever cue came before.
_DIRECT_VERDICT = re.compile(
    r"[\"'*_)\s]*(?:[:=|]|\s[-\u2013\u2014])[\s\"'*_|]*"
    r"(?:(no|none|negative|absent|false|yes|present|positive|true|possible|probable|equivocal|uncertain|"
    r"indeterminate|null)"
    r"[\s\"'*_]*(?:\([^)\n]{0,30}\)[\s\"'*_]*)?(?=[,;/|}\]\n.!]|$)"
    r"|(-1|0|1)(?:\.0)?[\s\"']*(?=[,;/|}\]\n]|$))"  # the CSV coding: {"Edema": -1, "Cardiomegaly": 1}
)
_KEYED = re.compile("[\u2013\u2014\u2705\u2714\u2713\u2611\u274c\u2717\u2718\u2716\u274e]")  # dashes, marks
# A check or cross mark right after a finding's name: "Atelectasis \u2705", "**Cardiomegaly** \u274c".
_SYMBOL_VERDICT = re.compile(
    r"[\s\"'*_):|\-\u2013\u2014]*([\u2705\u2714\u2713\u2611\u274c\u2717\u2718\u2716\u274e])"
)
_NEW_ITEM = re.compile(
    r"\b(?:mild|mildly|moderate|moderately|severe|small|large|tiny|trace|minimal|extensive|marked|massive|new|"
    r"persistent|stable|chronic|old|healed|known|residual|increased|decreased|worsening|improving|unchanged|"
    r"left|right|bilateral|bibasilar|there)\b"
)
_LIST_GAP = re.compile(r"\s*(?:,|and|or|,\s*and|,\s*or)?\s*$")  # "X versus Y", "X and Y", "X, Y"
_CONTENT_KINDS = frozenset({MENTION, SIGN, STATEMENT, NORMAL_STUDY})


def _span_side(low: str, start: int, end: int) -> str | None:
    """Side written inside a mention ("blunted left costophrenic angle")."""
    span = low[start:end]
    if " " not in span:
        return None
    left = "left" in span
    right = "right" in span
    if "bilateral" in span or "both" in span or (left and right):
        return "bilateral"
    return "left" if left else "right" if right else None


def _sides(low: str, tokens: list, index: int, back_only: bool = False) -> str | None:
    """Laterality of tokens[index]: the laterality words just before it or just after it, whichever
    is nearer (before wins ties); words across a conjunction ("but", "except") never count."""
    back: list[str] = []
    back_gap = 99
    edge = tokens[index][0]
    j = index - 1
    floor = index - _MAX_WALK if index > _MAX_WALK else 0
    while j >= floor:
        tok = tokens[j]
        kind = tok[2]
        if kind == TERM and not tok[3]:
            j -= 1
            continue
        if kind == LAT:
            gap = _gap(low, tok[1], edge)
            if not back and gap <= _LAT_GAP:
                back_gap = gap
            elif not (back and _is_location_gap(low, tok[1], edge)):
                break
            back.append(tok[3])
            edge = tok[0]
            j -= 1
            continue
        break
    forward: list[str] = []
    forward_gap = 99
    lat_end = 0  # end of the last side word after the mention
    hopped = False
    edge = tokens[index][1]
    j = index + 1
    n = 0 if back_only else len(tokens)
    if n > index + _MAX_WALK:
        n = index + _MAX_WALK
    while j < n:
        tok = tokens[j]
        kind = tok[2]
        if (kind == TERM and not tok[3]) or (kind == SEMI and j == index + 1 and tok[3] != ";"):
            # predicates ("are present bilaterally") and a key's colon ("Pleural Effusion": "left")
            if _gap(low, edge, tok[0]) > _LAT_GAP:
                break
            edge = tok[1]
            j += 1
            continue
        if kind == LAT:
            gap = _gap(low, edge, tok[0])
            comma = low.find(",", edge, tok[0])
            if comma >= 0 and _NEW_ITEM.search(low, comma, tok[0]):
                break  # "no pneumothorax, mild right atelectasis": the side is the next finding's
            if not forward and gap <= _LAT_GAP:
                forward_gap = gap
            elif not (forward and _is_location_gap(low, edge, tok[0])):
                break
            forward.append(tok[3])
            edge = lat_end = tok[1]
            j += 1
            continue
        if forward or back:
            break
        # "atelectasis versus consolidation at the left base": hop over a short list.
        if (
            kind in _MENTION_KINDS or (kind == CUE and tok[3][0] & UNC_PRE and tok[3][0] & UNC_POST)
        ) and _LIST_GAP.match(low, edge, tok[0]):
            hopped = True
            edge = tok[1]
            j += 1
            continue
        break
    if forward and j < n and tokens[j][2] in _MENTION_KINDS and _is_modifier_gap(low, lat_end, tokens[j][0]):
        # "left lower lobe consolidation and right upper lobe nodule", "no pneumothorax after left chest
        # tube removal": side words that lead into the next finding are that finding's side.
        forward = []
    if back and forward and not hopped and forward_gap < back_gap:
        sides = forward
    else:
        sides = back or forward
    if not sides:
        return _span_side(low, tokens[index][0], tokens[index][1])
    if "bilateral" in sides or ("left" in sides and "right" in sides):
        return "bilateral"
    return sides[0]


# The first words of an answer to a question step ("Is there a pneumothorax? No.", "A: Yes").
_ANSWER = re.compile(
    r"[\s*_]*(?:(?:a|answer)\s*[:.)]\s*)?[\s*_]*(yes|no|none|nope|possibly|possible|probably|likely|maybe|unlikely|"
    r"definitely|certainly|correct|negative|positive|absent|present)\b"
)
_ANSWERS = {
    "yes": "positive",
    "definitely": "positive",
    "certainly": "positive",
    "correct": "positive",
    "positive": "positive",
    "present": "positive",
    "no": "negative",
    "none": "negative",
    "nope": "negative",
    "unlikely": "negative",
    "negative": "negative",
    "absent": "negative",
    "possibly": "uncertain",
    "possible": "uncertain",
    "probably": "uncertain",
    "likely": "uncertain",
    "maybe": "uncertain",
}


def _answered(asked: str, answer: str) -> str:
    """Status of what a question asked, given the answer: "Is there an effusion? No." -> negative;
    "Are the lungs clear? Yes." keeps the statement's own status; "Are the lungs clear? No." says
    something is abnormal without saying what, so it asserts nothing (DROP)."""
    if answer == "positive":
        return asked
    if asked == "negative":
        return DROP
    return answer


_QUESTION_TAIL = " *_)\"'"


def _is_question(low: str, start: int, end: int) -> bool:
    """True when the step ends with a question mark (trailing markdown and quotes ignored)."""
    end -= 1
    while end > start and low[end] in _QUESTION_TAIL:
        end -= 1
    return low[end] == "?"


def _side_after_verdict(low: str, tokens: list, index: int, verdict_end: int) -> str | None:
    """Side written after a key-value verdict on the same line ("Pleural effusion - yes, small on the
    left"), before any other finding."""
    line_end = low.find("\n", verdict_end, verdict_end + 200)
    if line_end < 0:
        line_end = verdict_end + 200
    for tok in tokens[index + 1 : index + 1 + _MAX_WALK]:
        if tok[0] >= line_end or tok[2] in _CONTENT_KINDS:
            return None
        if tok[2] == LAT:
            return tok[3]
    return None


_NEGATED_KINDS = frozenset({MENTION, SIGN, STATEMENT, NORMAL_STUDY, OTHER})


def _inherited_side(tokens: list, index: int, sides: dict[int, str | None]) -> str | None:
    """Side of an unlateralised mention from the nearest earlier lateralised mention of its step
    ("left lower lobe opacity may represent atelectasis" -> left atelectasis), else from the nearest
    earlier laterality word, unless a fresh negation intervenes."""
    nearest_word = None
    j = index - 1
    floor = index - _MAX_WALK if index > _MAX_WALK else 0
    while j >= floor:
        tok = tokens[j]
        kind = tok[2]
        if kind == CUE and tok[3][0] & NEG_PRE and not tok[3][0] & (COPULA | CONTRAST):
            following = j + 1
            while following < index and tokens[following][2] == LAT:
                following += 1
            if following == index or tokens[following][2] in _NEGATED_KINDS:
                break  # a negation of a finding ("no left effusion; pneumothorax ...") ends the reach
            # "lucency at the right apex without visible lung markings ... pneumothorax": no finding
            # was negated, so the side still reaches the mention.
        if kind == LAT and nearest_word is None:
            nearest_word = tok[3]
        if j in sides and sides[j] is not None:
            return sides[j]
        j -= 1
    return nearest_word


_ALTERNATIVE_KINDS = (MENTION, SIGN, OTHER)
_OR_WORD = re.compile(r"or\s")
_OR_GAP = re.compile(r"\s*,?\s*(?:and\s*/\s*)?or\s+(?:[a-z-]+\s+){0,2}$")  # "X or Y", "X and/or Y"


def _alternatives(low: str, tokens: list, found: list) -> list:
    """Alternatives are uncertain: "consistent with pneumonia or atelectasis" (two mentions joined
    by "or"), and "widened mediastinum ..., which may simply reflect the AP projection" (a hedge
    pointing at a mimic makes the step's last positive finding before it uncertain)."""
    if not found:
        return found
    first, last = tokens[0][0], tokens[-1][1]
    if _OR_WORD.search(low, first, last) is None and not any(tok[2] == MIMIC for tok in tokens):
        return found  # no "or" between the step's findings and no mimic: nothing to demote (most steps)
    demote: set[int] = set()  # token indexes whose positive status becomes uncertain
    positive_tokens = {i for (i, _, status, _, cue, _) in found if status == "positive" and cue is None}
    for i, tok in enumerate(tokens):
        kind = tok[2]
        if kind == MIMIC and i > 0:
            c = i - 1
            while c > 0 and tokens[c][2] == IGNORE:  # "may be related to the portable technique"
                c -= 1
            cue = tokens[c]
            if cue[2] == CUE and cue[3][0] & UNC_PRE and _gap(low, cue[1], tokens[c + 1][0]) <= 2:
                earlier = [k for k in positive_tokens if k < c]
                if earlier:
                    demote.add(max(earlier))
        elif kind in _ALTERNATIVE_KINDS and i + 1 < len(tokens):
            nxt = tokens[i + 1]
            if (
                nxt[2] in _ALTERNATIVE_KINDS
                and (i in positive_tokens or kind == OTHER)
                and (i + 1 in positive_tokens or nxt[2] == OTHER)
                and _OR_GAP.match(low, tok[1], nxt[0])
            ):
                demote.update((i, i + 1))
    if not demote:
        return found
    return [
        (i, obs, "uncertain" if i in demote and status == "positive" else status, side, cue, sign)
        for (i, obs, status, side, cue, sign) in found
    ]


def _later_side(tokens: list, found: list, k: int) -> str | None:
    """Side of the next positive/uncertain lateralised mention of the step, for "pneumonia is
    suggested by the consolidation in the right middle lobe"; not across a conjunction or negation."""
    start = found[k][0]
    for i, _observation, status, side, _cue, _sign in found[k + 1 : k + 1 + _MAX_WALK]:
        if i <= start:
            continue
        if status == "negative":
            return None
        if side is not None:
            for tok in tokens[start + 1 : i]:
                if (tok[2] == TERM and tok[3]) or (tok[2] == CUE and tok[3][0] & NEG_PRE):
                    return None
            return side
    return None


def _clauses(tokens: list) -> tuple[list[int], list[int]]:
    """For every token, the [lo, hi) token range of its clause (cut at ';', ':' and terminators)."""
    n = len(tokens)
    los = [0] * n
    his = [n] * n
    lo = 0
    for i, tok in enumerate(tokens):
        los[i] = lo
        if tok[2] == SEMI or tok[2] == TERM:
            his[lo:i] = [i] * (i - lo)
            lo = i + 1
    return los, his


_COPULA_TAIL = re.compile(
    r"\s*(?:[.;,:!?)\n]|$|(?:present|seen|noted|identified|visible|evident|apparent|visuali[sz]ed|appreciated|"
    r"demonstrated|detected|observed|definite|convincingly|clearly|yet|due|related|secondary|given|and|but|by|because|"
    r"although|though|however|on|in|from|definite|excluded)\b)"
)
DROP = "drop"
SIDE = "side"  # an assertion that only lends a side (phrases.SIDE_ONLY_SIGNS); see _aggregate


def _mention_status(
    low: str, tokens: list, index: int, lo: int, hi: int, default: str, mimic_after: bool = True
) -> tuple[str, str | None]:
    """Status of the mention tokens[index] from the cues of its clause tokens[lo:hi] ("drop": the
    mention is hypothetical and asserts nothing)."""
    # Post cues: after the mention, over list-like gaps and laterality words.
    edge = tokens[index][1]
    j = index + 1
    ceiling = hi if hi < index + _MAX_WALK else index + _MAX_WALK
    while j < ceiling:
        tok = tokens[j]
        kind = tok[2]
        if kind == LAT or kind == IGNORE or kind == GENERIC:  # "seen on the prior study is not seen"
            j += 1
            continue
        if _gap(low, edge, tok[0]) > _POST_GAP:
            break
        if kind in _MENTION_KINDS:
            edge = tok[1]
            j += 1
            continue
        if kind == CUE:
            bits, word = tok[3]
            if bits & (UNC_POST | NEG_POST) and (not bits & COPULA or _COPULA_TAIL.match(low, tok[1])):
                if bits & UNC_POST:
                    return "uncertain", word
                pre = _pre_status(low, tokens, index, lo, default)
                if pre[0] == "uncertain":  # "possible small pneumothorax, not definitely seen"
                    return pre
                return "negative", word
            if (
                bits & UNC_PRE
                and j + 1 < hi
                and tokens[j + 1][2] == MIMIC
                and _gap(low, tok[1], tokens[j + 1][0]) <= 2
            ):
                return "uncertain", word  # "nodular opacity may represent a nipple shadow"
        break
    if mimic_after and _EXPLAINING.search(low, tokens[index][1], tokens[index][1] + 120) is not None:
        explained = _explained_away(low, tokens, index, hi)
        if explained is not None:
            return explained
    return _pre_status(low, tokens, index, lo, default)


# "the nodule is consistent with a nipple shadow", "... reflects soft tissue overlay":
# a link from a finding to something that is not disease.
_EXPLAINING = re.compile(
    r"\b(?:represents?|representing|reflects?|reflecting|consistent\s+with|compatible\s+with|secondary\s+to|due\s+to)\b"
)
_MODAL = re.compile(r"\b(?:may|might|could|possibl[ey]|probabl[ey]|question\w*|versus|vs|or)\b")


_LINK_ENDS = (OTHER, STATEMENT, SEMI)


def _explained_away(low: str, tokens: list, index: int, hi: int) -> tuple[str, str | None] | None:
    """A finding that its clause explains as a mimic (cues.MIMICS: "nipple shadows", "soft tissue
    overlay") asserts nothing (DROP), or is uncertain when the
    link is hedged ("... which could represent overlapping vessels"); None when no such link."""
    end = tokens[index][1]
    # The link may be a terminator ("... due to overlying breast tissue"): the walk goes past the
    # clause end, up to a conjunction, a semicolon or another finding.
    ceiling = len(tokens) if len(tokens) < index + 12 else index + 12
    for j in range(index + 1, ceiling):
        tok = tokens[j]
        kind = tok[2]
        if kind in _MENTION_KINDS or kind in _LINK_ENDS or (kind == TERM and tok[3]):
            return None  # another finding or a conjunction comes first
        if kind == MIMIC:
            between = low[end : tok[0]]
            if _gap(low, end, tok[0]) > 16:
                return None
            if _EXPLAINING.search(between) is None:
                continue  # a mimic word in a place phrase ("on the lateral projection"): not the link
            if _MODAL.search(between) is not None:
                return "uncertain", "(explained) " + low[tok[0] : tok[1]]
            return DROP, "(explained) " + low[tok[0] : tok[1]]
    return None


_CLEAR_OF = re.compile(r"\b(?:clear|free)\s+of\b")
_OR_WORD_AHEAD = re.compile(r"\b(?:or|nor)\b")
_CLAUSE_REST = re.compile(r"[^.;:\n]*")


def _new_item_after_comma(low: str, start: int, end: int) -> int:
    """1 when the last comma in low[start:end] starts a new, described finding ("no pneumothorax,
    mild right atelectasis"), so a cue before the comma does not reach past it; 2 when a "with"
    does ("no pneumothorax with a moderate right effusion": only a negation stops there); else 0.
    Not inside a list that "or"/"nor" closes: "no consolidation, effusion or large pneumothorax" is
    one negated coordination whose items may carry size words."""
    comma = low.rfind(",", start, end)
    cut = 1
    joined = low.rfind(" with ", start, end)
    if joined > comma:
        comma, cut = joined + 5, 2
    if comma < 0 or _NEW_ITEM.search(low, comma, end) is None:
        return 0
    rest = _CLAUSE_REST.match(low, comma + 1)
    return 0 if _OR_WORD_AHEAD.search(low, comma, rest.end()) is not None else cut


def _pre_status(low: str, tokens: list, index: int, lo: int, default: str) -> tuple[str, str | None]:
    """Status from the nearest cue before the mention whose scope reaches it."""
    edge = tokens[index][0]
    joined = False  # a described finding after "with" lies between the cue and the mention
    j = index - 1
    floor = lo if lo > index - _MAX_WALK else index - _MAX_WALK
    while j >= floor:
        tok = tokens[j]
        kind = tok[2]
        if kind == LAT or kind == GENERIC:
            j -= 1
            continue
        if _gap(low, tok[1], edge) > _SCOPE_GAP:
            break
        if kind in _MENTION_KINDS or kind == MIMIC or kind == OTHER or kind == IGNORE:
            # an ignored phrase is a list item too ("differential includes fat, pericardial mass,
            # pleural mass or aneurysm")
            # "no pneumothorax, mild right basilar atelectasis": a new described finding after a
            # comma is not part of the negated list.
            cut = _new_item_after_comma(low, tok[1], tokens[index][0])
            if cut == 1:
                break
            joined = joined or cut == 2
            edge = tok[0]
            j -= 1
            continue
        if kind == STATEMENT and _CLEAR_OF.search(low, tok[0], tok[1] + 4) is not None:
            # "the lungs are clear of consolidation, effusion or pneumothorax": the
            # statement's "clear of" governs the rest of its list.
            if _new_item_after_comma(low, tok[1], tokens[index][0]):
                break
            return "negative", "clear of"
        if kind == CUE:
            bits, word = tok[3]
            cut = _new_item_after_comma(low, tok[1], tokens[index][0])
            if cut == 1:
                break  # "possibly related to prior infection, and a small calcified granuloma"
            if (joined or cut == 2) and bits & NEG_PRE and not bits & HYPO:
                break
            if bits & HYPO:
                return DROP, word
            for k in range(max(lo, j - _MAX_WALK), j):  # "if there is continued concern for rib fracture"
                earlier = tokens[k]
                if earlier[2] == CUE and earlier[3][0] & HYPO:
                    return DROP, earlier[3][1]
            if bits & NEG_PRE:
                return "negative", word
            if bits & UNC_PRE:
                if bits & WEAK:
                    # "no opacity to suggest pneumonia": a negation before a weak word dominates it.
                    k = j - 1
                    edge2 = tok[0]
                    while k >= lo:
                        prev = tokens[k]
                        if (
                            prev[2] in (LAT, IGNORE, MENTION, SIGN)
                            and _gap(low, prev[1], edge2) <= _SCOPE_GAP
                        ):
                            edge2 = prev[0]
                            k -= 1
                            continue
                        if prev[2] == CUE and _gap(low, prev[1], edge2) <= _SCOPE_GAP:
                            if prev[3][0] & NEG_PRE:
                                return "negative", prev[3][1]
                            if prev[3][0] & WEAK:
                                # "no lucency to suggest pneumothorax or fluid to suggest an
                                # effusion": one negation over a chain of linking words.
                                edge2 = prev[0]
                                k -= 1
                                continue
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
        if tok[2] == CUE and _gap(low, tok[1], start) <= 2:
            bits, word = tok[3]
            if bits & HYPO:
                return DROP, word
            if bits & NEG_PRE:
                return "negative", word
            if bits & UNC_PRE:
                return "uncertain", word
    return default, None


# A mention or statement found in a step: (token index, observation, status, side, cue, is_sign).
Found = tuple[int, str, str, str | None, str | None, bool]


def _assertions(text: str, low: str, segments: list, detail: bool):
    """Walk the steps; return (assertions, refusal spans, hedging spans, recognised_any).

    Per step: request sections are skipped, a pending question or bare label is answered by it
    (_answer_question, _sub_item), then the step is read (_read_step) and what it found is emitted
    (_emit_step)."""
    tokens = _scan(low, text)
    has_mimic = MIMIC in {tok[2] for tok in tokens}  # most texts have none: skip _explained_away
    ascii_text = low.isascii()
    assertions: list[Assertion] = []
    refusal: list[tuple[int, int]] = []
    hedging: list[tuple[int, int]] = []
    recognised = False
    n_tokens = len(tokens)
    t = 0
    # assertions of the previous step when it was a bare label ("2. Pleural effusion")
    pending: list[int] = []
    question: list[tuple[int, int, int, str, str, str | None]] = []  # what a question step asked
    for step_index, segment in enumerate(segments):
        seg_start, seg_end, _kind, heading = segment
        if t < n_tokens and tokens[t][0] < seg_start:  # tokens between steps (markers)
            t = _collect_spans(tokens, t, seg_start, refusal, hedging)
        first = t
        while t < n_tokens and tokens[t][0] < seg_end:
            t += 1
        if heading in CONTEXT_HEADINGS:  # filled by split_steps for the headings it gave
            pending = []  # a request section (INDICATION, COMPARISON ...) says nothing about this film
            question = []
            continue
        if question:
            if _answer_question(low, segment, tokens, first, t, question, assertions):
                recognised = True
            question = []
        if pending:
            # Sub-items of a bare label: "2. Pleural effusion / - None", "1. Atelectasis / - Left lower lobe".
            labelled = pending
            pending = []
            if _sub_item(low, segment, tokens[first:t], assertions, labelled):
                continue
        if first == t:
            continue
        read = _read_step(low, segment, tokens[first:t], ascii_text, has_mimic, refusal, hedging)
        if read is None:
            continue
        step_tokens, step_found, label_starts, step_recognised = read
        if step_recognised:
            recognised = True
        if not step_found:
            continue
        step_found = _alternatives(low, step_tokens, step_found)
        if label_starts:
            # A label is only a topic when the step goes on to say something about the same finding.
            said = {obs for (i, obs, *_rest) in step_found if step_tokens[i][0] not in label_starts}
            step_found = [
                item
                for item in step_found
                if step_tokens[item[0]][0] not in label_starts or item[1] not in said
            ]
        last = low[seg_end - 1]  # a question asserts nothing by itself
        asks = last == "?" or (last in _QUESTION_TAIL and _is_question(low, seg_start, seg_end))
        if _emit_step(step_index, step_tokens, step_found, asks, assertions, question):
            recognised = True
        if asks:
            continue
        if (
            seg_end - seg_start < 300
            and _gap(low, seg_start, seg_end) <= 4
            and all(a[6] is None for a in assertions[len(assertions) - len(step_found) :])
        ):
            pending = list(range(len(assertions) - len(step_found), len(assertions)))
    _collect_spans(tokens, t, len(low) + 1, refusal, hedging)
    return assertions, refusal, hedging, recognised


def _collect_spans(tokens: list, t: int, stop: int, refusal: list, hedging: list) -> int:
    """Record the refusal and hedging tokens from tokens[t] up to the first one starting at `stop`;
    return the index of that one."""
    n_tokens = len(tokens)
    while t < n_tokens and tokens[t][0] < stop:
        kind = tokens[t][2]
        if kind == REFUSAL:
            refusal.append((tokens[t][0], tokens[t][1]))
        elif kind == HEDGE:
            hedging.append((tokens[t][0], tokens[t][1]))
        t += 1
    return t


def _answer_question(
    low: str, segment, tokens: list, first: int, stop: int, question: list, assertions: list
) -> bool:
    """ "Is there a pneumothorax? No." / "Q: ... ? A: Yes": a step that starts with an answer gives
    what the question step asked its status (appended to `assertions`); True when it asserted any."""
    answer = _ANSWER.match(low, segment.start, segment.end)
    if answer is None:
        return False
    word = answer.group(1)
    answer_side = None  # "Is there an effusion? Yes, on the right."
    k = first
    while k < stop and tokens[k][2] not in _CONTENT_KINDS:
        if tokens[k][2] == LAT:
            answer_side = tokens[k][3]
            break
        k += 1
    asserted = False
    for step_of, a, b, observation, asked, side in question:
        if side is None and observation in LATERALIZABLE:
            side = answer_side
        status = _answered(asked, _ANSWERS[word])
        if status != DROP:
            assertions.append((step_of, a, b, observation, status, side, "(answer) " + word))
            asserted = True
    return asserted


def _colon_labels(low: str, segment, step_tokens: list) -> tuple[list, set[int], dict[int, str]]:
    """A colon after a short label ("**Edema**: not present") joins the label to what follows: return
    the step's tokens without those colons, the starts of the labels (a topic when the step says more
    about the same finding) and the labels' verdicts ("Pneumothorax: no." -> negative)."""
    label_starts: set[int] = set()
    verdicts: dict[int, str] = {}
    kept = []
    for tok in step_tokens:
        if (
            tok[2] == SEMI
            and tok[3] != ";"
            and tok[0] - segment.start < 300
            and _gap(low, segment.start, tok[0]) <= 5
        ):
            if kept and kept[-1][2] in _MENTION_KINDS:
                label_starts.add(kept[-1][0])
                verdict = _VERDICT.match(low, tok[1], segment.end)
                if verdict is not None:
                    verdicts[kept[-1][0]] = _VERDICTS[verdict.group(1).split()[0]]
            continue
        kept.append(tok)
    return kept, label_starts, verdicts


def _read_step(
    low: str, segment, step_tokens: list, ascii_text: bool, has_mimic: bool, refusal: list, hedging: list
) -> tuple[list, list[Found], set[int], bool] | None:
    """Read one step's tokens: (its tokens without label colons, what its mentions and statements
    found, the starts of its topic labels, whether it recognised a statement); None when the step
    has no content (cues and laterality words alone assert nothing). Refusal and hedging spans are
    recorded on the way."""
    content = False
    colon = False
    cuts = False  # a terminator or separator: the step has more than one clause
    special = False  # refusal, hedging or general-statement tokens (see _silent_clauses)
    for tok in step_tokens:
        kind = tok[2]
        if kind in _CONTENT_KINDS:
            content = True
        elif kind == SEMI:
            colon = colon or tok[3] != ";"
            cuts = True
        elif kind == TERM:
            cuts = True
        elif kind == REFUSAL or kind == HEDGE:
            content = special = True
        elif kind == GENERIC:
            special = True
    if not content:
        return None
    # Key-value verdicts ("X: no", "| X | No |", "X - absent", "X = 1") need a separator in the step.
    seg_start, seg_end, _kind, heading = segment
    keyed = (
        colon
        or low.find(" -", seg_start, seg_end) >= 0
        or low.find("=", seg_start, seg_end) >= 0
        or (not ascii_text and _KEYED.search(low, seg_start, seg_end) is not None)
    )
    label_starts: set[int] = set()  # "Pneumothorax: there is no pneumothorax": a topic label
    verdicts: dict[int, str] = {}  # "Pneumothorax: no." -> the label's status
    if colon:
        step_tokens, label_starts, verdicts = _colon_labels(low, segment, step_tokens)
    default = "positive"
    if heading is not None:
        default = _HEADING_DEFAULTS.get(heading) or _heading_default(heading)
    if cuts:
        los, his = _clauses(step_tokens)
    else:  # one clause: the whole step
        los, his = [0] * len(step_tokens), [len(step_tokens)] * len(step_tokens)
    last_mimic = -1  # index of the step's last mimic token ("nipple shadow"), for _explained_away
    if has_mimic:
        for k, tok in enumerate(step_tokens):
            if tok[2] == MIMIC:
                last_mimic = k
    silent = _silent_clauses(low, step_tokens, los, refusal, hedging) if special else _NOT_SILENT
    found: list[Found] = []
    token_sides: dict[int, str | None] = {}
    recognised = False
    for i, tok in enumerate(step_tokens):
        kind = tok[2]
        if kind == MENTION or kind == SIGN:
            if los[i] not in silent:
                _read_mention(
                    low,
                    step_tokens,
                    i,
                    los[i],
                    his[i],
                    default,
                    i < last_mimic,
                    verdicts,
                    keyed,
                    ascii_text,
                    token_sides,
                    found,
                )
        elif kind == STATEMENT:
            if los[i] not in silent and _read_statement(low, step_tokens, i, los[i], default, found):
                recognised = True
        elif kind == NORMAL_STUDY:
            if los[i] not in silent:
                recognised = True
    return step_tokens, found, label_starts, recognised


_NOT_SILENT: frozenset[int] = frozenset()


def _silent_clauses(low: str, step_tokens: list, los: list[int], refusal: list, hedging: list) -> set[int]:
    """Clauses (by first token) that refuse ("As an AI, I cannot ..."), speak in general
    ("typically") or narrate an earlier study ("On a prior CT, ..." when it opens the clause);
    records the step's refusal and hedging spans."""
    silent: set[int] = set()
    for i, tok in enumerate(step_tokens):
        kind = tok[2]
        if kind == REFUSAL:
            refusal.append((tok[0], tok[1]))
            silent.add(los[i])
        elif kind == HEDGE:
            hedging.append((tok[0], tok[1]))
        elif kind == GENERIC:
            if low.startswith("on ", tok[0]) and not _opens_clause(low, tok[0]):
                continue  # "larger than on the prior study": a comparison, not history
            silent.add(los[i])
    return silent


_CLAUSE_OPENING = re.compile(r"(?:^|[.;:\n(])[\s*_\-\d.)]*$")


def _opens_clause(low: str, start: int) -> bool:
    """True when nothing but punctuation, list markers or spaces stands between the last clause
    boundary (or the text start) and `start`."""
    return _CLAUSE_OPENING.search(low, max(0, start - 40), start) is not None


def _read_mention(
    low: str,
    step_tokens: list,
    i: int,
    lo: int,
    hi: int,
    default: str,
    mimic_after: bool,
    verdicts: dict[int, str],
    keyed: bool,
    ascii_text: bool,
    token_sides: dict[int, str | None],
    found: list[Found],
) -> None:
    """Status and side of the mention (or sign) step_tokens[i], appended to `found` once per
    observation it names: cues of its clause, a label's or key-value verdict, then its side (its own
    laterality words, a side after the verdict, or the side of an earlier mention of the step)."""
    tok = step_tokens[i]
    status, cue = _mention_status(low, step_tokens, i, lo, hi, default, mimic_after)
    if status == DROP:
        return
    if status == "positive" and cue is None and "Edema" in tok[3]:
        if low[tok[0] : tok[1]].translate(_DROP_SPACES) in UNCERTAIN_MENTIONS:
            status, cue = "uncertain", "(CheXpert: uncertain mention)"
    if cue is None and tok[0] in verdicts:
        status = verdicts[tok[0]]
    verdict = None
    if keyed:
        verdict = _DIRECT_VERDICT.match(low, tok[1])
        if verdict is None and not ascii_text:
            verdict = _SYMBOL_VERDICT.match(low, tok[1])
        if verdict is not None:  # "Atelectasis": "negative", | Effusion | No |, X: yes / Y: no
            word = verdict.group(1) or verdict.group(2)  # (the symbol regex has one group)
            status, cue = _VERDICTS[word], "(verdict) " + word
            if status == DROP:
                return
    side = _sides(low, step_tokens, i)
    if side is None and verdict is not None:
        side = _side_after_verdict(low, step_tokens, i, verdict.end())
    if side is None:
        side = _inherited_side(step_tokens, i, token_sides)
    token_sides[i] = side
    sign = tok[2] == SIGN
    for observation in tok[3]:
        found.append((i, observation, status, side, cue, sign))


def _read_statement(low: str, step_tokens: list, i: int, lo: int, default: str, found: list[Found]) -> bool:
    """What the flexible statement step_tokens[i] says ("heart size is normal", "the lungs are
    clear"), appended to `found`; True when it said anything."""
    tok = step_tokens[i]
    side = None
    said = False
    for observation, effect in tok[3].items():
        if effect == "mention" or effect == "sign":
            status, cue = _statement_status(low, step_tokens, i, lo, default)
            if status == DROP:
                continue
        else:
            status, cue = effect, None
        if observation in LATERALIZABLE:
            if side is None:
                # Only a side written before a normal statement counts: "the right lung
                # is clear" (right), "the lungs are clear bilaterally" (no side claim).
                side = _sides(low, step_tokens, i, back_only=True)
                if side is None and low.endswith("both ", 0, tok[0]):
                    side = "bilateral"  # "both costophrenic angles are sharp"
            found.append((i, observation, status, side, cue, effect == "sign"))
        else:
            found.append((i, observation, status, None, cue, False))
        said = True
    return said


def _emit_step(
    step_index: int, step_tokens: list, found: list[Found], asks: bool, assertions: list, question: list
) -> bool:
    """Turn what a step found into assertions (or, for a question step, into what it asked): signs
    the step interprets are dropped, side-only signs only lend a side, mentions without a side take
    the side of the step's signs or of a later mention. True when an assertion was made."""
    asserted = False
    explained = {obs for (_, obs, _, _, _, sign) in found if not sign}
    sign_sides = {obs: side for (_, obs, _, side, _, sign) in found if sign and side is not None}
    for k, (i, observation, status, side, cue, sign) in enumerate(found):
        if not sign and side is None and observation in sign_sides:
            side = sign_sides[observation]  # "blunting of the left angle suggests effusion"
        if side is None and status != "negative" and observation in LATERALIZABLE:
            side = _later_side(step_tokens, found, k)
        if sign and (
            observation in explained
            or any(alt in explained for alt in SIGN_ALTERNATIVES.get(observation, ()))
        ):
            continue  # the step interprets the sign itself
        tok = step_tokens[i]
        if sign and observation in SIDE_ONLY_SIGNS:
            if not asks and status != "negative" and side is not None:
                assertions.append((step_index, tok[0], tok[1], observation, SIDE, side, cue))
            continue
        if asks:
            question.append((step_index, tok[0], tok[1], observation, status, side))
            continue
        assertions.append((step_index, tok[0], tok[1], observation, status, side, cue))
        asserted = True
    return asserted


def _sub_item(low: str, segment, step_tokens: list, assertions: list, labelled: list[int]) -> bool:
    """Apply a sub-item that only answers its label (a verdict, or a location) to the label's
    assertions; True when the sub-item was consumed."""
    verdict = _VERDICT.match(low, segment.start, segment.end)
    if verdict is not None:
        status = _VERDICTS[verdict.group(1).split()[0]]
        for k in labelled:
            a = assertions[k]
            assertions[k] = (a[0], a[1], a[2], a[3], status, a[5], "(sub-item) " + verdict.group(1))
        return True
    if step_tokens and all(tok[2] == LAT for tok in step_tokens):
        words = low[segment.start : segment.end].replace(",", " ").replace(".", " ").split()
        if all(word in _LOCATION_WORDS or word in _SIDE_WORDS for word in words):
            side = _sides_of([tok[3] for tok in step_tokens])
            for k in labelled:
                a = assertions[k]
                if a[3] in LATERALIZABLE and a[5] is None:
                    assertions[k] = (a[0], a[1], a[2], a[3], a[4], side, a[6])
            return True
    return False


def _sides_of(words: list[str]) -> str:
    if "bilateral" in words or ("left" in words and "right" in words):
        return "bilateral"
    return words[0]


def _combine(items) -> tuple[str, str | None]:
    """Conflict rule: strongest status wins; laterality = union of that status's sides. Exception: a
    finding that is only mused about ("I wondered about a pneumothorax") and negated afterwards is
    negative (the model took the musing back)."""
    best = "absent"
    best_rank = 0
    has_uncertain = False
    for item in items:
        rank = _RANK[item[4]]
        if rank == 2:
            has_uncertain = True
        if rank > best_rank:
            best, best_rank = item[4], rank
    if best == "uncertain":
        mused = [item[1] for item in items if item[4] == "uncertain"]
        if all(item[6] in _TENTATIVE for item in items if item[4] == "uncertain") and any(
            item[4] == "negative" and item[1] > max(mused) for item in items
        ):
            best = "negative"
    sides = {item[5] for item in items if item[4] == best and item[5] is not None}
    if not sides and best == "positive" and has_uncertain:
        # "blunting of both angles suggests bilateral effusions ... supports pleural effusion": an
        # unlateralised restatement keeps the side of the uncertain mentions.
        sides = {item[5] for item in items if item[4] == "uncertain" and item[5] is not None}
    if not sides:
        side = "unspecified"
    elif "bilateral" in sides or len(sides) > 1:
        side = "bilateral"
    else:
        side = next(iter(sides))
    return best, side


_TENTATIVE = frozenset(cues.TENTATIVE)
_FAMILY = ("Pneumonia", "Consolidation", "Lung Opacity", "Atelectasis")


def _group(assertions: list) -> tuple[dict[str, list], dict[str, set[str]]]:
    """(observation -> its assertions, observation -> the sides its side-only signs lend)."""
    by_observation: dict[str, list[Assertion]] = {}
    lent: dict[str, set[str]] = {}
    for item in assertions:
        if item[4] == SIDE:
            lent.setdefault(item[3], set()).add(item[5])
        else:
            by_observation.setdefault(item[3], []).append(item)
    return by_observation, lent


def _aggregate(
    by_observation: dict[str, list], lent: dict[str, set[str]] | None = None
) -> dict[str, tuple[str, str | None]]:
    """Text-level (status, laterality) per observation: the conflict rule, then the family side: a
    positive/uncertain airspace finding (pneumonia, consolidation, opacity, atelectasis) without a
    side takes the single side that the other such findings of the text agree on ("pneumonia ...
    the consolidation in the right lower lobe" -> right pneumonia). A positive/uncertain finding
    without a side also takes the sides of its side-only signs (`lent`)."""
    result: dict[str, tuple[str, str | None]] = {}
    for name, items in by_observation.items():
        status, side = _combine(items)
        if lent and side == "unspecified" and status != "negative" and name in lent:
            sides = lent[name]
            side = "bilateral" if "bilateral" in sides or len(sides) > 1 else next(iter(sides))
        result[name] = (status, side if name in LATERALIZABLE else None)
    for name in _FAMILY:
        status, side = result.get(name, ("absent", None))
        if side != "unspecified" or status not in ("positive", "uncertain"):
            continue
        others = {
            result[other][1]
            for other in _FAMILY
            if other != name and other in result and result[other][0] in ("positive", "uncertain")
        } - {"unspecified", None}
        if len(others) == 1:
            result[name] = (status, next(iter(others)))
    return result


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
    if any(c in text for c in _CONTROL_CHARS):  # cheap test first: almost every text has none
        junk = len(_JUNK.findall(text, 0, 20000))
    else:
        junk = 0
    if junk and junk > 0.05 * min(len(text), 20000):
        return None, "binary or control characters (not text)"
    return text, None


def _not_english(text: str) -> bool:
    """True for a text in which nothing was recognised that is not English (called only then)."""
    if text.isascii():
        if not _ASCII_LETTER.search(text):
            return True
    else:
        letters = _LETTER.findall(text, 0, 5000)
        if not letters:
            return True
        ascii_letters = sum(1 for c in letters if c < "\x80")
        if ascii_letters < 0.5 * len(letters):
            return True
    # Latin-script answers in another language ("Pneumonie im rechten Unterlappen"): function words
    # of a few common languages and none of English's.
    words = _WORD_RE.findall(text.lower(), 0, 3000)
    foreign = sum(1 for w in words if w in _FOREIGN_WORDS)
    english = sum(1 for w in words if w in _ENGLISH_WORDS)
    return foreign > 0 and english == 0 or foreign >= 2 and foreign > english


def label_codes(
    text: object, uncertain: str = "keep"
) -> tuple[list[int | None], list[str | None], bool, bool, int, str | None]:
    """Fast path for batches: (14 values, 14 lateralities, refusal, hedging, n_steps, error); an
    uncertain observation's value follows ``uncertain`` (UNCERTAIN_POLICIES; "keep": -1)."""
    usable, error = _input_problem(text)
    if usable is None:
        return [None] * len(OBSERVATIONS), [None] * len(OBSERVATIONS), False, False, 0, error
    low = _lowered(usable)
    segments = split_steps(usable)
    assertions, refusal, hedging, recognised = _assertions(usable, low, segments, detail=False)
    by_observation, lent = _group(assertions)
    aggregated = _aggregate(by_observation, lent)
    statuses = {name: status for name, (status, _) in aggregated.items()}
    sides = {name: side for name, (_, side) in aggregated.items()}
    if not recognised and len(usable) < 80 and _NORMAL_ANSWER.match(low):
        recognised = True  # "Normal.", "Answer: none", "Findings: none."
    if not recognised and _not_english(usable):
        error = "no English text recognised"
    statuses["No Finding"] = _no_finding(statuses, recognised, bool(refusal), error, usable)
    values = [STATUS_VALUE[statuses.get(name, "absent")] for name in OBSERVATIONS]
    if uncertain != "keep":
        values = [
            value if value != -1 else _uncertain_value(uncertain, by_observation[name], usable, segments)
            for name, value in zip(OBSERVATIONS, values, strict=True)
        ]
    lats = [
        sides.get(name) if name in statuses and statuses[name] != "absent" else None for name in OBSERVATIONS
    ]
    n_steps = sum(1 for s in segments if s.kind != "heading")
    return values, lats, bool(refusal), bool(hedging), n_steps, error


def _uncertain_value(policy: str, items: list, text: str, segments: list) -> int:
    if policy == "positive":
        return 1
    if policy == "negative":
        return 0
    if policy == "graded":
        return int(_certainty([it for it in items if it[4] == "uncertain"], text, segments) == "probable")
    raise ValueError(f"uncertain policy {policy!r}: expected one of {', '.join(UNCERTAIN_POLICIES)}")


def _no_finding(
    statuses: dict[str, str], recognised: bool, refused: bool, error: str | None, text: str = ""
) -> str:
    if error is not None or (refused and not recognised):
        return "absent"
    if not recognised and len(text.split(None, 2)) < 3:
        return "absent"  # "aaaa", "ok": too little text to call the study normal
    for name in FINDINGS:
        if name != "Support Devices" and statuses.get(name) in ("positive", "uncertain"):
            return "absent"
    return "positive"


_POSSIBILITY_WORD = re.compile(r"\b(?:may|might|could|possibl[ey]|question\w*|suspect\w*|concern\w*)\b")


def _certainty(items: list, text: str, segments: list) -> str:
    """The grade of an uncertain observation from its uncertain assertions (step, start, end, name,
    status, side, cue): "probable" when one of them states the finding as the probable reading, else
    "possible"."""
    for item in items:
        cue = item[6]
        if cue is not None:
            if " ".join(cue.replace("-", " ").split()) in cues.PROBABLE:
                return "probable"
            continue
        # No cue word: one of two alternatives ("A or B") or a hedged statement ("borderline heart size");
        # a modal inside the statement or a differential heading above it keeps it a possibility.
        heading = segments[item[0]][3]
        if _POSSIBILITY_WORD.search(text[item[1] : item[2]].lower()) is None and (
            heading is None or _heading_default(heading) != "uncertain"
        ):
            return "probable"
    return "possible"


#: How ``label_codes`` writes an uncertain observation: -1 (CheXpert's coding), 1, 0, or by its grade
#: (1 when probable, 0 when possible; see ObservationLabel.certainty).
UNCERTAIN_POLICIES = ("keep", "positive", "negative", "graded")


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
    by_observation, lent = _group(assertions)
    by_step: dict[tuple[int, str], list[Assertion]] = {}
    for item in assertions:
        if item[4] != SIDE:
            by_step.setdefault((item[0], item[3]), []).append(item)
    for (step_index, name), items in by_step.items():
        status, side = _combine(items)
        steps[step_index].statuses[name] = status
        if name in LATERALIZABLE:
            steps[step_index].lateralities[name] = side
    observations = dict(empty)
    statuses: dict[str, str] = {}
    for name, (status, side) in _aggregate(by_observation, lent).items():
        statuses[name] = status
        evidence = [
            Evidence(it[0], it[1], it[2], usable[it[1] : it[2]], it[4], it[5], it[6])
            for it in by_observation[name]
            if it[4] == status
        ]
        certainty = None
        if status == "uncertain":
            certainty = _certainty([it for it in by_observation[name] if it[4] == status], usable, segments)
        observations[name] = ObservationLabel(status, side, evidence, certainty)
    if not recognised and len(usable) < 80 and _NORMAL_ANSWER.match(low):
        recognised = True  # "Normal.", "Answer: none", "Findings: none."
    if not recognised and _not_english(usable):
        error = "no English text recognised"
    if _no_finding(statuses, recognised, bool(refusal), error, usable) == "positive":
        observations["No Finding"] = ObservationLabel("positive", None, [])
    return LabeledText(
        usable,
        observations,
        steps,
        [Span(a, b, usable[a:b]) for a, b in refusal],
        [Span(a, b, usable[a:b]) for a, b in hedging],
        error,
    )
