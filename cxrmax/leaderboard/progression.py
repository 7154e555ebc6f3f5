"""Progression answers for MS-CXR-T: a class label ("improving" / "stable" / "worsening") or free
text, turned into one of the three classes.

Free text is read with cue words, restricted to the sentences that mention the finding when the answer
covers several findings (no such sentence: no answer for that finding): worsening cues ("worse", "increased", "progressed", "new", "larger"),
improving cues ("improved", "decreased", "resolving", "smaller", "less"), stable cues ("stable",
"unchanged", "no change", "similar"). A negated change cue ("no worsening", "not improved", "no
interval change") counts as stable. The class with the most cues wins; a tie goes to the cue seen
first. No cue: no answer (None), which is scored as wrong.
"""

from __future__ import annotations

import re

from cxrmax.core.pathologies import PROGRESSION_CLASSES

_CLASS_WORDS = {
    "improving": "improving",
    "improved": "improving",
    "improvement": "improving",
    "better": "improving",
    "stable": "stable",
    "unchanged": "stable",
    "no change": "stable",
    "worsening": "worsening",
    "worsened": "worsening",
    "worse": "worsening",
    "progression": "worsening",
    "progressing": "worsening",
}

_FINDING_WORDS = {
    "consolidation": r"consolidat\w*|airspace (?:disease|opacit\w*)",
    "edema": r"o?edema\w*|vascular congestion|pulmonary congestion",
    "pleural_effusion": r"effusion\w*|pleural fluid",
    "pneumonia": r"pneumonia\w*|infect\w*",
    "pneumothorax": r"pneumothora\w*|ptx",
}

_NEGATED_CHANGE = re.compile(
    r"\b(?:no|not|without)\s+(?:(?:significant|interval|appreciable|definite|substantial|new)\s+)*"
    r"(?:change|changed|worsening|worsened|improvement|improved|progression|increase|decrease)\b"
    r"|\bhas\s+not\s+(?:changed|improved|worsened)\b"
)
_CUES = {
    "worsening": re.compile(
        r"\b(?:worse\w*|worsen\w*|increas\w*|progress\w*|enlarg\w*|new|larger|greater|more\s+(?:extensive|prominent|pronounced|conspicuous)|develop\w*|extend\w*|deteriorat\w*)\b"
    ),
    "improving": re.compile(
        r"\b(?:improv\w*|decreas\w*|resolv\w*|resolution|smaller|less|reduc\w*|clear\w*|diminish\w*|regress\w*|better)\b"
    ),
    "stable": re.compile(
        r"\b(?:stable|unchanged|similar|persist\w*|no\s+(?:significant\s+|interval\s+)?change|grossly\s+unchanged|constant)\b"
    ),
}
_SENTENCE = re.compile(r"[^.;\n]+")


def normalise_class(answer: str) -> str | None:
    """A short answer that is itself a class name (or a close synonym), else None."""
    key = re.sub(r"[^a-z ]+", " ", answer.lower()).strip()
    key = re.sub(r"\s+", " ", key)
    if key in PROGRESSION_CLASSES:
        return key
    return _CLASS_WORDS.get(key)


def classify_progression(text: str | None, finding: str | None = None) -> str | None:
    """Progression class of ``text`` for ``finding`` (an MS-CXR-T prefix such as "pleural_effusion");
    with finding None the whole text is about one finding. None when no answer can be read."""
    if not text or not text.strip():
        return None
    direct = normalise_class(text)
    if direct:
        return direct
    lowered = text.lower()
    sentences = [s for s in _SENTENCE.findall(lowered) if s.strip()]
    if finding is not None:
        pattern = re.compile(r"\b(?:" + _FINDING_WORDS[finding] + r")")
        sentences = [s for s in sentences if pattern.search(s)]
        if not sentences:  # the answer does not speak of this finding
            return None
    votes: dict[str, int] = {}
    first: dict[str, int] = {}
    offset = 0
    for sentence in sentences:
        negated_spans = [m.span() for m in _NEGATED_CHANGE.finditer(sentence)]
        for _ in negated_spans:
            votes["stable"] = votes.get("stable", 0) + 1
            first.setdefault("stable", offset)
        for label, cue in _CUES.items():
            for match in cue.finditer(sentence):
                if any(a <= match.start() < b for a, b in negated_spans):
                    continue
                votes[label] = votes.get(label, 0) + 1
                first.setdefault(label, offset + match.start())
        offset += len(sentence) + 1
    if not votes:
        return None
    return max(votes, key=lambda label: (votes[label], -first[label]))
