"""`build-preferences`: source trajectories -> drift annotations, consensus positives, ranked
negatives, Stage-1 SFT rows, TRL / ms-swift / Parquet exports and a data card.

Data flow (one pass, memory flat in the number of rows):

1. `load.load_trajectories` reads every input (generate's ``OUT/trajectories/<model>/*.arrow``,
   Arrow IPC/Parquet/JSONL files, a `datasets` directory or a Hub id) memory-mapped where possible,
   normalises column names and checks keys (duplicates, conflicting ids, empty texts).
2. `build_preferences` fills labels, splits and reports from MIMIC-CXR (``--mimic-root``), removes
   MS-CXR-T subjects from train, and skips (counts) samples with fewer than ``min_sources``
   sources. Rows are ordered (sample_id, model, sample_index): that order is the stable tie order
   everywhere.
3. Chunks of samples go to worker processes (`annotate.annotate_chunk`): each labels its texts with
   the rule labeler, computes the drift annotations, the vote consensus and its composed positive,
   re-labels the positive, ranks the negatives and returns Arrow record batches.
4. The main process streams the batches into per-split Arrow files, then publishes
   ``OUT/preferences`` and ``OUT/sft`` (each a datasets.DatasetDict for `load_from_disk`, plus one
   Parquet file per split for `load_dataset(OUT, "preferences")` and the Hub, as the card's YAML
   declares), ``OUT/annotations``, the exports (`export`), the card and its figures (`datacard`),
   each with an atomic rename.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrmax.core import schemas
from cxrmax.core.errors import InputError, where
from cxrmax.core.io import atomic_write_json, iter_arrow_batches, replace_dir
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.core.splits import SPLITS
from cxrmax.labeler.batch import pool_worker_signals, terminate_pool
from cxrmax.mimic.reader import MimicCXR, read_ms_cxr_t
from cxrmax.preferences import datacard
from cxrmax.preferences import drift as D
from cxrmax.preferences.annotate import LABELER_ERROR_EXAMPLES, ChunkOptions, ChunkResult, annotate_chunk
from cxrmax.preferences.export import (
    export_parquet,
    export_swift,
    export_trl,
    image_ref,
    push_to_hub,
    save_dataset_dict,
    write_parquet,
)
from cxrmax.preferences.layout import PUBLISHED, parquet_name
from cxrmax.preferences.load import LoadReport, load_trajectories, normalise_split
from cxrmax.preferences.model_consensus import ModelConsensus

__all__ = [
    "BuildOptions",
    "BuildSummary",
    "LoadReport",
    "build_preferences",
    "export_parquet",
    "export_swift",
    "export_trl",
    "load_trajectories",
    "ms_cxr_t_subjects",
    "push_to_hub",
]


@dataclass
class BuildOptions:
    """Options of `build_preferences` (the CLI flags of `cxrmax build-preferences`)."""

    min_sources: int = 2
    consensus: str = "vote"  # vote | model
    #: composed (the consensus written as one answer) | selected (the source answer closest to it)
    positive: str = "composed"
    #: False: a build with 0 preference rows is an InputError saying why, and writes nothing (the
    #: CLI's default); True (the library's): the empty data sets and card are published
    allow_empty: bool = True
    drop_non_drifting: bool = False
    max_negatives: int | None = None
    exclude_refusals_from_sft: bool = False
    lenient: bool = False
    mimic_root: Path | None = None
    ms_cxr_t: Path | None = None
    step_bins: int = D.DEFAULT_STEP_BINS
    delta: int = 1
    processes: int | None = None
    chunk_samples: int = 1000
    export_trl: bool = True
    export_swift: bool = True
    export_parquet: Path | None = None
    push_to_hub: str | None = None
    public: bool = False
    card: bool = True
    figures: bool = True
    # --consensus model: generate backend settings (see cxrmax.preferences.consensus.synthesise_with_model)
    model_backend: dict | None = None


@dataclass
class BuildSummary:
    """What a build did, also written to OUT/build_report.json."""

    out: str
    load: dict
    counts: dict
    skipped_few_sources: int
    skipped_few_sources_examples: list[str]
    ms_cxr_t_excluded_rows: int
    split_unknown_rows: int
    split_rows: dict
    models: list[str]
    studies_not_in_mimic: int = 0  # rows whose study has no label row under --mimic-root
    split_invalid_rows_skipped: int = 0  # --lenient: rows with an unrecognised split value
    split_from_mimic_rows: int = 0  # rows whose split disagreed with --mimic-root's (official split kept)
    subject_mismatch_rows_skipped: int = 0  # --lenient: study under another subject in --mimic-root
    #: with --mimic-root: samples whose image_path is missing or names no file there (their rows are
    #: built, but a trainer cannot load the image: fix the paths or the root)
    samples_without_image: int = 0
    samples_without_image_examples: list[str] = field(default_factory=list)
    #: the --mimic-root the build read (where `cxrmax inspect` finds the films and reports)
    mimic_root: str | None = None
    positive: str = "composed"  # BuildOptions.positive: what the preference rows' positive is
    seconds: float = 0.0
    phases: dict = field(default_factory=dict)  # wall seconds per phase
    #: texts the labeler failed on, by file and 1-based row (the first few; "labeler errors" counts all)
    labeler_error_examples: list[str] = field(default_factory=list)
    #: what the user should know although the build succeeded (e.g. no train rows), one line each
    warnings: list[str] = field(default_factory=list)

    def skipped(self) -> dict[str, int]:
        """What the build skipped, dropped or flagged, by a one-line description (zero counts included)."""
        counts, load = self.counts, self.load
        return {
            "samples with fewer than --min-sources sources": self.skipped_few_sources,
            "empty texts": load["empty_texts"],
            "duplicate keys (lenient)": load["duplicates_skipped"],
            "identical duplicate rows (a merged copy) dropped": load["identical_duplicates_skipped"],
            "samples with mismatched ids (lenient)": load["conflicting_samples_skipped"],
            "MS-CXR-T train rows removed": self.ms_cxr_t_excluded_rows,
            "rows whose study has no labels under --mimic-root": self.studies_not_in_mimic,
            "rows without a split (put in train)": self.split_unknown_rows,
            "rows with an unknown split (lenient)": self.split_invalid_rows_skipped,
            "rows whose split disagreed with --mimic-root (official split used)": self.split_from_mimic_rows,
            "rows whose study belongs to another subject (lenient)": self.subject_mismatch_rows_skipped,
            "samples without negatives": counts.get("samples_without_negatives", 0),
            "samples where every source refused": counts.get("samples_without_consensus", 0),
            "labeler errors": counts.get("labeler_errors", 0),
            "consensus flagged": counts.get("consensus_flagged", 0),
            "answers cut at max_tokens (finish_reason length; negatives only, not SFT)": load[
                "truncated_texts"
            ],
            "rows with separate reasoning put before the answer": load["reasoning_joined"],
            "negatives identical to the positive (dropped)": counts.get("negatives_identical_to_chosen", 0),
            "--positive selected: negatives as close to the consensus as the positive (dropped)": counts.get(
                "negatives_tied_with_selected_positive", 0
            ),
            "--positive selected: samples whose every answer refused, failed or was cut": counts.get(
                "samples_without_selectable_positive", 0
            ),
            "--consensus model answers that failed (vote positive kept)": counts.get(
                "consensus_model_failures", 0
            ),
            "  of which cut at max_tokens (not stored; raise --consensus-max-tokens)": counts.get(
                "consensus_model_truncated", 0
            ),
        }


# --------------------------------------------------------------------------------------------
# Preparing the table: MIMIC-CXR, splits, MS-CXR-T, too few sources
# --------------------------------------------------------------------------------------------


@dataclass
class _MimicCheck:
    """What joining the trajectories to a MIMIC-CXR root found (counts of rows)."""

    not_in_mimic: int = 0  # study without a label row in the root
    split_from_mimic: int = 0  # the trajectory's split disagreed with MIMIC-CXR's: MIMIC-CXR's kept
    subject_mismatch_skipped: int = 0  # --lenient: the study belongs to another subject there


def _enrich_from_mimic(
    table: pa.Table, root: Path, lenient: bool, files: Sequence[str] = ()
) -> tuple[pa.Table, _MimicCheck]:
    """Fill missing ground-truth labels, split, subject ids and the report text from a MIMIC-CXR
    root (labels from the CheXpert CSV by study_id; report = impression > findings > last paragraph).

    The official split wins over the trajectory's (the outputs follow the MIMIC-CXR split; a
    trajectory that says "train" for a test study would leak it), counted. A study that belongs to
    another subject in the root means a wrong study id: InputError naming the row (--lenient: the
    rows are dropped, counted)."""
    mimic = MimicCXR(root, lenient=lenient)
    study = table.column("study_id")
    if study.null_count == table.num_rows:
        raise InputError(
            f"{where('trajectories', field='study_id')}: --mimic-root needs study ids in the input"
        )
    check = _MimicCheck()
    study_labels = mimic.study_labels()
    key = study_labels.column("study_id")
    lookup = pc.index_in(study, value_set=key.combine_chunks())
    has = pc.is_valid(lookup)
    struct = pa.StructArray.from_arrays(
        [study_labels.column(name).combine_chunks().cast(pa.float32()) for name in OBSERVATIONS],
        fields=list(schemas.LABELS_TYPE),
    )
    looked_up = struct.take(lookup.combine_chunks() if isinstance(lookup, pa.ChunkedArray) else lookup)
    current = table.column("labels").combine_chunks()
    labels = pc.if_else(pc.and_(pc.is_null(current), has), looked_up, current)
    table = table.set_column(table.schema.get_field_index("labels"), "labels", labels)
    for name in ("split", "subject_id"):
        if name in study_labels.column_names:
            values = (
                study_labels.column(name)
                .combine_chunks()
                .cast(table.schema.field(name).type)
                .take(lookup.combine_chunks() if isinstance(lookup, pa.ChunkedArray) else lookup)
            )
            differs = pc.fill_null(pc.not_equal(table.column(name), values), False)
            n_differ = int(pc.sum(differs).as_py() or 0)
            if n_differ and name == "subject_id":
                if not lenient:
                    i = pc.index(differs, True).as_py()
                    file_index = table.column("source_file")[i].as_py()
                    path = files[file_index] if file_index < len(files) else "trajectories"
                    raise InputError(
                        f"{where(path, table.column('source_row')[i].as_py(), 'subject_id')}: study "
                        f"{table.column('study_id')[i].as_py()} belongs to subject {values[i].as_py()} under "
                        f"{root}, not {table.column(name)[i].as_py()} (a wrong study id?); use --lenient to skip"
                    )
                check.subject_mismatch_skipped = n_differ
                keep = pc.invert(differs)
                table, values = table.filter(keep), values.filter(keep)
                lookup, has = lookup.filter(keep), has.filter(keep)
            elif n_differ:
                check.split_from_mimic = n_differ
            merged = (
                pc.coalesce(values, table.column(name))
                if name == "split"
                else pc.coalesce(table.column(name), values)
            )
            table = table.set_column(table.schema.get_field_index(name), name, merged)
    check.not_in_mimic = int(pc.sum(pc.invert(has)).as_py() or 0)
    return _fill_reports(table, mimic), check


def _fill_reports(table: pa.Table, mimic: MimicCXR) -> pa.Table:
    """Fill missing report texts from MIMIC-CXR (impression > findings > last paragraph), one read
    per study."""
    reports: dict[tuple[int, int], str | None] = {}
    subjects = table.column("subject_id").to_pylist()
    studies = table.column("study_id").to_pylist()
    texts = []
    existing = table.column("report").to_pylist()
    for subject, study_id, old in zip(subjects, studies, existing, strict=True):
        if old or subject is None or study_id is None:
            texts.append(old)
            continue
        if (subject, study_id) not in reports:
            sections = mimic.report(subject, study_id)
            reports[(subject, study_id)] = sections.best() if sections is not None else None
        texts.append(reports[(subject, study_id)])
    return table.set_column(
        table.schema.get_field_index("report"), "report", pa.array(texts, type=pa.string())
    )


def _samples_without_image(table: pa.Table, root: Path) -> list[str]:
    """Sample ids (sorted) whose image_path is null or names no file under `root` (one stat per
    distinct path)."""
    pairs = (
        pa.table({"s": table.column("sample_id"), "p": table.column("image_path")})
        .group_by(["s", "p"])
        .aggregate([])
    )
    exists: dict[str, bool] = {}
    missing = set()
    for sample_id, path in zip(pairs.column("s").to_pylist(), pairs.column("p").to_pylist(), strict=True):
        if path is None:
            missing.add(sample_id)
            continue
        if path not in exists:
            exists[path] = os.path.isfile(image_ref(path, root))
        if not exists[path]:
            missing.add(sample_id)
    return sorted(missing)


def ms_cxr_t_subjects(path: Path) -> set[int]:
    """Subject ids listed in an MS-CXR-T CSV (the decontamination set)."""
    table = read_ms_cxr_t(path)
    if "subject_id" not in table.column_names:
        raise InputError(f"{where(path, field='subject_id')}: MS-CXR-T CSV without a subject_id column")
    return {int(v) for v in table.column("subject_id").to_pylist() if v is not None}


@dataclass
class _Prepared:
    """The table ready to annotate (sorted, whole samples) and what preparing it found."""

    table: pa.Table
    starts: np.ndarray  # first row of each sample
    models: list[str]
    mimic_check: _MimicCheck
    split_unknown: int
    split_invalid: int
    without_image: list[str]
    ms_cxr_t_excluded: int
    few_sources: pa.ChunkedArray  # sample ids skipped for too few sources


def _remove_ms_cxr_t(table: pa.Table, csv_path: Path) -> tuple[pa.Table, int]:
    """Drop the train rows of MS-CXR-T's subjects (decontamination); returns how many."""
    subjects = ms_cxr_t_subjects(csv_path)
    in_train = pc.and_(
        pc.equal(table.column("split"), "train"),
        pc.fill_null(
            pc.is_in(table.column("subject_id"), value_set=pa.array(sorted(subjects), pa.int64())), False
        ),
    )
    return table.filter(pc.invert(in_train)), int(pc.sum(in_train).as_py() or 0)


