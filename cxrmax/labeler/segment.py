"""Split a report or a chatbot answer into reasoning steps.

A step is a sentence, a bullet item, a numbered item or a heading line. Headings ("## Findings",
"**Evidence:**", "FINDINGS:") are steps of kind "heading" and also the context (`heading`) of the
steps under them. Hard-wrapped report lines are joined: a newline only ends a step when the line
before it ends a sentence, the next line starts a bullet/number/heading, or a blank line follows.
Offsets are character offsets into the original text.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import NamedTuple

_LINE = re.compile(r"[^\n]*\n?")
_MD_HEADING = re.compile(r"[ \t]*#{1,6}[ \t]+(?P<h>.*?)[ \t#]*$")
_BOLD_HEADING = re.compile(
    r"[ \t]*(?:[-*+][ \t]+)?(?:\*\*|__)(?P<h>[^*_\n]{1,80}?)(?::[ \t]*)?(?:\*\*|__):?[ \t]*$"
)
_COLON_HEADING = re.compile(r"[ \t]*(?P<h>[A-Za-z][A-Za-z0-9 ,/&()'-]{0,60}):[ \t]*$")
_INLINE_SECTION = re.compile(r"[ \t]*(?:\*\*)?(?P<h>[A-Z][A-Z /&-]{2,40}):(?:\*\*)?[ \t]+\S")
# Report sections that describe the request, not this image ("Clinical history: fever, question
# pneumonia"), in any case (see split_steps for where such a section ends).
CONTEXT_SECTION = re.compile(
    r"(?:(?:clinical|patient|medical)\s+(?:history|indications?|information|details|context)|history|"
    r"indications?|reason\s+for\s+(?:the\s+)?(?:exam(?:ination)?|study|request|referral)|comparisons?|"
    r"technique|examination|exam|procedure|prior\s+studies)[\s:.*_]*",
    re.IGNORECASE,
)
_CONTEXT_LABEL = re.compile(
    r"[ \t]*(?:\*\*|__)?(?P<h>(?:clinical|patient|medical)\s+(?:history|indications?|information|details|context)|"
    r"history|indications?|reason\s+for\s+(?:the\s+)?(?:exam(?:ination)?|study|request|referral)|comparisons?|"
    r"technique)[ \t]*(?:\*\*|__)?[ \t]*:[ \t]*(?:\*\*|__)?[ \t]*\S",
    re.IGNORECASE,
)
_SENTENCE_LABEL = re.compile(
    r"(?:\*\*|__)?(?P<h>[A-Za-z][A-Za-z/]*(?:[ \t]+[A-Za-z/]+){0,3})(?:\*\*|__)?[ \t]*:"
)
_CONTEXT_FIRST = frozenset("CHIRTPMchirtpm*_")  # first letters of the context labels above
# "Pneumothorax: no", "Effusion - absent", "Heart size: normal": a short label line is its own step
# even when the line before it does not end a sentence (verdict lists rarely have full stops).
_LABEL_LINE = re.compile(
    r"[ \t]*(?:\*\*|__)?[A-Za-z][A-Za-z/]*(?:[ \t]+[A-Za-z/]+){0,3}(?:\*\*|__)?[ \t]*(?::|[ \t][-\u2013\u2014])[ \t]+\S"
)
_BULLET = re.compile(r"[ \t]*(?:[-*+\u2022\u25cf\u25e6\u2013]|\(?\d{1,2}[.)]|\(?[a-hA-H][.)])[ \t]+")
_SENTENCE_END = re.compile(r"[.!?][\"')\]*]*\s+")
_ABBREVIATIONS = frozenset(
    {
        "e.g",
        "i.e",
        "dr",
        "vs",
        "approx",
        "etc",
        "cf",
        "fig",
        "st",
        "mr",
        "mrs",
        "ms",
        "al",
        "incl",
        "resp",
    }
)


class Segment(NamedTuple):
    """One step's place in the text: [start, end) offsets, kind and the heading it sits under."""

    start: int
    end: int
    kind: str  # "sentence" | "bullet" | "numbered" | "heading"
    heading: str | None


