"""`cxrmax run RECIPE`: drive every stage of a build from one TOML recipe, resumably.

A recipe (``pipelines/cxr-max.toml`` is the real CXR-MAX build) names the data, the source models and,
per stage, the command that runs it with its arguments::

    [recipe]
    name = "cxr-max"
    out = "runs/cxr-max"                 # on a file system every machine sees
    mimic_root = "/data/mimic-cxr-jpg/2.0.0"
    roster = "pipelines/models.toml"     # vllm serve settings per model
    models = ["qwen2.5-vl", "glm-4.5v"]

    [vars]                               # free {names} for stage arguments
    accelerate_config = "pipelines/accelerate/zero2.yaml"

    [endpoints]                          # OpenAI-compatible base URLs per model (several: spread)
    "qwen2.5-vl" = ["http://gpu-01:8000/v1", "http://gpu-02:8000/v1"]

    [[stages]]
    name = "generate"
    for_each = "model"                   # one unit of work per model
    shardable = true                     # --shard i/N is passed on
    run = ["cxrmax", "generate"]
    args = { selection = "{out}/selection.parquet", model = "{model}", base-url = "{endpoints}", out = "{out}" }

Arguments become ``--key value`` (``true``: a bare flag; ``false``: left out; a list: the flag repeated;
``"{endpoints}"``: the model's base URLs). Placeholders: ``{out}``, ``{mimic_root}``, ``{model}``,
``{recipe_dir}``, ``{shard}`` and every key of ``[vars]``.

Resume: each finished unit leaves ``OUT/.recipe/<stage>[.<model>][.shard-i-of-N].json`` holding its
command; a rerun skips units whose command is unchanged and reruns the rest (the stages themselves
are resumable: generate answers each request exactly once, training resumes from checkpoints).
Sharding: with ``--shard i/N`` a machine runs only the stages marked ``shardable`` (passing the
shard on) or ``every_machine``; the others run once, without ``--shard``, after all shards are done.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cxrmax.core.errors import CxrmaxError, InputError, where
from cxrmax.core.io import atomic_write_json
from cxrmax.generate.roster import load_roster

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Stage:
    """One stage of a recipe as written in the TOML."""

    name: str
    run: tuple[str, ...]
    args: dict[str, Any] = field(default_factory=dict)
    for_each: str | None = None
    shardable: bool = False
    every_machine: bool = False
    description: str = ""
    on_rerun: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Unit:
    """One command to run: a stage, for one model when the stage runs per model."""

    stage: str
    model: str | None
    argv: tuple[str, ...]
    shardable: bool
    every_machine: bool
    rerun_args: tuple[str, ...] = ()
    description: str = ""

    @property
    def key(self) -> str:
        """The unit's name in the resume state (``generate.qwen2.5-vl``)."""
        return self.stage if self.model is None else f"{self.stage}.{self.model}"

    def command_line(self) -> str:
        """The command as a shell line."""
        return shlex.join(self.argv)


@dataclass
class Recipe:
    """A parsed recipe: settings, per-model endpoints and stages in order."""

    path: Path
    name: str
    out: Path
    mimic_root: str
    models: list[str]
    roster: Path | None
    endpoints: dict[str, list[str]]
    variables: dict[str, Any]
    stages: list[Stage]
    serve: dict[str, Any]

    def stage_names(self) -> list[str]:
        """Stage names in order."""
        return [s.name for s in self.stages]


