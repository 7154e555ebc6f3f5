"""Each command, run as a real process on bad input or interrupted by a real signal: one clear line,
the documented exit code, no traceback, nothing half made and no worker left running.

The tables grow with every input a user was seen to get wrong; each bad-input row is (name, argv,
the words the error must contain), each interruption row (name, argv, when to send the signal,
signal, what must not exist afterwards). ``{m}`` is a mini MIMIC-CXR made once for the module,
``{data}`` a folder of bad and big inputs made once, ``{tmp}`` the test's own folder."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cxrmax.core.schemas import PREFERENCE_SCHEMA, SFT_SCHEMA
from tests.helpers.training import preference_rows, save_dataset, sft_rows

REPO = Path(__file__).resolve().parents[2]
TEXTS = (
    "Small left pleural effusion. No pneumothorax.",
    "No acute findings. Heart size normal.",
    "Cardiomegaly with mild edema and a right pleural effusion.",
)

CASES = [
    (
        "view typo",
        ["mimic", "select", "{m}", "--view", "frontl", "--out", "{tmp}/sel.parquet"],
        ["frontl", "frontal"],
    ),
    (
        "split typo",
        ["mimic", "select", "{m}", "--split", "testing", "--out", "{tmp}/sel.parquet"],
        ["testing", "test"],
    ),
    (
        "empty selection",
        ["mimic", "select", "{m}", "--split", "test", "--k", "0", "--out", "{tmp}/sel.parquet"],
        ["no image matches", "--allow-empty"],
    ),
    ("gzip file as recipe", ["run", "{m}/mimic-cxr-2.0.0-split.csv.gz", "--dry-run"], ["not a recipe"]),
    ("missing recipe", ["run", "{tmp}/nope.toml", "--dry-run"], ["nope.toml", "not found"]),
    (
        "JSONL row not UTF-8",
        ["build-preferences", "{data}/latin.jsonl", "--out", "{tmp}/o"],
        ["latin.jsonl row 5", "not UTF-8"],
    ),
    (
        "JSONL row not UTF-8, lenient",
        ["build-preferences", "{data}/latin.jsonl", "--out", "{tmp}/o", "--lenient"],
        ["no readable input", "latin.jsonl row 5", "not UTF-8"],
    ),
    (
        "JSONL line not JSON",
        ["build-preferences", "{data}/unterminated.jsonl", "--out", "{tmp}/o"],
        ["unterminated.jsonl row 1", "not a JSON line", "Unterminated string"],
    ),
    (
        "nothing to label",
        ["label", "{data}/empty.jsonl", "--out", "{tmp}/labels.arrow"],
        ["no text to label", "--allow-empty"],
    ),
    (
        "one source per sample",
        ["build-preferences", "{data}/one-source.jsonl", "--out", "{tmp}/o"],
        ["0 preference rows", "--min-sources 2"],
    ),
    (
        "empty train split, checked before the model",
        ["train-apo", "--stage", "sft", "--model", "nosuchmodel", "--sft-data", "{data}/sft-test-only",
         "--out", "{tmp}/o", "--cpu"],
        ["sft-test-only", "'train'"],
    ),
]  # fmt: skip


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from cxrmax.testing.mini_mimic import make_mini_mimic

    root = tmp_path_factory.mktemp("bad") / "m"
    make_mini_mimic(root, studies=12, seed=0)
    return root


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture(scope="module")
def data(tmp_path_factory, mini):
    """Bad inputs (as users made them) and inputs big enough to interrupt."""
    root = tmp_path_factory.mktemp("inputs")
    rows = [
        {"sample_id": f"s{s}", "model": f"m{m}", "text": text, "split": "train"}
        for s in range(4)
        for m, text in enumerate(TEXTS)
    ]
    lines = [json.dumps(row).encode() for row in rows]
    lines[4] = lines[4].replace(b"acute", b"acute \xff\xfe")  # Latin-1 bytes in row 5
    (root / "latin.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (root / "unterminated.jsonl").write_text(
        '{"sample_id": "s0", "model": "m0", "text": "cut here\n' + json.dumps(rows[1]) + "\n"
    )
    _jsonl(root / "one-source.jsonl", [r for r in rows if r["model"] == "m0"])
    _jsonl(
        root / "many.jsonl",
        [
            {"sample_id": f"s{s}", "model": f"m{m}", "text": t}
            for s in range(20000)
            for m, t in enumerate(TEXTS)
        ],
    )
    (root / "empty.jsonl").write_text("")
    (root / "many.txt").write_text("".join(TEXTS[i % 3] + "\n" for i in range(100_000)))
    sft_row = {
        "sample_id": "s0",
        "split": "test",
        "image_path": None,
        "prompt": "p",
        "completion": "c",
        "model": "m",
    }
    save_dataset([sft_row], SFT_SCHEMA, root / "sft-test-only", split="test")
    with gzip.open(mini / "mimic-cxr-2.0.0-chexpert.csv.gz", "rt") as handle:
        studies = [row["study_id"] for row in csv.DictReader(handle)]
    with open(root / "reports.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["study_id", "report"])
        writer.writerows([study, TEXTS[0]] for study in studies)
    return root


def run_cli(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m cxrmax ARGV` as a user would run it: no terminal, narrow default width."""
    env = {**os.environ, "COLUMNS": "60", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cxrmax", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _fill(argv: list[str], **places: Path) -> list[str]:
    return [a.format(**places) for a in argv]


@pytest.mark.parametrize("name, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(name, argv, words, mini, data, tmp_path):
    argv = _fill(argv, m=mini, tmp=tmp_path, data=data)
    result = run_cli(argv, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0]
    assert not (tmp_path / "sel.parquet").exists()  # nothing half made
    assert not (tmp_path / "o").exists()  # not even an empty output folder


# ------------------------------------------------------------------------------------ interruptions


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _log_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def interrupt(argv: list[str], cwd: Path, ready, sig: int, group: bool = False, settle: float = 1.0):
    """Start the command, wait until ``ready(pid)`` says it is at work, send ``sig`` (to its whole
    process group when ``group``: a terminal's Ctrl-C), and return (returncode, stdout, stderr,
    seconds to exit, the child processes it had)."""
    env = {**os.environ, "COLUMNS": "60", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cxrmax", *argv],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not ready(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, "the command ended before it could be interrupted"
        time.sleep(settle)
        children = _children(proc.pid)
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
        return proc.returncode, out, err, time.monotonic() - sent, children
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _has_children(pid: int) -> bool:
    return bool(_children(pid))


def _after(seconds: float):
    start = time.monotonic()
    return lambda pid: time.monotonic() - start > seconds


INTERRUPTIONS = [
    (
        "simulate SIGINT",
        ["simulate", "--out", "{tmp}/sim", "--mimic-root", "{m}", "--teachers", "2", "--steps", "100000", "--no-generate"],
        "children", signal.SIGINT, False, ["sim/drift_spec.json"],
    ),
    (
        "simulate SIGTERM",
        ["simulate", "--out", "{tmp}/sim", "--mimic-root", "{m}", "--teachers", "2", "--steps", "100000", "--no-generate"],
        "children", signal.SIGTERM, False, ["sim/drift_spec.json"],
    ),
    (
        "simulate Ctrl-C in a terminal (whole process group)",
        ["simulate", "--out", "{tmp}/sim", "--mimic-root", "{m}", "--teachers", "2", "--steps", "100000", "--no-generate"],
        "children", signal.SIGINT, True, ["sim/drift_spec.json"],
    ),
    (
        "demo SIGINT",
        ["demo", "--out", "{tmp}/demo", "--size", "small"],
        "children", signal.SIGINT, True, ["demo/DEMO.md", "demo/demo_report.json"],
    ),
    (
        "build-preferences SIGINT",
        ["build-preferences", "{data}/many.jsonl", "--out", "{tmp}/o", "--processes", "2", "--no-card"],
        "children", signal.SIGINT, False, ["o"],
    ),
    (
        "build-preferences SIGTERM",
        ["build-preferences", "{data}/many.jsonl", "--out", "{tmp}/o", "--processes", "2", "--no-card"],
        "children", signal.SIGTERM, False, ["o"],
    ),
    (
        "label SIGINT",
        ["label", "{data}/many.txt", "--out", "{tmp}/labels.arrow", "--processes", "2"],
        "children", signal.SIGINT, False, ["labels.arrow"],
    ),
    (
        "label SIGTERM to the process group",
        ["label", "{data}/many.txt", "--out", "{tmp}/labels.arrow", "--processes", "2"],
        "children", signal.SIGTERM, True, ["labels.arrow"],
    ),
    (
        "leaderboard score SIGINT",
        ["leaderboard", "score", "{data}/reports.csv", "-t", "mimic-cxr-report", "-r", "{m}", "--lenient",
         "--bootstrap", "20000000", "--json", "{tmp}/score.json"],
        "8s", signal.SIGINT, False, ["score.json"],
    ),
    (
        "leaderboard submit SIGTERM",
        ["leaderboard", "submit", "{data}/reports.csv", "-t", "mimic-cxr-report", "-r", "{m}", "--lenient",
         "--bootstrap", "20000000", "-n", "x", "--store", "{tmp}/board.sqlite"],
        "8s", signal.SIGTERM, False, [],
    ),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, argv, when, sig, group, absent", INTERRUPTIONS, ids=[c[0] for c in INTERRUPTIONS]
)
def test_interruption_is_one_line_and_leaves_nothing_running(
    name, argv, when, sig, group, absent, mini, data, tmp_path
):
    argv = _fill(argv, m=mini, tmp=tmp_path, data=data)
    ready = _has_children if when == "children" else _after(float(when.rstrip("s")))
    code, out, err, seconds, children = interrupt(argv, tmp_path, ready, sig, group)
    assert code == 128 + sig, out + err
    assert "Traceback" not in err and "Exception" not in err, err
    # The run's own progress bars (transformers' in simulate's workers) are not the interruption's.
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]
    assert len(lines) == 1 and lines[0].startswith("interrupted: "), err
    assert seconds < 20
    time.sleep(0.5)
    assert not [pid for pid in children if _running(pid)], "worker processes outlived the command"
    for path in absent:
        assert not (tmp_path / path).exists(), path
    assert not list(tmp_path.rglob(".build-*"))  # build-preferences' staging removed
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


def _recipe(tmp_path: Path) -> Path:
    """A recipe whose one stage records its pid and waits: `cxrmax run` interrupted mid-stage."""
    # Like a cxrmax stage, it ends quietly on Ctrl-C (SIGTERM ends it by default).
    script = (
        "import os, signal, sys, time; signal.signal(signal.SIGINT, lambda *a: sys.exit(130)); "
        "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
    )
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        f'[recipe]\nname = "toy"\nout = "{tmp_path / "out"}"\nmimic_root = "/nowhere"\nmodels = ["m1"]\n\n'
        f'[[stages]]\nname = "wait"\nrun = {json.dumps([sys.executable, "-c", script, str(tmp_path / "stage.pid")])}\n'
    )
    return recipe


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_run_interrupted_stops_its_stage(sig, tmp_path):
    pid_file = tmp_path / "stage.pid"
    code, out, err, seconds, _ = interrupt(
        ["run", str(_recipe(tmp_path))], tmp_path, lambda pid: pid_file.exists(), sig, settle=0.2
    )
    assert code == 128 + sig, out + err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.strip()] == [
        "interrupted: finished stages are kept; run the same command again: they are skipped and the "
        "interrupted stage resumes"
    ]
    time.sleep(0.5)
    assert not _running(int(pid_file.read_text())), "the stage kept running after `cxrmax run` ended"


