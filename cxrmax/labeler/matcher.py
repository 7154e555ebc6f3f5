"""One precompiled regex that finds every phrase of every concern in a single pass over a text.

All literal phrases (mentions, cues, laterality, refusal, hedging, ignored phrases) are compiled
into one character trie, emitted as a regex, so the scan costs one C-level pass per text instead of
a Python loop per phrase. The few flexible statements ("heart size is mildly enlarged") are extra
named alternatives tried first at each word start. A match is looked up by its normalised key
(lower case, without spaces and hyphens) to get its kind and payload.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cxrmax.labeler import cues, phrases

# Token kinds.
MENTION = 0
STATEMENT = 1
CUE = 2
PSEUDO = 3
TERM = 4
LAT = 5
REFUSAL = 6
HEDGE = 7
NORMAL_STUDY = 8
IGNORE = 9
SEMI = 10
TRIGGER = 11  # a word that may start a flexible statement and means nothing by itself
SIGN = 12  # a radiographic sign standing for an observation (see phrases.SIGNS)
MIMIC = 13  # something a finding may turn out to be that is not disease ("nipple shadow")
GENERIC = 14  # makes its clause a general statement ("typically", "is characterized by")
OTHER = 15  # a diagnosis outside the 14 observations ("ARDS"): an alternative in "X or Y"

#: Words that may start a flexible statement (phrases.FLEX_STATEMENTS); the trie finds them and the
#: flexible regex is then tried only at their positions, which keeps the scan a single trie pass.
FLEX_TRIGGERS: tuple[str, ...] = (
    "heart",
    "cardiac",
    "size",
    "cardiothoracic",
    "cardiomediastinal",
    "cardio-mediastinal",
    "mediastinum",
    "mediastinal",
    "hila",
    "hilum",
    "hilar",
    "costophrenic",
    "cp",
    "sharp",
    "clear",
    "crisp",
    "preserved",
    "normal",
    "both",
    "lung",
    "lungs",
    "extubated",
    "extubation",
    "borderline",
)
FLEX_PREFIXES: tuple[str, ...] = (
    "heart",
    "cardi",
    "size",
    "medias",
    "hil",
    "costo",
    "cp",
    "sharp",
    "clear",
    "crisp",
    "preserved",
    "normal",
    "both",
    "lung",
    "no ",
    "no\n",
    "extubat",
    "borderline",
)

# Cue role bits.
NEG_PRE = 1
NEG_POST = 2
UNC_PRE = 4
UNC_POST = 8
WEAK = 16
COPULA = 32  # "is likely", "is not": applies backward only at the end of the predicate
HYPO = 64  # hypothetical scope ("if", "concerns about"): governed mentions assert nothing
CONTRAST = 128  # "rather than", "instead of": negates, but the side of the sentence carries over

_KEY_STRIP = re.compile(r"[\s\-]+")


def phrase_key(text: str) -> str:
    """Normalised lookup key of a phrase or a matched span."""
    return _KEY_STRIP.sub("", text.lower().replace("\u2019", "'"))


def _trie_regex(words: Iterable[str]) -> str:
    """Regex matching any of `words` (longest first at each position), built from a character trie."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.setdefault(char, {})
        node[""] = True

    def emit(node: dict) -> str:
        terminal = "" in node
        branches = []
        for char in sorted(k for k in node if k):
            if char == " ":
                atom = r"[\s\-]+"
            elif char == "-":
                atom = r"[\s\-]?"
            else:
                atom = re.escape(char)
            branches.append(atom + emit(node[char]))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if terminal else body

    return emit(trie)


def _first_chars(pattern: str) -> frozenset[str] | None:
    """The characters a match of `pattern` can start with, or None when that cannot be told (then the
    pattern is tried everywhere). Reads the parsed regex (the standard library's parser)."""
    try:
        from re import _parser as parser  # Python 3.11+
    except ImportError:  # pragma: no cover - Python 3.10
        import sre_parse as parser  # type: ignore[no-redef]
    try:
        chars, nullable = _first(parser.parse(pattern))
    except Exception:  # noqa: BLE001 - any surprise in the private parser: no dispatch for this one
        return None
    return None if chars is None or nullable else frozenset(chars)