def load_recipe(path: str | Path, out: str | Path | None = None) -> Recipe:
    """Read and validate a recipe TOML. ``out`` overrides ``[recipe].out``. Relative paths in the
    recipe resolve against the current directory (run it from the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise InputError(
            f"{where(path)}: not a recipe (binary or not UTF-8 text; recipes are TOML files)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{where(path)}: not valid TOML: {exc}") from None
    head = data.get("recipe")
    if not isinstance(head, dict):
        raise InputError(f"{where(path, field='recipe')}: missing [recipe] table")
    for key in ("name", "out", "mimic_root"):
        if not isinstance(head.get(key), str) or not head[key]:
            raise InputError(f"{where(path, field='recipe.' + key)}: missing or not a string")
    models = head.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise InputError(f"{where(path, field='recipe.models')}: must be a list of model names")
    endpoints = {}
    for model, urls in (data.get("endpoints") or {}).items():
        urls = [urls] if isinstance(urls, str) else urls
        if not isinstance(urls, list) or not all(isinstance(u, str) for u in urls):
            raise InputError(f"{where(path, field='endpoints.' + model)}: must be a URL or a list of URLs")
        endpoints[model] = urls
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise InputError(f"{where(path, field='stages')}: no [[stages]] defined")
    stages = []
    for index, raw in enumerate(raw_stages):
        label = f"stages[{index}]"
        if not isinstance(raw.get("name"), str):
            raise InputError(f"{where(path, field=label + '.name')}: missing")
        run = raw.get("run")
        if not isinstance(run, list) or not run or not all(isinstance(a, str) for a in run):
            raise InputError(f"{where(path, field=label + '.run')}: must be a non-empty list of strings")
        args = raw.get("args", {})
        if not isinstance(args, dict):
            raise InputError(f"{where(path, field=label + '.args')}: must be a table")
        for_each = raw.get("for_each")
        if for_each not in (None, "model"):
            raise InputError(f'{where(path, field=label + ".for_each")}: only "model" is supported')
        on_rerun = raw.get("on_rerun", {})
        if not isinstance(on_rerun, dict):
            raise InputError(f"{where(path, field=label + '.on_rerun')}: must be a table")
        unknown = set(raw) - {
            "name",
            "run",
            "args",
            "for_each",
            "shardable",
            "every_machine",
            "description",
            "on_rerun",
        }
        if unknown:
            raise InputError(f"{where(path, field=label)}: unknown keys {sorted(unknown)}")
        stages.append(
            Stage(
                name=raw["name"],
                run=tuple(run),
                args=args,
                for_each=for_each,
                shardable=bool(raw.get("shardable", False)),
                every_machine=bool(raw.get("every_machine", False)),
                description=str(raw.get("description", "")),
                on_rerun=on_rerun,
            )
        )
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise InputError(f"{where(path, field='stages')}: stage names must be unique: {names}")
    roster = head.get("roster")
    return Recipe(
        path=path,
        name=head["name"],
        out=Path(out) if out is not None else Path(head["out"]),
        mimic_root=head["mimic_root"],
        models=list(models),
        roster=Path(roster) if roster else None,
        endpoints=endpoints,
        variables=dict(data.get("vars") or {}),
        stages=stages,
        serve=dict(data.get("serve") or {}),
    )


def _substitute(value: Any, context: dict[str, Any], recipe: Recipe, stage: str) -> Any:
    if isinstance(value, list):
        out: list[Any] = []
        for item in value:
            sub = _substitute(item, context, recipe, stage)
            out.extend(sub if isinstance(sub, list) else [sub])
        return out
    if not isinstance(value, str):
        return value
    whole = _PLACEHOLDER.fullmatch(value)
    if whole and isinstance(context.get(whole.group(1)), list):
        return list(context[whole.group(1)])  # "{endpoints}" -> the list itself

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in context:
            raise InputError(
                f"{where(recipe.path, field='stages.' + stage)}: unknown placeholder {{{name}}}; "
                f"known: {', '.join(sorted(context))}"
            )
        return str(context[name])

    return _PLACEHOLDER.sub(replace, value)


def _flags(args: dict[str, Any], context: dict[str, Any], recipe: Recipe, stage: str) -> list[str]:
    argv: list[str] = []
    for key, raw in args.items():
        value = _substitute(raw, context, recipe, stage)
        flag = "--" + key
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def _argv(stage: Stage, context: dict[str, Any], recipe: Recipe) -> list[str]:
    argv = [str(_substitute(a, context, recipe, stage.name)) for a in stage.run]
    return argv + _flags(stage.args, context, recipe, stage.name)


def plan(
    recipe: Recipe,
    stages: Sequence[str] | None = None,
    shard: tuple[int, int] | None = None,
    models: Sequence[str] | None = None,
) -> list[Unit]:
    """The units to run, in order, with their exact commands.

    ``stages`` restricts to those stage names; ``models`` to those models; with ``shard`` only
    shardable and every-machine stages are kept and shardable ones get ``--shard i/N``."""
    known = recipe.stage_names()
    for name in stages or ():
        if name not in known:
            raise InputError(f"--stage {name!r}: no such stage in {recipe.path}; stages: {', '.join(known)}")
    chosen_models = list(models) if models else recipe.models
    for model in chosen_models:
        if model not in recipe.models:
            raise InputError(f"--model {model!r}: not in the recipe's models: {', '.join(recipe.models)}")
    base = {
        "out": str(recipe.out),
        "mimic_root": recipe.mimic_root,
        "recipe_dir": str(recipe.path.parent),
        "shard": f"{shard[0]}/{shard[1]}" if shard else "0/1",
        "python": sys.executable,
        **recipe.variables,
    }
    units = []
    for stage in recipe.stages:
        if stages and stage.name not in stages:
            continue
        if shard and not (stage.shardable or stage.every_machine):
            continue
        for model in chosen_models if stage.for_each == "model" else [None]:
            context = dict(base)
            if model is not None:
                context["model"] = model
                context["endpoints"] = recipe.endpoints.get(model, [])
            argv = _argv(stage, context, recipe)
            if shard and stage.shardable:
                argv += ["--shard", f"{shard[0]}/{shard[1]}"]
            rerun = tuple(_flags(stage.on_rerun, context, recipe, stage.name))
            units.append(
                Unit(
                    stage.name,
                    model,
                    tuple(argv),
                    stage.shardable,
                    stage.every_machine,
                    rerun,
                    stage.description,
                )
            )
    return units


def _state_path(recipe: Recipe, unit: Unit, shard: tuple[int, int] | None) -> Path:
    suffix = f".shard-{shard[0]}-of-{shard[1]}" if shard and unit.shardable else ""
    return recipe.out / ".recipe" / f"{unit.key}{suffix}.json"


def fingerprint(unit: Unit) -> str:
    """sha256 of the unit's command: a changed command means the unit reruns."""
    return hashlib.sha256(json.dumps(unit.argv).encode()).hexdigest()