def _drop_few_sources(table: pa.Table, min_sources: int) -> tuple[pa.Table, pa.ChunkedArray]:
    """Drop the samples with fewer than `min_sources` rows; returns the table and their ids."""
    sample_ids = table.column("sample_id").combine_chunks()
    counts_per_sample = (
        pa.table({"sample_id": sample_ids}).group_by("sample_id").aggregate([("sample_id", "count")])
    )
    few = counts_per_sample.filter(pc.less(counts_per_sample.column("sample_id_count"), min_sources))
    few_ids = few.column("sample_id")
    if len(few_ids):
        table = table.filter(
            pc.invert(pc.is_in(table.column("sample_id"), value_set=few_ids.combine_chunks()))
        )
    return table, few_ids


def _prepare(table: pa.Table, load_report: LoadReport, options: BuildOptions) -> _Prepared:
    """Enrich from MIMIC-CXR, normalise splits, remove MS-CXR-T subjects from train and samples
    with too few sources."""
    mimic_check = _MimicCheck()
    if options.mimic_root is not None:
        table, mimic_check = _enrich_from_mimic(
            table, Path(options.mimic_root), options.lenient, load_report.files
        )
    table, split_unknown, split_invalid = normalise_split(table, load_report.files, options.lenient)
    without_image: list[str] = []
    if options.mimic_root is not None:
        without_image = _samples_without_image(table, Path(options.mimic_root))
    excluded_rows = 0
    if options.ms_cxr_t is not None:
        table, excluded_rows = _remove_ms_cxr_t(table, Path(options.ms_cxr_t))
    table, few_ids = _drop_few_sources(table, options.min_sources)
    table = table.combine_chunks()
    ids = table.column("sample_id").to_numpy(zero_copy_only=False)
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]) if len(ids) else np.zeros(0, dtype=np.int64)
    return _Prepared(
        table=table,
        starts=starts,
        models=sorted(set(table.column("model").to_pylist())) if table.num_rows else [],
        mimic_check=mimic_check,
        split_unknown=split_unknown,
        split_invalid=split_invalid,
        without_image=without_image,
        ms_cxr_t_excluded=excluded_rows,
        few_sources=few_ids,
    )


