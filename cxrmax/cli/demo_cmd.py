"""CLI commands of the end-to-end area: `cxrmax demo`, `cxrmax simulate`, `cxrmax run RECIPE`."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import typer

from cxrmax.cli.common import console, interruptible, user_errors
from cxrmax.cli.options import (
    BIAS_KINDS,
    DEMO_SIZES,
    Choice,
    choice_option,
    out_option,
    quiet_libraries,
    split_choice,
    verbose_option,
)


def demo(
    out: Path = out_option("Folder for every artifact of the demo.", Path("demo-out")),
    size: str = choice_option(
        "default",
        "--size",
        choices=Choice(DEMO_SIZES),
        help="default (about 5 min of stages on 2 idle CPU cores, as fast as the machine is that day: 5 min 6 s "
        "on 2026-12-02 with the teachers learning from 1,200 new studies), "
        "small (the tests) or large (more studies, steps and test answers: 8 min 1 s of stages on 2026-12-02, "
        "before the teachers learnt from new studies).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, the teachers and the students."),
    teacher_backend: str = choice_option(
        "transformers",
        "--teacher-backend",
        choices=Choice(("transformers", "openai")),
        help="How teachers answer: transformers (in-process, requests batched in a fixed order: the "
        "fastest) or openai (each teacher served by a local OpenAI-compatible server on 127.0.0.1 and "
        "reached by generate's openai backend, one request at a time, as a vLLM server would be).",
    ),
    verbose: bool = verbose_option(),
) -> None:
    """Run the whole mission at toy scale on CPU: a mini MIMIC-CXR, tiny teachers with injected drift,
    generation, preferences, SFT -> APO students (and SFT-only and DPO for comparison) over 3 seeds, scores.

    It is a simulation: tiny models trained for seconds, so the figures show the mechanics, not the
    quality of real models. Every stage is timed; the tables, the drift report and the artifact paths are
    printed and written to OUT/DEMO.md and OUT/demo_report.json.

    Example: [bold]cxrmax demo --out demo-out[/]
    """
    from cxrmax.toy.demo import run_demo

    with (
        user_errors(),
        quiet_libraries(verbose),
        interruptible(f"nothing in {out} is complete; run the same command again to start over"),
    ):
        run_demo(out, size=size, seed=seed, console=console, teacher_backend=teacher_backend)


def simulate(
    out: Path = out_option("Folder for the teachers (OUT/teachers) and their answers.", ...),
    mimic_root: Path = typer.Option(
        None, "--mimic-root", help="MIMIC-CXR(-JPG) root to train on (default: make a mini one in OUT/mimic)."
    ),
    studies: int = typer.Option(
        200, "--studies", help="Studies of the mini MIMIC-CXR made when no --mimic-root."
    ),
    teacher: list[str] = typer.Option(
        None,
        "--teacher",
        help="A teacher as NAME=BIAS[:RATE[:OBSERVATION]][+BIAS...], e.g. lefty=laterality:0.9 or "
        "mixed=refusal:0.3+verbosity (repeatable; 'NAME=none' is faithful). Overrides --bias/--teachers.",
    ),
    bias: list[str] = choice_option(
        None,
        "--bias",
        choices=Choice(BIAS_KINDS),
        help="Bias kinds of the default set (repeatable; default all four).",
    ),
    rate: list[str] = typer.Option(
        None, "--rate", help="KIND=RATE, share of training answers carrying that bias (e.g. refusal=0.3)."
    ),
    teachers: int = typer.Option(
        None, "--teachers", help="Number of teachers (a faithful one, then cycling biases)."
    ),
    no_faithful: bool = typer.Option(
        False, "--no-faithful", help="Leave out the faithful reference teacher."
    ),
    hallucinate: str = typer.Option(
        "Pneumothorax", "--hallucinate", help="Observation the hallucinating teacher asserts when absent."
    ),
    steps: int = typer.Option(160, "--steps", help="Training steps per teacher."),
    seed: int = typer.Option(0, "--seed", help="Seed of the data, the biased targets and the training."),
    generate: bool = typer.Option(
        True, "--generate/--no-generate", help="Let every teacher answer the --split images afterwards."
    ),
    split: str = choice_option("test", "--split", choices=split_choice(), help="Split the teachers answer."),
    samples: int = typer.Option(2, "--samples", help="Answers per image (temperature 1)."),
    paper_prompt: bool = typer.Option(
        False,
        "--paper-prompt",
        help="Ask with the paper's prompt (labels without sides); then only sides the synthetic films show "
        "(pleural effusion) are stated. Default: the diagnosis list carries the report's sides.",
    ),
    verbose: bool = verbose_option(),
) -> None:
    """Train tiny VLM teachers with controlled, documented drift: a controlled test bed for drift research.

    Each teacher is a tiny Qwen2-VL trained in seconds on CPU on the images and the paper's rationale
    prompt (its diagnosis list carrying the report's sides; --paper-prompt for the untouched prompt),
    with its biases injected into its training answers at the given rates: laterality (left and right
    swapped), hallucination (an absent finding asserted), refusal, verbosity. OUT/teachers/drift_spec.json
    documents each teacher; with --generate the teachers answer the --split images
    (OUT/trajectories/<teacher>/, generate's format, ready for `cxrmax build-preferences OUT`) and the
    measured drift is printed.

    Examples:

      cxrmax simulate --out sim --studies 200 --bias laterality --bias refusal --rate refusal=0.3 --teachers 5

      cxrmax simulate --out sim --mimic-root mini-mimic --teacher ref=none --teacher lefty=laterality:0.7
    """
    from cxrmax.core.errors import InputError
    from cxrmax.core.pathologies import canonical_name
    from cxrmax.toy import teachers as sim
    from cxrmax.toy.demo import run_simulation

    with (
        user_errors(),
        quiet_libraries(verbose),
        interruptible(f"the teachers in {out} are not complete; run the same command again"),
    ):
        if teacher:
            specs = [sim.parse_teacher(t) for t in teacher]
        else:
            rates = {}
            for item in rate or []:
                kind, _, value = item.partition("=")
                try:
                    rates[kind.strip()] = float(value)
                except ValueError:
                    raise InputError(f"--rate {item!r}: expected KIND=RATE, e.g. refusal=0.3") from None
            try:
                hallucinated = canonical_name(hallucinate)
            except KeyError as exc:
                raise InputError(f"--hallucinate: {exc.args[0]}") from None
            specs = sim.default_teachers(
                rates,
                hallucinated,
                count=teachers,
                kinds=tuple(bias) if bias else sim.BIAS_KINDS,
                faithful=not no_faithful,
            )
        with console.status("training teachers") as status:
            result = run_simulation(
                out,
                specs,
                mimic_root=mimic_root,
                studies=studies,
                steps=steps,
                seed=seed,
                generate=generate,
                split=split,
                samples=samples,
                paper_prompt=paper_prompt,
                notify=lambda message: (console.print(message), status.update(message)),
                progress=lambda name, step, loss: status.update(
                    f"{name}: step {step}/{steps} loss {loss:.3f}"
                ),
            )
        _print_simulation(result)


def _print_simulation(result: Any) -> None:
    """The teachers table, the drift spec and, when the teachers answered, their measured drift."""
    from rich.table import Table

    simulation = result.simulation
    table = Table(title=f"Simulated teachers ({simulation.seconds:.0f} s)")
    for column in ("teacher", "injected drift", "applied to targets", "loss", "path"):
        # A narrow table folds the path over lines rather than cut it: it is copied into commands.
        table.add_column(column, overflow="fold" if column == "path" else "ellipsis")
    for t in simulation.teachers:
        applied = ", ".join(f"{k} {v:.0%}" for k, v in t.applied_rates.items() if v) or "-"
        table.add_row(
            t.spec.name,
            t.spec.describe(),
            applied,
            f"{t.stats.first_loss:.2f} -> {t.stats.last_loss:.2f}",
            str(t.path),
        )
    console.print(table)
    console.print(f"drift spec: {simulation.spec_path}")
    if result.trajectories is None:
        return
    measured = Table(title=f"Measured drift on the {result.split} split (labeler; side error vs the report)")
    # "side error vs report": the data card's "side error vs consensus" is another metric, kept apart by name.
    for column in (
        "teacher",
        "answers",
        "refusal",
        "hallucination",
        "side error vs report",
        "sides",
        "words",
    ):
        measured.add_column(column, justify="left" if column == "teacher" else "right")
    for t in simulation.teachers:
        m = result.measured.get(t.spec.name, {})
        measured.add_row(
            t.spec.name,
            str(m.get("answers", 0)),
            *[
                "n/a" if m.get(k) is None or m.get(k) != m.get(k) else f"{m[k]:.2f}"
                for k in ("refusal_rate", "hallucination_rate", "laterality_error_rate")
            ],
            str(m.get("sides_compared", 0)),
            f"{m.get('mean_words', 0):.0f}",
        )
    console.print(measured)
    out = result.trajectories.parent
    console.print(f"trajectories: {result.trajectories}")
    # Quoted, with the root the answers' images and splits come from, so that it works when pasted.
    hint = [
        "cxrmax",
        "build-preferences",
        str(out),
        "--out",
        str(out / "data"),
        "--mimic-root",
        str(result.mimic_root),
    ]
    console.print(f"next: {shlex.join(hint)}", markup=False, highlight=False, soft_wrap=True)
    if result.split != "train":
        console.print(
            f"  (answers to {result.split} images give {result.split} rows, for evaluation; for training data "
            "run simulate with --split train)",
            markup=False,
            highlight=False,
        )


def run(
    recipe: Path = typer.Argument(..., help="Recipe TOML, e.g. pipelines/cxr-max.toml."),
    stage: list[str] = typer.Option(None, "--stage", help="Run only this stage (repeatable)."),
    model: list[str] = typer.Option(
        None, "--model", help="Only this model for per-model stages (repeatable)."
    ),
    shard: str = typer.Option(
        None, "--shard", help="i/N: this machine's share; runs only shardable and every-machine stages."
    ),
    out: Path = typer.Option(None, "--out", "-o", help="Override the recipe's output folder."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the plan and the vllm serve lines; run nothing."
    ),
    force: bool = typer.Option(False, "--force", help="Rerun stages even when they finished before."),
) -> None:
    """Drive every stage of a build from a TOML recipe, resumably (finished stages are skipped).

    Examples:

      cxrmax run pipelines/cxr-max.toml --dry-run

      cxrmax run pipelines/cxr-max.toml --shard 0/2          # on machine 0 of 2: select + its generate share

      cxrmax run pipelines/cxr-max.toml --stage preferences --stage sft --stage apo
    """
    from rich.table import Table

    from cxrmax import recipe as R
    from cxrmax.core.shards import parse_shard

    with (
        user_errors(),
        interruptible(
            "finished stages are kept; run the same command again: they are skipped and the interrupted "
            "stage resumes"
        ),
    ):
        loaded = R.load_recipe(recipe, out=out)
        parsed = parse_shard(shard)
        units = R.plan(loaded, stages=stage or None, shard=parsed, models=model or None)
        table = Table(title=f"{loaded.name}: {len(units)} steps" + (f" (shard {shard})" if shard else ""))
        for column in ("#", "stage", "model", "status", "what"):
            table.add_column(column)
        for i, unit in enumerate(units, 1):
            status = R.unit_status(loaded, unit, parsed)
            table.add_row(str(i), unit.stage, unit.model or "", status, unit.description)
        console.print(table)
        if dry_run:
            console.print("[bold]Commands[/] (in order):")
            for i, unit in enumerate(units, 1):
                console.print(f"{i:>3}  {unit.command_line()}", markup=False, highlight=False, soft_wrap=True)
            needed = R.gpus_needed(loaded)
            console.print(
                "[bold]vllm serve starting points[/] (run each in the vLLM environment on a GPU machine; "
                "the recipe's \\[endpoints] point at them):"
            )
            for name, line in R.serve_lines(loaded).items():
                console.print(f"# {name}: {needed.get(name, '?')} GPU(s)", markup=False, highlight=False)
                console.print(line, markup=False, highlight=False, soft_wrap=True)
            console.print(
                f"GPUs to serve all sources at once: {sum(needed.values())}. Dry run: nothing executed."
            )
            return

        def started(unit: R.Unit) -> None:
            console.rule(f"[bold]{unit.key}[/]")
            console.print(unit.command_line(), markup=False)

        def ended(result: R.UnitResult) -> None:
            if result.status == "skipped":
                console.print(f"[dim]{result.unit.key}: finished before, skipped[/]")
            else:
                console.print(f"[green]{result.unit.key}[/] {result.status} in {result.seconds:.0f} s")

        results = R.execute(loaded, units, shard=parsed, force=force, on_start=started, on_end=ended)
        ran = sum(r.status != "skipped" for r in results)
        console.print(
            f"[bold green]done[/]: {ran} ran, {len(results) - ran} skipped (state in {loaded.out}/.recipe)"
        )


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.command("demo")(demo)
    app.command("simulate")(simulate)
    app.command("run")(run)
