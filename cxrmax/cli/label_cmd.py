"""CLI commands for the label area (registered on the root app by cxrmax.cli): `cxrmax label`.

Parses options, calls `cxrmax.labeler.files` (read, label, write) and renders with rich."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from cxrmax.cli.common import console, interruptible, user_errors
from cxrmax.cli.options import LABEL_INPUT_FORMATS, LABEL_UNCERTAIN, Choice, choice_option, out_option
from cxrmax.core.errors import InputError

_STATUS_STYLE = {"positive": "bold green", "negative": "bold red", "uncertain": "bold yellow"}
_PREVIEW_CHARS = 70


@dataclass
class _Totals:
    """Counts for the closing summary line."""

    rows: int = 0
    errors: int = 0
    refusal: int = 0
    hedging: int = 0

    def add_table(self, table: Any) -> None:
        """Count a label table's rows."""
        self.rows += table.num_rows
        self.errors += table.num_rows - table.column("error").null_count
        self.refusal += sum(1 for v in table.column("refusal").to_pylist() if v)
        self.hedging += sum(1 for v in table.column("hedging").to_pylist() if v)

    def add_result(self, result: Any) -> None:
        """Count one `label_text` result."""
        self.rows += 1
        self.errors += result.error is not None
        self.refusal += result.is_refusal
        self.hedging += bool(result.hedging)

    def summary(self, skipped: list[str]) -> str:
        """The closing line: texts, errors, refusals, hedging and skipped rows."""
        line = (
            f"{self.rows} texts, {self.errors} with errors, {self.refusal} refusals, {self.hedging} hedging"
        )
        if skipped:
            line += f", {len(skipped)} malformed rows skipped (first: {skipped[0]})"
        return line


def label(
    source: str = typer.Argument(
        "-",
        help="Input file (plain lines, .jsonl, .csv, .arrow, .parquet; compressed is fine) or - for stdin.",
    ),
    field: str = typer.Option("text", "--field", help="JSONL field holding the text."),
    column: str = typer.Option("text", "--column", help="CSV/Arrow/Parquet column holding the text."),
    fmt: str = choice_option(
        None,
        "--format",
        "-f",
        choices=Choice(LABEL_INPUT_FORMATS),
        help="Force the input format (default: from the file's content).",
    ),
    out: Path = out_option("Write the label table to this .arrow (or .parquet) file."),
    explain: bool = typer.Option(
        False, "--explain", help="Print each text with its evidence spans highlighted."
    ),
    processes: int = typer.Option(None, "--processes", "-j", help="Worker processes (default: all cores)."),
    uncertain: str = choice_option(
        "keep",
        "--uncertain",
        choices=Choice(LABEL_UNCERTAIN),
        help="How an uncertain observation is written: keep (-1, CheXpert's coding), positive (1), negative "
        "(0), or graded: 1 when the text names it as the probable reading (likely, probable, X versus Y, "
        "borderline), 0 for a possibility (may represent, cannot exclude, concerning for).",
    ),
    lenient: bool = typer.Option(
        False, "--lenient", help="Skip malformed JSONL rows (counted) instead of failing."
    ),
    show: int = typer.Option(30, "--show", help="Rows to show in the table when not writing --out."),
    keep: list[str] = typer.Option(
        [], "--keep", help="Copy this input column/field to --out (repeatable), e.g. --keep sample_id."
    ),
    allow_empty: bool = typer.Option(
        False,
        "--allow-empty",
        help="Accept an input with no text (default: an error; --out then writes an empty table).",
    ),
) -> None:
    """Label texts with the 14 CheXpert observations (status, laterality, refusal, hedging).

    Plain-text input has one text per line ("\\n" inside a line stands for a newline).

    Examples:

      echo "Small left pleural effusion. No pneumothorax." | cxrmax label --explain

      cxrmax label answers.jsonl --field answer --out labels.arrow

      cxrmax label trajectories.arrow --column text --keep sample_id --keep model --out labels.parquet

      cxrmax label reports.csv --column report --uncertain graded --out labels.arrow
    """
    with user_errors(), interruptible("no file was written or changed; run the same command again"):
        from cxrmax.labeler.files import check_output, input_kind, iter_text_chunks

        kind = input_kind(source, fmt)
        if out is not None:
            check_output(out)
        skipped: list[str] = []
        text_field = field if kind.format in ("lines", "jsonl") else column
        chunks = iter_text_chunks(
            source, text_field, kind.format, keep=keep, lenient=lenient, skipped=skipped
        )
        first = next((chunk for chunk in chunks if chunk.texts), None)
        if first is None and not allow_empty:
            raise InputError(
                f"{source}: no text to label (0 rows{'' if kind.format == 'lines' else f' with field {text_field!r}'}); "
                "nothing written (--allow-empty accepts an empty input)"
            )
        chunks = itertools.chain([first] if first is not None else [], chunks)
        totals = _Totals()
        if out is not None:
            _label_to_file(chunks, out, keep, processes, totals, uncertain)
            console.print(f"[green]wrote[/] {out} ({totals.rows} rows)")
        elif explain:
            _explain_chunks(chunks, totals)
        else:
            _show_table(chunks, processes, show, totals, uncertain)
        console.print(totals.summary(skipped))