# --------------------------------------------------------------------------------------------
# Annotating the chunks (a pool of worker processes) and staging the outputs
# --------------------------------------------------------------------------------------------


class _SplitWriters:
    """Arrow IPC stream writers, one per split."""

    def __init__(self, directory: Path, schema: pa.Schema) -> None:
        self.directory = directory
        self.schema = schema
        directory.mkdir(parents=True, exist_ok=True)
        self.writers = {
            split: pa.ipc.new_stream(str(directory / f"{split}.arrow"), schema) for split in SPLITS
        }
        self.rows: Counter = Counter()

    def write(self, batch: pa.RecordBatch) -> None:
        """Append the rows of `batch` to the file of their split."""
        split = batch.column(batch.schema.get_field_index("split"))
        for name in SPLITS:
            part = batch.filter(pc.equal(split, name))
            if part.num_rows:
                self.writers[name].write_batch(part)
                self.rows[name] += part.num_rows

    def close(self) -> None:
        """Close every writer; an empty split still gets one (empty) batch, which `datasets` needs."""
        for split, writer in self.writers.items():
            if not self.rows[split]:
                writer.write_batch(pa.RecordBatch.from_pylist([], schema=self.schema))
            writer.close()


class _StagedWriters:
    """Where the chunks' batches go under the work folder: preferences/ and sft/ per split,
    annotations/trajectories.arrow and annotations/samples.arrow."""

    def __init__(self, work: Path) -> None:
        self.preferences = _SplitWriters(work / "preferences", schemas.PREFERENCE_SCHEMA)
        self.sft = _SplitWriters(work / "sft", schemas.SFT_SCHEMA)
        (work / "annotations").mkdir()
        self.trajectories = pa.ipc.new_file(
            str(work / "annotations" / "trajectories.arrow"), schemas.DRIFT_TRAJECTORY_SCHEMA
        )
        self.samples = pa.ipc.new_file(
            str(work / "annotations" / "samples.arrow"), schemas.DRIFT_SAMPLE_SCHEMA
        )

    def write(self, result: ChunkResult, preferences: pa.RecordBatch) -> None:
        """Write one chunk's batches (`preferences` possibly rewritten by the model consensus)."""
        self.preferences.write(preferences)
        self.sft.write(result.sft)
        self.trajectories.write_batch(result.trajectories)
        self.samples.write_batch(result.samples)

    def close(self) -> None:
        """Close every file."""
        self.preferences.close()
        self.sft.close()
        self.trajectories.close()
        self.samples.close()


