"""Radiology report text: decoding report files and splitting a MIMIC-CXR free-text report into
sections (findings, impression, last paragraph, addenda, wet read).

`parse_report(text)` handles what the release's 227,835 reports contain: a "FINAL REPORT" line with
a wet read above it, addenda above a line of underscores or below the report ("ADDENDUM", "FINAL
ADDENDUM"), headers with or without a colon, inline or on their own line, misspelled (IMPRESSON,
FINDNGS), synonyms (CONCLUSION, SUMMARY, FINDINGS AND IMPRESSION), sub-headings inside a section
(LUNGS:), numbered items, hard wraps, Windows line ends, non-breaking spaces and a BOM.
`decode_report(bytes)` reads UTF-8 and falls back to cp1252 per byte, never losing a character.
"""

from __future__ import annotations

import codecs
import difflib
import functools
import re
from dataclasses import dataclass, field

from cxrmax.core.formats import GZIP_MAGIC, NOT_GZIP_TEXT, raster_format

__all__ = ["ReportSections", "decode_report", "parse_report"]


@dataclass(frozen=True)
class ReportSections:
    """The parts of a free-text report that label extraction and generation need."""

    findings: str | None = None
    impression: str | None = None
    last_paragraph: str | None = None
    addenda: tuple[str, ...] = ()
    sections: dict[str, str] = field(default_factory=dict)
    #: The preliminary ("WET READ" / "PROVISIONAL FINDINGS IMPRESSION (PFI)") read filed before the
    #: final report, kept apart: it may disagree with the final report.
    wet_read: str | None = None

    def best(self) -> str | None:
        """The single text to use: impression > findings > last paragraph (None when all are empty)."""
        return self.impression or self.findings or self.last_paragraph


