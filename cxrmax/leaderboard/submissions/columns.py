"""Column roles: which submission column is the key, the text, the model, an observation or a finding."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxrmax.core.errors import InputError, where
from cxrmax.core.pathologies import (
    MS_CXR_T_FINDINGS,
    MS_CXR_T_SHORT,
    OBSERVATIONS,
    canonical_name,
    is_observation,
)

KEY_COLUMNS = ("study_id", "study", "studyid")
TEXT_COLUMNS = (
    "model_prediction",
    "report",
    "text",
    "prediction",
    "generated_report",
    "generated",
    "answer",
    "rationale",
    "output",
)
MODEL_COLUMNS = ("model", "model_name", "source")
#: Columns a submission may carry that scoring does not use.
PASSTHROUGH_COLUMNS = frozenset(
    {
        "subject_id",
        "dicom_id",
        "sample_id",
        "split",
        "image_path",
        "previous_dicom_id",
        "previous_study_id",
        "view",
        "prompt",
        "prompt_id",
        "id",
        # Input fields a ReXrank-style file carries next to model_prediction (never scored).
        "image_paths",
        "images",
        "context",
        "indication",
        "history",
        "comparison",
        "technique",
        "section_findings",
        "section_impression",
        "reference",
        "reference_report",
        "ground_truth",
    }
)
#: Placeholder names of unnamed columns (pandas' index, a trailing comma), ignored by plan_columns.
UNNAMED_COLUMN = re.compile(r"unnamed: \d+|index|level_0|__index_level_\d+__")


@dataclass
class ColumnPlan:
    """What each submission column means."""

    key: str | None = None
    observations: dict[str, str] = field(default_factory=dict)  # source column -> observation
    text: str | None = None
    model: str | None = None
    progression: dict[str, str] = field(default_factory=dict)  # source column -> ms-cxr-t finding prefix
    ignored: list[str] = field(default_factory=list)


def _progression_prefix(name: str) -> str | None:
    low = name.strip().lower().replace(" ", "_")
    for suffix in ("_progression", "_answer"):
        if low.endswith(suffix):
            low = low[: -len(suffix)]
    for prefix, short in MS_CXR_T_SHORT.items():
        if low in (prefix, short.lower()):
            return prefix
    return None


def plan_columns(
    columns: Sequence[str], kind: str, path: Path, row: int | None = None, lenient: bool = False
) -> ColumnPlan:
    """Assign a role to every column for a task kind; unknown columns are an error (ignored and listed
    with ``lenient``)."""
    plan = ColumnPlan()
    for name in columns:
        low = name.strip().lower()
        if re.sub(r"[\s_\-]+", "", low) in ("studyid", "study") and plan.key is None:  # "Study ID", "studyId"
            plan.key = name
        elif low in MODEL_COLUMNS and plan.model is None:
            plan.model = name
        elif low in TEXT_COLUMNS and plan.text is None:
            plan.text = name
        elif kind == "ms-cxr-t" and _progression_prefix(name):
            plan.progression[name] = _progression_prefix(name)  # type: ignore[assignment]
        elif kind == "labels" and is_observation(name):
            obs = canonical_name(name)
            if obs in plan.observations.values():
                raise InputError(
                    f"{where(path, row=row, field=name)}: observation {obs!r} given by two columns"
                )
            plan.observations[name] = obs
        elif low in PASSTHROUGH_COLUMNS or (kind == "report" and low in ("findings", "impression")):
            plan.ignored.append(name)
        elif not low or UNNAMED_COLUMN.fullmatch(low):
            plan.ignored.append(name)  # an unnamed column cannot be a label: pandas' index, a trailing comma
        elif lenient:
            plan.ignored.append(name)
        else:
            raise InputError(
                f"{where(path, row=row, field=name)}: unexpected column for a {kind} submission; {expected_columns(kind)}"
            )
    return plan


def expected_columns(kind: str) -> str:
    """The columns a submission of this task kind needs, as a sentence for error messages."""
    text = "one of " + ", ".join(TEXT_COLUMNS)
    if kind == "labels":
        return f"expected study_id and the 14 observation columns ({', '.join(OBSERVATIONS)}) or a text column ({text})"
    if kind == "ms-cxr-t":
        return f"expected study_id and per-finding columns ({', '.join(MS_CXR_T_FINDINGS)}, optionally with _progression) or a text column ({text})"
    if kind == "rationale":
        return f"expected study_id, model and a text column ({text})"
    return f"expected study_id and a text column ({text})"
