"""CLI commands for the preferences area (registered on the root app by cxrmax.cli):
`cxrmax build-preferences` and `cxrmax drift-report`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.markup import escape

from cxrmax.cli.common import console, interruptible, user_errors
from cxrmax.cli.options import GENERATE_BACKENDS, Choice, choice_option, emit_json, json_option, out_option

if TYPE_CHECKING:  # the build imports datasets: only when a command runs
    from cxrmax.preferences.build import BuildOptions, BuildSummary
    from cxrmax.preferences.datacard import DriftStatistics


def _build_preferences(
    trajectories: list[str] = typer.Argument(
        ...,
        help="Trajectory inputs: generate's OUT (or OUT/trajectories, OUT/trajectories/<model>), Arrow/Parquet/"
        "JSONL files, a `datasets` directory, or a Hugging Face Hub data set id.",
    ),
    out: Path = out_option("Output folder (preferences/, sft/, annotations/, exports/).", ...),
    mimic_root: Path | None = typer.Option(
        None,
        "--mimic-root",
        help="MIMIC-CXR root: fills missing labels/splits, reports for similarity, image paths.",
    ),
    ms_cxr_t: Path | None = typer.Option(
        None, "--ms-cxr-t", help="MS-CXR-T CSV: its subjects are removed from train."
    ),
    consensus: str = choice_option(
        "vote",
        "--consensus",
        choices=Choice(("vote", "model")),
        help="vote (offline, deterministic) or model (in-context, a served model).",
    ),
    positive: str = choice_option(
        "composed",
        "--positive",
        choices=Choice(("composed", "selected")),
        help="composed: the consensus written as one answer from the sources' supported steps; selected: "
        "the source answer closest to the consensus, in its own words (no refusal or cut answer; answers "
        "as close as it are dropped from the negatives). Not with --consensus model.",
    ),
    min_sources: int = typer.Option(2, "--min-sources", help="Skip (and report) samples with fewer sources."),
    drop_non_drifting: bool = typer.Option(
        False, "--drop-non-drifting", help="Drop negatives with zero drift."
    ),
    max_negatives: int | None = typer.Option(
        None, "--max-negatives", help="Keep at most N most drifting negatives."
    ),
    exclude_refusals_from_sft: bool = typer.Option(
        False, "--exclude-refusals-from-sft", help="Keep refusing trajectories out of the SFT set."
    ),
    lenient: bool = typer.Option(
        False,
        "--lenient",
        help="Skip (and count) duplicate keys, mismatched ids and unreadable (corrupt/truncated) files.",
    ),
    allow_empty: bool = typer.Option(
        False, "--allow-empty", help="Publish a build with no preference row (default: an error saying why)."
    ),
    export_parquet: Path | None = typer.Option(
        None, "--export-parquet", help="Also write a Parquet copy + card here."
    ),
    push_to_hub: str | None = typer.Option(
        None, "--push-to-hub", help="Publish as Parquet to this Hub data set (private unless --public)."
    ),
    public: bool = typer.Option(
        False, "--public", help="With --push-to-hub: make the repository public (default: private)."
    ),
    step_bins: int = typer.Option(
        10, "--step-bins", help="Relative step bins of the step-wise drift profile."
    ),
    delta: int = typer.Option(1, "--delta", help="Bin distance Delta in JS(P_j || P_j+Delta)."),
    processes: int | None = typer.Option(
        None, "--processes", "-j", help="Worker processes (default: all cores)."
    ),
    no_card: bool = typer.Option(False, "--no-card", help="Do not render README.md and figures."),
    consensus_backend: str = choice_option(
        "openai",
        "--consensus-backend",
        choices=Choice(GENERATE_BACKENDS),
        help="--consensus model: the generate backend that serves it.",
    ),
    consensus_model: str | None = typer.Option(
        None, "--consensus-model", help="--consensus model: served model id or local model directory."
    ),
    base_url: list[str] = typer.Option(
        [], "--base-url", help="--consensus model: server URL(s) (repeatable)."
    ),
    consensus_prompt: Path | None = typer.Option(
        None,
        "--consensus-prompt",
        help="--consensus model: prompt template (default pipelines/prompts/consensus.txt).",
    ),
    consensus_max_tokens: int = typer.Option(
        1024,
        "--consensus-max-tokens",
        min=1,
        help="--consensus model: answer token limit (an answer cut there keeps the vote's positive).",
    ),
    allow_external_endpoint: bool = typer.Option(
        False,
        "--allow-external-endpoint",
        help="--consensus model: allow a --base-url outside loopback/private networks (MIMIC-CXR's DUA!).",
    ),
) -> None:
    """Build APO preferences: drift annotations, consensus positives, ranked negatives, SFT rows.

    Examples:

      cxrmax build-preferences runs/cxrmax --out runs/cxrmax --mimic-root /data/mimic-cxr-jpg

      cxrmax build-preferences a.parquet b.parquet --out prefs --max-negatives 4 --drop-non-drifting

      cxrmax build-preferences runs/cxrmax --out prefs --positive selected

      cxrmax build-preferences runs/cxrmax --out runs/cxrmax --consensus model --consensus-model student \\
        --base-url http://127.0.0.1:8000/v1
    """
    from cxrmax.preferences.build import BuildOptions

    with user_errors(), interruptible(f"nothing was published in {out}; run the same command again"):
        backend = None
        if consensus == "model":
            backend = {
                "backend": consensus_backend,
                "model": consensus_model,
                "base_urls": list(base_url),
                "prompt_path": consensus_prompt,
                "image_root": mimic_root,
                "allow_external_endpoint": allow_external_endpoint,
                "max_tokens": consensus_max_tokens,
            }
        options = BuildOptions(
            min_sources=min_sources,
            consensus=consensus,
            positive=positive,
            drop_non_drifting=drop_non_drifting,
            max_negatives=max_negatives,
            exclude_refusals_from_sft=exclude_refusals_from_sft,
            lenient=lenient,
            mimic_root=mimic_root,
            ms_cxr_t=ms_cxr_t,
            step_bins=step_bins,
            delta=delta,
            processes=processes,
            export_parquet=export_parquet,
            push_to_hub=push_to_hub,
            public=public,
            card=not no_card,
            model_backend=backend,
            allow_empty=allow_empty,
        )
        summary = _build_with_progress(trajectories, out, options)
        _render_build(summary, out)


def _build_with_progress(trajectories: list[str], out: Path, options: BuildOptions) -> BuildSummary:
    """Run build_preferences under one rich progress bar (instead of a tqdm bar per saved split)."""
    import datasets
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from cxrmax.preferences.build import build_preferences

    datasets.disable_progress_bars()
    with Progress(
        TextColumn("[bold]build-preferences"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("samples"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("samples", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return build_preferences(trajectories, out, options, progress=progress)


def _render_build(summary: BuildSummary, out: Path) -> None:
    """Print what a build made, what it skipped and what needs the user's attention."""
    counts = summary.counts
    console.print(
        f"[green]done[/] in {summary.seconds:.1f}s: {counts.get('samples', 0)} samples, "
        f"{counts.get('trajectories', 0)} trajectories from {len(summary.models)} models -> "
        f"{counts.get('preference_rows', 0)} preference rows ({counts.get('negatives', 0)} negatives), "
        f"{counts.get('sft_rows', 0)} SFT rows"
    )
    for label, value in summary.skipped().items():
        if value:
            console.print(f"  {label}: {value}")
    for example in summary.labeler_error_examples:
        console.print(f"  labeler error: {escape(example)}")
    if summary.skipped_few_sources_examples:
        console.print(f"  e.g. skipped: {', '.join(summary.skipped_few_sources_examples[:5])}")
    if summary.samples_without_image:
        console.print(
            f"  [yellow]samples whose image is not under --mimic-root[/]: {summary.samples_without_image} "
            f"(a trainer cannot load them; e.g. {', '.join(summary.samples_without_image_examples[:3])})"
        )
    if summary.load["samples_with_mixed_prompts"]:
        console.print(
            f"  [yellow]samples whose sources were asked different prompts[/]: "
            f"{summary.load['samples_with_mixed_prompts']} (the row keeps the first source's prompt; "
            f"e.g. {', '.join(summary.load['mixed_prompt_examples'][:3])})"
        )
    if summary.load["uncommitted_journals"]:
        console.print(
            f"  [yellow]uncommitted generate journals not read[/] (run generate again to commit them): "
            f"{', '.join(summary.load['uncommitted_journals'][:3])}"
        )
    for reason in summary.load["unreadable_files"]:
        console.print(f"  [yellow]skipped unreadable file (lenient)[/]: {reason}")
    for path, columns in summary.load["ignored_columns"].items():
        console.print(f"  [yellow]ignored columns[/] in {path}: {', '.join(columns)}")
    for warning in summary.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    outputs = [out / name for name in ("preferences", "sft", "annotations", "exports", "README.md")]
    console.print("outputs: " + ", ".join(str(path) for path in outputs if path.exists()))


