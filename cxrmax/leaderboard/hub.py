"""Publish the board as a Hugging Face Hub data set (Parquet + a data card) with huggingface_hub.

Only scores leave the machine: names, model info, metric values and task versions, never submission
contents or MIMIC-CXR data. Offline (no network, HF_HUB_OFFLINE, no token) it fails with a clear
message instead of a traceback."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cxrmax.core.errors import CxrmaxError
from cxrmax.leaderboard.render import board_table, to_markdown
from cxrmax.leaderboard.tasks import get_task, list_tasks

_TRANSPORT_ERRORS = {
    "ConnectError",
    "ConnectTimeout",
    "NetworkError",
    "TransportError",
    "TimeoutException",
    "RequestError",
    "ConnectionError",
    "Timeout",
}


def board_records(board: Any, tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One flat record per board row (scored and published), metrics as a JSON string column."""
    records = []
    for name in tasks or sorted(list_tasks()):
        task = get_task(name)
        columns, rows = board_table(board, task)
        for row in rows:
            records.append(
                {
                    "task": task.name,
                    "task_version": str(row.get("task_version") or task.version),
                    "name": row["name"].strip(),
                    "source": row["source"],
                    "primary_metric": task.primary_metric,
                    "primary_value": row.get(task.primary_metric),
                    "metrics": json.dumps({m: row.get(m) for m in task.headline}),
                    "coverage": row.get("coverage"),
                    "uncertain": row.get("uncertain") or None,
                    "submitted": row.get("submitted") or None,
                    "group": row["group"],
                    "rank": row["rank"] if row["rank"] != "" else None,
                    "ci_95": row.get("ci_95") or None,
                    "fingerprint": row.get("fingerprint") or None,
                    "citation": row.get("citation") or None,
                }
            )
    return records


def write_board_dataset(board: Any, out_dir: str | Path, tasks: Sequence[str] | None = None) -> Path:
    """Write data/board.parquet and a README.md data card under ``out_dir``."""
    out = Path(out_dir)
    (out / "data").mkdir(parents=True, exist_ok=True)
    records = board_records(board, tasks)
    schema = pa.schema(
        [
            ("task", pa.string()),
            ("task_version", pa.string()),
            ("name", pa.string()),
            ("source", pa.string()),
            ("primary_metric", pa.string()),
            ("primary_value", pa.float64()),
            ("metrics", pa.string()),
            ("coverage", pa.float64()),
            ("uncertain", pa.string()),
            ("submitted", pa.string()),
            ("group", pa.string()),
            ("rank", pa.int64()),
            ("ci_95", pa.string()),
            ("fingerprint", pa.string()),
            ("citation", pa.string()),
        ]
    )
    pq.write_table(pa.Table.from_pylist(records, schema=schema), out / "data" / "board.parquet")
    sections = []
    for name in tasks or sorted(list_tasks()):
        task = get_task(name)
        columns, rows = board_table(board, task)
        sections.append((f"{task.name} v{task.version}", columns, rows))
    card = (
        "---\nconfigs:\n- config_name: default\n  data_files: data/board.parquet\nlicense: cc-by-4.0\n"
        "tags:\n- leaderboard\n- radiology\n- chest-x-ray\n---\n\n"
        "Scores computed locally with `cxrmax leaderboard`. Rows marked *published, not re-scored* are "
        "copied from the papers. No MIMIC-CXR data is included.\n\n" + to_markdown(sections)
    )
    (out / "README.md").write_text(card, encoding="utf-8")
    return out


def push_to_hub(
    board: Any,
    repo_id: str,
    tasks: Sequence[str] | None = None,
    token: str | None = None,
    private: bool = False,
) -> str:
    """Upload the board as a data set repo ``repo_id``; returns the repo URL. Raises CxrmaxError with a
    plain message when offline, unauthenticated or refused."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise CxrmaxError(
            "cannot push to the Hub: offline mode (HF_HUB_OFFLINE is set); export with --format instead"
        )
    try:
        from huggingface_hub import HfApi
        from huggingface_hub import errors as hf_errors
    except ImportError as exc:
        raise CxrmaxError(f"--push-to-hub needs huggingface_hub: {exc}") from None
    # Read the endpoint now: huggingface_hub reads HF_ENDPOINT once, when it is first imported.
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    api = HfApi(endpoint=endpoint, token=token)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_board_dataset(board, tmp, tasks)
            api.create_repo(repo_id, repo_type="dataset", exist_ok=True, private=private)
            api.upload_folder(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=str(folder),
                commit_message="Update cxrmax leaderboard",
            )
    except hf_errors.OfflineModeIsEnabled:
        raise CxrmaxError("cannot push to the Hub: huggingface_hub is in offline mode") from None
    except hf_errors.HfHubHTTPError as exc:
        raise CxrmaxError(
            f"the Hub refused the upload to {repo_id} (token missing or without write access?): {exc}"
        ) from None
    except (hf_errors.LocalTokenNotFoundError, ValueError) as exc:
        raise CxrmaxError(
            f"cannot push to the Hub: {exc} (log in with `hf auth login` or pass a token)"
        ) from None
    except Exception as exc:
        # The HTTP client behind huggingface_hub varies by version (httpx, a vendored fork, requests):
        # recognise transport failures by class name rather than by one library's classes.
        names = {cls.__name__ for cls in type(exc).__mro__}
        if names & _TRANSPORT_ERRORS or isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            raise CxrmaxError(f"cannot reach the Hugging Face Hub at {endpoint} (offline?): {exc}") from None
        raise
    return f"{endpoint.rstrip('/')}/datasets/{repo_id}"