def _segment(values: tuple) -> Segment:
    """Build a Segment without NamedTuple's Python-level __new__ (this runs ~20 times per text)."""
    return tuple.__new__(Segment, values)


def _heading_text(line: str, stripped: str) -> str | None:
    first, last = stripped[0], stripped[-1]
    # Cheap character checks first: most lines are not headings and skip every regex.
    if first == "#":
        patterns: tuple = (_MD_HEADING,)
    elif first in "*_-+" and last in "*_:":
        patterns = (_BOLD_HEADING, _COLON_HEADING)
    elif last == ":":
        patterns = (_COLON_HEADING,)
    else:
        return None
    for pattern in patterns:
        match = pattern.match(line)
        if match:
            text = match.group("h").strip().strip("*_").strip()
            # A long line ending with a colon is a sentence introducing a list, not a heading.
            if pattern is _COLON_HEADING and len(text.split()) > 8:
                return None
            return text or None
    return None


_WORD = re.compile(r"\w")
_SYMBOL_LEAD = re.compile(r"[ \t]*(?:[^\w\s]\ufe0f?[ \t]*)?")
_BULLET_FIRST = frozenset("-*+\u2022\u25cf\u25e6\u2013(0123456789")
_END_STRIP = " \t\"')]*"
# Characters that end a line's statement: sentence ends, a colon, and check or cross marks that end
# verdict lines ("Atelectasis \u2705", "Cardiomegaly \u274c").
_LINE_ENDS = frozenset(".!?:\u2705\u2714\u2713\u2611\u274c\u2717\u2718\u2716\u274e")


def _split_sentences(
    text: str, start: int, end: int, kind: str, heading: str | None, out: list[Segment]
) -> None:
    """Append the sentences of text[start:end] (first one keeps `kind`, later ones are sentences)."""
    first_kind = kind
    cursor = start
    append = out.append
    new = tuple.__new__  # a Segment without NamedTuple's Python-level __new__ (see _segment)
    word_search = _WORD.search
    for match in _SENTENCE_END.finditer(text, start, end):
        dot, cut = match.span()
        if cut >= end:
            break
        # "e.g. pneumonia", "Dr. X", "vs. atelectasis": not a sentence end.
        word_start = text.rfind(" ", cursor, dot) + 1
        if word_start < cursor:
            word_start = cursor
        if dot - word_start <= 8:  # longer words are no abbreviation: skip the string work
            word = text[word_start:dot].lower().lstrip("(*")
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        piece_end = dot + 1
        if piece_end > cursor and word_search(text, cursor, piece_end):
            append(new(Segment, (cursor, piece_end, first_kind, heading)))
            first_kind = "sentence"
        cursor = cut
    stripped_end = end
    while stripped_end > cursor and text[stripped_end - 1].isspace():
        stripped_end -= 1
    if stripped_end > cursor and word_search(text, cursor, stripped_end):  # not a bare "|---|" row
        append(new(Segment, (cursor, stripped_end, first_kind, heading)))


#: Every context heading seen so far (a few spellings of a few section names): core.py tests
#: membership here, which is cheaper than a call per step.
CONTEXT_HEADINGS: set[str] = set()


@lru_cache(maxsize=4096)
def _is_context(heading: str) -> bool:
    if CONTEXT_SECTION.fullmatch(heading) is None:
        return False
    CONTEXT_HEADINGS.add(heading)
    return True


