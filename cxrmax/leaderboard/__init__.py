"""The cxrmax leaderboard: versioned tasks, validated streaming submissions, label / report /
MS-CXR-T / rationale metrics, a persistent SQLite board with the published reference rows. Every
score carries a fingerprint of what it was scored against (fingerprint.py) and its canonical
predictions (predictions.py); the rules are in docs/leaderboard.md."""

from __future__ import annotations

from cxrmax.leaderboard.scoring import ScoreResult, score
from cxrmax.leaderboard.tasks import Task, get_task, list_tasks, published_rows

__all__ = ["ScoreResult", "Task", "get_task", "list_tasks", "published_rows", "score"]
