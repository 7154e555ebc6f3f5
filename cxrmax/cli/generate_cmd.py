"""CLI commands for the generate area: `cxrmax generate`, `cxrmax generate status`, `cxrmax models list`,
`cxrmax models serve-command` (registered on the root app by cxrmax.cli)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import typer
from rich.markup import escape

from cxrmax.cli.common import console, err_console, raise_terminated, user_errors
from cxrmax.cli.options import (
    GENERATE_BACKENDS,
    Choice,
    choice_option,
    either,
    emit_json,
    json_option,
    out_option,
    quiet_libraries,
    verbose_option,
)

generate_app = typer.Typer(
    name="generate",
    invoke_without_command=True,
    no_args_is_help=False,
    rich_markup_mode="rich",
)
models_app = typer.Typer(
    name="models", help="The source-model roster (pipelines/models.toml).", no_args_is_help=True
)


def _sigterm_as_interrupt() -> None:
    # SIGTERM (e.g. from a job scheduler) ends the run like Ctrl-C: buffered answers are committed.
    try:
        signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not in the main thread (e.g. tests calling the app in a thread)
        pass


@generate_app.callback()
def generate(
    ctx: typer.Context,
    model: str = typer.Option(
        None,
        "--model",
        "-m",
        help="Roster name (cxrmax models list), a served model id, or a local model folder.",
    ),
    selection: Path = typer.Option(
        None, "--selection", "-s", help="Selection manifest from `cxrmax mimic select`."
    ),
    mimic_root: Path = typer.Option(
        None, "--mimic-root", help="MIMIC-CXR(-JPG) root the selection's image paths are relative to."
    ),
    out: Path = out_option("Output folder; trajectories go to OUT/trajectories/<model>/."),
    base_url: list[str] = typer.Option(
        None,
        "--base-url",
        help="OpenAI-compatible server URL (e.g. http://127.0.0.1:8000/v1). Repeat to spread requests over servers.",
    ),
    backend: str = choice_option(
        None,
        "--backend",
        choices=Choice(GENERATE_BACKENDS),
        help="openai (default with --base-url), transformers (default without: in-process), or vllm (in-process).",
    ),
    prompt: str = typer.Option(
        "rationale", "--prompt", help="Prompt template name in pipelines/prompts/ or a file path."
    ),
    samples: int = typer.Option(1, "--samples", min=1, help="Answers per image (sample_index 0..n-1)."),
    seed: int = typer.Option(
        0, "--seed", help="Base seed; each request gets a seed derived from it, the sample and the index."
    ),
    max_tokens: int = typer.Option(
        None, "--max-tokens", min=1, help="Answer length limit (default: the roster's)."
    ),
    temperature: float = typer.Option(
        None, "--temperature", min=0.0, help="Sampling temperature (default: the roster's)."
    ),
    top_p: float = typer.Option(
        None, "--top-p", min=0.0, max=1.0, help="Nucleus sampling (default: the roster's)."
    ),
    concurrency: int = typer.Option(
        64, "--concurrency", min=1, help="Requests in flight at once (all servers together)."
    ),
    batch_size: int = typer.Option(
        8,
        "--batch-size",
        min=1,
        help="transformers backend: requests generated together as one batch (consecutive in the "
        "selection's order, so a rerun batches them alike). Servers (openai, vllm) batch on their own.",
    ),
    rpm: float = typer.Option(None, "--rpm", min=0.001, help="Requests-per-minute limit."),
    tpm: float = typer.Option(None, "--tpm", min=1.0, help="Tokens-per-minute limit (prompt + answer)."),
    timeout: float = typer.Option(
        600.0, "--timeout", min=0.1, help="Seconds before one request times out (then retried)."
    ),
    max_attempts: int = typer.Option(
        6, "--max-attempts", min=1, help="Attempts per request on 429/5xx/timeouts/connection errors."
    ),
    shard: str = typer.Option(
        None, "--shard", help="i/N: do only this machine's deterministic share (0 <= i < N)."
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Also retry permanent failures (4xx, bad images) from earlier runs."
    ),
    retry_length: bool = typer.Option(
        False, "--retry-length", help="Redo answers cut at max tokens (finish_reason length)."
    ),
    image_max_edge: int = typer.Option(
        1024, "--image-max-edge", min=64, help="Downscale images so the longer edge is at most this."
    ),
    image_max_pixels: int = typer.Option(
        None, "--image-max-pixels", min=4096, help="Also cap width x height."
    ),
    api_key: str = typer.Option(
        None, "--api-key", envvar="OPENAI_API_KEY", help="API key for the server (default $OPENAI_API_KEY)."
    ),
    name: str = typer.Option(
        None,
        "--name",
        "-n",
        help="Name recorded as `model` and used as the output folder (default: the roster name or id).",
    ),
    allow_external_endpoint: bool = typer.Option(
        False,
        "--allow-external-endpoint",
        help="Allow non-local servers (only if your MIMIC-CXR data use agreement covers them).",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of the live display."),
    rows_per_shard: int = typer.Option(
        2000, "--rows-per-shard", min=1, help="Answers per committed Arrow shard."
    ),
    json_out: Path = json_option("the run's counters"),
    summary_json: Path = typer.Option(None, "--summary-json", hidden=True, help="Old spelling of --json."),
    verbose: bool = verbose_option(),
) -> None:
    """Generate trajectories: one request per (image, sample), keyed and stored exactly once.

    Rerunning the same command does only what is missing; Ctrl-C or kill -9 loses no finished answer.

    Examples:
      [bold]cxrmax models serve-command qwen2-vl[/]   (start that on the GPU machine)
      [bold]cxrmax generate --model qwen2-vl --selection sel.parquet --mimic-root /data/mimic-cxr-jpg --out cxrmax-out --base-url http://gpu1:8000/v1 --base-url http://gpu2:8000/v1[/]
      [bold]cxrmax generate --model ./tiny-vlm --selection sel.parquet --mimic-root mini --out out[/]   (in-process transformers)
      [bold]cxrmax generate status cxrmax-out[/]
    """
    if ctx.invoked_subcommand is not None:
        return
    missing = [
        flag
        for flag, value in (
            ("--model", model),
            ("--selection", selection),
            ("--mimic-root", mimic_root),
            ("--out", out),
        )
        if value is None
    ]
    if missing:
        err_console.print(f"[bold red]error:[/] missing {', '.join(missing)}\n")
        console.print(ctx.get_help())
        raise typer.Exit(2)
    _sigterm_as_interrupt()
    json_out = either(json_out, summary_json, "--json")
    with user_errors(), quiet_libraries(verbose):
        from cxrmax.core.shards import parse_shard
        from cxrmax.generate.orchestrator import GenerateOptions
        from cxrmax.generate.prompts import load_prompt

        spec, model_path = _model_spec(model, name)
        chosen_backend = backend or ("openai" if base_url else "transformers")
        if chosen_backend == "openai" and not base_url:
            raise typer.BadParameter("the openai backend needs --base-url (the server's /v1 URL)")
        options = GenerateOptions(
            model=spec,
            selection=selection,
            mimic_root=mimic_root,
            out=out,
            prompt=load_prompt(prompt),
            backend=chosen_backend,
            base_urls=list(base_url or []),
            api_key=api_key,
            model_path=model_path,
            samples=samples,
            seed=seed,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            concurrency=concurrency,
            batch_size=batch_size,
            rpm=rpm,
            tpm=tpm,
            timeout=timeout,
            max_attempts=max_attempts,
            shard=parse_shard(shard),
            retry_failed=retry_failed,
            retry_length=retry_length,
            image_max_edge=image_max_edge,
            image_max_pixels=image_max_pixels,
            allow_external_endpoint=allow_external_endpoint,
            rows_per_shard=rows_per_shard,
        )
        stats, backend_obj = _run(options, quiet)
        counters = json.dumps({"model": spec.name, **stats.as_dict()}, indent=2, allow_nan=False)
        if not emit_json(counters, json_out):
            _print_summary(options, stats, backend_obj)
        if stats.failed:
            raise typer.Exit(1)


def _model_spec(model: str, name: str | None):  # noqa: ANN202 - ModelSpec is imported lazily
    """The roster entry for ``--model`` (a local folder becomes an ad-hoc spec) and the model folder."""
    from cxrmax.generate.roster import ModelSpec, resolve_model

    if Path(model).is_dir():
        model_path = str(Path(model).resolve())
        return ModelSpec(
            name=name or Path(model).resolve().name, hf_id=model_path, in_roster=False
        ), model_path
    spec = resolve_model(model)
    if name:
        spec = ModelSpec(**{**spec.__dict__, "name": name})
    return spec, None


def _run(options, quiet: bool):  # noqa: ANN001, ANN202 - generate's types are imported lazily
    """Build the backend and run the generation with a live display (plain lines when ``quiet`` or
    not on a terminal); Ctrl-C exits 130 (SIGTERM 143) after saying that nothing received is lost."""
    import asyncio

    from cxrmax.generate.orchestrator import build_backend, generate_async
    from cxrmax.generate.progress import PlainProgress, RichProgress

    backend = build_backend(options)
    progress = PlainProgress() if quiet or not sys.stderr.isatty() else RichProgress()
    try:
        return asyncio.run(generate_async(options, backend, progress)), backend
    except KeyboardInterrupt as exc:
        err_console.print(
            "[yellow]interrupted[/]: every answer received so far is stored; run the same command again to continue."
        )
        raise typer.Exit(128 + int(getattr(exc, "signum", signal.SIGINT))) from None


def _print_summary(options, stats, backend) -> None:  # noqa: ANN001
    from rich.table import Table

    table = Table(title=f"{options.model.name} -> {options.model_dir}", show_header=False, box=None)
    rows = [
        ("answered now", stats.done),
        ("already done before", stats.already_done),
        ("recovered from a killed run", stats.recovered),
        ("failed", stats.failed),
        ("skipped (failed before; --retry-failed)", stats.skipped_failed),
        ("cut at max tokens (--retry-length redoes)", stats.length),
        ("retries", stats.retries),
        ("requests/s", f"{stats.requests_per_s:.2f}"),
        ("completion tokens/s", f"{stats.tokens_per_s:.1f}"),
        ("elapsed", f"{stats.elapsed:.1f} s"),
    ]
    for label, value in rows:
        if value or label in ("answered now", "failed"):
            table.add_row(label, str(value))
    if stats.errors:
        table.add_row("errors seen", ", ".join(f"{k} {v}" for k, v in stats.errors.most_common()))
    sent = getattr(backend, "sent_per_endpoint", None)
    if sent is not None and len(sent()) > 1:
        table.add_row("requests per server", ", ".join(f"{u} {n}" for u, n in sent().items()))
    console.print(table)
    if stats.failed:
        err_console.print(
            f"[yellow]{stats.failed} request(s) failed[/]: see `cxrmax generate status {options.out}`; rerun to retry "
            "transient failures, add --retry-failed for the others."
        )


@generate_app.command("status")
def status(
    out: Path = typer.Argument(..., help="The --out folder of earlier runs."),
    json_out: Path = json_option("the status of each model"),
    failures: bool = typer.Option(
        False, "--failures", help="Also list the failed requests (kind, status, message)."
    ),
) -> None:
    """Done, failed and missing requests per model (and answers a killed run left to recover).

    Example: [bold]cxrmax generate status cxrmax-out[/]
    """
    with user_errors():
        from rich.table import Table

        from cxrmax.generate.status import generation_status
        from cxrmax.generate.store import FailureLedger

        statuses = generation_status(out)
        if emit_json(json.dumps([s.as_dict() for s in statuses], indent=2), json_out):
            return
        table = Table(title=f"generation status of {out}")
        for column in (
            "model",
            "done",
            "failed",
            "missing",
            "planned",
            "cut (length)",
            "recoverable",
            "shards",
            "duplicates",
        ):
            table.add_column(column, justify="left" if column == "model" else "right")
        for s in statuses:
            failed = str(s.failed) + (
                f" ({', '.join(f'{k} {v}' for k, v in s.failed_by_kind.items())})" if s.failed else ""
            )
            table.add_row(
                s.model,
                str(s.distinct_keys),
                failed,
                "?" if s.missing is None else str(s.missing),
                "?" if s.planned is None else str(s.planned),
                str(s.length),
                str(s.recoverable),
                str(s.shards),
                str(s.duplicates),
            )
        console.print(table)
        for s in statuses:
            for note in s.notes:
                console.print(f"[dim]{s.model}: {note}[/]")
        if failures:
            for model_dir in sorted((out / "trajectories").iterdir()):
                ledger_path = model_dir / "failures.sqlite"
                if not ledger_path.exists():
                    continue
                ledger = FailureLedger(ledger_path)
                for row in ledger.rows():
                    console.print(
                        f"{model_dir.name} {row['sample_id']}#{row['sample_index']} {row['kind']} "
                        f"{row['status'] or ''} attempts={row['attempts']} {'retryable' if row['retryable'] else 'permanent'}: "
                        f"{row['message']}"
                    )
                ledger.close()


@models_app.command("list")
def models_list(json_out: Path = json_option("the roster")) -> None:
    """The source-model roster: names, Hugging Face ids, GPUs, serving limits, notes.

    Example: [bold]cxrmax models list[/]
    """
    with user_errors():
        from rich.table import Table

        from cxrmax.generate.roster import load_roster, roster_path

        roster = load_roster()
        if emit_json(json.dumps({n: {**s.__dict__} for n, s in roster.items()}, indent=2), json_out):
            return
        table = Table(title=f"source models ({roster_path()})")
        # Names and Hugging Face ids are copied into commands: never cut or folded. The notes are
        # prose: printed under the table at full width instead of squeezed into a column.
        widest_id = max((len(spec.hf_id) for spec in roster.values()), default=5)
        for column in ("name", "hf_id", "params", "GPUs", "max len", "sampling"):
            table.add_column(
                column,
                no_wrap=column in ("name", "hf_id"),
                min_width=widest_id if column == "hf_id" else None,
            )
        for spec in roster.values():
            sampling = f"T={spec.sampling.get('temperature')} top_p={spec.sampling.get('top_p')} max={spec.sampling.get('max_tokens')}"
            table.add_row(
                spec.name,
                spec.hf_id,
                spec.params,
                str(spec.serve.get("tensor_parallel_size", spec.min_gpus)),
                str(spec.serve.get("max_model_len", "")),
                sampling,
            )
        console.print(table)
        for spec in roster.values():
            if spec.notes:
                console.print(f"[bold]{escape(spec.name)}[/]: {escape(spec.notes)}")


@models_app.command("serve-command")
def models_serve_command(
    name: str = typer.Argument(..., help="Roster name (see cxrmax models list)."),
    port: int = typer.Option(8000, "--port", help="Port for vllm serve."),
    host: str = typer.Option("0.0.0.0", "--host", help="Address vllm serve listens on."),
) -> None:
    """Print the `vllm serve` command line for a roster model.

    Example: [bold]cxrmax models serve-command qwen2-vl --port 8001[/]
    """
    with user_errors():
        from cxrmax.core.errors import InputError
        from cxrmax.generate.roster import load_roster

        roster = load_roster()
        if name not in roster:
            raise InputError(f"{name!r} is not in the roster; known: {', '.join(roster)}")
        # Plain print: the line is meant to be copied or piped into a shell.
        typer.echo(roster[name].serve_command(port=port, host=host))


def register(app: typer.Typer) -> None:
    """Add this area's commands to the root app."""
    app.add_typer(generate_app, name="generate")
    app.add_typer(models_app, name="models")