TRAIN = ["train-apo", "--stage", "sft", "--cpu", "--global-batch", "1", "--per-device-batch", "1",
         "--logging-steps", "1", "--set", "max_length=128"]  # fmt: skip


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return save_dataset(sft_rows(16), SFT_SCHEMA, tmp_path_factory.mktemp("sft") / "sft")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_train_apo_interrupted_saves_a_checkpoint_and_the_rerun_resumes(
    sig, tiny_lm_path, sft_data, tmp_path
):
    argv = [*TRAIN, "--model", str(tiny_lm_path), "--sft-data", str(sft_data), "--out", str(tmp_path / "run")]
    log = tmp_path / "run" / "sft" / "log.jsonl"
    code, out, err, seconds, _ = interrupt(
        [*argv, "--max-steps", "100000"], tmp_path, lambda pid: _log_lines(log) >= 3, sig, settle=0.3
    )
    assert code == 128 + sig, out + err
    assert "Traceback" not in err and seconds < 30
    lines = [line for line in err.splitlines() if line.startswith("interrupted: ")]
    assert len(lines) == 1 and "checkpoint saved at" in lines[0], err
    marker = json.loads((tmp_path / "run" / "sft" / "interrupted.json").read_text())
    step = marker["step"]
    assert step >= 3 and (tmp_path / "run" / "sft" / marker["checkpoint"]).is_dir()
    assert f"checkpoint-{step} (step {step} of 100000)" in lines[0]

    rerun = run_cli([*argv, "--max-steps", str(step + 2)], tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert (
        f"resuming the interrupted run from {tmp_path / 'run' / 'sft' / f'checkpoint-{step}'}" in rerun.stdout
    )
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    resumed = steps[steps.index(step) + 1 :]
    assert resumed and min(resumed) >= step  # the rerun went on from the saved step, not from 1
    assert max(steps) == step + 2
    assert not (tmp_path / "run" / "sft" / "interrupted.json").exists()


@pytest.mark.slow
def test_stage_all_interrupted_in_stage2_keeps_stage1_and_resumes(tiny_lm_path, sft_data, tmp_path):
    """`--stage all` stopped during APO: the rerun keeps the finished SFT model (it is APO's reference)
    and goes on from APO's checkpoint, instead of training Stage 1 again."""
    prefs = save_dataset(preference_rows(16), PREFERENCE_SCHEMA, tmp_path / "preferences")
    run = tmp_path / "run"
    argv = [*TRAIN, "--stage", "all", "--model", str(tiny_lm_path), "--sft-data", str(sft_data),
            "--preferences", str(prefs), "--out", str(run), "--set", "sft.max_steps=3"]  # fmt: skip
    log = run / "apo" / "log.jsonl"
    code, _, err, _, _ = interrupt(
        [*argv, "--set", "apo.max_steps=100000"],
        tmp_path,
        lambda pid: _log_lines(log) >= 2,
        signal.SIGINT,
        settle=0.3,
    )
    assert code == 130, err
    step = json.loads((run / "apo" / "interrupted.json").read_text())["step"]
    sft_weights = sorted((run / "sft").glob("*.safetensors"))
    assert sft_weights and (run / "sft" / "completed.json").is_file()
    before = {path: path.stat().st_mtime_ns for path in sft_weights}

    rerun = run_cli([*argv, "--set", f"apo.max_steps={step + 2}"], tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "sft kept" in rerun.stdout and f"resuming the interrupted run from {run / 'apo'}" in rerun.stdout
    assert {path: path.stat().st_mtime_ns for path in sft_weights} == before  # Stage 1 not retrained
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert max(steps) == step + 2 and min(steps[steps.index(step) + 1 :]) >= step


# ------------------------------------------------------------------------------------ next: hints


@pytest.mark.slow
def test_simulate_next_hint_works_when_pasted(mini, tmp_path):
    sim = run_cli(
        [
            "simulate",
            "--out",
            "sim",
            "--mimic-root",
            str(mini),
            "--teachers",
            "2",
            "--steps",
            "2",
            "--samples",
            "1",
        ],
        tmp_path,
        timeout=600,
    )
    assert sim.returncode == 0, sim.stdout + sim.stderr
    hints = [line.removeprefix("next: ") for line in sim.stdout.splitlines() if line.startswith("next: ")]
    assert len(hints) == 1, sim.stdout
    argv = shlex.split(hints[0])
    assert argv[:2] == ["cxrmax", "build-preferences"] and "--mimic-root" in argv
    built = run_cli(argv[1:], tmp_path, timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    report = json.loads((tmp_path / "sim" / "data" / "build_report.json").read_text())
    assert report["counts"]["preference_rows"] > 0
    # simulate's default split is test: the hint says so, and the build warns that nothing is in train.
    assert "--split train" in sim.stdout and "warning: no train rows" in built.stdout
