"""`cxrmax run RECIPE`: the real CXR-MAX recipe's plan, its commands against the real CLI, and the
driver's resume / shard / failure behaviour on small recipes that run real subprocesses."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import tomllib
import typer
import yaml
from typer.testing import CliRunner

from cxrmax import recipe as R
from cxrmax.cli import app
from cxrmax.core.errors import CxrmaxError, InputError
from cxrmax.core.shards import parse_shard

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "pipelines" / "cxr-max.toml"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def _toy(tmp_path: Path, body: str, models: str = '["m1", "m2"]') -> R.Recipe:
    """A recipe whose stages are small Python commands appending to a log file."""
    head = f"""
[recipe]
name = "toy"
out = "{tmp_path / "out"}"
mimic_root = "/nowhere"
models = {models}

[vars]
py = "{sys.executable}"
log = "{tmp_path / "log.txt"}"

[endpoints]
m1 = ["http://127.0.0.1:9001/v1", "http://127.0.0.1:9002/v1"]
m2 = "http://127.0.0.1:9003/v1"
"""
    return R.load_recipe(_write(tmp_path, head + body))


APPEND = 'run = ["{py}", "-c", "import sys; open(sys.argv[1], \'a\').write(\' \'.join(sys.argv[2:]) + chr(10))", "{log}", "%s"]'


def _log(tmp_path: Path) -> list[str]:
    path = tmp_path / "log.txt"
    return path.read_text().splitlines() if path.exists() else []


# ------------------------------------------------------------------ the real recipe


def test_real_recipe_plans_the_full_cxr_max_build():
    recipe = R.load_recipe(REAL)
    assert len(recipe.models) == 7 and len(set(recipe.models)) == 7
    units = R.plan(recipe)
    stages = [u.stage for u in units]
    assert stages.index("select") < stages.index("generate") < stages.index("preferences")
    assert stages.index("preferences") < stages.index("sft") < stages.index("apo") < stages.index("score")
    generate = [u for u in units if u.stage == "generate"]
    assert [u.model for u in generate] == recipe.models
    select = next(u for u in units if u.stage == "select")
    assert "--k" in select.argv and select.argv[select.argv.index("--k") + 1] == "24426"
    for unit in generate:
        argv = list(unit.argv)
        urls = [argv[i + 1] for i, a in enumerate(argv) if a == "--base-url"]
        assert urls == recipe.endpoints[unit.model]
    sft = next(u for u in units if u.stage == "sft")
    assert sft.argv[:3] == ("accelerate", "launch", "--config_file")
    assert "--deepspeed" in sft.argv and "--resume" not in sft.argv
    assert sft.rerun_args == ("--resume", "latest")


def test_real_recipe_serve_lines_come_from_the_roster():
    recipe = R.load_recipe(REAL)
    lines = R.serve_lines(recipe)
    assert set(lines) == set(recipe.models)
    roster = tomllib.loads((REPO / "pipelines" / "models.toml").read_text())["models"]
    ports = tomllib.loads(REAL.read_text())["serve"]["ports"]
    for name, line in lines.items():
        argv = shlex.split(line)
        assert argv[:3] == ["vllm", "serve", roster[name]["hf_id"]]
        assert argv[argv.index("--port") + 1] == str(ports[name])
        tp = roster[name]["serve"]["tensor_parallel_size"]
        assert argv[argv.index("--tensor-parallel-size") + 1] == str(tp)
        # the generate endpoint of the model points at the port its server listens on
        assert recipe.endpoints[name][0].endswith(f":{ports[name]}/v1")
    assert sum(R.gpus_needed(recipe).values()) >= 7


def _click_command(argv: list[str]):
    """The click command a cxrmax argv invokes (after `cxrmax` or `-m cxrmax`)."""
    if argv[0] == "cxrmax":
        rest = argv[1:]
    else:
        rest = argv[argv.index("-m") + 2 :]
    command = typer.main.get_command(app)
    while hasattr(command, "commands") and rest and rest[0] in command.commands:
        command = command.commands[rest[0]]
        rest = rest[1:]
    return command, rest


def test_every_flag_of_the_real_recipe_exists_in_the_cli():
    recipe = R.load_recipe(REAL)
    checked = 0
    for unit in R.plan(recipe):
        argv = list(unit.argv) + list(unit.rerun_args)
        command, rest = _click_command(argv)
        # a group that runs without a subcommand (`cxrmax generate ...`) takes its own options
        assert command.params, f"{unit.key}: {argv} does not name a command with options"
        known = {opt for param in command.params for opt in param.opts + param.secondary_opts}
        for token in rest:
            if token.startswith("--"):
                assert token in known, f"{unit.key}: {token} is not an option of {command.name}"
                checked += 1
    assert checked > 40


def test_accelerate_and_deepspeed_configs_are_consistent():
    folder = REPO / "pipelines" / "accelerate"
    ds = json.loads((folder / "ds_zero2.json").read_text())
    assert ds["zero_optimization"]["stage"] == 2
    for name in ("zero2.yaml", "zero2-2nodes.yaml"):
        config = yaml.safe_load((folder / name).read_text())
        assert config["distributed_type"] == "DEEPSPEED"
        assert (REPO / config["deepspeed_config"]["deepspeed_config_file"]).is_file()
        assert config["num_processes"] % config["num_machines"] == 0
    recipe = R.load_recipe(REAL)
    assert (REPO / recipe.variables["accelerate_config"]).is_file()
    assert (REPO / recipe.variables["deepspeed_config"]).is_file()


def test_dry_run_cli_prints_plan_and_serve_lines(tmp_path):
    result = CliRunner().invoke(app, ["run", str(REAL), "--dry-run", "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert (
        sum(line.startswith("vllm serve ") and "--port" in line for line in result.output.splitlines()) == 7
    )
    assert "--k 24426" in result.output
    assert "accelerate launch --config_file" in result.output
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_dry_run_with_shard_keeps_only_shardable_stages():
    recipe = R.load_recipe(REAL)
    units = R.plan(recipe, shard=parse_shard("1/4"))
    assert {u.stage for u in units} == {"select", "generate", "select-eval", "predict"}
    for unit in units:
        if unit.stage in ("generate", "predict"):
            assert unit.argv[-2:] == ("--shard", "1/4")
        else:
            assert "--shard" not in unit.argv


# ------------------------------------------------------------------ the driver on toy recipes


def test_execute_runs_in_order_then_skips_finished_units(tmp_path):
    body = f"""