def _label_to_file(
    chunks: Iterable[Any],
    out: Path,
    keep: list[str],
    processes: int | None,
    totals: _Totals,
    uncertain: str = "keep",
) -> None:
    """Label every chunk into ``out`` with a progress bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from cxrmax.labeler.files import label_chunks, output_table, write_labels

    with Progress(
        TextColumn("labelling"),
        BarColumn(),
        TextColumn("{task.completed} texts"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task("label", total=None)

        def tables() -> Iterable[Any]:
            for chunk, labels in label_chunks(chunks, processes=processes, uncertain=uncertain):
                table = output_table(chunk, labels, totals.rows + 1)
                totals.add_table(labels)
                progress.update(task, advance=labels.num_rows)
                yield table

        write_labels(tables(), out, keep)


def _explain_chunks(chunks: Iterable[Any], totals: _Totals) -> None:
    """Label and print every text with its evidence highlighted."""
    from cxrmax.labeler import label_text

    for chunk in chunks:
        for text in chunk.texts:
            result = label_text(text)
            _explain(totals.rows + 1, result)
            totals.add_result(result)


def _show_table(
    chunks: Iterable[Any], processes: int | None, show: int, totals: _Totals, uncertain: str = "keep"
) -> None:
    """Label every chunk and print the first ``show`` rows as a table."""
    from rich.table import Table

    from cxrmax.core.pathologies import OBSERVATIONS
    from cxrmax.labeler.files import label_chunks

    shown: list[tuple[int, object, dict]] = []
    for chunk, labels in label_chunks(chunks, processes=processes, uncertain=uncertain):
        start = totals.rows
        totals.add_table(labels)
        if len(shown) < show:
            for offset, row in enumerate(labels.slice(0, show - len(shown)).to_pylist()):
                shown.append((start + offset + 1, chunk.texts[offset], row))
    grid = Table(title="cxrmax label", show_lines=False)
    for header in ("row", "text", "positive", "uncertain", "negative", "flags"):
        grid.add_column(header, overflow="fold")
    for number, text, row in shown:

        def names(value: int, row: dict = row) -> str:
            parts = []
            for name in OBSERVATIONS:
                if row[name] == value:
                    side = row[f"{name} laterality"]
                    parts.append(name + (f" ({side})" if side not in (None, "unspecified") else ""))
            return ", ".join(parts)

        flags = [f for f in ("refusal", "hedging") if row[f]]
        if row["error"]:
            flags.append(f"error: {row['error']}")
        preview = " ".join((text if isinstance(text, str) else repr(text)).split())
        grid.add_row(
            str(number),
            preview[:_PREVIEW_CHARS] + ("..." if len(preview) > _PREVIEW_CHARS else ""),
            f"[green]{names(1)}[/]",
            f"[yellow]{names(-1)}[/]",
            f"[red]{names(0)}[/]",
            ", ".join(flags),
        )
    console.print(grid)


def _explain(index: int, result: Any) -> None:
    """Print one text with its evidence, refusal and hedging spans highlighted, then its labels."""
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
        status = f"{label.status} ({label.certainty})" if label.certainty else label.status
        console.print(f"  [{_STATUS_STYLE.get(label.status, 'bold')}]{status:9s}[/] {name}{side}  {spans}")
    flags = [f for f, on in (("refusal", result.is_refusal), ("hedging", bool(result.hedging))) if on]
    if flags or result.error:
        console.print(
            f"  flags: {', '.join(flags) or '-'}" + (f"  error: {result.error}" if result.error else "")
        )


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("label")(label)
