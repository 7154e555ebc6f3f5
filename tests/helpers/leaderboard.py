"""A ScoreResult with chosen headline figures, for board tests."""

from __future__ import annotations

from cxrmax.leaderboard.scoring import ScoreResult


def make_result(sha: str, value: float, task: str = "mimic-cxr-labels", **headline_extra) -> ScoreResult:
    headline = {"micro_f1_14": value, "macro_f1_14": value / 2, "micro_f1_5": value, "macro_f1_5": value}
    headline.update(headline_extra)
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
    )