[[stages]]
name = "a"
{APPEND % "a"}

[[stages]]
name = "gen"
for_each = "model"
{APPEND % "gen"}
args = {{ model = "{{model}}", url = "{{endpoints}}" }}
"""
    recipe = _toy(tmp_path, body)
    results = R.execute(recipe, R.plan(recipe))
    assert [r.status for r in results] == ["ran", "ran", "ran"]
    assert _log(tmp_path) == [
        "a",
        "gen --model m1 --url http://127.0.0.1:9001/v1 --url http://127.0.0.1:9002/v1",
        "gen --model m2 --url http://127.0.0.1:9003/v1",
    ]
    state = json.loads((tmp_path / "out" / ".recipe" / "gen.m1.json").read_text())
    assert state["status"] == "done" and state["model"] == "m1"
    again = R.execute(recipe, R.plan(recipe))
    assert [r.status for r in again] == ["skipped"] * 3
    assert len(_log(tmp_path)) == 3
    forced = R.execute(recipe, R.plan(recipe, stages=["a"]), force=True)
    assert [r.status for r in forced] == ["ran"] and _log(tmp_path)[-1] == "a"


def test_changed_command_reruns_only_that_unit(tmp_path):
    body = f"""
[[stages]]
name = "a"
{APPEND % "a"}
args = {{ x = 1 }}

[[stages]]
name = "b"
{APPEND % "b"}
"""
    recipe = _toy(tmp_path, body)
    R.execute(recipe, R.plan(recipe))
    changed = _toy(tmp_path, body.replace("x = 1", "x = 2"))
    results = R.execute(changed, R.plan(changed))
    assert [r.status for r in results] == ["ran", "skipped"]
    assert _log(tmp_path) == ["a --x 1", "b", "a --x 2"]


def test_failure_stops_the_run_and_a_rerun_resumes_with_on_rerun_args(tmp_path):
    flag = tmp_path / "fail-once"
    flag.write_text("")
    script = (
        "import os, sys; open(sys.argv[1], 'a').write(' '.join(sys.argv[2:]) + chr(10)); "
        f"flag = {str(flag)!r}; "
        "sys.exit(3 if os.path.exists(flag) and not os.remove(flag) else 0)"
    )
    body = f"""
