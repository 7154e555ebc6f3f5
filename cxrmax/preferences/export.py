"""Exports of a build: TRL and ms-swift preference data, a Parquet copy laid out as a Hugging Face
Hub data set, and the push to the Hub (one commit).

Every export is written under a temporary folder and moved into place with `core.io.replace_dir`,
so a failure leaves the previous export whole.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from huggingface_hub import HfApi

from cxrmax.core.errors import CxrmaxError
from cxrmax.core.io import replace_dir
from cxrmax.core.splits import SPLITS
from cxrmax.preferences.layout import DATA_SETS, parquet_name

#: Rows per Parquet row group: small enough for the Hub's dataset viewer to page through a split
#: without reading it whole, large enough to compress the texts well.
PARQUET_ROW_GROUP_ROWS = 1000


def write_parquet(batches: Iterable[pa.RecordBatch], schema: pa.Schema, path: Path) -> int:
    """Write `batches` (of `schema`) as one Parquet file, batch by batch (memory stays flat).

    The file carries the `datasets` features in its schema metadata, as `Dataset.to_parquet`
    writes them, so `datasets.load_dataset` restores the same features (the label structs, the
    float32 lists) instead of inferring them. Returns the number of rows written."""
    metadata = datasets.Features.from_arrow_schema(schema).arrow_schema.metadata
    rows = 0
    with pq.ParquetWriter(str(path), schema.with_metadata(metadata)) as writer:
        for batch in batches:
            if batch.num_rows:
                writer.write_batch(batch, row_group_size=PARQUET_ROW_GROUP_ROWS)
                rows += batch.num_rows
    return rows


def image_ref(path: str | None, image_root: Path | None) -> str | None:
    """An image path as a trainer opens it: relative paths are taken under `image_root`."""
    if path is None:
        return None
    if image_root is not None and not os.path.isabs(path):
        return str(Path(image_root) / path)
    return path


def save_dataset_dict(dd: datasets.DatasetDict, path: Path) -> None:
    """save_to_disk with at least one shard per split: `datasets` writes an empty split with zero
    shards, which load_from_disk then cannot read."""
    num_shards = {split: 1 for split, ds in dd.items() if len(ds) == 0}
    dd.save_to_disk(str(path), num_shards=num_shards or None)


def _iter_preference_rows(preferences_dir: Path, split: str) -> Iterator[dict]:
    ds = datasets.load_from_disk(str(preferences_dir))[split]
    for batch in ds.data.table.to_batches(max_chunksize=1024):
        yield from batch.to_pylist()


def _trl_features() -> datasets.Features:
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    message = {"role": datasets.Value("string"), "content": datasets.List(part)}
    return datasets.Features(
        {
            "sample_id": datasets.Value("string"),
            "prompt": datasets.List(message),
            "chosen": datasets.List(message),
            "rejected": datasets.List(message),
            "images": datasets.List(datasets.Value("string")),
            "rejected_model": datasets.Value("string"),
            "rejected_drift": datasets.Value("float32"),
            "negative_rank": datasets.Value("int32"),
        }
    )


def _messages(role: str, texts: pa.Array, with_image: np.ndarray | bool) -> pa.ListArray:
    """One single-message conversation per row: [{"role", "content": [({"type": "image"},)
    {"type": "text", "text": ...}]}], built column-wise (no Python object per row). ``with_image``
    (one flag, or one per row) says which rows get the image part: only rows that have an image."""
    m = len(texts)
    texts = pc.fill_null(texts.cast(pa.string()), "")
    has_image = np.broadcast_to(np.asarray(with_image, dtype=bool), (m,))
    offsets = np.zeros(m + 1, dtype=np.int32)
    np.cumsum(1 + has_image.astype(np.int32), out=offsets[1:])
    text_at = offsets[1:] - 1  # the text part ends each row's content
    types = np.full(int(offsets[-1]), "text", dtype=object)
    types[offsets[:-1][has_image]] = "image"
    # Every part takes its text from `texts`; image parts take the null appended at index m.
    source = np.full(int(offsets[-1]), m, dtype=np.int64)
    source[text_at] = np.arange(m)
    part_text = pa.concat_arrays([texts, pa.nulls(1, pa.string())]).take(pa.array(source))
    parts = pa.StructArray.from_arrays([pa.array(types, type=pa.string()), part_text], names=["type", "text"])
    content = pa.ListArray.from_arrays(pa.array(offsets), parts)
    roles = pa.array(np.full(m, role, dtype=object), type=pa.string())
    message = pa.StructArray.from_arrays([roles, content], names=["role", "content"])
    return pa.ListArray.from_arrays(pa.array(np.arange(m + 1, dtype=np.int32)), message)


def _trl_batch(table: pa.Table, schema: pa.Schema, image_root: Path | None) -> tuple[pa.RecordBatch, bool]:
    """TRL rows (one per negative) of a preferences table; also whether every image file exists."""
    rejected = table.column("rejected").combine_chunks()
    parent = pc.list_parent_indices(rejected)
    offsets = rejected.offsets.to_numpy()[:-1]
    parent_np = parent.to_numpy(zero_copy_only=False)
    rank = np.arange(len(parent_np)) - (offsets[parent_np] - offsets[0] if len(offsets) else 0)
    images = [image_ref(p, image_root) for p in table.column("image_path").to_pylist()]
    exist = all(i is not None and os.path.exists(i) for i in images)
    image_lists = pa.array([[i] if i else [] for i in images], type=pa.list_(pa.string())).take(parent)
    arrays = {
        "sample_id": table.column("sample_id").combine_chunks().take(parent),
        "prompt": _messages(
            "user",
            table.column("prompt").combine_chunks().take(parent),
            np.array([i is not None for i in images], dtype=bool)[parent_np],
        ),
        "chosen": _messages("assistant", table.column("chosen").combine_chunks().take(parent), False),
        "rejected": _messages("assistant", pc.list_flatten(rejected), False),
        "images": image_lists,
        "rejected_model": pc.list_flatten(table.column("rejected_models").combine_chunks()),
        "rejected_drift": pc.list_flatten(table.column("rejected_drift").combine_chunks()),
        "negative_rank": pa.array(rank.astype(np.int32)),
    }
    batch = pa.RecordBatch.from_arrays([arrays[f.name].cast(f.type) for f in schema], schema=schema)
    return batch, exist


def export_trl(preferences_dir: Path, out_dir: Path, image_root: Path | None = None) -> Path:
    """TRL preference data set (datasets.DatasetDict on disk): one row per (positive, negative)
    pair, conversational with images: ``prompt`` (user turn with an image part, when the row has an
    image, and the prompt text), ``chosen``/``rejected`` (assistant turns), ``images`` (list of image paths; an Image
    feature when the files exist), plus sample_id, rejected_model, rejected_drift and
    negative_rank. This is the shape trl.DPOTrainer reads for vision-language models."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".trl-", dir=out_dir.parent))
    schema = _trl_features().arrow_schema
    try:
        source = datasets.load_from_disk(str(preferences_dir))
        images_exist = True
        for split in SPLITS:
            with pa.ipc.new_stream(str(work / f"{split}.arrow"), schema) as writer:
                wrote = False
                for batch in source[split].data.table.to_batches(max_chunksize=2048):
                    if not batch.num_rows:
                        continue
                    rows, exist = _trl_batch(pa.Table.from_batches([batch]), schema, image_root)
                    images_exist = images_exist and exist
                    if rows.num_rows:
                        writer.write_batch(rows)
                        wrote = True
                if not wrote:
                    writer.write_batch(pa.RecordBatch.from_pylist([], schema=schema))
        dd = datasets.DatasetDict(
            {split: datasets.Dataset.from_file(str(work / f"{split}.arrow")) for split in SPLITS}
        )
        if images_exist and any(len(ds) for ds in dd.values()):
            dd = dd.cast_column("images", datasets.List(datasets.Image()))
        save_dataset_dict(dd, work / "data")
        del dd, source
        replace_dir(work / "data", out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def export_swift(preferences_dir: Path, out_dir: Path, image_root: Path | None = None) -> Path:
    """ms-swift DPO/RLHF JSONL, one file per split: ``{"messages": [user with "<image>" + prompt,
    assistant = chosen], "rejected_response": negative, "images": [path]}``, one row per negative."""
    # The work folder sits beside out_dir, so that replace_dir is a rename on one file system.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".swift-", dir=out_dir.parent))
    try:
        for split in SPLITS:
            with open(work / f"{split}.jsonl", "w", encoding="utf-8") as handle:
                for row in _iter_preference_rows(preferences_dir, split):
                    image = image_ref(row["image_path"], image_root)
                    messages = [
                        # The <image> tag only where an image is listed: ms-swift pairs tags with images.
                        {"role": "user", "content": ("<image>" if image else "") + (row["prompt"] or "")},
                        {"role": "assistant", "content": row["chosen"]},
                    ]
                    # The sample's part is encoded once and shared by its negatives' lines.
                    head = (
                        '{"messages": ' + json.dumps(messages, ensure_ascii=False) + ', "rejected_response": '
                    )
                    tail = ', "images": ' + json.dumps([image] if image else [], ensure_ascii=False) + "}\n"
                    handle.writelines(
                        head + json.dumps(text, ensure_ascii=False) + tail for text in row["rejected"]
                    )
        replace_dir(work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out_dir


def _copy_parquet(source: Path, target: Path) -> None:
    """The Parquet files of one data set folder of a build (`source`, e.g. OUT/preferences) into
    `target`; an output of an older build without them is converted from its Arrow files."""
    target.mkdir()
    dd: datasets.DatasetDict | None = None
    for split in SPLITS:
        if (source / parquet_name(split)).is_file():
            shutil.copy2(source / parquet_name(split), target / parquet_name(split))
            continue
        dd = dd if dd is not None else datasets.load_from_disk(str(source))
        table = dd[split].data.table
        write_parquet(
            table.to_batches(max_chunksize=PARQUET_ROW_GROUP_ROWS), table.schema, target / parquet_name(split)
        )


def export_parquet(out: Path, target: Path) -> Path:
    """Write preferences/, sft/ (one Parquet file per split), README.md (the card) and figures/ under
    `target`, laid out as a Hugging Face Hub data set (configs listed in the card's YAML header).
    Written to a temporary directory and renamed, so a failure leaves nothing half-written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        for name in DATA_SETS:
            _copy_parquet(out / name, work / name)
        if (out / "README.md").exists():
            shutil.copy2(out / "README.md", work / "README.md")
        if (out / "figures").is_dir():
            shutil.copytree(out / "figures", work / "figures")
        if (out / "build_report.json").exists():
            shutil.copy2(out / "build_report.json", work / "build_report.json")
        replace_dir(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def push_to_hub(out: Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Publish preferences/, sft/ and the card as Parquet to a Hub data set repository in ONE
    commit (private by default). Without network (or with HF_HUB_OFFLINE=1) raises CxrmaxError
    with a clear message; the Hub repository is left untouched (the upload is a single commit)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise CxrmaxError(
            f"cannot push to the Hugging Face Hub repository {repo_id!r}: HF_HUB_OFFLINE is set. Nothing was "
            "uploaded; use --export-parquet DIR to get the same files offline."
        )
    staging = Path(tempfile.mkdtemp(prefix=".hub-", dir=out))
    try:
        export_parquet(out, staging / "repo")
        api = HfApi(token=token)
        try:
            api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
            info = api.upload_folder(
                repo_id=repo_id,
                repo_type="dataset",
                folder_path=str(staging / "repo"),
                commit_message="cxrmax build-preferences",
            )
        except Exception as exc:  # offline, DNS, auth, HTTP errors: all end the same way for the user
            raise CxrmaxError(
                f"cannot push to the Hugging Face Hub repository {repo_id!r}: {type(exc).__name__}: {exc}. "
                "Nothing was uploaded; the local outputs are complete (use --export-parquet DIR to get the "
                "same files offline)."
            ) from None
        return str(getattr(info, "commit_url", info))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
