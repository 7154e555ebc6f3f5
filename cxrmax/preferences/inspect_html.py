"""One sample of a build-preferences output as a self-contained HTML page (`cxrmax inspect --html`).

The page needs nothing but itself: the style is inline, the film is embedded as a data URL, there
is no script. Every text on it (answers, model names, prompts, the report, paths) is untrusted, so
each is escaped with `html.escape` (quotes included) before it is placed in the page; marks are
``<mark class="drift KIND" data-kind="KIND" data-observation="...">`` elements around escaped text.
"""

from __future__ import annotations

import html
import os
from pathlib import Path

from cxrmax.core.io import atomic_write_text
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.preferences.inspect import MARK_KINDS, SampleView, SourceAnswer

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 1.5em auto; max-width: 72em; color: #1d1d1f; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
.film img { max-width: 28em; max-height: 28em; border: 1px solid #ccc; }
.answer { white-space: pre-wrap; background: #fafafa; border: 1px solid #e3e3e3; padding: .6em .8em; }
.meta { color: #555; font-size: .92em; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: .2em .6em; text-align: left; }
mark.drift { border-radius: 3px; padding: 0 .1em; }
mark.hallucinated { background: #ffc9c9; } mark.contradicted { background: #ffd8a8; }
mark.side-swapped { background: #a5d8ff; } mark.refusal { background: #dee2e6; }
.legend mark { margin-right: .8em; }
"""

_LABEL_WORDS = {1.0: "positive", 0.0: "negative", -1.0: "uncertain"}


def _e(value: object) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.3f}"


def _marked(answer: SourceAnswer) -> str:
    """The answer's text, escaped, with each drift span wrapped in a <mark>."""
    if answer.text is None:
        return '<span class="meta">(the text is not kept in the outputs)</span>'
    pieces = []
    for piece, marks in answer.segments():
        text = _e(piece)
        for mark in marks:
            title = mark.kind if mark.observation is None else f"{mark.kind}: {mark.observation}"
            text = (
                f'<mark class="drift {mark.kind}" data-kind="{mark.kind}" '
                f'data-observation="{_e(mark.observation or "")}" title="{_e(title)}">{text}</mark>'
            )
        pieces.append(text)
    return "".join(pieces)


def _labels_text(labels: dict[str, float | None], sides: dict[str, str | None] | None = None) -> str:
    parts = []
    for name in OBSERVATIONS:
        value = labels.get(name)
        if value is None:
            continue
        side = (sides or {}).get(name)
        parts.append(f"{name} {_LABEL_WORDS.get(value, value)}" + (f" ({side})" if side else ""))
    return "; ".join(parts) or "none"


def _source_section(answer: SourceAnswer) -> str:
    rank = "not a negative" if answer.negative_rank is None else f"negative #{answer.negative_rank + 1}"
    flags = [f for f, on in (("refusal", answer.refusal), ("cut at max_tokens", answer.truncated)) if on]
    findings = [
        f"{label}: {_e(', '.join(names))}"
        for label, names in (
            ("hallucinated", answer.hallucinated),
            ("contradicted", answer.contradicted),
            ("side-swapped", answer.side_swapped),
            ("omitted", answer.omitted),
        )
        if names
    ]
    return (
        f'<section class="source" data-source="{_e(answer.name)}">'
        f"<h3>{_e(answer.name)}</h3>"
        f'<p class="meta">drift from the consensus {_fmt(answer.drift)}; {rank}'
        + (f"; {_e(', '.join(flags))}" if flags else "")
        + "</p>"
        + (f'<p class="meta">{"; ".join(findings)}</p>' if findings else "")
        + f'<div class="answer">{_marked(answer)}</div></section>'
    )


def _film_section(view: SampleView) -> str:
    url = view.film.data_url()
    path = f'<p class="meta">film: <code>{_e(view.film.path)}</code></p>'
    if url is None:
        return path + f'<p class="meta">(no image shown: {_e(view.film.problem)})</p>'
    return path + f'<div class="film"><img alt="film of {_e(view.sample_id)}" src="{url}"></div>'


def _negatives_table(view: SampleView) -> str:
    if not view.negatives:
        return f'<p class="meta">no preference row: {_e(view.no_preference_reason)}</p>'
    rows = "".join(
        f"<tr><td>{n.rank + 1}</td><td>{_e(n.name)}</td><td>{_fmt(n.drift)}</td></tr>" for n in view.negatives
    )
    return '<table class="negatives"><tr><th>rank</th><th>source</th><th>drift</th></tr>' + rows + "</table>"


def render_html(view: SampleView) -> str:
    """The page of one sample (see the module docstring)."""
    legend = "".join(f'<mark class="drift {k}">{k}</mark>' for k in MARK_KINDS)
    consensus = (
        f'<div class="answer consensus">{_e(view.consensus)}</div>'
        if view.consensus is not None
        else f'<p class="meta">none: {_e(view.no_preference_reason)}</p>'
    )
    report = (
        f'<div class="answer report">{_e(view.report)}</div>'
        if view.report
        else f'<p class="meta">none: {_e(view.report_note)}</p>'
    )
    flagged = " (flagged: its re-labelled text disagrees with the vote)" if view.consensus_flagged else ""
    body = [
        f"<h1>Sample {_e(view.sample_id)}</h1>",
        f'<p class="meta">split {_e(view.split)}; subject {_e(view.subject_id)}, study {_e(view.study_id)}; '
        f"sample drift score {_fmt(view.drift_score)}; laterality conflicts: "
        f"{_e(', '.join(view.laterality_conflicts) or 'none')}; output {_e(view.out)}</p>",
        "<h2>Film</h2>",
        _film_section(view),
        "<h2>Prompt</h2>",
        f'<div class="answer">{_e(view.prompt)}</div>',
        "<h2>Consensus positive</h2>",
        f'<p class="meta">{_e(view.consensus_source or "")}{flagged}; consensus labels: '
        f"{_e(_labels_text(view.consensus_labels, view.consensus_laterality))}</p>",
        consensus,
        "<h2>Ranked negatives</h2>",
        _negatives_table(view),
        "<h2>Sources</h2>",
        f'<p class="legend">marked against the consensus: {legend}</p>',
        *(_source_section(answer) for answer in view.sources),
        "<h2>Reference report</h2>",
        f'<p class="meta">ground truth: {_e(_labels_text(view.ground_truth))}</p>',
        report,
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>cxrmax inspect {_e(view.sample_id)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def write_html(view: SampleView, path: str | os.PathLike) -> Path:
    """Write the page of `view` to `path` atomically; returns the path."""
    return atomic_write_text(path, render_html(view))
