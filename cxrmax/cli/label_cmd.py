"""CLI commands for the label area (registered on the root app by cxrmax.cli): `cxrmax label`."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import typer

from cxrmax.cli.common import console, user_errors

_CHUNK_ROWS = 8192
_STATUS_STYLE = {"positive": "bold green", "negative": "bold red", "uncertain": "bold yellow"}


def _detect_format(path: str, given: str | None) -> str:
    if given:
        return given
    name = path.lower()
    if name.endswith((".jsonl", ".json", ".ndjson", ".jsonl.gz")):
        return "jsonl"
    if name.endswith((".arrow", ".feather", ".ipc")):
        return "arrow"
    if name.endswith(".parquet"):
        return "parquet"
    return "lines"


def _iter_text_chunks(
    path: str,
    fmt: str,
    field: str,
    column: str,
    lenient: bool,
    skipped: list[str],
    keep: list[str],
    kept: list,
) -> Iterator[list[object]]:
    """Yield lists of texts (None where a row has no usable text) without holding the whole input.
    For each chunk, the `keep` columns of its rows are appended to `kept` as a pyarrow Table."""
    from cxrmax.core.errors import InputError, where

    if fmt in ("lines", "jsonl"):
        if path == "-":
            handle = sys.stdin
        else:
            if not Path(path).exists():
                raise InputError(f"{path}: no such file")
            if path.endswith(".gz"):
                import gzip

                handle = gzip.open(path, "rt", encoding="utf-8", errors="replace")
            else:
                handle = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
        import pyarrow as pa

        if keep and fmt == "lines":
            raise InputError("--keep needs JSONL, Arrow or Parquet input")
        chunk: list[object] = []
        extras: dict[str, list] = {name: [] for name in keep}

        def flush_extras() -> None:
            kept.append(pa.table({name: pa.array(values, pa.string()) for name, values in extras.items()}))
            for values in extras.values():
                values.clear()

        try:
            for row, line in enumerate(handle, start=1):
                line = line.rstrip("\n")
                if fmt == "lines":
                    chunk.append(line.replace("\\n", "\n"))
                else:
                    if not line.strip():
                        continue
                    record: object = {}
                    try:
                        record = json.loads(line)
                        if not isinstance(record, dict):
                            raise ValueError("not a JSON object")
                        if field not in record:
                            raise KeyError(field)
                        value = record[field]
                        if value is not None and not isinstance(value, str):
                            raise TypeError(f"{type(value).__name__}, not a string")
                    except (ValueError, KeyError, TypeError) as exc:
                        problem = f"{where(path, row, field)}: {exc}"
                        if not lenient:
                            raise InputError(problem + " (use --lenient to skip bad rows)") from None
                        skipped.append(problem)
                        value = None
                        record = record if isinstance(record, dict) else {}
                    chunk.append(value)
                    for name in keep:
                        extra = record.get(name)
                        extras[name].append(None if extra is None else str(extra))
                if len(chunk) >= _CHUNK_ROWS:
                    flush_extras()
                    yield chunk
                    chunk = []
        finally:
            if handle is not sys.stdin:
                handle.close()
        if chunk:
            flush_extras()
            yield chunk
        return

    import pyarrow as pa
    import pyarrow.parquet as pq

    if path == "-":
        raise InputError("Arrow/Parquet input must be a file, not stdin")
    if not Path(path).exists():
        raise InputError(f"{path}: no such file")
    if fmt == "parquet":
        try:
            parquet = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise InputError(f"{path}: not a Parquet file ({exc})") from None
        names = parquet.schema_arrow.names
        for name in (column, *keep):
            if name not in names:
                raise InputError(f"{where(path, field=name)}: no such column; columns: {names}")
        for batch in parquet.iter_batches(
            batch_size=_CHUNK_ROWS, columns=list(dict.fromkeys([column, *keep]))
        ):
            kept.append(pa.table({name: batch.column(batch.schema.get_field_index(name)) for name in keep}))
            yield _strings(batch.column(batch.schema.get_field_index(column)), path, column)
        return
    try:
        source = pa.memory_map(path)
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = reader.schema
        except pa.ArrowInvalid:
            source = pa.memory_map(path)
            stream = pa.ipc.open_stream(source)
            batches, schema = iter(stream), stream.schema
    except Exception as exc:
        raise InputError(f"{path}: not an Arrow IPC file or stream ({exc})") from None
    for name in (column, *keep):
        if name not in schema.names:
            raise InputError(f"{where(path, field=name)}: no such column; columns: {schema.names}")
    index = schema.get_field_index(column)
    for batch in batches:
        array = batch.column(index)
        for start in range(0, len(array), _CHUNK_ROWS):
            part = batch.slice(start, _CHUNK_ROWS)
            kept.append(pa.table({name: part.column(schema.get_field_index(name)) for name in keep}))
            yield _strings(array.slice(start, _CHUNK_ROWS), path, column)


def _strings(array, path: str, column: str) -> list[object]:
    import pyarrow as pa

    from cxrmax.core.errors import InputError, where

    if pa.types.is_large_string(array.type) or pa.types.is_string(array.type):
        return array.to_pylist()
    if pa.types.is_binary(array.type) or pa.types.is_large_binary(array.type):
        return array.to_pylist()  # bytes: decoded (or flagged) by the labeler
    raise InputError(f"{where(path, field=column)}: column type {array.type} is not text")


def _explain(index: int, result) -> None:
    from rich.text import Text

    text = Text(result.text)
    for label in result.observations.values():
        for evidence in label.evidence:
            text.stylize(_STATUS_STYLE.get(evidence.status, "bold"), evidence.start, evidence.end)
    for span in result.refusal:
        text.stylize("reverse magenta", span.start, span.end)
    for span in result.hedging:
        text.stylize("italic cyan", span.start, span.end)
    console.rule(f"text {index}")
    console.print(text)
    for name, label in result.observations.items():
        if label.status == "absent":
            continue
        side = f" ({label.laterality})" if label.laterality not in (None, "unspecified") else ""
        spans = "; ".join(
            f"step {e.step} [{e.start}:{e.end}] {e.text!r}" + (f" cue {e.cue!r}" if e.cue else "")
            for e in label.evidence
        )
        console.print(
            f"  [{_STATUS_STYLE.get(label.status, 'bold')}]{label.status:9s}[/] {name}{side}  {spans}"
        )
    flags = [f for f, on in (("refusal", result.is_refusal), ("hedging", bool(result.hedging))) if on]
    if flags or result.error:
        console.print(
            f"  flags: {', '.join(flags) or '-'}" + (f"  error: {result.error}" if result.error else "")
        )


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""

    @app.command("label")
    def label(
        source: str = typer.Argument(
            "-", help="Input file (plain lines, .jsonl, .arrow, .parquet) or - for stdin."
        ),
        field: str = typer.Option("text", "--field", help="JSONL field holding the text."),
        column: str = typer.Option("text", "--column", help="Arrow/Parquet column holding the text."),
        fmt: str = typer.Option(
            None,
            "--format",
            help="Force the input format: lines, jsonl, arrow or parquet (default: by extension).",
        ),
        out: Path = typer.Option(
            None, "--out", help="Write the label table to this .arrow (or .parquet) file."
        ),
        explain: bool = typer.Option(
            False, "--explain", help="Print each text with its evidence spans highlighted."
        ),
        processes: int = typer.Option(None, "--processes", help="Worker processes (default: all cores)."),
        lenient: bool = typer.Option(
            False, "--lenient", help="Skip malformed JSONL rows (counted) instead of failing."
        ),
        show: int = typer.Option(30, "--show", help="Rows to show in the table when not writing --out."),
        keep: list[str] = typer.Option(
            [], "--keep", help="Copy this input column/field to --out (repeatable), e.g. --keep sample_id."
        ),
    ) -> None:
        """Label texts with the 14 CheXpert observations (status, laterality, refusal, hedging).

        Plain-text input has one text per line ("\\n" inside a line stands for a newline).

        Examples:

          echo "Small left pleural effusion. No pneumothorax." | cxrmax label --explain

          cxrmax label answers.jsonl --field answer --out labels.arrow

          cxrmax label trajectories.arrow --column text --keep sample_id --keep model --out labels.parquet
        """
        with user_errors():
            import pyarrow as pa
            import pyarrow.parquet as pq
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
            from rich.table import Table

            from cxrmax.core.errors import InputError
            from cxrmax.core.pathologies import OBSERVATIONS
            from cxrmax.labeler import LABEL_TABLE_SCHEMA, iter_label_tables, label_text

            input_format = _detect_format(source, fmt)
            if input_format not in ("lines", "jsonl", "arrow", "parquet"):
                raise InputError(f"--format {fmt!r}: use lines, jsonl, arrow or parquet")
            skipped: list[str] = []
            kept: list = []  # per chunk, the --keep columns (filled as chunks are read)
            chunks = _iter_text_chunks(source, input_format, field, column, lenient, skipped, keep, kept)
            out_schema = None
            totals = {"rows": 0, "errors": 0, "refusal": 0, "hedging": 0}
            positives = dict.fromkeys(OBSERVATIONS, 0)

            def tally(table: pa.Table) -> None:
                totals["rows"] += table.num_rows
                totals["errors"] += table.num_rows - table.column("error").null_count
                totals["refusal"] += sum(1 for v in table.column("refusal").to_pylist() if v)
                totals["hedging"] += sum(1 for v in table.column("hedging").to_pylist() if v)
                for name in OBSERVATIONS:
                    positives[name] += sum(1 for v in table.column(name).to_pylist() if v == 1)

            if out is not None:
                suffix = out.suffix.lower()
                if suffix not in (".arrow", ".parquet", ".feather", ".ipc"):
                    raise InputError(f"--out {out}: use a .arrow or .parquet file name")
                out.parent.mkdir(parents=True, exist_ok=True)
                tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
                writer = None
                try:
                    with Progress(
                        TextColumn("labelling"),
                        BarColumn(),
                        TextColumn("{task.completed} texts"),
                        TimeElapsedColumn(),
                        console=console,
                        transient=True,
                    ) as progress:
                        task = progress.add_task("label", total=None)
                        for table in iter_label_tables(chunks, processes=processes):
                            rows = pa.array(
                                range(totals["rows"] + 1, totals["rows"] + 1 + table.num_rows), pa.int64()
                            )
                            tally(table)
                            extra = kept.pop(0) if kept else pa.table({})
                            table = pa.Table.from_arrays(
                                [rows, *extra.columns, *table.columns],
                                names=["row", *extra.column_names, *table.column_names],
                            )
                            if writer is None:
                                out_schema = table.schema
                                writer = (
                                    pq.ParquetWriter(tmp, out_schema)
                                    if suffix == ".parquet"
                                    else pa.ipc.new_file(str(tmp), out_schema)
                                )
                            writer.write_table(table.cast(out_schema))
                            progress.update(task, advance=table.num_rows)
                    if writer is None:  # no input rows: still write a valid, empty table
                        out_schema = pa.schema(
                            [pa.field("row", pa.int64())]
                            + [pa.field(name, pa.string()) for name in keep]
                            + list(LABEL_TABLE_SCHEMA)
                        )
                        writer = (
                            pq.ParquetWriter(tmp, out_schema)
                            if suffix == ".parquet"
                            else pa.ipc.new_file(str(tmp), out_schema)
                        )
                    writer.close()
                    os.replace(tmp, out)
                except BaseException:
                    if writer is not None:
                        writer.close()
                    tmp.unlink(missing_ok=True)
                    raise
                console.print(f"[green]wrote[/] {out} ({totals['rows']} rows)")
            else:
                shown: list = []
                current: list = [None]

                def remembered(stream=chunks):
                    for chunk in stream:
                        current[0] = chunk
                        yield chunk

                if explain:
                    tables = ((None, chunk) for chunk in chunks)
                else:
                    tables = (
                        (table, current[0]) for table in iter_label_tables(remembered(), processes=processes)
                    )
                for table, chunk in tables:
                    kept.clear()  # --keep only applies to --out
                    if explain:
                        for text in chunk:
                            totals_row = totals["rows"] + 1
                            result = label_text(text)
                            _explain(totals_row, result)
                            totals["rows"] += 1
                            totals["errors"] += result.error is not None
                            totals["refusal"] += result.is_refusal
                            totals["hedging"] += bool(result.hedging)
                            for name, value in result.labels().items():
                                positives[name] += value == 1
                        continue
                    start = totals["rows"]
                    tally(table)
                    if len(shown) < show:
                        for offset, row in enumerate(table.slice(0, show - len(shown)).to_pylist()):
                            shown.append((start + offset + 1, chunk[offset], row))
                if not explain:
                    grid = Table(title="cxrmax label", show_lines=False)
                    for header in ("row", "text", "positive", "uncertain", "negative", "flags"):
                        grid.add_column(header, overflow="fold")
                    for number, text, row in shown:

                        def names(value: int, row=row) -> str:
                            parts = []
                            for name in OBSERVATIONS:
                                if row[name] == value:
                                    side = row[f"{name} laterality"]
                                    parts.append(
                                        name + (f" ({side})" if side not in (None, "unspecified") else "")
                                    )
                            return ", ".join(parts)

                        flags = [f for f in ("refusal", "hedging") if row[f]]
                        if row["error"]:
                            flags.append(f"error: {row['error']}")
                        preview = text if isinstance(text, str) else repr(text)
                        preview = " ".join(preview.split())
                        grid.add_row(
                            str(number),
                            preview[:70] + ("..." if len(preview) > 70 else ""),
                            f"[green]{names(1)}[/]",
                            f"[yellow]{names(-1)}[/]",
                            f"[red]{names(0)}[/]",
                            ", ".join(flags),
                        )
                    console.print(grid)
            summary = (
                f"{totals['rows']} texts, {totals['errors']} with errors, {totals['refusal']} refusals, "
                f"{totals['hedging']} hedging"
            )
            if skipped:
                summary += f", {len(skipped)} malformed rows skipped (first: {skipped[0]})"
            console.print(summary)
