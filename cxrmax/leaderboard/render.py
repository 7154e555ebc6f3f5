"""Showing scores and boards: rich tables for the terminal, and Markdown / CSV / HTML exports (the
HTML is one static page whose tables sort on a header click, with the script inline)."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from cxrmax.leaderboard.tasks import Task, get_task, list_tasks, published_rows

POLICY_TEXT = {
    "positive": "uncertain (-1) counts as positive, blank as negative",
    "negative": "uncertain (-1) counts as negative, blank as negative",
    "ignore": "cells uncertain in the reference or the prediction are left out, blank as negative",
    "n/a": "not applicable to this task",
}


def fmt(value: Any, digits: int = 4) -> str:
    """A metric value for display ('-' for missing)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def policy_line(policy: str) -> str:
    """The uncertain-policy sentence printed with every result."""
    return f"uncertain policy: {policy} ({POLICY_TEXT.get(policy, policy)})"


def render_score(result: Any, console: Console) -> None:
    """Print a ScoreResult: provenance, policy, coverage, headline with CIs, breakdowns and notes."""
    console.print(
        f"[bold]{result.task}[/] v{result.task_version}  submission {result.submission} ({result.format}, sha256 {result.sha256[:12]})"
    )
    console.print(policy_line(result.uncertain))
    coverage = (
        f"coverage: {result.n_scored}/{result.n_references} reference studies ({100 * result.coverage:.1f}%)"
    )
    if result.missing:
        coverage += f", {result.missing} missing"
    if result.skipped_unknown:
        coverage += f", {result.skipped_unknown} rows skipped (unknown study or no ground truth)"
    console.print(coverage + f"; input: {result.input_kind}")
    table = Table(title="headline" + (f" (95% bootstrap CI, {result.n_boot} resamples)" if result.ci else ""))
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    for metric, value in result.headline.items():
        low_high = result.ci.get(metric)
        ci = f"[{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else ""
        style = "bold" if metric == result.primary_metric else None
        table.add_row(metric, fmt(value), ci, style=style)
    console.print(table)
    if result.per_observation:
        obs = Table(title="per observation" + (" (clinical efficacy)" if result.kind == "report" else ""))
        for column in ("observation", "n", "support", "accuracy", "precision", "recall", "f1", "auroc"):
            header = {"accuracy": "acc", "precision": "prec", "recall": "rec", "support": "pos"}.get(
                column, column
            )
            obs.add_column(
                header,
                justify="left" if column == "observation" else "right",
                no_wrap=True,
                min_width=5 if column != "observation" else None,
            )
        for row in result.per_observation:
            obs.add_row(
                *(
                    fmt(row[c], 3)
                    for c in ("observation", "n", "support", "accuracy", "precision", "recall", "f1", "auroc")
                )
            )
        console.print(obs)
    if result.per_finding:
        findings = Table(title="per finding (top-1 accuracy)")
        for column in ("finding", "n", "accuracy"):
            findings.add_column(column)
        for row in result.per_finding:
            findings.add_row(row["finding"], str(row["n"]), fmt(row["accuracy"]))
        console.print(findings)
    if result.per_model:
        models = Table(title="per model")
        for column in ("model", "n", "precision", "recall", "similarity", "label_jaccard"):
            models.add_column(column, justify="left" if column == "model" else "right")
        for model, row in result.per_model.items():
            models.add_row(
                model,
                str(row["n"]),
                *(fmt(row.get(c)) for c in ("precision", "recall", "similarity", "label_jaccard")),
            )
        console.print(models)
    for note in result.notes:
        console.print(f"[dim]note:[/] {note}")


#: The uncertain policy under which a board ranks entries (others are listed, unranked).
RANKED_POLICY = "positive"