def _iter_chunks(
    table: pa.Table, sample_starts: np.ndarray, chunk_samples: int, compact: bool = False
) -> Iterator[pa.Table]:
    """Slices of whole samples. ``compact``: each slice copied into buffers of its own, for sending
    to a worker: a pickled slice would carry its parent's whole buffers (the full table per task)."""
    n = table.num_rows
    bounds = list(sample_starts[::chunk_samples]) + [n]
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        chunk = table.slice(int(lo), int(hi - lo))
        yield chunk.take(pa.array(np.arange(chunk.num_rows))) if compact else chunk


def _bounded_imap(pool, func: Callable, items: Iterable, in_flight: int) -> Iterator:
    """Ordered map over a pool with at most `in_flight` tasks queued: Pool.imap would pickle every
    chunk up front, so memory would grow with the input instead of staying flat."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(func, (item,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _worker(args: tuple[pa.Table, ChunkOptions]) -> ChunkResult:
    chunk, options = args
    return annotate_chunk(chunk, options)


def _chunk_options(options: BuildOptions) -> ChunkOptions:
    return ChunkOptions(
        drop_non_drifting=options.drop_non_drifting,
        max_negatives=options.max_negatives,
        exclude_refusals_from_sft=options.exclude_refusals_from_sft,
        step_bins=options.step_bins,
        delta=options.delta,
        consensus=options.consensus,
        positive=options.positive,
    )


def _annotate_all(
    prepared: _Prepared,
    writers: _StagedWriters,
    out: Path,
    options: BuildOptions,
    progress: Callable[[int, int], None] | None,
    labeler_errors: list[tuple] | None = None,
) -> Counter:
    """Annotate every chunk (in a pool of worker processes when there are several) and write the
    batches in input order; returns the summed counters (and appends the first labeler failures,
    (source_file, source_row, model, error), to ``labeler_errors``)."""
    labeler_errors = [] if labeler_errors is None else labeler_errors
    starts = prepared.starts
    totals: Counter = Counter()
    processes = options.processes or os.cpu_count() or 1
    # Chunks small enough to keep every worker busy on small runs, capped for flat memory.
    chunk_samples = max(1, min(options.chunk_samples, -(-len(starts) // (2 * processes)) or 1))
    if processes > 1:
        chunk_samples = max(chunk_samples, min(50, options.chunk_samples))
    chunk_options = _chunk_options(options)
    parallel = processes > 1 and len(starts) > chunk_samples
    chunks = (
        (chunk, chunk_options)
        for chunk in _iter_chunks(prepared.table, starts, chunk_samples, compact=parallel)
    )
    pool = None
    if parallel:
        # fork (like the labeler's batch mode): no re-import per worker, no __main__ guard needed.
        methods = multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        pool = context.Pool(processes, initializer=pool_worker_signals)
        results: Iterable[ChunkResult] = _bounded_imap(pool, _worker, chunks, 2 * processes)
    else:
        results = map(_worker, chunks)
    done = 0
    model_synth = None
    if options.consensus == "model":
        model_synth = ModelConsensus(out / "consensus", **(options.model_backend or {}))
    try:
        for result in results:
            preferences = result.preferences
            if model_synth is not None:
                preferences = model_synth.apply(preferences, result.contexts)
                totals["consensus_flagged_model"] += model_synth.last_flagged
            writers.write(result, preferences)
            totals.update(result.counts)
            labeler_errors.extend(result.labeler_errors[: LABELER_ERROR_EXAMPLES - len(labeler_errors)])
            done += result.samples.num_rows
            if progress is not None:
                progress(done, len(starts))
    finally:
        if pool is not None:
            terminate_pool(pool)
        if model_synth is not None:
            totals["consensus_model_requests"] += model_synth.requests
            totals["consensus_model_failures"] += model_synth.failures
            totals["consensus_model_truncated"] += model_synth.truncated
            model_synth.close()
    return totals


def _save_split_files(split_dir: Path, final: Path, work: Path, schema: pa.Schema) -> None:
    """The per-split Arrow files of `split_dir` saved at `final` twice over: as a
    datasets.DatasetDict (``<split>/`` folders, what `load_from_disk` and the trainer read) and as
    one Parquet file per split beside them (``<split>-00000-of-00001.parquet``, what the card's YAML
    configs point at, so `load_dataset(OUT, "preferences")` and the Hub's viewer read it).
    `load_from_disk` follows dataset_dict.json to the split folders and never sees the Parquet
    files; the YAML globs never match the Arrow files."""
    dd = datasets.DatasetDict(
        {split: datasets.Dataset.from_file(str(split_dir / f"{split}.arrow")) for split in SPLITS}
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=work))
    save_dataset_dict(dd, tmp / "data")
    del dd
    for split in SPLITS:
        write_parquet(
            iter_arrow_batches(split_dir / f"{split}.arrow"), schema, tmp / "data" / parquet_name(split)
        )
    replace_dir(tmp / "data", final)
    shutil.rmtree(tmp, ignore_errors=True)


def _stage_datasets(work: Path, options: BuildOptions, phase: Callable[[str], None]) -> Path:
    """Save the data sets and the exports under work/out (published later); returns that folder."""
    stage = work / "out"
    stage.mkdir()
    _save_split_files(work / "preferences", stage / "preferences", work, schemas.PREFERENCE_SCHEMA)
    _save_split_files(work / "sft", stage / "sft", work, schemas.SFT_SCHEMA)
    os.replace(work / "annotations", stage / "annotations")
    phase("save")
    if options.export_trl:
        export_trl(stage / "preferences", stage / "exports" / "trl", image_root=options.mimic_root)
        phase("export_trl")
    if options.export_swift:
        export_swift(stage / "preferences", stage / "exports" / "swift", image_root=options.mimic_root)
        phase("export_swift")
    return stage


def _publish(staged: Path, final: Path) -> None:
    """Move a staged output into place (a directory replaces the old one whole); remove a stale
    output folder when nothing was staged for it (files such as README.md are never deleted)."""
    if staged.exists():
        replace_dir(staged, final)
    elif final.is_dir():  # e.g. exports of an earlier build that no longer match
        shutil.rmtree(final)


# --------------------------------------------------------------------------------------------
# The build
# --------------------------------------------------------------------------------------------


def _check_options(options: BuildOptions) -> None:
    if options.consensus not in ("vote", "model"):
        raise InputError(f"--consensus must be 'vote' or 'model', not {options.consensus!r}")
    if options.positive not in ("composed", "selected"):
        raise InputError(f"--positive must be 'composed' or 'selected', not {options.positive!r}")
    if options.positive == "selected" and options.consensus == "model":
        raise InputError(
            "--positive selected takes a source's own answer as the positive; --consensus model writes a "
            "new one: use one of them"
        )
    if options.min_sources < 1:
        raise InputError("--min-sources must be at least 1")
    if options.step_bins < 1 or not 1 <= options.delta <= options.step_bins:
        raise InputError("--step-bins must be at least 1 and --delta between 1 and --step-bins")
    if options.max_negatives is not None and options.max_negatives < 1:
        raise InputError("--max-negatives must be at least 1")


class _Phases:
    """Wall seconds per phase of the build."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self.last, 3)
        self.last = now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 3)