def _first(sequence) -> tuple[set[str] | None, bool]:
    """(first characters, can match empty) of a parsed regex sequence; None characters = unknown."""
    result: set[str] = set()
    for op, arg in sequence:
        name = str(op)
        if name == "LITERAL":
            result.add(chr(arg))
            return result, False
        if name == "IN":
            for item_op, item_arg in arg:
                item = str(item_op)
                if item == "LITERAL":
                    result.add(chr(item_arg))
                elif item == "RANGE":
                    result.update(chr(code) for code in range(item_arg[0], item_arg[1] + 1))
                else:  # a negated set or a category (\s, \w): unknown
                    return None, False
            return result, False
        if name == "BRANCH":
            empty = False
            for alternative in arg[1]:
                chars, nullable = _first(alternative)
                if chars is None:
                    return None, False
                result |= chars
                empty = empty or nullable
            if not empty:
                return result, False
            continue
        if name == "SUBPATTERN":
            chars, nullable = _first(arg[-1])
            if chars is None:
                return None, False
            result |= chars
            if not nullable:
                return result, False
            continue
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low_count, _high, sub = arg
            chars, nullable = _first(sub)
            if chars is None:
                return None, False
            result |= chars
            if low_count > 0 and not nullable:
                return result, False
            continue
        if name == "AT":  # \b and anchors take no character
            continue
        return None, False
    return result, True


