"""CLI commands for the leaderboard area (registered on the root app by cxrmax.cli):
`cxrmax leaderboard score | submit | show | export | export-predictions | tasks`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from cxrmax.cli.common import console, interruptible, raise_if_interrupted, user_errors
from cxrmax.cli.options import (
    UNCERTAIN_POLICIES,
    Choice,
    choice_option,
    either,
    emit_json,
    fail,
    json_option,
    out_option,
    task_choice,
)

leaderboard_app = typer.Typer(
    name="leaderboard",
    help="Score model outputs locally and keep a persistent leaderboard beside the published results.\n\n"
    "Examples:\n\n"
    "  cxrmax leaderboard score preds.csv --task mimic-cxr-labels --references /data/mimic-cxr-jpg\n\n"
    "  cxrmax leaderboard submit reports.json --task mimic-cxr-report --references /data/mimic-cxr --name my-model\n\n"
    "  cxrmax leaderboard show --task ms-cxr-t\n\n"
    "  cxrmax leaderboard export --format html -o board.html\n\n"
    "  cxrmax leaderboard export-predictions 3 -o predictions.json   (ReXrank's submission JSON)",
    no_args_is_help=True,
    rich_markup_mode="rich",
)


_UNCERTAIN_HELP = "Uncertain-label policy (positive: the CheXbert-F1 convention)."


def _uncertain_option() -> Any:
    """``--uncertain``: how uncertain (-1) labels count."""
    return choice_option("positive", "--uncertain", choices=Choice(UNCERTAIN_POLICIES), help=_UNCERTAIN_HELP)


def _task_option(help: str, default: Any = ...) -> Any:
    """``--task/-t``: a task of the registry (names listed in --help), NAME@VERSION or a task TOML."""
    return choice_option(default, "--task", "-t", choices=task_choice(), help=help, metavar="TASK")


_SECTION_HELP = "Report task: the report section scored (default: the task's)."
_SECTIONS = ("findings", "impression", "best")


def _parse_model_info(values: list[str] | None) -> dict[str, Any]:
    from cxrmax.core.errors import InputError

    info: dict[str, Any] = {}
    for value in values or []:
        text = value.strip()
        if text.startswith("{"):
            try:
                loaded = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"--model-info: invalid JSON: {exc}") from None
            if not isinstance(loaded, dict):
                raise InputError("--model-info: JSON must be an object")
            info.update(loaded)
        elif "=" in text:
            key, _, val = text.partition("=")
            info[key.strip()] = val.strip()
        else:
            raise InputError(f"--model-info: {value!r} is neither KEY=VALUE nor a JSON object")
    return info


def _run_score(
    submission: Path,
    task: str,
    references: Path | None,
    uncertain: str,
    require_complete: bool,
    lenient: bool,
    bootstrap: int,
    seed: int,
    section: str | None,
    processes: int | None,
    sha256: str | None = None,
) -> Any:
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from cxrmax.core.errors import CxrmaxError
    from cxrmax.leaderboard import get_task, score

    task_def = get_task(task)
    if references is None and task_def.kind != "rationale":
        raise CxrmaxError(
            f"--references is required for task {task_def.name} (a MIMIC-CXR root or a reference file)"
        )
    with Progress(
        SpinnerColumn(),
        TextColumn("[bold]scoring[/] {task.fields[rows]} rows"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        bar = progress.add_task("score", total=None, rows=0)

        def advance(n: int) -> None:
            progress.update(bar, rows=progress.tasks[0].fields["rows"] + n)

        return score(
            submission,
            task_def,
            references,
            uncertain=uncertain,
            require_complete=require_complete,
            lenient=lenient,
            n_boot=bootstrap,
            seed=seed,
            section=section,
            processes=processes,
            progress=advance,
            sha256=sha256,
        )


@leaderboard_app.command("score")
def score_cmd(
    submission: Path = typer.Argument(
        ...,
        help="Submission file (.csv/.tsv/.jsonl/.json/.parquet) or a trajectories folder (cxr-max-rationale).",
    ),
    task: str = _task_option("The task: a name, NAME@VERSION or a task TOML file."),
    references: Path = typer.Option(
        None, "--references", "-r", help="MIMIC-CXR root folder, or a prepared reference file."
    ),
    uncertain: str = _uncertain_option(),
    require_complete: bool = typer.Option(
        False, "--require-complete", help="Fail when any reference study is missing."
    ),
    lenient: bool = typer.Option(
        False,
        "--lenient",
        help="Skip (and count) rows with unknown study ids and rows that cannot be read (broken lines, bad ids, values "
        "or texts; their studies count as missing); ignore unknown columns; missing observation columns count as blank.",
    ),
    bootstrap: int = typer.Option(
        1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs (0 turns them off)."
    ),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    section: str = choice_option(None, "--section", choices=Choice(_SECTIONS), help=_SECTION_HELP),
    processes: int = typer.Option(None, "--processes", "-j", help="Labeler processes for free text."),
    json_out: Path = json_option("the full result"),
) -> None:
    """Score a submission and print the result (rich tables; --json for the machine-readable form).

    Example: cxrmax leaderboard score preds.parquet -t mimic-cxr-labels -r /data/mimic-cxr-jpg --uncertain ignore
    """
    with user_errors(), interruptible("nothing was written; run the same command again"):
        from cxrmax.leaderboard.render import render_score
        from cxrmax.leaderboard.scoring import dumps

        result = _run_score(
            submission,
            task,
            references,
            uncertain,
            require_complete,
            lenient,
            bootstrap,
            seed,
            section,
            processes,
        )
        if str(json_out) == "-":  # machine-readable only, for pipes
            emit_json(dumps(result), json_out)
            return
        render_score(result, console)
        emit_json(dumps(result), json_out)


@leaderboard_app.command("submit")
def submit_cmd(
    submission: Path = typer.Argument(..., help="Submission file or trajectories folder."),
    task: str = _task_option("The task: a name, NAME@VERSION or a task TOML file."),
    name: str = typer.Option(
        ...,
        "--name",
        "-n",
        help="Entry name shown on the board: one line of printable text, at most 200 characters.",
    ),
    references: Path = typer.Option(
        None, "--references", "-r", help="MIMIC-CXR root folder, or a prepared reference file."
    ),
    model_info: list[str] = typer.Option(
        None, "--model-info", help="KEY=VALUE or a JSON object; repeatable."
    ),
    store: Path = typer.Option(
        None,
        "--store",
        help="Leaderboard SQLite file (default $CXRMAX_LEADERBOARD or ~/.cxrmax/leaderboard.sqlite).",
    ),
    uncertain: str = _uncertain_option(),
    require_complete: bool = typer.Option(
        False, "--require-complete", help="Fail when any reference study is missing."
    ),
    lenient: bool = typer.Option(
        False,
        "--lenient",
        help="Skip (and count) rows with unknown study ids and rows that cannot be read (broken lines, bad ids, values "
        "or texts; their studies count as missing); ignore unknown columns; missing observation columns count as blank.",
    ),
    bootstrap: int = typer.Option(1000, "--bootstrap", help="Bootstrap resamples for the 95% CIs."),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    section: str = choice_option(None, "--section", choices=Choice(_SECTIONS), help=_SECTION_HELP),
    processes: int = typer.Option(None, "--processes", "-j", help="Labeler processes for free text."),
    json_out: Path = json_option("the full result"),
) -> None:
    """Score a submission and store it on the board (one transaction, with its fingerprint and its
    canonical predictions; the same predictions under the same --uncertain policy are refused).

    Example: cxrmax leaderboard submit preds.csv -t mimic-cxr-labels -r /data/mimic-cxr-jpg -n my-model --model-info params=7B
    """
    with user_errors(), interruptible("nothing was stored on the board; run the same command again"):
        from cxrmax.core.terminal import markup_safe
        from cxrmax.leaderboard.render import render_score
        from cxrmax.leaderboard.scoring import dumps, file_sha256
        from cxrmax.leaderboard.store import Board, DuplicateSubmission, check_entry_name
        from cxrmax.leaderboard.tasks import get_task

        check_entry_name(name)  # before scoring: a bad name should not cost a scoring run
        info = _parse_model_info(model_info)
        # Only read until the submission is scored, so that a failing one leaves no new store behind.
        with Board(store, create=False) as board:
            digest = file_sha256(submission) if submission.is_file() else None
            if digest is not None and section is None:
                # The same bytes under the same policy are the same predictions: refuse before scoring.
                # Anything else (another spelling of the same predictions) is caught by board.submit.
                existing = board.find(get_task(task).name, digest, uncertain)
                if existing is not None:
                    raise DuplicateSubmission(
                        f"this submission (uncertain={uncertain}) is already on the {existing.task} board as "
                        f"entry {existing.id} {existing.name!r} ({existing.created_at})"
                    )
        result = _run_score(
            submission,
            task,
            references,
            uncertain,
            require_complete,
            lenient,
            bootstrap,
            seed,
            section,
            processes,
            sha256=digest,
        )
        if str(json_out) != "-":
            render_score(result, console)
        raise_if_interrupted()  # a Ctrl-C lost in a finalizer during scoring still stops the submit
        with Board(store) as board:
            entry_id = board.submit(result, name, info)
        if emit_json(dumps(result), json_out):
            return
        console.print(
            f"[green]stored[/] entry {entry_id} {markup_safe(repr(name))} on {markup_safe(result.task)} "
            f"v{markup_safe(result.task_version)} in {markup_safe(board.path)}"
        )


@leaderboard_app.command("show")
def show_cmd(
    task: list[str] = _task_option("Task(s) to show (repeatable; default: all).", None),
    store: Path = typer.Option(None, "--store", help="Leaderboard SQLite file."),
) -> None:
    """Rank the board's entries beside the published reference rows ("published, not re-scored").

    Only entries with the task's official fingerprint and full coverage are ranked; the others are
    listed apart with the reason (see docs/leaderboard.md).

    Example: cxrmax leaderboard show --task ms-cxr-t
    """
    with user_errors():
        from cxrmax.core.terminal import markup_safe
        from cxrmax.leaderboard.render import render_board
        from cxrmax.leaderboard.store import Board
        from cxrmax.leaderboard.tasks import list_tasks

        with Board(store, create=False) as board:
            if not board.exists:
                console.print(
                    f"[dim]no leaderboard store at {markup_safe(board.path)} yet (submit creates it)[/]"
                )
            for name in task or sorted(list_tasks()):
                render_board(board, name, console)


@leaderboard_app.command("export")
def export_cmd(
    format: str = choice_option(
        "md",
        "--format",
        "-f",
        choices=Choice(("md", "csv", "html")),
        help="Markdown, CSV, or html (one static page, sortable tables).",
    ),
    out: Path = out_option("File to write (default: print)."),
    output: Path = typer.Option(None, "--output", hidden=True, help="Old spelling of --out."),
    task: list[str] = _task_option("Task(s) to export (repeatable; default: all).", None),
    store: Path = typer.Option(None, "--store", help="Leaderboard SQLite file."),
    push_to_hub: str = typer.Option(
        None,
        "--push-to-hub",
        help="Also publish the board as a Hub data set REPO, private unless --public (needs network and a token).",
    ),
    public: bool = typer.Option(
        False, "--public", help="With --push-to-hub: make the repository public (default: private)."
    ),
    private: bool = typer.Option(
        False, "--private", hidden=True, help="Old flag: repositories are private unless --public."
    ),
    token: str = typer.Option(
        None, "--token", envvar="HF_TOKEN", help="Hub token (default: the logged-in one)."
    ),
) -> None:
    """Export the board as Markdown, CSV or a static HTML page; optionally push it to the Hub.

    Example: cxrmax leaderboard export --format html -o board.html --push-to-hub me/cxrmax-board
    """
    output = either(out, output, "--out")
    if public and private:
        fail("--public and --private contradict each other (repositories are private unless --public)")
    with user_errors():
        from cxrmax.core.io import atomic_write_text
        from cxrmax.leaderboard.render import export_board
        from cxrmax.leaderboard.store import Board

        with Board(store, create=False) as board:
            text = export_board(board, format, task or None)
            if output:
                atomic_write_text(output, text)
                console.print(f"wrote {output}")
            else:
                console.out(text, highlight=False)
            if push_to_hub:
                from cxrmax.leaderboard.hub import push_to_hub as push

                url = push(board, push_to_hub, task or None, token=token, private=not public)
                console.print(f"[green]pushed[/] {url}")


@leaderboard_app.command("export-predictions")
def export_predictions_cmd(
    entry: int = typer.Argument(..., help="Entry id (as `leaderboard show` or `submit` prints it)."),
    out: Path = out_option("Write the JSON here ('-': print it).", None),
    output: Path = typer.Option(None, "--output", hidden=True, help="Old spelling of --out."),
    store: Path = typer.Option(None, "--store", help="Leaderboard SQLite file."),
    model: str = typer.Option(
        None, "--model", help="Rationale entries: the model to export (needed when there are several)."
    ),
) -> None:
    """Write a stored entry's predictions as ReXrank's submission JSON (study_id -> model_prediction),
    to score them with ReXrank or RadEval.

    Example: cxrmax leaderboard export-predictions 3 -o predictions.json
    """
    output = either(out, output, "--out")
    if output is None:
        fail("missing --out: where to write the JSON ('-': print it)")
    with user_errors():
        from cxrmax.core.io import atomic_write_json
        from cxrmax.leaderboard.store import Board

        with Board(store, create=False) as board:
            payload = board.predictions(entry).to_rexrank(model)
        if str(output) == "-":
            print(json.dumps(payload, indent=2, allow_nan=False))
            return
        atomic_write_json(output, payload)
        console.print(f"wrote {len(payload)} predictions of entry {entry} to {output}")


@leaderboard_app.command("tasks")
def tasks_cmd() -> None:
    """List the task definitions (name, version, kind, ranking metric)."""
    with user_errors():
        from rich.table import Table

        from cxrmax.leaderboard.tasks import list_tasks

        table = Table(title="leaderboard tasks")
        for column in ("name", "version", "kind", "primary metric", "description"):
            table.add_column(column)
        for task in list_tasks().values():
            table.add_row(task.name, task.version, task.kind, task.primary_metric, task.description)
        console.print(table)


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.add_typer(leaderboard_app, name="leaderboard")
