"""Prompt templates (pipelines/prompts/*.txt): parse, render per selection row, hash what is sent.

A template file is a small header of ``key: value`` lines, a ``---`` line, then the body. The body is a
``str.format`` template over these fields:

- ``{labels}``: the study's positive labels (value 1.0), joined "A, B and C"; when there are none, the
  header's ``empty_labels`` value (e.g. "No Finding"); uncertain (-1) labels are not listed.
- ``{view}``: the view position (PA, AP, LATERAL...) or "unknown".
- ``{observation_list}``: the 14 observations, one per line.

Header keys: ``id`` (required; recorded in every trajectory row as prompt_id), ``description``,
``empty_labels``. Each row also records the sha256 of the exact rendered text (prompt_hash), so a
template edit never mixes with answers to the old text.
"""

from __future__ import annotations

import hashlib
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cxrmax.core.errors import InputError, where
from cxrmax.core.pathologies import OBSERVATIONS

_FIELDS = {"labels", "view", "observation_list"}
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def pipelines_dir() -> Path:
    """The pipelines/ folder: $CXRMAX_PIPELINES, else the one next to the cxrmax package (source checkout)."""
    env = os.environ.get("CXRMAX_PIPELINES")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "pipelines"


def prompts_dir() -> Path:
    return pipelines_dir() / "prompts"


@dataclass(frozen=True)
class PromptTemplate:
    """A parsed prompt template."""

    id: str
    body: str
    description: str = ""
    empty_labels: str = "No Finding"
    source: str = ""

    def render(self, row: dict[str, Any]) -> str:
        """The exact prompt text for one selection row (``labels`` a name->value mapping, ``view``)."""
        labels = row.get("labels") or {}
        positives = [
            name for name in OBSERVATIONS if labels.get(name) is not None and float(labels[name]) == 1.0
        ]
        values = {
            "labels": join_labels(positives) if positives else self.empty_labels,
            "view": row.get("view") or "unknown",
            "observation_list": "\n".join(OBSERVATIONS),
        }
        return self.body.format_map(values)


def join_labels(names: list[str]) -> str:
    """'A', 'A and B', 'A, B and C'."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def prompt_hash(text: str) -> str:
    """sha256 (hex) of the exact prompt text sent."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def parse_template(text: str, source: str = "<string>") -> PromptTemplate:
    """Parse a template file's text (header, ``---``, body)."""
    lines = text.splitlines()
    try:
        split = next(i for i, line in enumerate(lines) if line.strip() == "---")
    except StopIteration:
        raise InputError(f"{source}: a prompt template needs a header, a '---' line, then the body") from None
    header: dict[str, str] = {}
    for number, line in enumerate(lines[:split], start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise InputError(f"{where(source, number)}: header lines are 'key: value', got {line!r}")
        header[key.strip()] = value.strip()
    body = "\n".join(lines[split + 1 :]).strip("\n")
    template_id = header.get("id", "")
    if not _ID_PATTERN.match(template_id):
        raise InputError(f"{where(source, field='id')}: missing or invalid template id {template_id!r}")
    if not body.strip():
        raise InputError(f"{source}: the template body is empty")
    for _, field, _, _ in string.Formatter().parse(body):
        if field is not None and field not in _FIELDS:
            raise InputError(
                f"{where(source, field=field)}: unknown placeholder; use {{labels}}, {{view}} or {{observation_list}} "
                "(write {{ and }} for literal braces)"
            )
    return PromptTemplate(
        id=template_id,
        body=body,
        description=header.get("description", ""),
        empty_labels=header.get("empty_labels", "No Finding"),
        source=source,
    )


def available_prompts() -> list[str]:
    """Names of the templates in pipelines/prompts/ (file stems)."""
    folder = prompts_dir()
    return sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []


def load_prompt(name_or_path: str | Path) -> PromptTemplate:
    """Load a template by name (``rationale`` = pipelines/prompts/rationale.txt) or by file path."""
    path = Path(name_or_path)
    if not path.is_file():
        path = prompts_dir() / f"{name_or_path}.txt"
    if not path.is_file():
        raise InputError(
            f"unknown prompt {str(name_or_path)!r}: give a file path or one of {', '.join(available_prompts()) or '(none found)'} "
            f"(from {prompts_dir()})"
        )
    return parse_template(path.read_text(encoding="utf-8"), source=str(path))