def _not_comparable(entry: Any, task: Task) -> str:
    """Why an entry is not ranked with the task's board ('' when it is)."""
    why = []
    if entry.task_version != task.version:
        why.append(f"task v{entry.task_version}")
    if entry.uncertain not in (RANKED_POLICY, "n/a"):
        why.append(f"uncertain={entry.uncertain}")
    section = entry.result.get("extra", {}).get("reference_section")
    if task.kind == "report" and section and section != task.reference_section:
        why.append(f"section={section}")
    return ", ".join(why)


def board_table(
    board: Any, task: str | Task, include_published: bool = True
) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of one task's board: scored entries ranked by the primary metric, then the published
    reference rows marked "published, not re-scored". Returns (columns, rows)."""
    task = get_task(task)
    metrics = list(task.headline)
    entries = board.ranked(task.name, task.higher_is_better)
    # Only like-for-like entries are ranked: the current task version, the default uncertain policy
    # and the task's reference section. The others follow, unranked, with the reason.
    reasons = {e.id: _not_comparable(e, task) for e in entries}
    ranked = [e for e in entries if not reasons[e.id]]
    others = [e for e in entries if reasons[e.id]]
    rows: list[dict[str, Any]] = []
    for rank, entry in [(i, e) for i, e in enumerate(ranked, start=1)] + [("", e) for e in others]:
        row = {
            "rank": rank,
            "name": entry.name,
            "source": f"scored ({reasons[entry.id]}; not ranked)" if reasons[entry.id] else "scored",
            "task_version": entry.task_version,
            "uncertain": entry.uncertain,
            "coverage": entry.coverage,
            "submitted": entry.created_at,
        }
        row.update({m: entry.metrics.get(m) for m in metrics})
        rows.append(row)
        if task.kind == "rationale":
            for model, values in entry.result.get("per_model", {}).items():
                sub = {
                    "rank": "",
                    "name": f"  {entry.name} / {model}",
                    "source": "scored",
                    "task_version": entry.task_version,
                    "uncertain": entry.uncertain,
                    "coverage": None,
                    "submitted": entry.created_at,
                }
                sub.update({m: values.get(m) for m in metrics})
                rows.append(sub)
    if include_published:
        for published in published_rows(task):
            row = {
                "rank": "",
                "name": published.name,
                "source": published.note,
                "task_version": "",
                "uncertain": "",
                "coverage": None,
                "submitted": published.source,
            }
            row.update({m: published.metrics.get(m) for m in metrics})
            rows.append(row)
    columns = ["rank", "name", "source", *metrics, "coverage", "uncertain", "task_version", "submitted"]
    return columns, rows


def render_board(board: Any, task: str | Task, console: Console) -> None:
    """Print one task's board with rich: a compact table (rank, name, scored/published, headline
    metrics, coverage, policy); the published rows' source goes in the caption."""
    task = get_task(task)
    columns, rows = board_table(board, task)
    sources = sorted(
        {r["submitted"] for r in rows if not r["source"].startswith("scored") and r["submitted"]}
    )
    caption = "; ".join(f"* published, not re-scored: {s}" for s in sources) or None
    table = Table(title=f"{task.name} v{task.version}, ranked by {task.primary_metric}", caption=caption)
    shown = ["rank", "name", *task.headline, "coverage"] + (["uncertain"] if task.kind != "ms-cxr-t" else [])
    for column in shown:
        numeric = column in task.headline or column == "coverage"
        table.add_column(
            _SHORT.get(column, column),
            justify="right" if numeric else "left",
            no_wrap=column != "name",
            min_width=5 if numeric else (12 if column == "name" else None),
        )
    for row in rows:
        published = not row["source"].startswith("scored")
        cells = []
        for column in shown:
            value = row[column]
            if column == "name" and published:
                value = f"{value} *"
            cells.append(fmt(value, 3))
        table.add_row(*cells, style="dim italic" if published else None)
    console.print(table)
    if not any(r["source"].startswith("scored") for r in rows):
        console.print("[dim]no scored entries yet: `cxrmax leaderboard submit ...` adds one[/]")


