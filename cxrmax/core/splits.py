"""MIMIC-CXR's three splits and the one table of their accepted spellings."""

from __future__ import annotations

SPLITS: tuple[str, ...] = ("train", "validate", "test")

#: Spellings found in the wild (Hugging Face datasets, pandas exports) for the official names.
SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "validate": "validate",
    "validation": "validate",
    "val": "validate",
    "valid": "validate",
    "dev": "validate",
    "test": "test",
}


def canonical_split(value: str) -> str | None:
    """The official name of a split spelling (case and surrounding blanks ignored), or None."""
    return SPLIT_ALIASES.get(value.strip().lower())