# A line of >= 10 underscores separates an addendum or a wet read from the report; PHI blanks are
# "___", so 10 in a row is never one. Also matched mid-line: some copies flatten reports to one line.
_SEPARATOR = re.compile(r"[ \t]*_{10,}[ \t]*")
# "FINAL REPORT" alone on its line marks the report; anywhere else (flattened copies) only when no
# line has it, since a wet read may say "FINAL REPORT TO FOLLOW".
_FINAL_REPORT_LINE = re.compile(r"^[ \t]*FINAL REPORT[ \t]*:?[ \t]*$", re.M)
_FINAL_REPORT_ANY = re.compile(r"\bFINAL REPORT\b")
_FINAL_ADDENDUM = re.compile(r"^[ \t]*FINAL ADDENDUM[ \t]*:?[ \t]*$", re.M)
_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&()'-]{1,48}?)[ \t]*:(?![0-9])", re.M)
# A header alone on its line without a colon ("FINDINGS", "IMPRESSION"); accepted for known names only.
_BARE_HEADER = re.compile(r"^[ \t]*([A-Za-z][A-Za-z /&()'-]{1,48}?)[ \t]*$", re.M)
_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_LIST_ITEM = re.compile(r"^\d{1,2}[.)]\s")
# An upper-case "LUNGS:" / "LINES/TUBES:" line inside FINDINGS keeps its own line.
_SUBHEADING_LINE = re.compile(r"^[A-Z][A-Z /&()'-]{1,40}:\s")
# Characters that real copies carry in place of plain spaces and newlines (BOM, NBSP, form feed...).
_SPACE_LIKE = str.maketrans(
    {"\ufeff": "", "\u00a0": " ", "\u2007": " ", "\u202f": " ", "\f": "\n", "\v": "\n"}
)
_LINE_BREAKS = re.compile(r"\r\n?|\u2028|\u2029|\x85")
_CLINICAL = {"FINDINGS": "findings", "IMPRESSION": "impression"}
_IMPRESSION_LIKE = {"IMPRESSIONS", "CONCLUSION", "CONCLUSIONS", "OPINION", "SUMMARY"}
# Sections that precede the clinical text: only their first paragraph belongs to them (free text
# may follow after a blank line), and they never provide the last paragraph.
_LEADING_SECTIONS = {
    "examination",
    "exam",
    "type of examination",
    "procedure",
    "study",
    "indication",
    "indications",
    "clinical indication",
    "history",
    "clinical history",
    "clinical information",
    "patient history",
    "reason for exam",
    "reason for examination",
    "technique",
    "comparison",
    "comparisons",
    "comparison exam",
    "reference exam",
    "referring physician",
}
# Sections that follow the clinical text and are not part of it.
_TRAILING_SECTIONS = {
    "recommendation",
    "recommendations",
    "notification",
    "notifications",
    "communication",
    "addendum",
    "final addendum",
    "wet read",
    "provisional findings impression pfi",
    "provisional findings impression",
}
# Headers that always start a new section; any other header inside FINDINGS or IMPRESSION
# ("LUNGS:", "LINES/TUBES:", "NOTE:") is a sub-heading and stays in the text.
_TOP_LEVEL = {"findings", "impression"} | _LEADING_SECTIONS | _TRAILING_SECTIONS
_WET_READ_NAMES = ("wet read", "provisional findings impression pfi", "provisional findings impression")
_ADDENDUM_NAMES = {"addendum", "final addendum"}
# Known headers also found mid-line (upper-case only), for reports flattened onto one line.
_INLINE_HEADER = re.compile(
    r"(?<=\s)(FINDINGS AND IMPRESSION|FINDINGS|IMPRESSION|CONCLUSION|EXAMINATION|CLINICAL HISTORY|"
    r"HISTORY|INDICATION|TECHNIQUE|COMPARISON|RECOMMENDATION\(S\)|RECOMMENDATIONS|NOTIFICATION|"
    r"ADDENDUM)[ \t]*:(?![0-9])"
)
# Line-start forms the general header pattern misses: "ADDENDUM #2:" and a known header ended by a
# semicolon ("IMPRESSION; ...").
_ODD_HEADER = re.compile(
    r"^[ \t]*((?:FINAL )?ADDENDUM)[ \t]*#[ \t]*\d{1,2}[ \t]*:?|"
    r"^[ \t]*(FINDINGS|IMPRESSION|CONCLUSION)[ \t]*;",
    re.M,
)


def _header_key(header: str) -> str:
    """ "RECOMMENDATION(S)" -> "RECOMMENDATIONS", "LINES/TUBES" -> "LINES TUBES"."""
    return re.sub(r"[^A-Z]+", " ", header.upper().replace("(S)", "S")).strip()


def _fuzzy_is(word: str, canonical: str) -> bool:
    # "IMPRESSON", "FINDNGS", "FINDING", "IMPRESSIONS": common misspellings and plurals.
    return difflib.SequenceMatcher(None, word, canonical).ratio() >= 0.8


@functools.lru_cache(maxsize=8192)  # the release repeats a few hundred header spellings
def _section_name(header: str) -> str | None:
    """Map a header to "findings", "impression", another lower-case name, or None (not a header)."""
    key = _header_key(header)
    if not key:
        return None
    if key.lower() in _TOP_LEVEL - {"findings", "impression"}:
        return key.lower()
    words = key.split()
    if key in _IMPRESSION_LIKE or words[0] in _IMPRESSION_LIKE:
        return "impression"
    says_findings = any(_fuzzy_is(word, "FINDINGS") for word in words)
    says_impression = any(_fuzzy_is(word, "IMPRESSION") for word in words)
    if says_findings and says_impression:
        return "impression"  # "FINDINGS AND IMPRESSION(S)", "FINDINGS/IMPRESSION": read as the impression
    for canonical, name in _CLINICAL.items():
        # "IMPRESSON", "FINDNGS", "IMPRESSION AND RECOMMENDATIONS", "FINDINGS (PA)": by the first
        # word; "CHEST FINDINGS", "FINAL IMPRESSION": by the last.
        if _fuzzy_is(words[0], canonical) or _fuzzy_is(words[-1], canonical):
            return name
    if header.strip().upper() != header.strip():
        # Other sections are upper-case in the release; "Dr. ___ was told:" is text. Copies that
        # title-case them ("Comparison:", "Recommendation(s):") keep the known names.
        return key.lower() if header.strip()[0].isupper() and key.lower() in _TOP_LEVEL else None
    return key.lower()