_SHORT = {
    "consolidation": "Con",
    "pleural_effusion": "PE",
    "pneumonia": "Pna",
    "pneumothorax": "Pnx",
    "edema": "Ede",
    "avg": "Avg",
    "micro_f1_14": "microF1-14",
    "macro_f1_14": "macroF1-14",
    "micro_f1_5": "microF1-5",
    "macro_f1_5": "macroF1-5",
    "ce_micro_f1_14": "CE-F1-14",
    "ce_micro_f1_5": "CE-F1-5",
    "coverage": "cov",
}


def to_markdown(sections: Sequence[tuple[str, list[str], list[dict[str, Any]]]]) -> str:
    """Markdown: one heading and pipe table per task."""
    out = ["# cxrmax leaderboard", ""]
    for title, columns, rows in sections:
        out += [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for row in rows:
            out.append("| " + " | ".join(fmt(row[c]).replace("|", "\\|") for c in columns) + " |")
        out.append("")
    return "\n".join(out)


def to_csv(sections: Sequence[tuple[str, list[str], list[dict[str, Any]]]]) -> str:
    """CSV: one table with a leading task column (union of all tasks' columns)."""
    all_columns: list[str] = []
    for _, columns, _ in sections:
        all_columns += [c for c in columns if c not in all_columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", *all_columns])
    for title, _, rows in sections:
        for row in rows:
            writer.writerow([title, *("" if row.get(c) is None else row.get(c) for c in all_columns)])
    return buffer.getvalue()


_SORT_SCRIPT = """
document.querySelectorAll("table.board").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute("data-order") !== "asc";
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
      th.setAttribute("data-order", asc ? "asc" : "desc");
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute("data-value"), y = b.cells[col].getAttribute("data-value");
        var nx = parseFloat(x), ny = parseFloat(y);
        var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : (x || "").localeCompare(y || "");
        if (x === "" && y !== "") return 1;
        if (y === "" && x !== "") return -1;
        return asc ? cmp : -cmp;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def to_html(
    sections: Sequence[tuple[str, list[str], list[dict[str, Any]]]], title: str = "cxrmax leaderboard"
) -> str:
    """A single static HTML page; each task's table sorts by a click on a column header (inline JS,
    no external resources). Published rows are marked and styled apart."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:2em}"
        "th,td{border:1px solid #ccc;padding:4px 8px}th{cursor:pointer;background:#f0f0f0}"
        "tr.published td{color:#666;font-style:italic}th[data-order=asc]::after{content:' \\25B2'}"
        "th[data-order=desc]::after{content:' \\25BC'}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Rows marked <em>published, not re-scored</em> are copied from the papers; click a header to sort.</p>",
    ]
    for section_title, columns, rows in sections:
        parts.append(f"<h2>{html.escape(section_title)}</h2>")
        parts.append(
            '<table class="board"><thead><tr>'
            + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
            + "</tr></thead><tbody>"
        )
        for row in rows:
            css = "" if str(row.get("source", "")).startswith("scored") else ' class="published"'
            cells = []
            for c in columns:
                value = row.get(c)
                raw = "" if value is None else str(value)
                cells.append(
                    f'<td data-value="{html.escape(raw, quote=True)}">{html.escape(fmt(value))}</td>'
                )
            parts.append(f"<tr{css}>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
    parts.append(f"<script>{_SORT_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def export_board(board: Any, fmt_name: str, tasks: Sequence[str] | None = None) -> str:
    """The board (all tasks, or the given ones) as md | csv | html text."""
    names = list(tasks) if tasks else sorted(list_tasks())
    sections = []
    for name in names:
        task = get_task(name)
        columns, rows = board_table(board, task)
        sections.append((f"{task.name} v{task.version}", columns, rows))
    if fmt_name == "md":
        return to_markdown(sections)
    if fmt_name == "csv":
        return to_csv(sections)
    if fmt_name == "html":
        return to_html(sections)
    raise ValueError(f"unknown export format {fmt_name!r}; use md, csv or html")
