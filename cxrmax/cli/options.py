"""The CLI's shared conventions, one definition each (docs/cli.md writes them down and
tests/cli/test_conventions.py checks them on the whole command tree):

- the output folder or file is ``--out/-o``;
- ``--json PATH`` writes the machine-readable result to PATH, ``--json -`` prints only that JSON;
- a short option means one thing everywhere (:data:`SHORT_OPTIONS`);
- options with a closed set of values declare it (:class:`Choice`), so ``--help`` lists them; sets
  that live in a registry (leaderboard tasks, demo sizes, label sources) are read from it when help
  is rendered or a value is parsed, not when the CLI starts;
- third-party progress bars and warnings are hidden unless ``--verbose`` (:func:`quiet_libraries`).
"""

from __future__ import annotations

import contextlib
import difflib
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.markup import escape

from cxrmax.cli.common import console, err_console
from cxrmax.core.splits import SPLITS, canonical_split

#: The one meaning of each short option across the CLI (the conventions test holds every command to it).
SHORT_OPTIONS: dict[str, str] = {
    "-o": "--out",
    "-m": "--model",
    "-n": "--name",
    "-c": "--config",
    "-s": "--selection",
    "-t": "--task",
    "-r": "--references",
    "-f": "--format",
    "-j": "--processes",
    "-q": "--quiet",
    "-v": "--verbose",
}


class Choice:
    """A closed set of values for an option (made with :func:`choice_option`): --help lists them
    (the metavar ``[a|b|c]``), the shell completes them, and others are refused with a one-line
    error (exit code 2) that names the option and every value.

    ``values`` is the tuple itself or a function returning it, called when a value is parsed (so a
    registry is read then, not at the CLI's start-up); ``shown`` is what --help lists for such a
    function (default: the values themselves, read once). ``normalize`` maps other accepted spellings
    onto a value (e.g. split aliases; None: unknown spelling) and ``also`` accepts values outside the
    set as they are (e.g. a task given as a TOML path). ``check=False`` only lists and completes
    them: the library checks the value, because it also comes from config files and should read
    the same either way."""

    def __init__(
        self,
        values: Sequence[str] | Callable[[], Iterable[str]],
        *,
        shown: Sequence[str] | None = None,
        normalize: Callable[[str], str | None] | None = None,
        also: Callable[[str], bool] | None = None,
        check: bool = True,
    ) -> None:
        self._values = values
        self._check = check
        if shown is None and callable(values):
            raise TypeError("a Choice read from a registry needs `shown` (what --help lists)")
        self.shown = tuple(shown if shown is not None else self.values())
        self._normalize = normalize
        self._also = also

    def values(self) -> tuple[str, ...]:
        """The current values (read from the registry when given as a function)."""
        return tuple(self._values() if callable(self._values) else self._values)

    @property
    def metavar(self) -> str:
        """How --help shows the option's value: every choice."""
        return "[" + "|".join(self.shown) + "]"

    def complete(self, incomplete: str) -> list[str]:
        """Shell completion: the values that start with what is typed."""
        return [value for value in self.values() if value.startswith(incomplete)]

    def parse(self, name: str, value: Any) -> Any:
        """The value itself when it is one of the set (or normalises to one); else a usage error."""
        if not isinstance(value, str):
            return value
        choices = self.values()
        if not self._check or value in choices or (self._also is not None and self._also(value)):
            return value
        if self._normalize is not None:
            canonical = self._normalize(value)
            if canonical is not None:
                return canonical
        if not choices:  # the registry could not be read: let the command report why
            return value
        what = _NOUNS.get(name, name.lstrip("-"))
        message = f"{name} {value!r}: unknown {what}; use one of {', '.join(choices)}"
        close = difflib.get_close_matches(value, choices, n=1)
        if close:
            message += f" (did you mean {close[0]}?)"
        fail(message)


#: What a wrong value of these options is called in the message (default: the option's name).
_NOUNS = {
    "--uncertain": "policy",
    "--report-to": "integration",
    "--teacher-backend": "backend",
    "--consensus-backend": "backend",
    "--labels": "label source",
}


def choice_option(
    default: Any, *names: str, choices: Choice, help: str, metavar: str | None = None, **kwargs: Any
) -> Any:
    """A typer.Option whose value is one of ``choices``: listed in --help (as the metavar, or, given
    a short ``metavar``, at the end of the help text), completed in the shell, others refused naming
    ``names[0]``."""
    if metavar is not None:
        help = f"{help} One of: {', '.join(choices.shown)}."
    return typer.Option(
        default,
        *names,
        parser=lambda value: choices.parse(names[0], value),
        metavar=metavar or choices.metavar,
        autocompletion=choices.complete,
        help=help,
        **kwargs,
    )


def fail(message: str) -> NoReturn:
    """End the command on a usage mistake: one line and exit code 2, like every other user error
    (common.user_errors), not click's framed box, which folds the message at the terminal's width."""
    err_console.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


# ---------------------------------------------------------------------------------------- value sets
# The sets below belong to modules that import torch, pyarrow or numpy; --help must not. They are
# spelled here and tests/cli/test_conventions.py holds each equal to its owner's.
#: cxrmax.toy.demo.SIZES
DEMO_SIZES = ("small", "default", "large")
#: cxrmax.toy.teachers.BIAS_KINDS
BIAS_KINDS = ("laterality", "hallucination", "refusal", "verbosity")
#: cxrmax.mimic.layout.LABEL_SOURCES
LABEL_SOURCES = ("chexpert", "negbio", "test-set-labeled")
#: cxrmax.labeler.files.INPUT_FORMATS
LABEL_INPUT_FORMATS = ("lines", "jsonl", "csv", "tsv", "arrow", "parquet")
#: cxrmax.labeler.core.UNCERTAIN_POLICIES
LABEL_UNCERTAIN = ("keep", "positive", "negative", "graded")
UNCERTAIN_POLICIES = ("positive", "negative", "ignore")
GENERATE_BACKENDS = ("openai", "transformers", "vllm")
REPORT_TO = ("none", "tensorboard", "wandb")


