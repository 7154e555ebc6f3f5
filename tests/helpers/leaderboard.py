"""A ScoreResult with chosen headline figures, for board tests."""

from __future__ import annotations

from cxrmax.leaderboard import fingerprint
from cxrmax.leaderboard.scoring import ScoreResult
from cxrmax.leaderboard.tasks import get_task

#: The reference hash every `make_result` claims (as if scored from the same MIMIC-CXR root).
REFERENCE_SHA = "f" * 64


def make_result(
    sha: str,
    value: float,
    task: str = "mimic-cxr-labels",
    reference_sha: str = REFERENCE_SHA,
    origin: str = fingerprint.ORIGIN_ROOT,
    **headline_extra,
) -> ScoreResult:
    """A result whose file and canonical predictions both hash to ``sha``, fingerprinted as scored
    against ``reference_sha`` from ``origin`` under the default policy."""
    headline = {"micro_f1_14": value, "macro_f1_14": value / 2, "micro_f1_5": value, "macro_f1_5": value}
    headline.update(headline_extra)
    definition = get_task(task)
    section = definition.reference_section if definition.kind == "report" else None
    return ScoreResult(
        task=task,
        task_version="1.0",
        kind="labels",
        submission=f"/tmp/{sha}.csv",
        sha256=sha,
        format="csv",
        uncertain="positive",
        input_kind="labels",
        n_rows=10,
        n_references=10,
        n_scored=10,
        missing=0,
        skipped_unknown=0,
        primary_metric="micro_f1_14",
        headline=headline,
        ci={"micro_f1_14": (value - 0.05, value + 0.05)},
        fingerprint=fingerprint.make(definition, reference_sha, origin, "positive", section),
        predictions_sha256=sha,
    )
