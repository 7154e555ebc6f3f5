"""Fixtures of the preferences tests: one real build of a generate-shaped run over the mini
MIMIC-CXR, shared by the layout and inspector tests (built once per session, read-only)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cxrmax.preferences.build import BuildOptions, build_preferences
from tests.helpers.preference_runs import N_SAMPLES, full_run


@pytest.fixture(scope="session")
def mini_build(mini_mimic, tmp_path_factory) -> tuple[Path, list[dict]]:
    """(OUT, the selected samples): build-preferences (card, no figures, no ms-swift export) over
    seven sources' answers to the first samples of the mini MIMIC-CXR, with --mimic-root."""
    from cxrmax.mimic.reader import MimicCXR

    samples = MimicCXR(mini_mimic).select().slice(0, N_SAMPLES).to_pylist()
    root = tmp_path_factory.mktemp("mini-build")
    full_run(root / "run", samples)
    options = BuildOptions(processes=1, mimic_root=Path(mini_mimic), figures=False, export_swift=False)
    build_preferences([root / "run"], root / "data", options)
    return root / "data", samples
