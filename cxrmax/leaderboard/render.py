"""Showing scores and boards: rich tables for the terminal, and Markdown / CSV / HTML exports (the
HTML is one static page whose tables sort on a header click, with the script inline)."""

from __future__ import annotations

import csv
import html
import io
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from cxrmax.core.terminal import markup_safe, visible
from cxrmax.leaderboard import fingerprint
from cxrmax.leaderboard.fingerprint import short
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
        f"[bold]{markup_safe(result.task)}[/] v{markup_safe(result.task_version)}  submission {markup_safe(result.submission)} "
        f"({result.format}, sha256 {result.sha256[:12]})"
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
    fp = result.fingerprint or {}
    if fp:
        console.print(
            f"fingerprint {short(fp.get('id'))}: references {short(fp.get('reference_sha256')) or 'none'} "
            f"({fp.get('reference_origin')}), metrics {fp.get('metric_version')}"
        )
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
                markup_safe(model),
                str(row["n"]),
                *(fmt(row.get(c)) for c in ("precision", "recall", "similarity", "label_jaccard")),
            )
        console.print(models)
    for note in result.notes:
        console.print(f"[dim]note:[/] {markup_safe(note)}")


#: Row groups of a board table, in display order: ranked entries; entries scored against the
#: official references but not comparable (coverage, policy, task version...), unranked; entries
#: scored against other or unknown references; the published rows.
GROUPS = ("ranked", "unranked", "other-references", "published")
GROUP_TITLES = {
    "ranked": "ranked",
    "unranked": "scored, not ranked",
    "other-references": "scored against other references, not ranked",
    "published": "published, not re-scored",
}


def _reference_reason(entry: Any, official: str | None) -> str:
    """Why an entry's references are not the task's official ones ('' when they are)."""
    if not entry.fingerprint:
        return "other/unknown references: stored before fingerprints"
    if not entry.reference_sha256:  # e.g. rationales scored on the trajectories' own labels
        return "unknown references: none given"
    if official is None:
        return "the board has no official references yet"
    if entry.reference_sha256 != official:
        return f"references {short(entry.reference_sha256)}, official {short(official)}"
    return ""


def _not_comparable(entry: Any, task: Task, official_fp: dict[str, Any] | None) -> str:
    """Why an entry scored against the official references is not ranked ('' when it is)."""
    why = []
    if entry.task_version != task.version:
        why.append(f"task v{entry.task_version}")
    if entry.uncertain not in (fingerprint.ranked_policy(task), "n/a"):
        why.append(f"uncertain={entry.uncertain}")
    section = entry.result.get("extra", {}).get("reference_section")
    if task.kind == "report" and section and section != task.reference_section:
        why.append(f"section={section}")
    metric_version = entry.fingerprint_parts.get("metric_version")
    if metric_version and metric_version != fingerprint.METRIC_VERSIONS[task.kind]:
        why.append(f"metrics {metric_version}")
    if not why and official_fp is not None and entry.fingerprint != official_fp["id"]:
        why.append(f"fingerprint {short(entry.fingerprint)}")
    if entry.coverage is not None and entry.coverage < task.min_coverage - 1e-12:
        why.append(f"coverage {entry.coverage:.3f} < {task.min_coverage:.3f}")
    return ", ".join(why)


def _ci_text(entry: Any, metric: str) -> str:
    low_high = entry.ci.get(metric)
    return f"[{low_high[0]:.4f}, {low_high[1]:.4f}]" if low_high else ""


def board_table(
    board: Any, task: str | Task, include_published: bool = True
) -> tuple[list[str], list[dict[str, Any]]]:
    """Rows of one task's board, the one source of `show` and the md / csv / html exports.

    Groups, never interleaved (row key ``group``): entries with the task's official fingerprint and
    enough coverage, ranked by the primary metric; entries scored against the official references
    but not comparable, with the reason; entries scored against other or unknown references; then
    the published rows, sorted by the primary metric. Each row has its coverage, short fingerprint
    and the primary metric's 95% CI; published rows carry their citation in ``citation`` (rendered
    once per table). Returns (columns, rows)."""
    task = get_task(task)
    metrics = list(task.headline)
    official, _ = board.official_references(task)
    official_fp = fingerprint.official(task, official) if official else None
    grouped: dict[str, list[tuple[Any, str]]] = {group: [] for group in GROUPS}
    for entry in board.ranked(task.name, task.higher_is_better):
        reference_reason = _reference_reason(entry, official)
        if reference_reason:
            grouped["other-references"].append((entry, f"scored against {reference_reason}; not ranked"))
            continue
        reason = _not_comparable(entry, task, official_fp)
        if reason:
            grouped["unranked"].append((entry, f"scored ({reason}; not ranked)"))
        else:
            grouped["ranked"].append((entry, "scored"))
    rows: list[dict[str, Any]] = []
    for group in ("ranked", "unranked", "other-references"):
        for rank, (entry, source) in enumerate(grouped[group], start=1):
            rows += _entry_rows(entry, task, metrics, group, rank if group == "ranked" else "", source)
    if include_published:
        rows += _published_table_rows(task, metrics)
    columns = [
        "rank",
        "name",
        "source",
        *metrics,
        "ci_95",
        "coverage",
        "fingerprint",
        "uncertain",
        "task_version",
        "submitted",
    ]
    return columns, rows


