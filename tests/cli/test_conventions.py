"""The CLI's conventions (docs/cli.md), checked on every command of the typer app: output
`--out/-o`, `--json PATH`, one meaning per short option, declared choices, private Hub pushes unless
`--public`, task lists from the task registry, `--verbose` where third-party output is hidden."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest
import typer
from typer.testing import CliRunner

from cxrmax.cli import app, common, options

runner = CliRunner()

#: Commands whose positional OUT is an earlier command's output they read (not a folder they make).
READS_AN_OUTPUT = {"generate status", "drift-report", "inspect"}
#: Options whose values must be listed in --help, wherever they appear.
CHOICE_OPTIONS = {
    "--stage",
    "--loss",
    "--consensus",
    "--size",
    "--backend",
    "--teacher-backend",
    "--consensus-backend",
    "--uncertain",
    "--section",
    "--format",
    "--labels",
    "--report-to",
    "--split",
    "--bias",
    "--task",
}
#: `run` takes the stage and model names its recipe file defines: not a closed set.
OPEN_SETS = {("run", "--stage"), ("run", "--model")}
#: Commands that load models through transformers and so take --verbose.
LOADS_MODELS = {"simulate", "generate", "train-apo", "demo", "evaluate"}


def _commands() -> Iterator[tuple[str, object]]:
    """Every command and group below the root, by its full name ("leaderboard score")."""

    def walk(command: object, path: str) -> Iterator[tuple[str, object]]:
        if path:
            yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}".strip())

    yield from walk(typer.main.get_command(app), "")


def _visible_options(command: object) -> Iterator[object]:
    for param in command.params:
        if getattr(param, "param_type_name", "") == "option" and not param.hidden:
            yield param


def _names(param: object) -> list[str]:
    return [*param.opts, *param.secondary_opts]


COMMANDS = dict(_commands())


def test_the_tree_is_walked():
    assert {"demo", "simulate", "train-apo", "leaderboard score", "fixtures mimic", "models list"} <= set(
        COMMANDS
    )


def test_output_is_out_with_o():
    for path, command in COMMANDS.items():
        for param in _visible_options(command):
            names = _names(param)
            assert not {"--output", "--output-dir", "--outdir"} & set(names), (path, names)
            if "-o" in names or "--out" in names:
                assert param.opts[:2] == ["--out", "-o"] or set(names) == {"--out", "-o"}, (path, names)
        for param in command.params:
            if getattr(param, "param_type_name", "") == "argument" and param.name in ("out", "output"):
                assert path in READS_AN_OUTPUT, f"{path}: the output folder is positional, not --out"


def test_one_meaning_per_short_option():
    seen: dict[str, set[str]] = {}
    for path, command in COMMANDS.items():
        for param in _visible_options(command):
            shorts = [n for n in _names(param) if n.startswith("-") and not n.startswith("--")]
            longs = [n for n in param.opts if n.startswith("--")]
            for short in shorts:
                seen.setdefault(short, set()).add(longs[0])
                assert options.SHORT_OPTIONS.get(short) == longs[0], (path, short, longs)
    assert all(len(longs) == 1 for longs in seen.values()), seen


def test_json_takes_a_path_everywhere():
    found = []
    for path, command in COMMANDS.items():
        for param in command.params:
            names = _names(param)
            if any(n.endswith("json") for n in names if n.startswith("--")) and not param.hidden:
                assert names == ["--json"], (path, names)
                assert not getattr(param, "is_flag", False) and param.metavar == "PATH", path
                found.append(path)
    assert {
        "drift-report",
        "models list",
        "generate status",
        "leaderboard score",
        "leaderboard submit",
    } <= set(found)


def test_closed_sets_are_listed_in_help():
    for path, command in COMMANDS.items():
        for param in _visible_options(command):
            name = param.opts[0]
            if name not in CHOICE_OPTIONS or (path, name) in OPEN_SETS:
                continue
            listed = (param.metavar or "").startswith("[") or "One of:" in (param.help or "")
            assert listed, f"{path} {name}: its values are not listed in --help"


def test_a_wrong_choice_names_the_option_and_the_values():
    result = runner.invoke(app, ["leaderboard", "export", "--format", "pdf"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "--format 'pdf': unknown format; use one of md, csv, html" in text


def test_hub_pushes_are_private_unless_public():
    for path, command in COMMANDS.items():
        names = {n for param in _visible_options(command) for n in _names(param)}
        if "--push-to-hub" in names:
            assert "--public" in names and "--private" not in names, path


def test_task_lists_come_from_the_registry():
    from cxrmax.leaderboard.tasks import list_tasks

    tasks = sorted(list_tasks())
    assert len(tasks) >= 6
    assert options.listed_task_names() == tasks == options.task_names()
    for command in (["leaderboard", "score"], ["leaderboard", "submit"], ["leaderboard", "show"]):
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
        text = "".join(result.output.split())  # names may fold across lines
        for task in tasks:
            assert task in text, (command, task)


def test_value_sets_match_their_owners():
    from cxrmax.labeler.core import UNCERTAIN_POLICIES
    from cxrmax.labeler.files import INPUT_FORMATS
    from cxrmax.mimic.layout import LABEL_SOURCES
    from cxrmax.toy.demo import SIZES
    from cxrmax.toy.teachers import BIAS_KINDS

    assert set(options.DEMO_SIZES) == set(SIZES)
    assert options.BIAS_KINDS == tuple(BIAS_KINDS)
    assert options.LABEL_SOURCES == tuple(LABEL_SOURCES)
    assert options.LABEL_INPUT_FORMATS == tuple(INPUT_FORMATS)
    assert options.LABEL_UNCERTAIN == UNCERTAIN_POLICIES


def test_model_loading_commands_take_verbose():
    for path in LOADS_MODELS & set(COMMANDS):
        names = {n for param in _visible_options(COMMANDS[path]) for n in _names(param)}
        assert "--verbose" in names, path


def test_models_list_keeps_hf_ids_whole_at_120_columns(monkeypatch):
    from cxrmax.generate.roster import load_roster

    monkeypatch.setattr(common.console, "width", 120)
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    for spec in load_roster().values():
        assert spec.hf_id in result.output, spec.hf_id


def test_quiet_libraries_hides_and_restores():
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    with options.quiet_libraries(verbose=False):
        assert hf_logging.get_verbosity() == hf_logging.ERROR
        assert not hf_logging.is_progress_bar_enabled()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # what a user's interpreter shows
            with options.quiet_libraries(verbose=False):
                warnings.warn("old argument", FutureWarning, stacklevel=1)
        assert not caught
    assert (hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()) == (level, bars)
    with options.quiet_libraries(verbose=True):
        assert hf_logging.get_verbosity() == level


@pytest.mark.parametrize("command", [["fixtures", "mimic", "somewhere"], ["simulate", "somewhere"]])
def test_output_folders_are_not_positional(command):
    result = runner.invoke(app, command)
    assert result.exit_code == 2
