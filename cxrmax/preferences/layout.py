"""Where a build-preferences output keeps what: the one description of the OUT layout.

    OUT/README.md                     the data card (YAML configs -> the Parquet files below)
    OUT/build_report.json             what the build did (BuildSummary)
    OUT/preferences/                  datasets.DatasetDict: dataset_dict.json, <split>/ Arrow files
    OUT/preferences/<split>-00000-of-00001.parquet   the same rows as Parquet (load_dataset, Hub)
    OUT/sft/                          the same two forms, SFT rows
    OUT/annotations/trajectories.arrow, samples.arrow   the drift annotations (Arrow IPC files)
    OUT/exports/trl/, OUT/exports/swift/                 trainer-specific exports
    OUT/figures/*.png                 the card's figures

`load_from_disk(OUT/preferences)` follows dataset_dict.json to the split folders and never sees
the Parquet files; the card's ``<name>/<split>-*.parquet`` globs never match the Arrow files, so
`load_dataset(OUT, "preferences")` reads the Parquet files only. Importing this module is cheap
(no `datasets`), for the card and the inspector.
"""

from __future__ import annotations

from pathlib import Path

#: The data sets of a build, each a `configs` entry of the card.
DATA_SETS = ("preferences", "sft")

#: What a build publishes under OUT (folders among these not rebuilt this time are removed as stale).
PUBLISHED = ("preferences", "sft", "annotations", "exports", "figures", "README.md", "build_report.json")


def parquet_name(split: str) -> str:
    """The Parquet file of one split, as the card's YAML configs glob it (``<split>-*.parquet``)."""
    return f"{split}-00000-of-00001.parquet"


def parquet_glob(name: str, split: str) -> str:
    """The card's data_files pattern of one split of data set `name`, relative to OUT."""
    return f"{name}/{split}-*.parquet"


def annotations_path(out: str | Path, kind: str) -> Path:
    """OUT/annotations/<kind>.arrow, `kind` "trajectories" or "samples"."""
    return Path(out) / "annotations" / f"{kind}.arrow"