def unit_status(recipe: Recipe, unit: Unit, shard: tuple[int, int] | None = None) -> str:
    """``done`` (finished with exactly this command), ``started`` (began with this command and did not
    finish: a rerun resumes it, adding the stage's ``on_rerun`` arguments) or ``todo``."""
    path = _state_path(recipe, unit, shard)
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "todo"
    if state.get("fingerprint") != fingerprint(unit):
        return "todo"
    return "done" if state.get("status") == "done" else "started"


def is_done(recipe: Recipe, unit: Unit, shard: tuple[int, int] | None = None) -> bool:
    """True when the unit finished before with exactly this command."""
    return unit_status(recipe, unit, shard) == "done"


def _write_state(
    recipe: Recipe, unit: Unit, shard: tuple[int, int] | None, status: str, seconds: float | None = None
) -> None:
    state = {
        "status": status,
        "stage": unit.stage,
        "model": unit.model,
        "argv": list(unit.argv),
        "fingerprint": fingerprint(unit),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if seconds is not None:
        state["seconds"] = round(seconds, 3)
    atomic_write_json(_state_path(recipe, unit, shard), state)


@dataclass
class UnitResult:
    """What happened to one unit in a run."""

    unit: Unit
    status: str  # ran | resumed | skipped
    seconds: float = 0.0


#: Seconds an interrupted stage gets to save its state and exit before it is killed.
STAGE_STOP_SECONDS = 30.0


def _run_stage(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run one stage as a child process. When this process is interrupted (Ctrl-C, or SIGTERM turned
    into KeyboardInterrupt by the CLI), the child is sent the same signal, so it stops the way it
    would on its own (a terminal's Ctrl-C reaches it anyway, a SIGTERM sent to this process does
    not), and is waited for (killed after STAGE_STOP_SECONDS) before the interruption goes on: no
    stage keeps running behind a finished `cxrmax run`."""
    proc = subprocess.Popen(argv, env=env)
    try:
        return subprocess.CompletedProcess(argv, proc.wait())
    except KeyboardInterrupt as exc:
        proc.send_signal(int(getattr(exc, "signum", None) or signal.SIGINT))
        try:
            proc.wait(STAGE_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise


def execute(
    recipe: Recipe,
    units: Iterable[Unit],
    shard: tuple[int, int] | None = None,
    force: bool = False,
    on_start: Callable[[Unit], None] | None = None,
    on_end: Callable[[UnitResult], None] | None = None,
    env: dict[str, str] | None = None,
) -> list[UnitResult]:
    """Run the units in order (each a subprocess whose output goes to this terminal), skipping finished
    ones unless ``force``; a unit that started before and did not finish gets its ``on_rerun``
    arguments (e.g. ``--resume latest``). A failing unit stops the run with a CxrmaxError saying how
    to resume."""
    results = []
    for unit in units:
        status = "todo" if force else unit_status(recipe, unit, shard)
        if status == "done":
            result = UnitResult(unit, "skipped")
        else:
            argv = list(unit.argv) + (list(unit.rerun_args) if status == "started" else [])
            if on_start:
                on_start(unit)
            _write_state(recipe, unit, shard, "started")
            started = time.perf_counter()
            try:
                proc = _run_stage(argv, {**os.environ, **(env or {})})
            except FileNotFoundError:
                raise CxrmaxError(
                    f"stage {unit.key}: command {unit.argv[0]!r} not found (is it installed in this environment?)"
                ) from None
            seconds = time.perf_counter() - started
            if proc.returncode != 0:
                raise CxrmaxError(
                    f"stage {unit.key} failed with exit code {proc.returncode}: {shlex.join(argv)}\n"
                    f"Fix the cause and rerun the same `cxrmax run` command: finished stages are skipped "
                    f"and the stage resumes where it stopped."
                )
            _write_state(recipe, unit, shard, "done", seconds)
            result = UnitResult(unit, "resumed" if status == "started" else "ran", seconds)
        results.append(result)
        if on_end:
            on_end(result)
    return results


# --------------------------------------------------------------------------------------------
# vllm serve starting points from the roster.
# --------------------------------------------------------------------------------------------


def serve_lines(recipe: Recipe, models: Sequence[str] | None = None) -> dict[str, str]:
    """``vllm serve`` starting points for the recipe's models, from the generate roster
    (``[recipe].roster``): the recommended tensor-parallel layout, context length, image limit and
    processor pixel limits per model. The port comes from ``[serve.ports]`` (default 8000), so that
    each line matches the recipe's ``[endpoints]``."""
    roster = load_roster(recipe.roster) if recipe.roster else load_roster()
    ports = recipe.serve.get("ports", {}) if isinstance(recipe.serve.get("ports"), dict) else {}
    lines: dict[str, str] = {}
    for name in list(models) if models else recipe.models:
        spec = roster.get(name)
        if spec is None:
            raise InputError(
                f"{where(recipe.path, field='recipe.models')}: model {name!r} is not in the roster "
                f"{recipe.roster or 'pipelines/models.toml'}; known: {', '.join(sorted(roster))}"
            )
        lines[name] = spec.serve_command(port=int(ports.get(name, 8000)))
    return lines


def gpus_needed(recipe: Recipe) -> dict[str, int]:
    """GPUs (80 GB class) each model's recommended vllm layout needs, from the roster."""
    roster = load_roster(recipe.roster) if recipe.roster else load_roster()
    return {name: roster[name].min_gpus for name in recipe.models if name in roster}