def task_names() -> list[str]:
    """The leaderboard's task names, from the task registry (what `cxrmax leaderboard tasks` lists)."""
    from cxrmax.core.errors import CxrmaxError
    from cxrmax.leaderboard.tasks import list_tasks

    try:
        return sorted(list_tasks())
    except CxrmaxError:  # no task directory: the command itself says where it looked
        return []


def listed_task_names() -> list[str]:
    """The registry's task names for --help, without importing the leaderboard (numpy, the scorers):
    one definition file per task, named after it, in the folder leaderboard.tasks.benchmark_dir()
    resolves ($CXRMAX_BENCHMARK_DIR, else the repository's benchmark/)."""
    override = os.environ.get("CXRMAX_BENCHMARK_DIR")
    root = Path(override) if override else Path(__file__).resolve().parents[2] / "benchmark"
    return sorted(path.stem for path in (root / "tasks").glob("*.toml"))


def task_reference(value: str) -> bool:
    """A task given as ``name@version`` or as a task TOML file (accepted beside the names)."""
    return "@" in value or value.endswith(".toml")


def task_choice() -> Choice:
    """A leaderboard task: a registry name (listed in --help), NAME@VERSION or a task TOML file."""
    return Choice(task_names, shown=listed_task_names(), also=task_reference)


def split_choice() -> Choice:
    """train, validate or test; the spellings found in the wild (validation, val, dev) map onto them."""
    return Choice(SPLITS, normalize=canonical_split)


# ---------------------------------------------------------------------------------------- options
def out_option(help: str, default: Any = None) -> Any:
    """``--out/-o``: the folder (or file) a command writes. ``...`` as default makes it required."""
    return typer.Option(default, "--out", "-o", help=help)


def json_option(what: str = "the result") -> Any:
    """``--json PATH``: also write ``what`` as JSON to PATH; ``--json -`` prints only the JSON."""
    return typer.Option(
        None,
        "--json",
        metavar="PATH",
        help=f"Also write {what} as JSON to PATH ('-': print only the JSON, on stdout).",
    )


def verbose_option() -> Any:
    """``--verbose/-v``: show third-party progress bars, logs and warnings (hidden by default)."""
    return typer.Option(
        False,
        "--verbose",
        "-v",
        help="Show the libraries' progress bars, logs and warnings (transformers, ...).",
    )


def emit_json(text: str, destination: Path | None) -> bool:
    """Write JSON ``text`` where ``--json`` asked: stdout alone for ``-`` (returns True: the command
    prints nothing else), else PATH (atomically, with a note) and returns False."""
    from cxrmax.core.io import atomic_write_text

    if destination is None:
        return False
    if str(destination) == "-":
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
        return True
    atomic_write_text(destination, text if text.endswith("\n") else text + "\n")
    console.print(f"wrote {destination}")
    return False


def either(value: Any, alias: Any, name: str) -> Any:
    """The value of an option or of its hidden old spelling (an error when both are given)."""
    if value is not None and alias is not None and value != alias:
        fail(f"{name} is given twice (once in its old spelling)")
    return value if value is not None else alias


# ---------------------------------------------------------------------------------------- quiet
#: Read by transformers, huggingface_hub and datasets when they are imported (later in this process
#: or in a child process, e.g. the demo's teacher server); set only where the user has not.
_QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
}
#: Libraries whose UserWarnings are advice to their developers, not to a cxrmax user.
_NOISY_MODULES = r"(transformers|torch|peft|accelerate|huggingface_hub|datasets|trl)(\.|$)"


@contextlib.contextmanager
def quiet_libraries(verbose: bool = False) -> Iterator[None]:
    """Hide third-party output for the duration: transformers' "Loading weights" / "Writing model
    shards" bars and its logs below errors, datasets' map/save bars, and the libraries'
    FutureWarnings, DeprecationWarnings and UserWarnings. Nothing changes with ``verbose``.

    Libraries loaded already are put back as they were on exit (so a test calling commands
    in-process sees no lasting change); one first imported inside stays quiet, as the command
    that imported it ends."""
    if verbose:
        yield
        return
    added = {key: value for key, value in _QUIET_ENV.items() if key not in os.environ}
    os.environ.update(added)
    # huggingface_hub first: transformers imported inside the block takes its bars' state from it.
    restore = [_quiet_hub(), _quiet_transformers(), _quiet_datasets()]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=_NOISY_MODULES)
            yield
    finally:
        for undo in restore:
            undo()
        for key in added:
            os.environ.pop(key, None)


def _nothing() -> None:
    return None


def _quiet_hub() -> Callable[[], None]:
    """Hide huggingface_hub's progress bars if it is loaded; returns how to put them back."""
    if "huggingface_hub" not in sys.modules:
        return _nothing
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if are_progress_bars_disabled():
        return _nothing
    disable_progress_bars()
    return enable_progress_bars


def _quiet_transformers() -> Callable[[], None]:
    """Quiet transformers if it is loaded; returns how to put its verbosity and bars back."""
    if "transformers" not in sys.modules:
        return _nothing
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    def restore() -> None:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()

    return restore


def _quiet_datasets() -> Callable[[], None]:
    """Hide datasets' progress bars if it is loaded; returns how to put them back."""
    if "datasets" not in sys.modules:
        return _nothing
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if are_progress_bars_disabled():
        return _nothing
    disable_progress_bars()
    return enable_progress_bars