def _summary(
    out: Path,
    load_report: LoadReport,
    prepared: _Prepared,
    totals: Counter,
    writers: _StagedWriters,
    options: BuildOptions,
) -> BuildSummary:
    mimic_root = options.mimic_root
    check = prepared.mimic_check
    return BuildSummary(
        out=str(out),
        load=asdict(load_report),
        counts=dict(totals),
        skipped_few_sources=len(prepared.few_sources),
        skipped_few_sources_examples=[str(v) for v in prepared.few_sources.slice(0, 10).to_pylist()],
        ms_cxr_t_excluded_rows=prepared.ms_cxr_t_excluded,
        split_unknown_rows=prepared.split_unknown,
        split_rows={"preferences": dict(writers.preferences.rows), "sft": dict(writers.sft.rows)},
        models=prepared.models,
        studies_not_in_mimic=check.not_in_mimic,
        split_from_mimic_rows=check.split_from_mimic,
        subject_mismatch_rows_skipped=check.subject_mismatch_skipped,
        split_invalid_rows_skipped=prepared.split_invalid,
        samples_without_image=len(prepared.without_image),
        samples_without_image_examples=prepared.without_image[:5],
        mimic_root=str(Path(mimic_root).resolve()) if mimic_root is not None else None,
        positive=options.positive,
    )