def split_steps(text: str) -> list[Segment]:
    """Split `text` into steps (see module docstring). Never raises on any str."""
    if "\r" in text:  # Windows line ends: same offsets, one kind of newline
        text = text.replace("\r", " ")
    segments: list[Segment] = []
    heading: str | None = None
    block_start = -1
    block_kind = "sentence"
    block_heading: str | None = None
    prev_line_ends_sentence = True

    def flush(block_end: int) -> None:
        nonlocal block_start, heading, in_context
        if block_start >= 0:
            first_new = len(segments)
            _split_sentences(text, block_start, block_end, block_kind, block_heading, segments)
            if in_context and block_heading is not None and _is_context(block_heading):
                # "INDICATION: Cough. FINDINGS: Small left effusion." on one line: a later sentence
                # that opens another section ends the request section.
                for k in range(first_new + 1, len(segments)):
                    label = _SENTENCE_LABEL.match(text, segments[k].start)
                    if label is not None and not _is_context(label.group("h")):
                        heading = label.group("h")
                        in_context = False
                        for m in range(k, len(segments)):
                            segments[m] = segments[m]._replace(heading=heading)
                        break
        block_start = -1

    # A request section (INDICATION, HISTORY, COMPARISON, TECHNIQUE, "Clinical history: ...") heads
    # the steps after it only until a blank line that follows its text, the next heading or section,
    # or a "Label: ..." line; then the heading before it is restored.
    in_context = False
    context_has_text = False
    context_one_line = False  # entered by a mixed-case "Clinical history: ..." line
    resume_heading: str | None = None

    def enter(new_heading: str, has_text: bool) -> None:
        nonlocal heading, in_context, context_has_text, resume_heading, context_one_line
        context_one_line = False
        if _is_context(new_heading):
            if not in_context:
                resume_heading = heading
            in_context = True
            context_has_text = has_text
        elif in_context:
            in_context = False
        heading = new_heading

    position = 0
    length = len(text)
    while position < length:
        newline = text.find("\n", position)
        line_end = length if newline < 0 else newline
        next_position = line_end + 1
        line = text[position:line_end]
        stripped = line.strip()
        if not stripped:
            flush(position)
            prev_line_ends_sentence = True
            if in_context and context_has_text:
                in_context = False
                heading = resume_heading
            position = next_position
            continue
        head = _heading_text(line, stripped) if len(line) <= 120 else None
        if head is not None:
            flush(position)
            lead = len(line) - len(line.lstrip())
            segments.append(_segment((position + lead, position + len(line.rstrip()), "heading", heading)))
            enter(head, False)
            prev_line_ends_sentence = True
            position = next_position
            continue
        first = stripped[0]
        bullet = (
            _BULLET.match(line)
            if first in _BULLET_FIRST or (len(stripped) > 1 and stripped[1] in ".)")
            else None
        )
        if bullet is None and (first == "|" or (ord(first) > 127 and not first.isalnum())):
            # A markdown table row, or a line led by a symbol ("✅ Atelectasis", "➤ ..."): one item.
            bullet = _SYMBOL_LEAD.match(line)
        if in_context and context_one_line and (prev_line_ends_sentence or bullet is not None):
            # "Clinical history: fever.\nThe heart is enlarged.": a mixed-case label heads its own
            # sentence block only (an upper-case MIMIC section runs to the blank line).
            in_context = False
            heading = resume_heading
        if bullet is not None:
            flush(position)
            marker = bullet.group(0).strip()
            block_kind = (
                "numbered" if marker[:1].isdigit() or marker[:1] == "(" or marker[:1].isalpha() else "bullet"
            )
            block_start = position + bullet.end()
            block_heading = heading
        else:
            section = (
                _INLINE_SECTION.match(line) if (first.isupper() or first == "*") and ":" in line else None
            )
            label_line = False
            if section is not None:
                flush(position)
                enter(section.group("h").strip(), True)
            elif ":" in line or " -" in line or "\u2013" in line or "\u2014" in line:
                context = _CONTEXT_LABEL.match(line) if first in _CONTEXT_FIRST else None
                if context is not None:
                    flush(position)
                    enter(context.group("h").strip(), True)
                    context_one_line = not context.group("h").isupper()
                    label_line = True
                elif (in_context or (block_start >= 0 and not prev_line_ends_sentence)) and _LABEL_LINE.match(
                    line
                ) is not None:
                    label_line = True
                    if in_context:  # "Findings: ..." after "Clinical history: ..."
                        in_context = False
                        heading = resume_heading
            if block_start < 0 or prev_line_ends_sentence or section is not None or label_line:
                flush(position)
                block_start = position + (len(line) - len(line.lstrip()))
                block_kind = "sentence"
                block_heading = heading
        if in_context:
            context_has_text = True
        prev_line_ends_sentence = line.rstrip(_END_STRIP)[-1:] in _LINE_ENDS
        position = next_position
    flush(length)
    return segments