def _entry_rows(
    entry: Any, task: Task, metrics: list[str], group: str, rank: Any, source: str
) -> list[dict[str, Any]]:
    """One entry's row (and, for rationales, one row per model under it)."""
    base = {
        "group": group,
        "rank": rank,
        "name": entry.name,
        "source": source,
        "ci_95": _ci_text(entry, task.primary_metric),
        "coverage": entry.coverage,
        "fingerprint": short(entry.fingerprint) or "unknown",
        "uncertain": entry.uncertain,
        "task_version": entry.task_version,
        "submitted": entry.created_at,
        "citation": "",
    }
    rows = [{**base, **{m: entry.metrics.get(m) for m in metrics}}]
    if task.kind == "rationale":
        for model, values in entry.result.get("per_model", {}).items():
            ci = (values.get("ci") or {}).get(task.primary_metric)
            rows.append(
                {
                    **base,
                    "rank": "",
                    "name": f"  {entry.name} / {model}",
                    "ci_95": f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ci and None not in ci else "",
                    "coverage": None,
                    **{m: values.get(m) for m in metrics},
                }
            )
    return rows


def _published_table_rows(task: Task, metrics: list[str]) -> list[dict[str, Any]]:
    """The published rows, best first by the primary metric (rows without it last, then by name)."""
    sign = -1 if task.higher_is_better else 1
    published = sorted(
        published_rows(task),
        key=lambda r: (
            r.metrics.get(task.primary_metric) is None,
            sign * r.metrics.get(task.primary_metric, 0.0),
            r.name,
        ),
    )
    rows = []
    for row in published:
        rows.append(
            {
                "group": "published",
                "rank": "",
                "name": row.name,
                "source": row.note,
                "ci_95": "",
                "coverage": None,
                "fingerprint": "",
                "uncertain": "",
                "task_version": "",
                "submitted": "",
                "citation": row.source,
                **{m: row.metrics.get(m) for m in metrics},
            }
        )
    return rows


def citations(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The distinct citations of a table's published rows, in order (each printed once)."""
    return list(dict.fromkeys(r["citation"] for r in rows if r.get("citation")))


def render_board(board: Any, task: str | Task, console: Console) -> None:
    """Print one task's board with rich: the same rows and columns as the exports (rank, status with
    the reason for unranked entries, headline metrics, CI, coverage, fingerprint), one section per
    group, the citation of the published rows once in the caption."""
    task = get_task(task)
    columns, rows = board_table(board, task)
    cited = citations(rows)
    caption = markup_safe("; ".join(f"* published, not re-scored: {s}" for s in cited)) or None
    _, origin = board.official_references(task)
    table = Table(
        title=markup_safe(
            f"{task.name} v{task.version}, ranked by {task.primary_metric} (official references: {origin})"
        ),
        caption=caption,
    )
    shown = [c for c in columns if c not in ("task_version", "submitted")]
    if task.kind == "ms-cxr-t":
        shown.remove("uncertain")
    for column in shown:
        numeric = column in task.headline or column == "coverage"
        table.add_column(
            _SHORT.get(column, column),
            justify="right" if numeric else "left",
            no_wrap=column not in ("name", "source"),
            min_width=5 if numeric else (12 if column in ("name", "source") else None),
        )
    previous = None
    for row in rows:
        if previous is not None and row["group"] != previous:
            table.add_section()
        previous = row["group"]
        published = row["group"] == "published"
        cells = []
        for column in shown:
            value = row[column]
            if column == "name" and published:
                value = f"{value} *"
            cells.append(markup_safe(fmt(value, 3)))
        table.add_row(*cells, style="dim italic" if published else None)
    _print_wide(console, table)
    if not any(r["group"] != "published" for r in rows):
        console.print("[dim]no scored entries yet: `cxrmax leaderboard submit ...` adds one[/]")


def _print_wide(console: Console, table: Table) -> None:
    """Print a table; off a terminal (a pipe, a log) at its natural width, where rich would squeeze
    it into 80 columns and cut names and reasons short."""
    if console.is_terminal:
        console.print(table)
        return
    width = Measurement.get(console, console.options.update(max_width=100_000), table).maximum
    buffer = io.StringIO()
    Console(file=buffer, width=max(width, console.width), color_system=None).print(table)
    console.out(buffer.getvalue().rstrip("\n"), highlight=False)


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
    "source": "status",
    "ci_95": "95% CI",
    "fingerprint": "fp",
}


