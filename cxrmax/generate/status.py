"""`cxrmax generate status OUT`: done, failed and missing requests per model.

Each run writes ``OUT/trajectories/<model>/run-<tag>.json`` (selection, prompt, sampling, samples,
shard). Status replans those requests from the selection (when it is still there) and counts which keys
are in committed shards, which are in the failure ledger and which are missing. Journals of killed runs
(answers not yet in a shard) are reported as "recoverable": the next run turns them into shards."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.compute as pc

from cxrmax.core.errors import CxrmaxError, InputError
from cxrmax.generate.orchestrator import GenerateOptions, plan_requests
from cxrmax.generate.prompts import PromptTemplate
from cxrmax.generate.roster import ModelSpec
from cxrmax.generate.store import FailureLedger, KeySet, key_digest, read_shard, shard_paths


@dataclass
class ModelStatus:
    model: str
    rows: int = 0  # rows in committed shards
    distinct_keys: int = 0
    duplicates: int = 0
    length: int = 0
    failed: int = 0
    failed_by_kind: dict[str, int] = field(default_factory=dict)
    planned: int | None = None  # requests the recorded runs asked for (None: unknown)
    done_of_planned: int | None = None
    failed_of_planned: int | None = None
    missing: int | None = None
    recoverable: int = 0  # journal lines of killed runs, committed on the next run
    shards: int = 0
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _journal_lines(model_dir: Path) -> int:
    total = 0
    for journal in model_dir.glob("wal-*.jsonl"):
        with open(journal, "rb") as handle:
            total += sum(1 for line in handle if line.endswith(b"\n"))
    return total


def model_status(model_dir: Path) -> ModelStatus:
    """Status of one model folder."""
    status = ModelStatus(model=model_dir.name)
    keys = []
    for path in shard_paths(model_dir):
        table = read_shard(path, ["request_key", "finish_reason", "model"])
        status.shards += 1
        status.rows += table.num_rows
        status.length += pc.sum(pc.fill_null(pc.equal(table["finish_reason"], "length"), False)).as_py() or 0
        keys.extend(table["request_key"].to_pylist())
        if table.num_rows:
            status.model = table["model"][0].as_py() or status.model
    done = KeySet(key_digest(k) for k in keys)
    status.distinct_keys = len(done)
    status.duplicates = status.rows - status.distinct_keys
    del keys
    failed_keys: set[bytes] = set()
    if (model_dir / "failures.sqlite").exists():
        ledger = FailureLedger(model_dir / "failures.sqlite")
        try:
            status.failed_by_kind = ledger.counts_by_kind()
            failed_keys = {key_digest(k).rstrip(b"\0") for k in ledger.keys()}
        finally:
            ledger.close()
        status.failed = sum(status.failed_by_kind.values())
    status.recoverable = _journal_lines(model_dir)
    manifests = sorted(model_dir.glob("run-*.json"))
    if not manifests:
        status.notes.append("no run manifest: planned/missing unknown")
        return status
    planned = done_planned = failed_planned = 0
    for manifest_path in manifests:
        manifest = json.loads(manifest_path.read_text())
        selection = Path(manifest["selection"])
        if not selection.is_file():
            status.notes.append(
                f"{manifest_path.name}: selection {selection} is gone; counts from the manifest"
            )
            planned += int(manifest.get("requests", 0))
            continue
        options = GenerateOptions(
            model=ModelSpec(name=manifest["model"], hf_id=manifest.get("served_model") or manifest["model"]),
            selection=selection,
            mimic_root=Path(manifest.get("mimic_root", ".")),
            out=model_dir.parent.parent,
            prompt=PromptTemplate(
                id=manifest["prompt_id"],
                body=manifest["prompt_body"],
                empty_labels=manifest.get("prompt_empty_labels", "No Finding"),
            ),
            samples=int(manifest["samples"]),
            seed=int(manifest["sampling"]["seed"]),
            temperature=manifest["sampling"]["temperature"],
            top_p=manifest["sampling"]["top_p"],
            max_tokens=manifest["sampling"]["max_tokens"],
            shard=tuple(manifest["shard"]) if manifest.get("shard") else None,
        )
        try:
            for request in plan_requests(options):
                planned += 1
                if request.digest in done:
                    done_planned += 1
                elif request.digest.rstrip(b"\0") in failed_keys:
                    failed_planned += 1
        except InputError as exc:
            status.notes.append(f"{manifest_path.name}: {exc}")
    status.planned = planned
    status.done_of_planned = done_planned
    status.failed_of_planned = failed_planned
    status.missing = planned - done_planned - failed_planned
    return status


def generation_status(out: str | Path) -> list[ModelStatus]:
    """Status of every model under ``OUT/trajectories/``."""
    root = Path(out) / "trajectories"
    if not root.is_dir():
        raise CxrmaxError(f"{root} does not exist: nothing generated in {out} yet")
    return [model_status(d) for d in sorted(root.iterdir()) if d.is_dir()]
