"""The CheXpert observation vocabulary used by MIMIC-CXR, CXR-MAX and every cxrmax stage.

Names are the exact column spellings of the MIMIC-CXR chexpert/negbio CSVs. Labels are always
mapped by name (never by column position): other tools order the columns differently.

Label coding (MIMIC-CXR CSVs and every cxrmax table): 1 positive, 0 negative, -1 uncertain,
blank/None = not mentioned.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Literal

#: The 14 observations, alphabetical as in the MIMIC-CXR CSV header.
OBSERVATIONS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

#: The 13 findings (every observation except "No Finding").
FINDINGS: tuple[str, ...] = tuple(o for o in OBSERVATIONS if o != "No Finding")

#: The five CheXpert competition labels.
COMPETITION_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Pleural Effusion",
)

#: Observations for which a side (left/right/bilateral) is meaningful.
LATERALIZABLE: frozenset[str] = frozenset(
    {
        "Atelectasis",
        "Consolidation",
        "Fracture",
        "Lung Lesion",
        "Lung Opacity",
        "Pleural Effusion",
        "Pleural Other",
        "Pneumonia",
        "Pneumothorax",
    }
)

#: MS-CXR-T temporal findings: CSV column prefix -> observation name.
MS_CXR_T_FINDINGS: dict[str, str] = {
    "consolidation": "Consolidation",
    "edema": "Edema",
    "pleural_effusion": "Pleural Effusion",
    "pneumonia": "Pneumonia",
    "pneumothorax": "Pneumothorax",
}
#: The paper's short column names for the MS-CXR-T table (Con, PE, Pna, Pnx, Ede).
MS_CXR_T_SHORT: dict[str, str] = {
    "consolidation": "Con",
    "pleural_effusion": "PE",
    "pneumonia": "Pna",
    "pneumothorax": "Pnx",
    "edema": "Ede",
}
PROGRESSION_CLASSES: tuple[str, ...] = ("improving", "stable", "worsening")

# Alternative spellings seen in other releases and tools, normalised by `canonical_name`.
_ALIASES: dict[str, str] = {
    "airspace opacity": "Lung Opacity",
    "air space opacity": "Lung Opacity",
    "lung opacity": "Lung Opacity",
    "opacity": "Lung Opacity",
    "enlarged cardiomediastinum": "Enlarged Cardiomediastinum",
    "enlarged cardiac mediastinum": "Enlarged Cardiomediastinum",
    "widened mediastinum": "Enlarged Cardiomediastinum",
    "effusion": "Pleural Effusion",
    "pleural effusion": "Pleural Effusion",
    "pleural other": "Pleural Other",
    "pleural_other": "Pleural Other",
    "lung lesion": "Lung Lesion",
    "support devices": "Support Devices",
    "support device": "Support Devices",
    "no finding": "No Finding",
    "no findings": "No Finding",
    "normal": "No Finding",
    "fracture": "Fracture",
    "fractures": "Fracture",
    "pneumo thorax": "Pneumothorax",
}

LabelValue = Literal[1, 0, -1] | None
VALID_LABEL_VALUES: frozenset[float] = frozenset({1.0, 0.0, -1.0})


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


_CANONICAL: dict[str, str] = {_key(o): o for o in OBSERVATIONS} | {_key(k): v for k, v in _ALIASES.items()}


def canonical_name(name: str) -> str:
    """Map any known spelling of an observation ("Airspace Opacity", "pleural_effusion") to its
    MIMIC-CXR CSV name. Raises KeyError naming the unknown observation."""
    try:
        return _CANONICAL[_key(name)]
    except KeyError:
        raise KeyError(f"unknown observation {name!r}; known: {', '.join(OBSERVATIONS)}") from None


def is_observation(name: str) -> bool:
    """True when `name` is one of the 14 observations or a known alias of one."""
    return _key(name) in _CANONICAL


def parse_label_value(value: object) -> LabelValue:
    """Parse one CSV cell into the -1/0/1/None coding. Raises ValueError for anything else."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() in {"nan", "none", "null"}:
            return None
        value = float(text)
    if isinstance(value, float) and math.isnan(value):
        return None
    number = float(value)  # type: ignore[arg-type]
    if number not in VALID_LABEL_VALUES:
        raise ValueError(f"label value {value!r} is not one of 1, 0, -1 or blank")
    return int(number)  # type: ignore[return-value]


def no_finding(labels: Mapping[str, LabelValue]) -> LabelValue:
    """The CheXpert "No Finding" rule: positive only when no finding other than Support Devices
    is positive or uncertain; otherwise not mentioned (None), as in the CheXpert labeler."""
    for name in FINDINGS:
        if name == "Support Devices":
            continue
        if labels.get(name) in (1, -1):
            return None
    return 1


def binarize(
    value: LabelValue, uncertain: Literal["positive", "negative", "ignore"] = "positive"
) -> int | None:
    """Turn a -1/0/1/None label into a binary target under an explicit uncertain policy.

    Blank (not mentioned) counts as negative. With ``uncertain="ignore"`` an uncertain label
    returns None (to be dropped from the metric)."""
    if value is None or value == 0:
        return 0
    if value == 1:
        return 1
    if value == -1:
        if uncertain == "positive":
            return 1
        if uncertain == "negative":
            return 0
        if uncertain == "ignore":
            return None
        raise ValueError(f"unknown uncertain policy {uncertain!r}")
    raise ValueError(f"label value {value!r} is not one of 1, 0, -1 or None")


def positive_observations(labels: Mapping[str, LabelValue], include_no_finding: bool = False) -> list[str]:
    """Observations labelled 1, in canonical order (the study's diagnosis list for prompts)."""
    names = OBSERVATIONS if include_no_finding else FINDINGS
    return [name for name in names if labels.get(name) == 1]
