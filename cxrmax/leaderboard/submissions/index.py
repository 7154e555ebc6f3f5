"""`StudyIndex`: reference keys to dense slots, catching unknown and duplicate submission rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxrmax.core.errors import InputError, where


class StudyIndex:
    """Maps study ids of the references to dense slots and catches unknown and duplicate rows."""

    def __init__(self, study_ids: np.ndarray, source: str = "references"):
        study_ids = np.asarray(study_ids)
        if study_ids.dtype.kind not in "UO":
            study_ids = study_ids.astype(np.int64)
        self.order = np.argsort(study_ids, kind="stable")
        self.sorted = study_ids[self.order]
        if len(self.sorted) > 1 and np.any(self.sorted[1:] == self.sorted[:-1]):
            dup = self.sorted[1:][self.sorted[1:] == self.sorted[:-1]][0]
            raise InputError(f"{source}: reference key {dup} appears twice")
        self.size = len(study_ids)
        self.first_row = np.zeros(self.size, dtype=np.int64)  # 0 = not seen yet

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Slots of ``ids`` (-1 where unknown)."""
        pos = np.searchsorted(self.sorted, ids)
        pos = np.minimum(pos, max(self.size - 1, 0))
        found = (self.sorted[pos] == ids) if self.size else np.zeros(len(ids), bool)
        return np.where(found, self.order[pos] if self.size else -1, -1)

    def claim(
        self,
        slots: np.ndarray,
        rows: np.ndarray,
        ids: np.ndarray,
        path: Path,
        field_name: str,
        hint: str = "",
    ) -> None:
        """Mark slots as submitted; a slot submitted twice (in this batch or before) is an error naming
        both rows (``hint`` is appended to the message)."""
        seen_before = self.first_row[slots] > 0
        if seen_before.any():
            i = int(np.nonzero(seen_before)[0][0])
            raise InputError(
                f"{where(path, row=int(rows[i]), field=field_name)}: duplicate {field_name} {ids[i]} (first given in row {int(self.first_row[slots[i]])}){hint}"
            )
        uniq, first, counts = np.unique(slots, return_index=True, return_counts=True)
        if np.any(counts > 1):
            slot = uniq[counts > 1][0]
            where_rows = rows[slots == slot]
            raise InputError(
                f"{where(path, row=int(where_rows[1]), field=field_name)}: duplicate {field_name} {ids[slots == slot][0]} (first given in row {int(where_rows[0])}){hint}"
            )
        self.first_row[slots] = rows

    def release(self, slots: np.ndarray) -> None:
        """Forget that these slots were submitted (their rows were skipped under ``lenient``)."""
        self.first_row[slots] = 0

    @property
    def covered(self) -> np.ndarray:
        """Bool mask of slots that received a row."""
        return self.first_row > 0
