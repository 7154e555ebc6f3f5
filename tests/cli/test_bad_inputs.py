"""Each command, run as a real process on bad input: a clear one-line error, exit code 2, no traceback.

The table grows with every input a user was seen to get wrong; each row is (name, argv, the words
the error must contain). ``{m}`` is a mini MIMIC-CXR made once for the module."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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
]


@pytest.fixture(scope="module")
def mini(tmp_path_factory):
    from cxrmax.testing.mini_mimic import make_mini_mimic

    root = tmp_path_factory.mktemp("bad") / "m"
    make_mini_mimic(root, studies=12, seed=0)
    return root


def run_cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m cxrmax ARGV` as a user would run it: no terminal, narrow default width."""
    env = {**os.environ, "COLUMNS": "60", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "cxrmax", *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("name, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_line(name, argv, words, mini, tmp_path):
    argv = [a.format(m=mini, tmp=tmp_path) for a in argv]
    result = run_cli(argv, tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for word in words:
        assert word in errors[0]
    assert not (tmp_path / "sel.parquet").exists()  # nothing half made
