"""The layout of a build output: the card's YAML configs point at Parquet files that hold the same
rows as the save_to_disk folders, so `datasets.load_dataset(OUT, name)` and
`datasets.load_from_disk(OUT/name)` both load it (and the Hub's viewer reads a pushed copy)."""

from __future__ import annotations

from pathlib import Path

import datasets
import pyarrow.parquet as pq
import yaml

from cxrmax.core.splits import SPLITS
from cxrmax.preferences.build import BuildOptions, build_preferences
from cxrmax.preferences.export import export_parquet
from cxrmax.preferences.layout import DATA_SETS, parquet_name
from tests.helpers.preference_runs import full_run


def card_configs(out: Path) -> dict[str, list[dict]]:
    """config_name -> data_files of the YAML header of OUT/README.md."""
    header = (out / "README.md").read_text(encoding="utf-8").split("---\n")[1]
    return {c["config_name"]: c["data_files"] for c in yaml.safe_load(header)["configs"]}


def assert_loads_agree(out: Path, cache: Path, hub_copy: Path | None = None) -> None:
    """load_dataset(OUT, name) (or of the Hub copy) holds exactly the non-empty splits of
    load_from_disk(OUT/name)."""
    for name in DATA_SETS:
        disk = datasets.load_from_disk(str(out / name))
        assert set(disk) == set(SPLITS)
        hub = datasets.load_dataset(str(hub_copy or out), name, cache_dir=str(cache))
        assert set(hub) == {split for split in SPLITS if len(disk[split])}
        for split in hub:
            assert hub[split].features == disk[split].features
            assert hub[split].to_list() == disk[split].to_list()


def test_load_dataset_and_load_from_disk_agree_on_a_mini_mimic_build(mini_build, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = mini_build
    configs = card_configs(out)
    assert set(configs) == set(DATA_SETS)
    assert configs["preferences"] == [
        {"split": split, "path": f"preferences/{split}-*.parquet"} for split in SPLITS
    ]
    assert_loads_agree(out, tmp_path / "cache")
    # The Hub copy is the same files: its own card loads the same way.
    export_parquet(out, tmp_path / "hub")
    for name in DATA_SETS:
        for split in SPLITS:
            assert pq.read_table(tmp_path / "hub" / name / parquet_name(split)).equals(
                pq.read_table(out / name / parquet_name(split))
            )
    assert_loads_agree(out, tmp_path / "cache-hub", hub_copy=tmp_path / "hub")


def test_empty_splits_are_left_out_of_the_card(mini_mimic, tmp_path, monkeypatch):
    """load_dataset refuses a declared split without rows: a build with train samples only
    declares train, and load_from_disk still has all three splits."""
    from cxrmax.mimic.reader import MimicCXR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    samples = [s for s in MimicCXR(mini_mimic).select().to_pylist() if s["split"] == "train"][:3]
    full_run(tmp_path / "run", samples)
    out = tmp_path / "data"
    build_preferences(
        [tmp_path / "run"],
        out,
        BuildOptions(
            processes=1, mimic_root=Path(mini_mimic), figures=False, export_swift=False, export_trl=False
        ),
    )
    assert {name: [f["split"] for f in files] for name, files in card_configs(out).items()} == {
        "preferences": ["train"],
        "sft": ["train"],
    }
    assert pq.read_metadata(out / "preferences" / parquet_name("test")).num_rows == 0
    assert_loads_agree(out, tmp_path / "cache")