def _split_numbered(line: str) -> list[str]:
    """ "1. A. 2. B." -> ["1. A.", "2. B."]: numbered items written on one line, split only where
    the numbers run 1, 2, 3... after a sentence end (so "T2." or "1.5 cm" never split)."""
    first = re.match(r"1([.)])\s", line)
    if not first:
        return [line]
    items, start, number = [], 0, 2
    while True:
        pattern = rf"(?<=[.;!?])\s+(?={number}{re.escape(first.group(1))}\s+\S)"
        hit = re.compile(pattern).search(line, start)
        if hit is None:
            break
        items.append(line[start : hit.start()].strip())
        start, number = hit.end(), number + 1
    items.append(line[start:].strip())
    return items


def _normalize(text: str) -> str | None:
    """Unwrap hard-wrapped lines; keep paragraph breaks, numbered items and upper-case sub-headings
    ("LUNGS: ...") on their own lines."""
    paragraphs = []
    for paragraph in _BLANK_LINES.split(text):
        lines: list[str] = []
        for raw in paragraph.splitlines():
            line = " ".join(raw.split())
            if not line:
                continue
            if lines and not _LIST_ITEM.match(line) and not _SUBHEADING_LINE.match(line):
                lines[-1] = f"{lines[-1]} {line}"
            else:
                lines.append(line)
        lines = [item for line in lines for item in _split_numbered(line)]
        if lines:
            paragraphs.append("\n".join(lines))
    joined = "\n".join(paragraphs).strip()
    return joined or None


def _find_headers(text: str) -> list[tuple[int, int, str]]:
    """Section headers of a report as (start, end, name), in order: "WORDS:" at a line start,
    a known header alone on its line without a colon, and known upper-case headers mid-line.
    Inside FINDINGS and IMPRESSION only top-level headers start a new section."""
    found: list[tuple[int, int, str]] = []
    for match in _HEADER.finditer(text):
        name = _section_name(match.group(1))
        if name is not None:
            found.append((match.start(), match.end(), name))
    for match in _BARE_HEADER.finditer(text):
        words = match.group(1).strip()
        name = _section_name(words)
        if name is None or name not in _TOP_LEVEL or len(words.split()) > 4:
            continue
        if words.upper() != words and not (
            words == words.capitalize() and _header_key(words) in ("FINDINGS", "IMPRESSION", "CONCLUSION")
        ):
            continue  # "Impression" may be a title-case header; "impression" is a wrapped word
        found.append((match.start(), match.end(), name))
    for match in _INLINE_HEADER.finditer(text):
        found.append((match.start(), match.end(), _section_name(match.group(1)) or ""))
    for match in _ODD_HEADER.finditer(text):
        found.append((match.start(), match.end(), _section_name(match.group(1) or match.group(2)) or ""))
    found.sort()
    headers: list[tuple[int, int, str]] = []
    current: str | None = None
    for start, end, name in found:
        if headers and start < headers[-1][1]:
            continue  # "HISTORY:" inside "CLINICAL HISTORY:" already taken
        inside_text = current in ("findings", "impression") or current in _ADDENDUM_NAMES
        if inside_text and name not in _TOP_LEVEL:
            continue  # a sub-heading ("LUNGS:") stays in the findings text
        headers.append((start, end, name))
        current = name
    return headers