def _drift_report(
    out: Path = typer.Argument(..., help="A build-preferences output folder."),
    figures: Path | None = typer.Option(
        None, "--figures", help="Where to write the PNG figures (default OUT/figures)."
    ),
    json_out: Path | None = json_option("the statistics"),
) -> None:
    """Per-model drift table (precision, recall, similarity to report, refusal rate, side error vs
    consensus, drift from consensus) and figures, from a build-preferences output.

    Example: cxrmax drift-report runs/cxrmax (--json - for the statistics alone, as JSON)
    """
    from cxrmax.preferences.datacard import drift_report

    with user_errors():
        stats, paths = drift_report(out, figures)
        text = json.dumps(stats.as_json(), default=str, allow_nan=False, indent=2)
        if emit_json(text, json_out):
            return
        _render_drift(stats, paths)


def _render_drift(stats: DriftStatistics, paths: dict[str, Path]) -> None:
    """The per-model drift table, the sample-level summary line and the figure paths."""
    from rich.table import Table

    from cxrmax.preferences.datacard import METRIC_LABELS

    table = Table(
        title=f"Drift per source model ({stats.samples} samples; precision/recall vs {stats.reference})"
    )
    # Headers are the metrics' one name (the data card's and the figures' too).
    columns = (("trajectories", "n", "{:d}"),) + tuple(
        (name, METRIC_LABELS[name], "{:.3f}")
        for name in (
            "precision",
            "recall",
            "similarity",
            "refusal_rate",
            "laterality_error_rate",
            "mean_drift",
        )
    )
    table.add_column("model")
    for _, header, _ in columns:
        table.add_column(header, justify="right")
    for model in stats.models:
        row = stats.per_model[model]
        cells = []
        for name, _, fmt in columns:
            value = row[name]
            cells.append("n/a" if isinstance(value, float) and value != value else fmt.format(value))
        table.add_row(model, *cells)
    console.print(table)
    console.print(
        f"sample drift score: {', '.join(f'{k} {v:.3f}' for k, v in stats.drift_score_quantiles.items())}; "
        f"laterality conflicts in {stats.laterality_conflict_samples} samples; refusals in "
        f"{stats.refusal_samples}; consensus flagged {stats.consensus_flagged}"
    )
    for path in paths.values():
        console.print(f"figure: {path}")


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("build-preferences")(_build_preferences)
    app.command("drift-report")(_drift_report)
