"""Reading the training data: one split of a dataset build-preferences saved, column types checked.

Inputs are the datasets build-preferences saves (``datasets.DatasetDict.save_to_disk``) with
``cxrmax.core.schemas.PREFERENCE_SCHEMA`` (one positive + a list of negatives per row) or ``SFT_SCHEMA``
(one completion per row). A missing directory, split or column, and a column of the wrong type
(``rejected`` not a list of strings, ``chosen`` not a string), is an InputError naming the dataset and
the field before any row is read.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets

from cxrmax.core.errors import InputError, where

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "image_path")
SFT_COLUMNS = ("prompt", "completion", "image_path")


def load_split(path: str | os.PathLike, split: str = "train", required: Sequence[str] = ()) -> Any:
    """Load one split of a dataset saved with ``save_to_disk`` (a DatasetDict dir or a Dataset dir).

    Raises InputError naming the directory, split or missing column."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{where(path)}: no such dataset directory")
    splits_file = path / "dataset_dict.json"
    if splits_file.is_file():
        # Load only the split asked for: datasets cannot reload a DatasetDict holding an empty split
        # (saved with zero shards), which would make every split of it unreadable.
        try:
            splits = list(json.loads(splits_file.read_text())["splits"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{where(splits_file)}: unreadable split list ({exc})") from exc
        if split not in splits:
            raise InputError(f"{where(path)}: no split {split!r} (have {sorted(splits)})")
        path = path / split
        if not list(path.glob("*.arrow")):
            raise InputError(f"{where(path)}: the {split!r} split has no rows")
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError / ValueError for non-datasets dirs
        inside = [name for name in ("preferences", "sft") if (path / name).is_dir()]
        hint = (
            f"; did you mean {path / inside[0]}? (build-preferences writes OUT/preferences and OUT/sft)"
            if inside
            else ""
        )
        raise InputError(f"{where(path)}: not a dataset saved with save_to_disk ({exc}){hint}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise InputError(f"{where(path)}: no split {split!r} (have {sorted(loaded)})")
        loaded = loaded[split]
    for column in required:
        if column not in loaded.column_names:
            raise InputError(f"{where(path, field=column)}: missing column (have {loaded.column_names})")
    if len(loaded) == 0:
        # Said here, before a model is loaded, not as an empty dataloader after it.
        raise InputError(f"{where(path)}: the {split!r} split has no rows")
    return loaded


def _type_name(feature: Any) -> str:
    return getattr(feature, "dtype", None) or type(feature).__name__


def _is_text(feature: Any) -> bool:
    # dtype "null": a column that is None in every row (pyarrow cannot type it); rows say what is missing.
    return getattr(feature, "dtype", None) in ("string", "large_string", "null")


def _is_text_list(feature: Any) -> bool:
    if getattr(feature, "dtype", None) == "null":
        return True
    if isinstance(feature, list):  # the legacy [Value] form
        return len(feature) == 1 and _is_text(feature[0])
    inner = getattr(feature, "feature", None)  # datasets.List / LargeList / Sequence
    return inner is not None and _is_text(inner)


def check_column_types(
    dataset: Any, text_columns: Sequence[str], list_columns: Sequence[str], source: Any
) -> None:
    """Raise InputError when a present column has the wrong type (e.g. ``rejected`` saved as one string
    would otherwise be split into single characters, ``chosen`` saved as a list would read as empty)."""
    features = getattr(dataset, "features", None) or {}
    for name in text_columns:
        if name in features and not _is_text(features[name]):
            raise InputError(
                f"{where(source, field=name)}: expected a text column, got {_type_name(features[name])}"
            )
    for name in list_columns:
        if name in features and not _is_text_list(features[name]):
            raise InputError(
                f"{where(source, field=name)}: expected a list of texts per row, got {features[name]}"
            )