def _chunk_kind(chunk: str) -> str:
    """ "report", "addendum", "wet read" or "" (unknown) for one separator-delimited chunk."""
    if _FINAL_REPORT_LINE.search(chunk):
        return "report"
    first = _header_key(chunk.strip().split("\n", 1)[0])
    if first.startswith(("FINAL ADDENDUM", "ADDENDUM")):
        return "addendum"
    if first.startswith(("WET READ", "PROVISIONAL FINDINGS IMPRESSION")):
        return "wet read"
    return "report" if _FINAL_REPORT_ANY.search(chunk) else ""


def _final_report_marker(text: str) -> re.Match | None:
    return _FINAL_REPORT_LINE.search(text) or _FINAL_REPORT_ANY.search(text)


def parse_report(text: str) -> ReportSections:
    """Split a MIMIC-CXR free-text report into findings, impression, last paragraph and addenda.

    Handles addenda above or below the report (split off by a line of underscores, or an
    "ADDENDUM" header), a WET READ / PFI block before the final report (kept as `wet_read`),
    missing sections, misspelled headers ("IMPRESSON:", "FINDING:", "FINDNGS:"), headers without
    a colon on their own line, content on the header line, upper-case sub-headings inside FINDINGS
    ("LUNGS:", "PLEURA:"), numbered items, and "FINDINGS AND IMPRESSION:" / "CONCLUSION:" (read as
    the impression). PHI placeholders (___) are kept. The last paragraph is that of the final
    report's clinical text (not of INDICATION, COMPARISON, NOTIFICATION, ...), without its header."""
    text = text or ""
    if "\n" not in text and "\\n" in text:  # a report dumped with escaped line ends ("...\\n IMPRESSION:")
        text = text.replace("\\r\\n", "\n").replace("\\n", "\n")
    text = _LINE_BREAKS.sub("\n", text.translate(_SPACE_LIKE)).expandtabs(1)
    chunks = [chunk for chunk in _SEPARATOR.split(text) if chunk.strip()]
    if not chunks:
        return ReportSections()
    kinds = [_chunk_kind(chunk) for chunk in chunks]
    if "report" in kinds:
        main_index = len(kinds) - 1 - kinds[::-1].index("report")
    elif "" in kinds:
        main_index = len(kinds) - 1 - kinds[::-1].index("")
    else:
        main_index = len(chunks) - 1
    addenda: list[str] = []
    wet_reads: list[str] = []
    for index, chunk in enumerate(chunks):
        if index == main_index:
            continue
        body = _normalize(_FINAL_ADDENDUM.sub("", chunk))
        if body:
            (wet_reads if kinds[index] == "wet read" else addenda).append(body)
    main = chunks[main_index]
    marker = _final_report_marker(main)
    if marker is not None:
        preamble, main = main[: marker.start()], main[marker.end() :]
        kind = _chunk_kind(preamble) if preamble.strip() else ""
        body = _normalize(_FINAL_ADDENDUM.sub("", preamble))
        if body and kind == "wet read":
            wet_reads.append(body)
        elif body and kind == "addendum":
            addenda.append(body)
        elif body:
            main = f"{preamble}\n\n{main}"

    headers = _find_headers(main)
    # Segments in order: (section name or None for unlabelled text, body).
    segments: list[tuple[str | None, str]] = [(None, main[: headers[0][0]] if headers else main)]
    for index, (start, end, name) in enumerate(headers):
        stop = headers[index + 1][0] if index + 1 < len(headers) else len(main)
        body = main[end:stop]
        if name in _ADDENDUM_NAMES:
            addendum = _normalize(_FINAL_ADDENDUM.sub("", main[start:stop]))
            if addendum:
                addenda.append(addendum)
            continue
        if name in _LEADING_SECTIONS:
            # "INDICATION: ..." owns its first paragraph; a later paragraph is free text.
            parts = [part for part in _BLANK_LINES.split(body.strip("\n")) if part.strip()]
            if len(parts) > 1:
                first_end = body.find(parts[0]) + len(parts[0])
                segments.append((name, body[:first_end]))
                segments.append((None, body[first_end:]))
                continue
        segments.append((name, body))

    sections: dict[str, str] = {}
    for name, body in segments:
        normalized = _normalize(body) if name is not None else None
        if name is not None and normalized:
            sections[name] = f"{sections[name]}\n{normalized}" if name in sections else normalized
    last_paragraph = _last_paragraph(segments, skip=_LEADING_SECTIONS | _TRAILING_SECTIONS)
    if last_paragraph is None:
        last_paragraph = _last_paragraph(segments, skip=_ADDENDUM_NAMES)
    # A wet read inside the report body (below "FINAL REPORT") stays a section and is also shown here.
    wet_read = "\n".join(wet_reads) or next((sections[n] for n in _WET_READ_NAMES if n in sections), None)
    return ReportSections(
        findings=sections.get("findings"),
        impression=sections.get("impression"),
        last_paragraph=last_paragraph,
        addenda=tuple(addenda),
        sections=sections,
        wet_read=wet_read,
    )


