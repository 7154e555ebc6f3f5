"""`cxrmax inspect OUT --sample ID [--html FILE]`: one sample of a build-preferences output, whole
(library: cxrmax.preferences.inspect; this module parses, calls and renders with rich)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape
from rich.text import Text

from cxrmax.cli.common import console, user_errors

if TYPE_CHECKING:  # the library imports the labeler and MIMIC-CXR reader: only when the command runs
    from cxrmax.preferences.inspect import SampleView, SourceAnswer

#: rich styles of the drift marks (the HTML page uses the same colours).
_MARK_STYLES = {
    "hallucinated": "black on #ffc9c9",
    "contradicted": "black on #ffd8a8",
    "side-swapped": "black on #a5d8ff",
    "refusal": "black on #dee2e6",
}


def _inspect(
    out: Path = typer.Argument(..., help="A build-preferences output folder."),
    sample: str = typer.Option(..., "--sample", help="The sample id (dicom_id) to show."),
    html: Path | None = typer.Option(
        None, "--html", help="Also write the sample as a self-contained HTML page (film embedded) here."
    ),
    mimic_root: Path | None = typer.Option(
        None,
        "--mimic-root",
        help="MIMIC-CXR root for the film and the report (default: the build's --mimic-root).",
    ),
) -> None:
    """Show one sample whole: the film, each source's answer with its drift marked (hallucinated,
    contradicted, side-swapped findings, refusals), the consensus positive, the ranked negatives
    and the reference report.

    Example: cxrmax inspect runs/cxrmax --sample 0a1b2c3d --html sample.html
    """
    from cxrmax.preferences.inspect import inspect_sample
    from cxrmax.preferences.inspect_html import write_html

    with user_errors():
        view = inspect_sample(out, sample, image_root=mimic_root)
        _render(view)
        if html is not None:
            console.print(f"page: {escape(str(write_html(view, html)))}")


def _marked_text(answer: SourceAnswer) -> Text:
    """The answer as rich Text with the drift spans styled (no markup parsing: answers are untrusted)."""
    text = Text()
    if answer.text is None:
        text.append("(the text is not kept in the outputs)", style="dim")
        return text
    for piece, marks in answer.segments():
        text.append(piece, style=_MARK_STYLES[marks[0].kind] if marks else "")
    return text


def _heading(title: str) -> None:
    """A section title (the texts below it print unframed: off a terminal they never wrap, see
    core.terminal, so a frame would crop them)."""
    console.print()
    console.print(Text(title, style="bold underline"))


def _render_source(answer: SourceAnswer) -> None:
    rank = "not a negative" if answer.negative_rank is None else f"negative #{answer.negative_rank + 1}"
    drift = "n/a" if answer.drift is None else f"{answer.drift:.3f}"
    notes = [f"drift {drift}", rank] + [
        f for f, on in (("refusal", answer.refusal), ("cut at max_tokens", answer.truncated)) if on
    ]
    for label, names in (
        ("hallucinated", answer.hallucinated),
        ("contradicted", answer.contradicted),
        ("side-swapped", answer.side_swapped),
        ("omitted", answer.omitted),
    ):
        if names:
            notes.append(f"{label}: {', '.join(names)}")
    _heading(answer.name)
    console.print(Text("; ".join(notes), style="dim"))
    console.print(_marked_text(answer))


def _render(view: SampleView) -> None:
    """The sample in the terminal: header, film, consensus, negatives, sources, report."""
    from rich.table import Table

    console.rule(f"sample {escape(view.sample_id)}")
    score = "n/a" if view.drift_score is None else f"{view.drift_score:.3f}"
    console.print(
        f"split {escape(str(view.split))}; subject {view.subject_id}, study {view.study_id}; sample drift score "
        f"{score}; laterality conflicts: {escape(', '.join(view.laterality_conflicts) or 'none')}"
    )
    film = view.film.resolved or f"{view.film.path} ({view.film.problem})"
    console.print(f"film: {escape(str(film))}")
    legend = Text("marks vs the consensus: ")
    for kind, style in _MARK_STYLES.items():
        legend.append(f" {kind} ", style=style).append(" ")
    console.print(legend)
    flagged = " (flagged: its re-labelled text disagrees with the vote)" if view.consensus_flagged else ""
    _heading(f"consensus positive{flagged}")
    if view.consensus is not None:
        console.print(Text(view.consensus))
    else:
        console.print(Text(f"none: {view.no_preference_reason}", style="dim"))
    if view.negatives:
        _heading("ranked negatives (most drifting first)")
        table = Table()
        table.add_column("rank", justify="right")
        table.add_column("source")
        table.add_column("drift", justify="right")
        for n in view.negatives:
            table.add_row(str(n.rank + 1), Text(n.name), "n/a" if n.drift is None else f"{n.drift:.3f}")
        console.print(table)
    for answer in view.sources:
        _render_source(answer)
    _heading("reference report")
    console.print(Text(view.report) if view.report else Text(f"none: {view.report_note}", style="dim"))


def register(app: typer.Typer) -> None:
    """Add this area's command to the root app."""
    app.command("inspect")(_inspect)
