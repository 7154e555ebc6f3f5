"""CLI commands for MIMIC-CXR: `cxrmax fixtures mimic`, `cxrmax mimic summary`, `cxrmax mimic select`.

The `fixtures` group is created here; other areas may add their own fixture commands to
`fixtures_app` (imported from this module) instead of registering a second "fixtures" group."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrmax.cli.common import console, user_errors
from cxrmax.cli.options import LABEL_SOURCES, Choice, choice_option, out_option, split_choice
from cxrmax.core.errors import InputError

mimic_app = typer.Typer(
    name="mimic",
    help="Read MIMIC-CXR(-JPG) releases: summarise a root, select images into a manifest.",
    no_args_is_help=True,
)
fixtures_app = typer.Typer(
    name="fixtures",
    help="Make small data sets with the exact layout of the real ones (for tests and demos).",
    no_args_is_help=True,
)


@fixtures_app.command("mimic")
def fixtures_mimic(
    out: Path = out_option("Folder to write the mini MIMIC-CXR into.", ...),
    studies: int = typer.Option(40, "--studies", min=3, help="Number of studies (>= 3)."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed gives the same data set."),
    dicom: bool = typer.Option(
        False, "--dicom", help="DICOM layout (.dcm films, some MONOCHROME1) instead of JPGs."
    ),
    version: str = choice_option(
        "2.0.0",
        "--version",
        choices=Choice(("2.0.0", "2.1.0")),
        help="2.0.0, or 2.1.0 to add the radiologist test-set labels.",
    ),
    plain_csv: bool = typer.Option(False, "--plain-csv", help="Write plain .csv instead of .csv.gz."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists and is not empty."),
    large_images: int = typer.Option(
        2, "--large-images", min=0, help="How many films get real MIMIC size (~2,500x3,000)."
    ),
) -> None:
    """Write a mini MIMIC-CXR: CSVs, reports written from the labels, synthetic chest films, MS-CXR-T CSV.

    Example: [bold]cxrmax fixtures mimic --out mini-mimic --studies 40 --seed 0[/]
    """
    from cxrmax.testing.mini_mimic import make_mini_mimic

    with user_errors():
        try:
            root = make_mini_mimic(
                out,
                studies=studies,
                seed=seed,
                dicom=dicom,
                version=version,
                gz=not plain_csv,
                large_images=large_images,
                overwrite=overwrite,
            )
        except FileExistsError:
            # The library's message names its keyword argument; a CLI user has the flag.
            raise typer.BadParameter(
                f"{out} exists and is not empty (--overwrite replaces it)", param_hint="--out"
            ) from None
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        console.print(
            f"wrote a mini MIMIC-CXR ({studies} studies, seed {seed}, {'DICOM' if dicom else 'JPG'}) to {root}"
        )


@mimic_app.command("summary")
def mimic_summary(
    root: Path = typer.Argument(..., help="MIMIC-CXR(-JPG) root (the folder with files/ and the CSVs)."),
    source: str = choice_option("chexpert", "--labels", choices=Choice(LABEL_SOURCES), help="Label source."),
    reports: bool = typer.Option(
        True, "--reports/--no-reports", help="Parse every report for section coverage."
    ),
    lenient: bool = typer.Option(False, "--lenient", help="Skip bad rows (counted) instead of failing."),
    reports_root: Path = typer.Option(
        None, "--reports-root", help="Where files/pXX/pSUBJECT/sSTUDY.txt live, when not under ROOT."
    ),
) -> None:
    """Studies and images per split and view, label prevalence (1/0/-1/blank), report section coverage.

    Example: [bold]cxrmax mimic summary mini-mimic[/]
    """
    from cxrmax.mimic import MimicCXR

    with user_errors():
        mimic = MimicCXR(root, lenient=lenient, reports_root=reports_root)
        from rich.progress import Progress

        with Progress(console=console, transient=True) as bar:
            task = bar.add_task("reading CSVs", total=None)

            def advance(done: int, total: int) -> None:
                bar.update(task, description="parsing reports", completed=done, total=total)

            summary = mimic.summary(reports=reports, source=source, progress=advance)
        console.print(
            f"[bold]{root}[/]: MIMIC-CXR {summary['layout'].upper()} layout, version {summary['version']}"
        )
        _print_splits(summary)
        _print_views(summary)
        if "labels" in summary:
            _print_labels(summary["labels"])
        if "reports" in summary:
            _print_report_sections(summary["reports"])
        _print_skipped(summary["skipped"])


def _print_splits(summary: dict) -> None:
    """Subjects, studies and images per split, and the subjects whose studies span splits."""
    from rich.table import Table

    from cxrmax.core.splits import SPLITS

    splits = Table(title="Splits")
    for column in ("split", "subjects", "studies", "images"):
        splits.add_column(column, justify="right" if column != "split" else "left")
    for split in SPLITS:
        counts = summary["splits"][split]
        splits.add_row(split, f"{counts['subjects']:,}", f"{counts['studies']:,}", f"{counts['images']:,}")
    console.print(splits)
    leaking = summary["subjects_in_several_splits"]
    if leaking:
        shown = ", ".join(map(str, leaking[:5])) + (", ..." if len(leaking) > 5 else "")
        console.print(
            f"[yellow]warning:[/] {len(leaking):,} subject(s) have studies in more than one split "
            f"(train/test leakage; the release splits by patient): {shown}"
        )
    else:
        console.print("every subject's studies are in one split")


def _print_views(summary: dict) -> None:
    """Images per split and view (the empty view last)."""
    from rich.table import Table

    from cxrmax.core.splits import SPLITS

    views = sorted({view for _split, view in summary["views"]}, key=lambda v: (v == "", v))
    view_table = Table(title="Images per split and view")
    view_table.add_column("view")
    for split in SPLITS:
        view_table.add_column(split, justify="right")
    for view in views:
        view_table.add_row(view or "(empty)", *(f"{summary['views'].get((s, view), 0):,}" for s in SPLITS))
    console.print(view_table)


def _print_labels(labels: dict) -> None:
    """Label prevalence per observation (1 / 0 / -1 / blank)."""
    from rich.table import Table

    label_table = Table(
        title=f"Label prevalence ({labels['source']}; {labels['studies_with_labels']} studies with a label row, "
        f"{labels['studies_without_labels']} without)"
    )
    for column in ("observation", "1", "0", "-1", "blank"):
        label_table.add_column(column, justify="right" if column != "observation" else "left")
    for name, counts in labels["prevalence"].items():
        label_table.add_row(name, *(f"{counts[key]:,}" for key in ("1", "0", "-1", "blank")))
    console.print(label_table)


def _print_report_sections(cover: dict) -> None:
    """How many studies' reports have each section, and their share."""
    from rich.table import Table

    report_table = Table(title="Report sections")
    report_table.add_column("reports with")
    report_table.add_column("studies", justify="right")
    report_table.add_column("share", justify="right")
    for key in ("reports", "findings", "impression", "both", "last_paragraph_only", "addenda", "missing"):
        share = cover[key] / cover["studies"] if cover["studies"] else 0.0
        report_table.add_row(key.replace("_", " "), f"{cover[key]:,}", f"{share:.1%}")
    console.print(report_table)