def _cp1252_fallback(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler: bytes that are not UTF-8 are read as Windows-1252 (Latin-1 for the five
    bytes cp1252 leaves undefined), one byte at a time."""
    assert isinstance(error, UnicodeDecodeError)
    byte = error.object[error.start : error.start + 1]
    try:
        return byte.decode("cp1252"), error.start + 1
    except UnicodeDecodeError:
        return byte.decode("latin-1"), error.start + 1


codecs.register_error("cxrmax-cp1252-fallback", _cp1252_fallback)


#: Control characters a text report may hold (tab, newlines, form feed, vertical tab).
_TEXT_CONTROLS = frozenset(b"\t\n\r\f\v")


def binary_report(data: bytes) -> str | None:
    """Why ``data`` is not a report's text (an archive, an image, binary bytes), or None when it is
    text. Judged on the first 4 KiB: a known file signature, a NUL byte outside UTF-16, or more than
    1 in 20 bytes a control character no text file holds. cp1252 would decode any such bytes into
    nonsense text that the labeler then reads."""
    head = data[:4096]
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return None
    for magic, what in NOT_GZIP_TEXT.items():
        if head.startswith(magic):
            return what
    if head.startswith(GZIP_MAGIC):
        return "gzip-compressed"
    if head.startswith(b"%PDF"):
        return "a PDF"
    image = raster_format(head)
    if image is not None:
        return f"a {image} image"
    if head[128:132] == b"DICM":
        return "a DICOM file"
    if b"\x00" in head:
        return "binary data (NUL bytes)"
    controls = sum(1 for byte in head if byte < 32 and byte not in _TEXT_CONTROLS) + head.count(127)
    if controls * 20 > len(head):
        return f"binary data ({controls} control bytes in the first {len(head)})"
    return None


def decode_report(data: bytes) -> str:
    """Decode a report file: UTF-8 (a BOM dropped) or UTF-16 with its BOM; any byte that is not UTF-8 is read as
    Windows-1252 (the release is ASCII, but copies edited on Windows carry cp1252 degree signs and
    curly quotes, sometimes beside UTF-8 text), else Latin-1. Never yields a replacement mark.
    Check :func:`binary_report` first: bytes that are not text decode into nonsense."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16", errors="replace")
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    return data.decode("utf-8", errors="cxrmax-cp1252-fallback")


def _last_paragraph(segments: list[tuple[str | None, str]], skip: set[str]) -> str | None:
    """The last non-empty paragraph of the last segment whose section is not in `skip`."""
    for name, body in reversed(segments):
        if name in skip:
            continue
        for paragraph in reversed(_BLANK_LINES.split(body)):
            normalized = _normalize(paragraph)
            if normalized:
                return normalized
    return None
