"""What build-preferences writes and says matches what the data holds: no image slot without an
image, the card's split claim computed from the build, labeler failures named by row, an empty build
refused from the CLI, --no-card listing no README.md."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from typer.testing import CliRunner

from cxrmax.cli import app
from cxrmax.preferences.build import BuildOptions, build_preferences
from cxrmax.preferences.datacard import split_claim

TEXTS = (
    "Small left pleural effusion. No pneumothorax.",
    "No acute findings. Heart size normal.",
    "Cardiomegaly with mild edema and a right pleural effusion.",
)


def _jsonl(
    path: Path, samples: int = 3, split: str | None = None, images: bool = False, long: dict | None = None
) -> Path:
    long = long or {}
    with path.open("w") as handle:
        for s in range(samples):
            for m, text in enumerate(TEXTS):
                row = {"sample_id": f"s{s}", "model": f"m{m}", "text": long.get(f"s{s}m{m}", text)}
                if split:
                    row["split"] = split
                if images:
                    row["image_path"] = f"files/p10/p1000000{s}/s5000000{s}/i{s}.jpg"
                handle.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="module")
def text_only_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-only")
    source = _jsonl(root / "t.jsonl", long={"s1m2": "Effusion. " * 210_001})  # over the labeler's limit
    summary = build_preferences([source], root / "out", BuildOptions(processes=1))
    return root / "out", summary


def test_exports_without_images_have_no_image_slot(text_only_build):
    out, _ = text_only_build
    trl = datasets.load_from_disk(str(out / "exports" / "trl"))["train"]
    assert len(trl) and all(row["images"] == [] for row in trl)
    assert all([part["type"] for part in row["prompt"][0]["content"]] == ["text"] for row in trl)
    lines = [
        json.loads(line) for line in (out / "exports" / "swift" / "train.jsonl").read_text().splitlines()
    ]
    assert lines and all(not line["messages"][0]["content"].startswith("<image>") for line in lines)
    assert all(line["images"] == [] for line in lines)


def test_exports_with_images_keep_their_slot(tmp_path):
    build_preferences(
        [_jsonl(tmp_path / "i.jsonl", images=True)], tmp_path / "out", BuildOptions(processes=1, card=False)
    )
    trl = datasets.load_from_disk(str(tmp_path / "out" / "exports" / "trl"))["train"]
    assert [part["type"] for part in trl[0]["prompt"][0]["content"]] == ["image", "text"]
    first = json.loads((tmp_path / "out" / "exports" / "swift" / "train.jsonl").read_text().splitlines()[0])
    assert first["messages"][0]["content"].startswith("<image>") and len(first["images"]) == 1


def test_card_says_where_the_splits_come_from(text_only_build):
    out, _ = text_only_build
    card = (out / "README.md").read_text()
    assert "official MIMIC-CXR split" not in card.split("every row was put in train")[0]
    assert "The input had no split: every row was put in train" in card
    assert split_claim({"load": {"rows": 9}, "split_unknown_rows": 0}).startswith(
        "Splits are the input's own"
    )
    assert "4 rows without a split" in split_claim({"load": {"rows": 9}, "split_unknown_rows": 4})
    assert split_claim({"mimic_root": "/m", "split_from_mimic_rows": 2}).startswith(
        "Splits follow the official MIMIC-CXR split (joined from --mimic-root; 2 rows"
    )


def test_a_labeler_error_names_its_file_and_row(text_only_build):
    out, summary = text_only_build
    assert summary.counts["labeler_errors"] == 1
    assert summary.labeler_error_examples == [
        f"{out.parent / 't.jsonl'} row 6 (m2): text too long (2100010 characters > 2000000)"
    ]
    report = json.loads((out / "build_report.json").read_text())
    assert report["labeler_error_examples"] == summary.labeler_error_examples


def test_cli_empty_build_fails_and_no_card_lists_no_readme(tmp_path):
    runner = CliRunner()
    lonely = tmp_path / "lonely.jsonl"
    lonely.write_text(json.dumps({"sample_id": "s0", "model": "m0", "text": TEXTS[0]}) + "\n")
    result = runner.invoke(app, ["build-preferences", str(lonely), "--out", str(tmp_path / "empty")])
    assert result.exit_code == 2 and "0 preference rows" in result.output
    assert not (tmp_path / "empty").exists()
    allowed = runner.invoke(
        app, ["build-preferences", str(lonely), "--out", str(tmp_path / "empty"), "--allow-empty"]
    )
    assert allowed.exit_code == 0, allowed.output
    assert (tmp_path / "empty" / "preferences").is_dir()

    source = _jsonl(tmp_path / "t.jsonl", split="test")
    result = runner.invoke(
        app, ["build-preferences", str(source), "--out", str(tmp_path / "o"), "--no-card", "-j", "1"]
    )
    assert result.exit_code == 0, result.output
    outputs = next(line for line in result.output.splitlines() if line.startswith("outputs:"))
    assert "README.md" not in outputs and "preferences" in outputs
    assert "warning: no train rows (the preference rows are 3 test)" in result.output