def _groups(rows: Sequence[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Rows split into their groups, in `GROUPS` order (empty groups left out)."""
    return [
        (g, [r for r in rows if r.get("group") == g])
        for g in GROUPS
        if any(r.get("group") == g for r in rows)
    ]


def to_markdown(sections: Sequence[tuple[str, list[str], list[dict[str, Any]]]]) -> str:
    """Markdown: one heading per task, one pipe table per row group under a bold group title, the
    published rows' citation once after their table."""
    out = ["# cxrmax leaderboard", ""]
    for title, columns, rows in sections:
        out += [f"## {title}", ""]
        for group, group_rows in _groups(rows):
            out += [f"**{GROUP_TITLES[group]}**", ""]
            out += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            for row in group_rows:
                out.append(
                    "| " + " | ".join(visible(fmt(row[c])).replace("|", "\\|") for c in columns) + " |"
                )
            out.append("")
            for source in citations(group_rows):
                out += [f"Published rows (not re-scored) from: {source}", ""]
    return "\n".join(out)


def to_csv(sections: Sequence[tuple[str, list[str], list[dict[str, Any]]]]) -> str:
    """CSV: one table with leading task and group columns (union of all tasks' columns); the
    citation column is filled once per task, on its first published row."""
    all_columns: list[str] = []
    for _, columns, _ in sections:
        all_columns += [c for c in columns if c not in all_columns]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["task", "group", *all_columns, "citation"])
    for title, _, rows in sections:
        cited: set[str] = set()
        for row in rows:
            citation = row.get("citation") or ""
            first = citation and citation not in cited
            cited.add(citation)
            writer.writerow(
                [
                    title,
                    row.get("group", ""),
                    *("" if row.get(c) is None else row.get(c) for c in all_columns),
                    citation if first else "",
                ]
            )
    return buffer.getvalue()


_SORT_SCRIPT = """
document.querySelectorAll("table.board").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      // Each row group is its own tbody and sorts within itself: groups never interleave.
      Array.prototype.forEach.call(table.tBodies, function (body) { sortBody(body, col, th); });
    });
  });
});
function sortBody(body, col, th) {
      var rows = Array.prototype.slice.call(body.rows);
      var asc = th.getAttribute("data-order") !== "asc";
      if (body === body.parentNode.tBodies[body.parentNode.tBodies.length - 1]) {
        body.parentNode.querySelectorAll("th").forEach(function (h) { h.removeAttribute("data-order"); });
        th.setAttribute("data-order", asc ? "asc" : "desc");
      }
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute("data-value"), y = b.cells[col].getAttribute("data-value");
        var nx = parseFloat(x), ny = parseFloat(y);
        var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : (x || "").localeCompare(y || "");
        if (x === "" && y !== "") return 1;
        if (y === "" && x !== "") return -1;
        return asc ? cmp : -cmp;
      });
      rows.forEach(function (r) { body.appendChild(r); });
}
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
        "th[data-order=desc]::after{content:' \\25BC'}tbody+tbody{border-top:3px solid #888}"
        "tbody.group-other-references td{color:#844}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Each table has up to four groups, never interleaved: ranked entries (the task's official "
        "fingerprint and coverage), entries not ranked (the reason in <em>source</em>), entries scored "
        "against other references, and rows <em>published, not re-scored</em> (copied from the papers). "
        "Click a header to sort within each group.</p>",
    ]
    for section_title, columns, rows in sections:
        parts.append(f"<h2>{html.escape(section_title)}</h2>")
        parts.append(
            '<table class="board"><thead><tr>'
            + "".join(f"<th>{html.escape(c)}</th>" for c in columns)
            + "</tr></thead>"
        )
        for group, group_rows in _groups(rows):
            parts.append(f'<tbody class="group-{group}" title="{html.escape(GROUP_TITLES[group])}">')
            css = ' class="published"' if group == "published" else ""
            for row in group_rows:
                cells = []
                for c in columns:
                    value = row.get(c)
                    raw = "" if value is None else str(value)
                    cells.append(
                        f'<td data-value="{html.escape(raw, quote=True)}">{html.escape(fmt(value))}</td>'
                    )
                parts.append(f"<tr{css}>" + "".join(cells) + "</tr>")
            parts.append("</tbody>")
        parts.append("</table>")
        for source in citations(rows):
            parts.append(
                f'<p class="citation">Published rows (not re-scored) from: {html.escape(source)}</p>'
            )
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
