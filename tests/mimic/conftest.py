"""Fixtures of the MIMIC-CXR reader tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


def _link_or_copy(source: str, target: str) -> None:
    if source.endswith((".jpg", ".dcm")):
        try:
            Path(target).hardlink_to(source)
            return
        except OSError:
            pass
    shutil.copy2(source, target)


@pytest.fixture()
def mimic_copy(mini_mimic: Path, tmp_path: Path) -> Path:
    """A private copy of the session mini MIMIC-CXR that a test may corrupt (CSVs and reports; the
    images are hard-linked to keep it fast: replace them, never write through)."""
    target = tmp_path / "mimic"
    shutil.copytree(mini_mimic, target, copy_function=_link_or_copy)
    return target