@mimic_app.command("select")
def mimic_select(
    root: Path = typer.Argument(..., help="MIMIC-CXR(-JPG) root."),
    out: Path = typer.Option(..., "--out", "-o", help="Manifest to write (.parquet, .arrow or .feather)."),
    split: list[str] = choice_option(
        None, "--split", choices=split_choice(), help="Split (repeatable; default all)."
    ),
    view: list[str] = typer.Option(
        None, "--view", help="PA, AP, LATERAL, LL, frontal or lateral (repeatable)."
    ),
    require_positive: bool = typer.Option(
        False, "--require-positive", help="Only studies with at least one finding labelled 1."
    ),
    k: int = typer.Option(None, "--k", min=0, help="Deterministic sample of k studies (after the filters)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the sample."),
    shard: str = typer.Option(
        None, "--shard", help="i/N: keep shard i of N (shards partition the selection)."
    ),
    exclude_subjects: Path = typer.Option(
        None,
        "--exclude-subjects",
        help="File of subject ids to leave out: one per line, or a CSV with subject_id (e.g. the MS-CXR-T CSV).",
    ),
    all_images: bool = typer.Option(False, "--all-images", help="Every matching image, not one per study."),
    source: str = choice_option("chexpert", "--labels", choices=Choice(LABEL_SOURCES), help="Label source."),
    reports: bool = typer.Option(True, "--reports/--no-reports", help="Attach report sections."),
    verify_images: bool = typer.Option(
        False, "--verify-images", help="Decode every selected image now (finds corrupt JPEG/DICOM files)."
    ),
    lenient: bool = typer.Option(
        False, "--lenient", help="Skip bad rows, absent and corrupt images (counted) instead of failing."
    ),
    reports_root: Path = typer.Option(
        None, "--reports-root", help="Where files/pXX/pSUBJECT/sSTUDY.txt live, when not under ROOT."
    ),
    allow_empty: bool = typer.Option(
        False, "--allow-empty", help="Write the manifest even when no image matches (default: an error)."
    ),
) -> None:
    """Select images into a manifest (one row per image: ids, split, view, path, labels, report
    sections) that `cxrmax generate` reads.

    Example: [bold]cxrmax mimic select mini-mimic --split train --view frontal --require-positive --k 20 --seed 0
    --exclude-subjects mini-mimic/MS_CXR_T_temporal_image_classification_v1.0.0.csv --out sel.parquet[/]
    """
    from cxrmax.core.shards import parse_shard
    from cxrmax.mimic import MimicCXR, write_selection

    with user_errors():
        mimic = MimicCXR(root, lenient=lenient, reports_root=reports_root)
        with console.status("selecting"):
            table = mimic.select(
                splits=split or None,
                views=view or None,
                require_positive=require_positive,
                k=k,
                seed=seed,
                shard=parse_shard(shard),
                exclude_subjects=exclude_subjects,
                one_per_study=not all_images,
                source=source,
                with_reports=reports,
                verify_images=verify_images,
            )
            if table.num_rows == 0 and not allow_empty:
                raise InputError(
                    f"{root}: no image matches the filters (split {', '.join(split or ['any'])}, "
                    f"view {', '.join(view or ['any'])}"
                    f"{', positive studies only' if require_positive else ''}); nothing written "
                    "(--allow-empty writes an empty manifest)"
                )
            write_selection(table, out)
        from collections import Counter

        studies = len(set(table.column("study_id").to_pylist()))
        per_split = Counter(table.column("split").to_pylist())
        per_view = Counter(v or "(empty)" for v in table.column("view").to_pylist())
        console.print(f"selected {table.num_rows} images from {studies} studies -> {out}")
        console.print(
            "  by split: "
            + ", ".join(f"{k} {v}" for k, v in sorted(per_split.items()))
            + "; by view: "
            + ", ".join(f"{k} {v}" for k, v in sorted(per_view.items()))
        )
        _print_skipped(dict(mimic.skipped))


def _print_skipped(skipped: dict) -> None:
    if not skipped:
        return
    from rich.table import Table

    # Not only --lenient's skipped rows: missing reports and label files are left null either way.
    table = Table(title="Skipped or left null")
    table.add_column("reason")
    table.add_column("rows", justify="right")
    for reason, count in sorted(skipped.items()):
        table.add_row(reason, str(count))
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.add_typer(mimic_app, name="mimic")
    app.add_typer(fixtures_app, name="fixtures")
