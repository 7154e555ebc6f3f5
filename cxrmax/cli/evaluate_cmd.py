"""`cxrmax evaluate MODEL`: parse, call `cxrmax.evaluate.evaluate`, render the model's row beside the
sources' (registered on the root app by cxrmax.cli)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from cxrmax.cli.common import console, err_console, user_errors
from cxrmax.cli.options import emit_json, json_option, out_option, quiet_libraries, verbose_option


def evaluate(
    model: str = typer.Argument(
        ...,
        help="A merged model folder, a base model (folder or Hub id) or a LoRA adapter folder (train-apo's).",
    ),
    mimic_root: Path = typer.Option(
        ..., "--mimic-root", help="MIMIC-CXR(-JPG) root: test split, references."
    ),
    out: Path = out_option(
        "Output folder; the run goes to OUT/evaluate/<name>/. Models under OUT/trajectories/ are the sources.",
        default=...,
    ),
    sources: Path = typer.Option(
        None, "--sources", help="A generate output whose models are scored beside (default: OUT)."
    ),
    name: str = typer.Option(
        None, "--name", "-n", help="Name of the model's row (default: its folder's name or the Hub id)."
    ),
    prompt: str = typer.Option(
        "rationale",
        "--prompt",
        help="Prompt template name in pipelines/prompts/ or a file path (the sources').",
    ),
    samples: int = typer.Option(1, "--samples", min=1, help="Answers per test image."),
    temperature: float = typer.Option(
        None,
        "--temperature",
        min=0.0,
        help="Sampling temperature (default: the sources', else the roster's).",
    ),
    top_p: float = typer.Option(
        None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (default: the sources', else the roster's)."
    ),
    max_tokens: int = typer.Option(
        None, "--max-tokens", min=1, help="Answer length limit (default: the sources', else the roster's)."
    ),
    studies: int = typer.Option(None, "--studies", min=1, help="A deterministic sample of the test studies."),
    seed: int = typer.Option(0, "--seed", help="Base seed of the requests and the bootstrap."),
    image_max_edge: int = typer.Option(
        1024, "--image-max-edge", min=64, help="Downscale images so the longer edge is at most this."
    ),
    n_boot: int = typer.Option(1000, "--n-boot", min=0, help="Bootstrap resamples of the 95% intervals."),
    processes: int = typer.Option(None, "--processes", "-j", min=1, help="Labeler processes."),
    submit: str = typer.Option(
        None, "--submit", help="Put the model's results on the board under this name."
    ),
    board: Path = typer.Option(
        None,
        "--board",
        help="Leaderboard store (default $CXRMAX_LEADERBOARD or ~/.cxrmax/leaderboard.sqlite).",
    ),
    json_out: Path = json_option("the evaluation"),
    verbose: bool = verbose_option(),
) -> None:
    """Evaluate a model on the MIMIC-CXR test split: generate with the sources' prompt and sampling
    (resumable: rerun to continue), score on the rationale and label tasks with 95% intervals, and
    show its row beside the sources'.

    Examples:
      [bold]cxrmax evaluate runs/apo/apo --mimic-root /data/mimic-cxr-jpg --out runs/cxrmax[/]
      [bold]cxrmax evaluate runs/apo/apo/merged --mimic-root /data/mimic-cxr-jpg --out runs/eval --sources runs/cxrmax --submit apo-7b[/]
    """
    from cxrmax.evaluate import EvaluateOptions
    from cxrmax.evaluate import evaluate as run_evaluation
    from cxrmax.generate.progress import PlainProgress, RichProgress

    options = EvaluateOptions(
        model=model,
        mimic_root=mimic_root,
        out=out,
        name=name,
        prompt=prompt,
        samples=samples,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
        max_tokens=max_tokens,
        studies=studies,
        image_max_edge=image_max_edge,
        sources=sources,
        n_boot=n_boot,
        processes=processes,
        submit=submit,
        board=board,
    )
    quiet_display = json_out is not None and str(json_out) == "-"
    with user_errors(), quiet_libraries(verbose):
        progress = PlainProgress() if quiet_display or not sys.stderr.isatty() else RichProgress()
        try:
            result = run_evaluation(options, progress=progress)
        except KeyboardInterrupt:
            err_console.print(
                "[yellow]interrupted[/]: every answer received so far is stored; run the same command again to continue."
            )
            raise typer.Exit(130) from None
        if emit_json(json.dumps(result.to_dict(), indent=2, allow_nan=False), json_out):
            return
        _render(result)


def _render(result: Any) -> None:
    """The comparison table (the model's row first), the notes and the board entries."""
    from rich.table import Table

    rows = [row.figures() for row in result.rows]
    metrics = [m for m in _HEADERS if m in ("precision", "recall", "similarity") or any(m in r for r in rows)]
    table = Table(
        title=f"{result.model} ({result.model_kind}) on {result.images} MIMIC-CXR test images, "
        "figures over their 95% bootstrap intervals",
        caption="n: answers; prec, rec, sim: precision, recall and similarity on cxr-max-rationale (every "
        "answer); F1-14, F1-5: micro F1 on mimic-cxr-labels (first answer per study; 14 or the 5 "
        "competition labels)",
    )
    table.add_column("model", no_wrap=True)
    table.add_column("n", justify="right")
    for metric in metrics:
        table.add_column(_HEADERS[metric], justify="right", no_wrap=True, min_width=9)
    for row in rows:
        style = "bold" if row["kind"] == "evaluated" else None
        cells = [_cell(row, metric) for metric in metrics]
        label = escape(row["model"]) + ("" if row["kind"] == "evaluated" else " (source)")
        table.add_row(label, str(row["answers"]), *cells, style=style)
    console.print(table)
    stats = result.generation
    console.print(
        f"answered now {stats.done}, already done {stats.already_done}, failed {stats.failed}; "
        f"sampling {json.dumps(result.sampling)}"
    )
    for note in result.notes:
        console.print(f"[dim]{escape(note)}[/]")
    for task, entry in result.submitted.items():
        console.print(f"[green]submitted[/] to {task} as entry {entry}")
    console.print(f"results in {result.folder}")


#: The table's figures and their headers, in order.
_HEADERS = {
    "precision": "prec",
    "recall": "rec",
    "similarity": "sim",
    "micro_f1_14": "F1-14",
    "micro_f1_5": "F1-5",
}


def _cell(row: dict[str, Any], metric: str) -> str:
    """A figure with its interval on the line below (narrow columns fit 80 terminal columns)."""
    value = row.get(metric)
    if value is None:
        return "n/a"
    interval = row["ci"].get(metric)
    return f"{value:.2f}\n{interval[0]:.2f}-{interval[1]:.2f}" if interval else f"{value:.2f}"


def register(app: typer.Typer) -> None:
    """Add this area's command to the root app."""
    app.command("evaluate")(evaluate)
