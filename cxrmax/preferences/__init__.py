"""build-preferences: trajectories of several source models -> drift annotations, consensus
positives, ranked negatives, SFT rows, exports and a data card.

Modules, in data-flow order: `load` (inputs -> one normalised table), `labels` (the adapter onto
the rule labeler), `drift` (the drift definitions), `consensus` (the pure vote and the composed
positive), `model_consensus` (--consensus model, networked), `annotate` (one chunk -> record
batches), `build` (the whole build: enrichment, pool, staging, publishing), `export` (TRL,
ms-swift, Parquet, Hub) and `datacard` (README.md and figures).

The names below are the public API, resolved on first use: importing this package (for `drift`,
say, as the leaderboard does) does not import `datasets` and the build.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Public name -> the module that defines it.
_EXPORTS = {
    "BuildOptions": "build",
    "BuildSummary": "build",
    "build_preferences": "build",
    "LoadReport": "load",
    "load_trajectories": "load",
    "export_parquet": "export",
    "export_swift": "export",
    "export_trl": "export",
    "push_to_hub": "export",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
