"""What a score was computed against: the fingerprint stored with every result and board entry.

A fingerprint names the task (id and version), the reference set (a content hash of the ids the
task scores and their ground truth, and the report section), the uncertain policy, and the version
of the metric definitions. Two scores are comparable only when their fingerprints are equal; the
board ranks only entries whose fingerprint equals the task's official one (see `official`).

The official reference hash of a task is, in order: ``reference_sha256`` in the task file (set by
the maintainers from the real data), else the hash pinned on the board by the first entry scored
from a MIMIC-CXR root with the task's own settings (`cxrmax.leaderboard.store.Board`). A reference
file made by a user is never pinned: it ranks only when its content equals the official set.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from cxrmax.leaderboard.tasks import Task

#: Bumped whenever a definition changes the numbers of a task kind, so that older entries are not
#: ranked beside newer ones. labels/1: F1 as in metrics.py. report/2: CIDEr-D document frequencies
#: from all task references; rexrank_bleu_2 added. ms-cxr-t/2: absent rows count as wrong.
#: rationale/1: drift definitions, similarity = content-token F1.
METRIC_VERSIONS = {
    "labels": "labels/1",
    "report": "report/2",
    "ms-cxr-t": "ms-cxr-t/2",
    "rationale": "rationale/1",
}

#: Where references came from: the task's own (a MIMIC-CXR root read by the task's rules) or a
#: prepared file the user passed.
ORIGIN_ROOT = "mimic-cxr root"
ORIGIN_FILE = "reference file"

#: The uncertain policy a board ranks under ("n/a" for MS-CXR-T, which has none).
RANKED_POLICY = "positive"

SHORT = 10  # hex digits shown in tables


def ranked_policy(task: Task) -> str:
    """The uncertain policy of the task's ranked table."""
    return "n/a" if task.kind == "ms-cxr-t" else RANKED_POLICY


def make(
    task: Task,
    reference_sha256: str,
    origin: str,
    uncertain: str,
    section: str | None = None,
) -> dict[str, Any]:
    """The fingerprint of a score of ``task`` against references hashing to ``reference_sha256``."""
    parts = {
        "task": task.name,
        "task_version": task.version,
        "reference_sha256": reference_sha256,
        "uncertain": uncertain,
        "metric_version": METRIC_VERSIONS[task.kind],
        "reference_section": section if task.kind == "report" else None,
    }
    return {**parts, "id": fingerprint_id(parts), "reference_origin": origin}


def fingerprint_id(parts: dict[str, Any]) -> str:
    """sha256 of the comparable parts (origin is not one: equal content is equal references)."""
    keys = ("task", "task_version", "reference_sha256", "uncertain", "metric_version", "reference_section")
    return hashlib.sha256(json.dumps({k: parts.get(k) for k in keys}, sort_keys=True).encode()).hexdigest()


def official(task: Task, reference_sha256: str) -> dict[str, Any]:
    """The fingerprint a ranked entry of ``task`` must have, given its official reference hash."""
    section = task.reference_section if task.kind == "report" else None
    return make(task, reference_sha256, ORIGIN_ROOT, ranked_policy(task), section)


def pins_official(task: Task, fp: dict[str, Any]) -> bool:
    """True when an entry with fingerprint ``fp`` may pin the task's official references on a board:
    scored from a MIMIC-CXR root, at the task's version, metric version and report section."""
    section = task.reference_section if task.kind == "report" else None
    return (
        fp.get("reference_origin") == ORIGIN_ROOT
        and fp.get("task_version") == task.version
        and fp.get("metric_version") == METRIC_VERSIONS[task.kind]
        and fp.get("reference_section") == section
        and bool(fp.get("reference_sha256"))
    )


def short(value: str | None) -> str:
    """The first `SHORT` hex digits ('' for none)."""
    return (value or "")[:SHORT]