[[stages]]
name = "train"
run = ["{{py}}", "-c", "{script}", "{{log}}", "train"]
on_rerun = {{ resume = "latest" }}

[[stages]]
name = "after"
{APPEND % "after"}
"""
    recipe = _toy(tmp_path, body)
    with pytest.raises(CxrmaxError, match="stage train failed with exit code 3"):
        R.execute(recipe, R.plan(recipe))
    assert _log(tmp_path) == ["train"]
    assert R.unit_status(recipe, R.plan(recipe)[0]) == "started"
    results = R.execute(recipe, R.plan(recipe))
    assert [r.status for r in results] == ["resumed", "ran"]
    assert _log(tmp_path) == ["train", "train --resume latest", "after"]


def test_shard_runs_only_shardable_units_and_keeps_separate_state(tmp_path):
    body = f"""
[[stages]]
name = "select"
every_machine = true
{APPEND % "select"}

[[stages]]
name = "gen"
for_each = "model"
shardable = true
{APPEND % "gen"}
args = {{ model = "{{model}}" }}

[[stages]]
name = "train"
{APPEND % "train"}
"""
    recipe = _toy(tmp_path, body, models='["m1"]')
    R.execute(recipe, R.plan(recipe, shard=(0, 2)), shard=(0, 2))
    R.execute(recipe, R.plan(recipe, shard=(1, 2)), shard=(1, 2))
    assert _log(tmp_path) == [
        "select",
        "gen --model m1 --shard 0/2",
        "gen --model m1 --shard 1/2",  # select is done on this machine too (same state file)
    ]
    assert (tmp_path / "out" / ".recipe" / "gen.m1.shard-1-of-2.json").is_file()
    R.execute(recipe, R.plan(recipe))  # the non-sharded run: everything not done yet
    assert _log(tmp_path)[-2:] == ["gen --model m1", "train"]


def test_real_select_stage_on_a_mini_mimic(tmp_path, mini_mimic):
    body = """
[[stages]]
name = "select"
run = ["{python}", "-m", "cxrmax", "mimic", "select", "{mimic_root}"]
args = { out = "{out}/selection.parquet", view = ["PA", "AP"], require-positive = true, k = 5, seed = 0 }
"""
    path = _write(
        tmp_path,
        f'[recipe]\nname = "mini"\nout = "{tmp_path / "out"}"\nmimic_root = "{mini_mimic}"\n' + body,
    )
    recipe = R.load_recipe(path)
    R.execute(recipe, R.plan(recipe))
    from cxrmax.mimic.reader import read_selection

    table = read_selection(tmp_path / "out" / "selection.parquet")
    assert table.num_rows == 5
    assert set(table.column("view").to_pylist()) <= {"PA", "AP"}


@pytest.mark.parametrize(
    "text, message",
    [
        ("[recipe]\nname='x'\n", "recipe.out"),
        ("not toml [", "not valid TOML"),
        ("[recipe]\nname='x'\nout='o'\nmimic_root='m'\n", "no [[stages]]"),
        (
            "[recipe]\nname='x'\nout='o'\nmimic_root='m'\n[[stages]]\nname='a'\nrun=['echo', '{nope}']\n",
            "unknown placeholder {nope}",
        ),
        (
            "[recipe]\nname='x'\nout='o'\nmimic_root='m'\n[[stages]]\nname='a'\nrun=['echo']\nfor_each='x'\n",
            "for_each",
        ),
        (
            "[recipe]\nname='x'\nout='o'\nmimic_root='m'\n[[stages]]\nname='a'\nrun=['echo']\ncolour='red'\n",
            "unknown keys",
        ),
    ],
)
def test_bad_recipes_name_the_problem(tmp_path, text, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("{", r"\{")):
        recipe = R.load_recipe(_write(tmp_path, text))
        R.plan(recipe)


def test_unknown_stage_model_and_bad_shard_are_errors():
    recipe = R.load_recipe(REAL)
    with pytest.raises(InputError, match="no such stage"):
        R.plan(recipe, stages=["nope"])
    with pytest.raises(InputError, match="not in the recipe's models"):
        R.plan(recipe, models=["gpt-9"])
    for text in ("2/2", "x", "1/0"):
        with pytest.raises(InputError, match="--shard"):
            parse_shard(text)
