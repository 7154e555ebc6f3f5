"""The `cxrmax` command line. Thin: commands parse options, call library functions and render with
rich. Heavy imports (torch, transformers, pyarrow, the labeler) happen inside commands, so
`cxrmax --help` stays fast.

Registration, one style for every area: each ``*_cmd`` module defines its command functions at
module level and a ``register(app)`` that adds them, ``app.command(name)(function)`` for a top-level
command and ``app.add_typer(group_app, name=...)`` for a command group (leaderboard, generate,
models, mimic, fixtures)."""

from __future__ import annotations

import typer

from cxrmax import __version__
from cxrmax.cli import (
    demo_cmd,
    evaluate_cmd,
    generate_cmd,
    inspect_cmd,
    label_cmd,
    leaderboard_cmd,
    mimic_cmd,
    preferences_cmd,
    train_cmd,
)

app = typer.Typer(
    name="cxrmax",
    help="Multi-source reasoning alignment for chest X-rays: generate trajectories, build drift-aware "
    "preferences, train with APO (Autonomous Preference Optimization), score on the leaderboard.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cxrmax {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    pass


for _module in (mimic_cmd, generate_cmd, label_cmd, preferences_cmd, train_cmd, leaderboard_cmd, demo_cmd):
    _module.register(app)
inspect_cmd.register(app)
evaluate_cmd.register(app)


def main() -> None:
    app()