def build_preferences(
    inputs: Sequence[str | Path],
    out: str | Path,
    options: BuildOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> BuildSummary:
    """Build OUT/preferences, OUT/sft, OUT/annotations, the exports and the card from trajectories.

    `progress(done_samples, total_samples)` is called after each chunk. Raises InputError on bad
    input (see `load_trajectories`)."""
    options = options or BuildOptions()
    _check_options(options)
    phase = _Phases()
    out = Path(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file of that name, a read-only or missing parent
        raise InputError(f"{where(out)}: cannot create the output folder ({exc.strerror or exc})") from None
    try:
        return _build(inputs, out, options, progress, phase)
    except BaseException:
        if created:  # a folder this run made and published nothing in: not left behind, empty
            with contextlib.suppress(OSError):
                out.rmdir()
        raise


def _build(
    inputs: Sequence[str | Path],
    out: Path,
    options: BuildOptions,
    progress: Callable[[int, int], None] | None,
    phase: _Phases,
) -> BuildSummary:
    """build_preferences once OUT exists: load, prepare, annotate into a staging folder, publish."""
    table, load_report = load_trajectories(inputs, lenient=options.lenient)
    phase("load")
    prepared = _prepare(table, load_report, options)
    del table
    phase("prepare")
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out))
    try:
        writers = _StagedWriters(work)
        labeler_errors: list[tuple] = []
        totals = _annotate_all(prepared, writers, out, options, progress, labeler_errors)
        phase("annotate")
        writers.close()
        if not totals.get("preference_rows") and not options.allow_empty:
            raise InputError(_empty_reason(prepared, totals, options))
        # Everything is staged under the work folder and published with renames at the very end,
        # so a crash or Ctrl-C before that leaves the previous outputs whole.
        stage = _stage_datasets(work, options, phase)
        summary = _summary(out, load_report, prepared, totals, writers, options)
        summary.labeler_error_examples = [
            f"{where(load_report.files[f] if f is not None else '?', row)} ({model}): {error}"
            for f, row, model, error in labeler_errors
        ]
        summary.warnings = _warnings(summary)
        atomic_write_json(stage / "build_report.json", asdict(summary))
        if options.card:
            datacard.write_card(stage, figures=options.figures)
            phase("card")
        summary.phases = phase.seconds
        summary.seconds = phase.total()
        atomic_write_json(stage / "build_report.json", asdict(summary))
        for name in PUBLISHED:
            _publish(stage / name, out / name)
        if options.export_parquet is not None:
            export_parquet(out, Path(options.export_parquet))
        if options.push_to_hub:
            push_to_hub(out, options.push_to_hub, private=not options.public)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def _empty_reason(prepared: _Prepared, totals: Counter, options: BuildOptions) -> str:
    """Why a build made no preference row, in the user's terms (the InputError of an empty build)."""
    samples = len(prepared.starts)
    few = len(prepared.few_sources)
    if not samples and few:
        examples = ", ".join(str(v) for v in prepared.few_sources.slice(0, 3).to_pylist())
        why = (
            f"every sample ({few}, e.g. {examples}) has fewer than --min-sources {options.min_sources} "
            "sources: preferences compare the answers of several models to one image, so give "
            "trajectories of at least two models per sample"
        )
    elif not samples:
        why = "the input has no usable trajectory"
    else:
        why = (
            f"none of the {samples} samples kept a preference row ({totals.get('samples_without_negatives', 0)} "
            f"without negatives, {totals.get('samples_without_consensus', 0)} where every source refused)"
        )
    return f"0 preference rows: {why}; nothing was written"


def _warnings(summary: BuildSummary) -> list[str]:
    """Lines the user must see although the build succeeded."""
    warnings = []
    preference_splits = {k: v for k, v in summary.split_rows["preferences"].items() if v}
    if preference_splits and "train" not in preference_splits:
        held = ", ".join(f"{v} {k}" for k, v in sorted(preference_splits.items()))
        warnings.append(
            f"no train rows (the preference rows are {held}): train-apo trains on the train split; "
            "build from answers to train images (e.g. `cxrmax simulate --split train`) or check the split column"
        )
    return warnings


def rebuild_with_model_consensus(
    sources: list[str], out: Path, *, mimic_root: Path | None, model_backend: dict[str, Any]
) -> BuildSummary:
    """build-preferences with a model's consensus: what ``train-apo --stage all --consensus model``
    runs between its stages (apo_train.pipeline.RebuildPreferences)."""
    return build_preferences(
        sources, out, BuildOptions(consensus="model", mimic_root=mimic_root, model_backend=model_backend)
    )
