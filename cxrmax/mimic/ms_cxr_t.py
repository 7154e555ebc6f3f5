"""MS-CXR-T: the temporal image classification labels (progression of five findings between two
studies of a patient), read and validated like the release's CSVs."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from cxrmax.core.errors import InputError, where
from cxrmax.core.pathologies import MS_CXR_T_FINDINGS
from cxrmax.mimic.csvs import Validator, read_csv, read_header

__all__ = ["read_ms_cxr_t"]

_PROGRESSION = ("improving", "stable", "worsening")
_QUALITY = ("one_expert", "multiple_experts", "disagreement")


def read_ms_cxr_t(path: str | os.PathLike) -> pa.Table:
    """Read the MS-CXR-T temporal image classification CSV: dicom_id, previous_dicom_id, study_id,
    previous_study_id, subject_id (int64) and per finding ``<f>_progression`` (improving | stable |
    worsening | null) and ``<f>_label_quality`` (one_expert | multiple_experts | disagreement | null).
    Column names and values are case-normalised; anything else is an InputError naming row and field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{where(path)}: MS-CXR-T CSV not found")
    header = read_header(path)
    lowered = {name.strip().lower(): name for name in header}
    ids = ["dicom_id", "previous_dicom_id", "study_id", "previous_study_id", "subject_id"]
    finding_columns = [f"{f}_{kind}" for f in MS_CXR_T_FINDINGS for kind in ("progression", "label_quality")]
    missing = [name for name in ids + finding_columns if name not in lowered]
    if missing:
        raise InputError(f"{where(path, field=missing[0])}: missing column (missing: {', '.join(missing)})")
    raw = read_csv(path, [lowered[name] for name in ids + finding_columns])
    raw = raw.rename_columns([name.strip().lower() for name in raw.column_names])
    check = Validator(path, raw, lenient=False, skipped=Counter())
    data: dict[str, pa.ChunkedArray] = {
        "dicom_id": check.text("dicom_id"),
        "previous_dicom_id": check.text("previous_dicom_id"),
        "study_id": check.integer("study_id"),
        "previous_study_id": check.integer("previous_study_id"),
        "subject_id": check.integer("subject_id"),
    }
    for name in finding_columns:
        values = pc.utf8_lower(pc.utf8_trim_whitespace(raw.column(name)))
        values = pc.if_else(pc.fill_null(pc.equal(values, ""), True), pa.scalar(None, pa.string()), values)
        allowed = _PROGRESSION if name.endswith("_progression") else _QUALITY
        check.flag(
            pc.and_(pc.is_valid(values), pc.invert(pc.is_in(values, pa.array(allowed)))),
            name,
            f"value is not one of {', '.join(allowed)} or empty",
            "bad value",
        )
        data[name] = values
    return pa.table(data)
