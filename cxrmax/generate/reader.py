"""Reading generate's output: the committed trajectory shards under ``OUT/trajectories/<model>/``."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from cxrmax.core.errors import InputError, where
from cxrmax.core.schemas import TRAJECTORY_SCHEMA
from cxrmax.generate.roster import safe_dir_name
from cxrmax.generate.store import read_shard

__all__ = ["model_dirs", "read_trajectories", "trajectory_files"]


def model_dirs(out_dir: str | Path) -> list[Path]:
    """The model folders under ``OUT/trajectories/``."""
    root = Path(out_dir) / "trajectories"
    return sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []


def trajectory_files(out_dir: str | Path, model: str | None = None) -> list[Path]:
    """Committed shard files, optionally of one model (roster name, served id or folder name)."""
    dirs = model_dirs(out_dir)
    if model is not None:
        wanted = {model, safe_dir_name(model)}
        dirs = [d for d in dirs if d.name in wanted]
    return [p for d in dirs for p in sorted(d.glob("part-*.arrow"))]


#: The order ``read_trajectories(ordered=True)`` returns: the same for the same answers on every run.
ANSWER_ORDER: tuple[str, ...] = ("model", "sample_id", "sample_index", "request_key")


def read_trajectories(
    out_dir: str | Path,
    model: str | None = None,
    columns: list[str] | None = None,
    ordered: bool = False,
) -> pa.Table:
    """All committed trajectories under ``OUT/trajectories/`` (one model's with ``model``) as one table
    with shards.TRAJECTORY_SCHEMA (memory-mapped; ``columns`` to read fewer). Journals of a running or
    killed run are not included until they are committed.

    Shards hold answers in commit order, which concurrent requests make differ from run to run; with
    ``ordered`` the rows are sorted by ANSWER_ORDER (copied out of the memory map: for test-split-sized
    reads whose consumers resample rows, e.g. bootstrap intervals, and must not depend on that order)."""
    files = trajectory_files(out_dir, model)
    if not files and model is not None and not model_dirs(out_dir):
        raise InputError(f"{where(Path(out_dir) / 'trajectories')}: no trajectories found")
    tables = []
    for path in files:
        table = read_shard(path)
        if table.schema != TRAJECTORY_SCHEMA:
            # Shards written before an additive schema change: add the missing columns as nulls.
            table = _conform(table)
        tables.append(table.select(columns) if columns else table)
    if not tables:
        schema = (
            TRAJECTORY_SCHEMA if not columns else pa.schema([TRAJECTORY_SCHEMA.field(c) for c in columns])
        )
        return schema.empty_table()
    table = pa.concat_tables(tables)
    if ordered:
        keys = [name for name in ANSWER_ORDER if name in table.column_names]
        table = table.sort_by([(name, "ascending") for name in keys])
    return table


def _conform(table: pa.Table) -> pa.Table:
    """Shards written before an additive schema change, with the missing columns added as nulls."""
    columns = []
    for field in TRAJECTORY_SCHEMA:
        if field.name in table.column_names:
            columns.append(table[field.name].cast(field.type))
        else:
            columns.append(pa.nulls(table.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=TRAJECTORY_SCHEMA)