class Lexicon:
    """The compiled scanner plus the key -> (kind, payload) table."""

    def __init__(self) -> None:
        table: dict[str, tuple[int, object]] = {}
        spellings: list[str] = []

        def add(phrase: str, kind: int, payload: object) -> None:
            for spelling in phrases.expand(phrase):
                spelling = spelling.lower()
                key = phrase_key(spelling)
                old = table.get(key)
                if old is not None and old != (kind, payload):
                    if kind == CUE and old[0] == CUE:
                        # One phrase with several cue roles ("resolved": before or after a mention).
                        table[key] = (CUE, (old[1][0] | payload[0], spelling))  # type: ignore[index]
                        continue
                    if kind == MENTION and old[0] == MENTION:
                        merged = tuple(dict.fromkeys(old[1] + payload))  # type: ignore[operator]
                        table[key] = (MENTION, merged)
                        continue
                    # First definition wins (mentions are added before cues on purpose).
                    continue
                table[key] = (kind, payload)
                spellings.append(spelling)

        for observation, words in phrases.MENTIONS.items():
            for word in words:
                add(word, MENTION, (observation,))
        for observation, words in phrases.SIGNS.items():
            for word in words:
                add(word, SIGN, (observation,))
        add("hydropneumothorax", MENTION, ("Pneumothorax", "Pleural Effusion"))
        add("hydropneumothoraces", MENTION, ("Pneumothorax", "Pleural Effusion"))
        for words, kind in (
            (phrases.IGNORED, IGNORE),
            (phrases.NORMAL_STUDY, NORMAL_STUDY),
            (cues.REFUSAL, REFUSAL),
            (cues.HEDGING, HEDGE),
            (cues.PSEUDO, PSEUDO),
            (cues.GENERIC, GENERIC),
            (cues.MIMICS, MIMIC),
            (cues.OTHER_DIAGNOSES, OTHER),
        ):
            for word in words:
                add(word, kind, None)
        for word in cues.HYPOTHETICAL:
            add(word, CUE, (HYPO | NEG_PRE, word))
        for group, role in (
            (cues.NEG_PRE, NEG_PRE),
            (cues.NEG_POST, NEG_POST),
            (cues.UNC_PRE, UNC_PRE),
            (cues.UNC_POST, UNC_POST),
        ):
            for word in group:
                bits = role | (WEAK if word in cues.WEAK_UNCERTAIN and role == UNC_PRE else 0)
                if word in (
                    "rather than",
                    "instead of",
                    "not a true",
                    "and not a true",
                    "rather than a true",
                ):
                    bits |= CONTRAST
                if word.startswith(("is ", "are ")) and not word.endswith(" by"):
                    # "X is unlikely" (backward) and "... is unlikely to be pneumonia" (forward).
                    bits |= COPULA | (NEG_PRE if role & (NEG_PRE | NEG_POST) else UNC_PRE)
                add(word, CUE, (bits, word))
        for word in cues.NORMAL_PREDICATES:
            add(word, CUE, (NEG_POST | COPULA, word))
        for word in cues.TERMINATORS:
            add(word, TERM, word in cues.CONJUNCTIONS)
        for word, side in cues.LATERALITY.items():
            add(word, LAT, side)
        for word in FLEX_TRIGGERS:
            add(word, TRIGGER, None)
        self.table = table

        flex_parts = []
        self.flex: list[dict[str, str]] = []
        for index, (pattern, effects) in enumerate(phrases.FLEX_STATEMENTS):
            flex_parts.append(f"(?P<f{index}>{pattern})")
            self.flex.append(effects)
        trie = _trie_regex(sorted(set(spellings)))
        #: Every phrase at a word start, and every ";", ":", "|" (the reference scan; core._scan
        #: finds the same tokens with the three patterns below, which is faster).
        self.pattern = re.compile(r"\b(?:" + trie + r")(?![\w'])|[;:|]")
        #: A phrase after a non-word character (consumed, group 1 is the phrase): a pattern that
        #: starts with a character class lets the regex engine skip to the next non-word character
        #: instead of trying every position. Every phrase starts with a letter, so "a non-word
        #: character before it" is the word boundary of `pattern`.
        self.after_break = re.compile(r"[^\w](" + trie + r")(?![\w'])")
        #: A phrase at the very start of the text.
        self.at_start = re.compile(r"(?:" + trie + r")(?![\w'])")
        odd = [spelling for spelling in spellings if not spelling[:1].isalpha()]
        if odd:  # after_break would miss them: the scan relies on every phrase starting with a letter
            raise ValueError(f"phrases must start with a letter: {odd[:5]}")
        table[";"] = (SEMI, ";")
        table[":"] = (SEMI, ":")
        table["|"] = (SEMI, "|")  # markdown table cells
        #: Keys of the phrases at whose start a flexible statement may begin.
        starts = tuple({prefix.strip() for prefix in FLEX_PREFIXES})
        self.flex_keys = frozenset(key for key in table if key.startswith(starts))
        #: Matched text -> (kind, payload, may start a flexible statement), for the spellings as
        #: written in the phrase lists; core._scan adds the other spellings it meets (extra spaces,
        #: hyphens).
        self.spelled: dict[str, tuple[int, object, bool]] = {}
        for spelling in spellings:
            key = phrase_key(spelling)
            self.spelled[spelling] = (*table[key], key in self.flex_keys)
        for key in (";", ":", "|"):
            self.spelled[key] = (*table[key], False)
        #: Tried (anchored) at trigger positions only; it wins over the trie tokens it covers.
        self.flex_pattern = re.compile(r"(?:" + "|".join(flex_parts) + r")\b")
        #: The same, split by the first character of the text at the trigger: only the statements
        #: that can start with that character are tried (same result, fewer failing alternatives).
        firsts = [_first_chars(pattern) for pattern, _ in phrases.FLEX_STATEMENTS]
        self.flex_by_char: dict[str, re.Pattern | None] = {}
        for char in {key[0] for key in self.flex_keys}:
            parts = [
                part for part, first in zip(flex_parts, firsts, strict=True) if first is None or char in first
            ]
            self.flex_by_char[char] = re.compile(r"(?:" + "|".join(parts) + r")\b") if parts else None


LEXICON = Lexicon()
