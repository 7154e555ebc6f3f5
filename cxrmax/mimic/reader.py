"""The MIMIC-CXR reader: MIMIC-CXR-JPG 2.0.0/2.1.0 and the MIMIC-CXR DICOM layout.

`MimicCXR` joins the release's CSVs (found by `cxrmax.mimic.layout`, read and validated by
`cxrmax.mimic.csvs`) into one row per image, attaches study labels and report sections
(`cxrmax.mimic.reports.parse_report`) and selects images for generation. The test set's radiologist
labels (2.1.0) have no subject_id and say "Airspace Opacity" for "Lung Opacity": names are mapped
through `pathologies.canonical_name`, never by position.

Everything tabular stays columnar: CSVs are read with `pyarrow.csv`, validated with `pyarrow.compute`
and joined with Arrow joins; selecting from the full 377,110-image metadata opens no image and reads
only the reports of the selected studies.

Bad input raises `cxrmax.core.errors.InputError` naming the file, row (1-based data row) and field; with
``lenient=True`` the offending row is skipped instead and counted in `MimicCXR.skipped`.

Selection rules (`MimicCXR.select`):

* ``views``: ViewPosition values (case-insensitive), or the groups ``frontal`` (PA, AP) and
  ``lateral`` (LATERAL, LL, XTABLE LATERAL); other values (LAO, RAO, AP AXIAL,
  SWIMMERS, LPO, empty...) are kept and selectable by name.
* ``require_positive``: the study has at least one of the 13 findings (not "No Finding") labelled 1
  in the chosen label source.
* ``one_per_study``: one image per study, preferring PA, then AP, then other views, then the lowest
  dicom_id.
* ``k`` with ``seed``: the k studies with the smallest splitmix64 hash of (study_id, seed): the same
  sample on every machine and for any row order, and the sample for a smaller k is a subset of the
  sample for a larger k.
* ``shard=(i, n)``: studies whose splitmix64 hash of study_id is i modulo n, applied after sampling,
  so the n shards partition the selection exactly and every image of a study lands in one shard.
"""

from __future__ import annotations

import difflib
import os
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cxrmax.core.errors import ImageError, InputError, where
from cxrmax.core.pathologies import FINDINGS, OBSERVATIONS, canonical_name, is_observation
from cxrmax.core.schemas import LABELS_TYPE, SELECTION_SCHEMA
from cxrmax.core.shards import parse_shard
from cxrmax.core.splits import SPLIT_ALIASES, SPLITS, canonical_split
from cxrmax.mimic.csvs import Validator, check_columns, read_csv, read_header, read_subject_ids
from cxrmax.mimic.images import verify
from cxrmax.mimic.layout import (
    LABEL_SOURCES,
    METADATA_CSV,
    REPORTS_ZIP,
    SPLIT_CSV,
    detect_layout,
    find_csv,
    image_relpath,
    image_suffix,
    report_relpath,
)
from cxrmax.mimic.ms_cxr_t import read_ms_cxr_t
from cxrmax.mimic.reports import ReportSections, binary_report, decode_report, parse_report
from cxrmax.mimic.selection import read_selection, write_selection

# The names below were all defined here before the reader was split; callers keep importing them
# from cxrmax.mimic.reader (or, preferably, from cxrmax.mimic).
__all__ = [
    "SPLITS",
    "FRONTAL_VIEWS",
    "LATERAL_VIEWS",
    "LABEL_SOURCES",
    "MimicCXR",
    "read_ms_cxr_t",
    "read_selection",
    "write_selection",
    "read_subject_ids",
    "detect_layout",
    "report_relpath",
    "image_relpath",
]

FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP")
LATERAL_VIEWS: tuple[str, ...] = ("LATERAL", "LL", "XTABLE LATERAL")  # cross-table lateral too
#: `MimicCXR._report_or_skip`'s answer for a report file that could not be read (lenient).
_UNREADABLE = object()


# --------------------------------------------------------------------------------------------------
# Hashing (sampling and sharding)
# --------------------------------------------------------------------------------------------------


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64: a fixed, platform-independent hash of integer ids."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _seeded_hash(ids: np.ndarray, seed: int) -> np.ndarray:
    salt = _mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    return _mix64(ids.astype(np.uint64) ^ salt)


# --------------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------------


class MimicCXR:
    """A MIMIC-CXR(-JPG) root. CSVs are read lazily on first use and kept as Arrow tables.

    >>> mimic = MimicCXR("/data/mimic-cxr-jpg/2.1.0")            # doctest: +SKIP
    >>> table = mimic.select(splits=["train"], views=["frontal"], k=1000, seed=0)  # doctest: +SKIP
    """

    def __init__(
        self,
        root: str | os.PathLike,
        lenient: bool = False,
        *,
        reports_root: str | os.PathLike | None = None,
        layout: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.lenient = lenient
        self.reports_root = Path(reports_root) if reports_root is not None else self.root
        if reports_root is not None and not self.reports_root.exists():
            # Given on purpose: every report would silently be missing.
            raise InputError(f"{where(self.reports_root)}: reports root not found")
        if self.reports_root.name == "files" and not (self.reports_root / "files").is_dir():
            self.reports_root = self.reports_root.parent  # "--reports-root .../files": the folder above
        self.layout = layout or detect_layout(self.root)
        if self.layout not in ("jpg", "dicom"):
            raise InputError(f"unknown layout {self.layout!r}; expected jpg or dicom")
        self.image_extension = image_suffix(self.root, self.layout)
        self.version = "2.1.0" if find_csv(self.root, LABEL_SOURCES["test-set-labeled"]) else "2.0.0"
        #: Lenient-mode skips: "<file>: <reason>" -> rows skipped.
        self.skipped: Counter = Counter()
        self._images: pa.Table | None = None
        self._index: pa.Table | None = None
        self._labels: dict[str, pa.Table] = {}
        self._label_reads: dict[str, Future] = {}
        self._reports_in_zip = self.reports_root.is_file()  # reports_root may be the reports zip
        self._reports_zip: zipfile.ZipFile | None = None
        self._reports_zip_index: dict[str, str] | None = None

    def __repr__(self) -> str:
        return f"MimicCXR({str(self.root)!r}, layout={self.layout!r}, version={self.version!r})"

    def _read_table(
        self, path: Path, columns: Sequence[str], types: dict[str, pa.DataType] | None = None
    ) -> pa.Table:
        """`_read_csv`; when lenient, rows with a wrong number of fields are skipped and counted."""
        ragged: list | None = [] if self.lenient else None
        table = read_csv(path, columns, types, ragged)
        if ragged:
            self.skipped[f"{path.name}: wrong number of fields"] += len(ragged)
        return table

    def _require_csv(self, name: str) -> Path:
        path = find_csv(self.root, name)
        if path is None:
            self._refuse_csv_directory(name)
            hint = ""
            if self.layout == "dicom" and name in (METADATA_CSV, SPLIT_CSV):
                hint = "; the DICOM release has no view/split CSVs: copy MIMIC-CXR-JPG's CSVs next to files/"
            raise InputError(f"{where(self.root / name)}: missing (looked for {name}.gz and {name}){hint}")
        return path

    def _refuse_csv_directory(self, name: str) -> None:
        """An InputError when a folder sits where the CSV `name` (or its .gz) should be (an archive
        extracted in place, say): clearer than calling the file missing."""
        for candidate in (self.root / f"{name}.gz", self.root / name):
            if candidate.is_dir():
                raise InputError(f"{where(candidate)}: is a directory, not the CSV file")

    # ---- images ------------------------------------------------------------------------------

    def images(self) -> pa.Table:
        """One row per image: dicom_id, subject_id, study_id, split, view, study_date, study_time,
        rows, columns, image_path (relative to the root). Metadata joined with the split CSV; ids
        that disagree between the two are errors (or counted skips when lenient)."""
        if self._images is None:
            index = self._image_index()
            self._images = index.append_column("image_path", self._image_paths(index))
        return self._images

    def _image_index(self) -> pa.Table:
        """`images()` without image_path (built only for the rows a selection keeps)."""
        if self._index is None:
            self._index = self._load_images()
        return self._index

    def _image_paths(self, table: pa.Table) -> pa.ChunkedArray:
        subject = pc.cast(table.column("subject_id"), pa.string())
        return pc.binary_join_element_wise(
            "files/p",
            pc.utf8_slice_codeunits(subject, 0, 2),
            "/p",
            subject,
            "/s",
            pc.cast(table.column("study_id"), pa.string()),
            "/",
            table.column("dicom_id"),
            self.image_extension,
            "",
        )

    def _load_images(self) -> pa.Table:
        meta_path = self._require_csv(METADATA_CSV)
        header = read_header(meta_path)
        needed = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
        check_columns(meta_path, header, needed)
        split_path = self._require_csv(SPLIT_CSV)
        split_header = read_header(split_path)
        check_columns(split_path, split_header, ["dicom_id", "study_id", "subject_id", "split"])
        # Gzip decompression is single-threaded: read the split CSV on a second core meanwhile.
        with ThreadPoolExecutor(max_workers=1) as pool:
            split_future = pool.submit(
                self._read_table,
                split_path,
                ["dicom_id", "study_id", "subject_id", "split"],
                {"study_id": pa.int64(), "subject_id": pa.int64()},
            )
            self._prefetch_labels(pool)  # queued after the split CSV: selections attach labels
            return self._join_images(meta_path, header, split_path, split_future)

    def _join_images(
        self, meta_path: Path, header: list[str], split_path: Path, split_future: Future
    ) -> pa.Table:
        """The validated metadata joined with the split CSV (read meanwhile by `split_future`),
        sorted by subject, study, dicom_id: the image index."""
        meta, meta_dicom, meta_clean = self._read_metadata(meta_path, header)
        meta = self._drop_studies_with_several_subjects(meta, meta_path)
        split = self._read_split(split_path, split_future.result(), meta_dicom, meta_clean)
        joined = self._match_metadata_and_split(meta, split, meta_path, split_path)
        if not _sorted_by_subject_study_dicom(joined):  # the release is; a copy is only made when not
            joined = joined.sort_by(
                [("subject_id", "ascending"), ("study_id", "ascending"), ("dicom_id", "ascending")]
            )
        joined = self._check_one_split_per_study(joined, split_path)
        return joined.select(
            [
                "dicom_id",
                "subject_id",
                "study_id",
                "split",
                "view",
                "study_date",
                "study_time",
                "rows",
                "columns",
            ]
        )

    def _read_metadata(self, meta_path: Path, header: list[str]) -> tuple[pa.Table, pa.ChunkedArray, bool]:
        """The metadata CSV validated: (table with _meta_row, its dicom_id column before bad rows
        were dropped, whether no row was bad)."""
        needed = ["dicom_id", "subject_id", "study_id", "ViewPosition"]
        optional = [c for c in ("StudyDate", "StudyTime", "Rows", "Columns") if c in header]
        raw = self._read_table(
            meta_path,
            needed + optional,
            {
                "subject_id": pa.int64(),
                "study_id": pa.int64(),
                "StudyDate": pa.int64(),
                "StudyTime": pa.float64(),
                "Rows": pa.int64(),
                "Columns": pa.int64(),
            },
        )
        if raw.num_rows == 0:
            raise InputError(f"{where(meta_path)}: no data rows")
        check = Validator(meta_path, raw, self.lenient, self.skipped)
        dicom_id = check.text("dicom_id", trim=True)
        # The dicom_id is the image's file name: a separator or a dot folder would point elsewhere.
        check.flag(
            pc.or_(
                pc.match_substring_regex(dicom_id, r"[/\\\x00-\x1f]"),
                pc.is_in(dicom_id, pa.array([".", ".."])),
            ),
            "dicom_id",
            "not a file name (a path separator, a control character or a dot folder)",
            "bad dicom_id",
        )
        subject_id = check.integer("subject_id")
        study_id = check.integer("study_id")
        view = pc.utf8_upper(pc.utf8_trim_whitespace(raw.column("ViewPosition")))
        view = pc.if_else(pc.equal(view, ""), pa.scalar(None, pa.string()), view)  # " " is empty too
        nulls = pa.nulls(raw.num_rows)
        study_date = (
            check.integer("StudyDate", required=False) if "StudyDate" in optional else nulls.cast(pa.int64())
        )
        study_time = check.number("StudyTime") if "StudyTime" in optional else nulls.cast(pa.float64())
        rows = check.integer("Rows", required=False) if "Rows" in optional else nulls.cast(pa.int64())
        columns = (
            check.integer("Columns", required=False) if "Columns" in optional else nulls.cast(pa.int64())
        )
        check.duplicates(dicom_id, "dicom_id", "dicom_id")
        meta_clean = not check.bad.any()
        meta = pa.table(
            {
                "dicom_id": dicom_id,
                "subject_id": subject_id,
                "study_id": study_id,
                "view": view,
                "study_date": study_date,
                "study_time": study_time,
                "rows": rows,
                "columns": columns,
                "_meta_row": pa.array(np.arange(1, raw.num_rows + 1)),
            }
        ).filter(pa.array(check.keep()))
        return meta, dicom_id, meta_clean

    def _drop_studies_with_several_subjects(self, meta: pa.Table, meta_path: Path) -> pa.Table:
        """A study belongs to one subject: a clash is an error, or (lenient) the study is dropped."""
        studies_np = meta.column("study_id").to_numpy()
        subjects_np = meta.column("subject_id").to_numpy()
        order = np.lexsort((subjects_np, studies_np))
        same_study = studies_np[order][1:] == studies_np[order][:-1]
        clash = same_study & (subjects_np[order][1:] != subjects_np[order][:-1])
        if clash.any():
            conflict_ids = np.unique(studies_np[order][1:][clash])
            bad_study = int(conflict_ids[0])
            bad_rows = meta.filter(pc.equal(meta.column("study_id"), bad_study))
            if not self.lenient:
                raise InputError(
                    f"{where(meta_path, row=max(bad_rows.column('_meta_row').to_pylist()), field='subject_id')}: "
                    f"study {bad_study} appears with subjects {sorted(set(bad_rows.column('subject_id').to_pylist()))}"
                )
            conflict = pa.table({"study_id": pa.array(conflict_ids)})
            dropped = pc.is_in(meta.column("study_id"), conflict.column("study_id"))
            self.skipped[f"{meta_path.name}: study with several subjects"] += int(pc.sum(dropped).as_py())
            meta = meta.filter(pc.invert(dropped))
        return meta

    def _read_split(
        self, split_path: Path, raw_split: pa.Table, meta_dicom: pa.ChunkedArray, meta_clean: bool
    ) -> pa.Table:
        """The split CSV validated (split spellings made canonical), with its 1-based _split_row."""
        check = Validator(split_path, raw_split, self.lenient, self.skipped)
        split_values = pc.utf8_lower(pc.utf8_trim_whitespace(check.text("split")))
        for alias, split_name in SPLIT_ALIASES.items():  # "val", "valid", "validation", "dev"
            if alias != split_name:
                split_values = pc.if_else(pc.equal(split_values, alias), split_name, split_values)
        check.flag(
            pc.invert(pc.is_in(split_values, pa.array(SPLITS))),
            "split",
            f"split is not one of {', '.join(SPLITS)}",
            "unknown split",
        )
        split_dicom = check.text("dicom_id", trim=True)
        if not (meta_clean and split_dicom.equals(meta_dicom)):  # same ids, same order as clean metadata
            check.duplicates(split_dicom, "dicom_id", "dicom_id")
        split = pa.table(
            {
                "dicom_id": split_dicom,
                "split_study_id": check.integer("study_id"),
                "split_subject_id": check.integer("subject_id"),
                "split": split_values,
                "_split_row": pa.array(np.arange(1, raw_split.num_rows + 1)),
            }
        ).filter(pa.array(check.keep()))
        return split

    def _match_metadata_and_split(
        self, meta: pa.Table, split: pa.Table, meta_path: Path, split_path: Path
    ) -> pa.Table:
        """Join the two on dicom_id; images in only one file, or whose ids disagree, are errors
        naming the row (lenient: counted skips)."""
        if meta.num_rows == split.num_rows and meta.column("dicom_id").equals(split.column("dicom_id")):
            # The release lists images in the same order in both files: no hash join needed.
            joined = meta
            for name in ("split_study_id", "split_subject_id", "split", "_split_row"):
                joined = joined.append_column(name, split.column(name))
        else:
            joined = meta.join(split, keys="dicom_id", join_type="full outer", use_threads=True)
        no_meta = pc.is_null(joined.column("_meta_row"))
        no_split = pc.is_null(joined.column("_split_row"))
        disagree_study = pc.fill_null(
            pc.not_equal(joined.column("study_id"), joined.column("split_study_id")), False
        )
        disagree_subject = pc.fill_null(
            pc.not_equal(joined.column("subject_id"), joined.column("split_subject_id")), False
        )
        problems = [
            (
                no_meta,
                split_path,
                "_split_row",
                "dicom_id",
                f"image not listed in {meta_path.name}",
                "image not in metadata",
            ),
            (
                no_split,
                meta_path,
                "_meta_row",
                "dicom_id",
                f"image has no row in {split_path.name}",
                "image without split",
            ),
            (
                disagree_study,
                split_path,
                "_split_row",
                "study_id",
                f"study_id disagrees with {meta_path.name}",
                "ids disagree",
            ),
            (
                disagree_subject,
                split_path,
                "_split_row",
                "subject_id",
                f"subject_id disagrees with {meta_path.name}",
                "ids disagree",
            ),
        ]
        drop = np.zeros(joined.num_rows, dtype=bool)
        for mask, path, row_column, field_name, problem, reason in problems:
            values = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
            if not values.any():
                continue
            first = int(np.flatnonzero(values)[0])
            if not self.lenient:
                row = joined.column(row_column)[first].as_py()
                raise InputError(
                    f"{where(path, row=row, field=field_name)}: {problem} (dicom_id {joined.column('dicom_id')[first].as_py()})"
                )
            self.skipped[f"{path.name}: {reason}"] += int((values & ~drop).sum())
            drop |= values
        if drop.any():
            joined = joined.filter(pa.array(~drop))
        return joined

    def _check_one_split_per_study(self, joined: pa.Table, split_path: Path) -> pa.Table:
        """A study's images share one split (the release splits by patient). A hand-made split CSV
        that puts a study's PA in train and its lateral in test would leak the study across splits:
        an error naming the split row, or (lenient) all of that study's images are dropped."""
        if joined.num_rows < 2:
            return joined
        study = joined.column("study_id").to_numpy()
        split = joined.column("split")
        same_study = study[1:] == study[:-1]
        if not same_study.any():
            return joined
        differs = pc.fill_null(pc.not_equal(split.slice(1), split.slice(0, len(split) - 1)), False)
        clash = same_study & np.asarray(differs.to_numpy(zero_copy_only=False), dtype=bool)
        if not clash.any():
            return joined
        first = int(np.flatnonzero(clash)[0]) + 1
        if not self.lenient:
            bad_study = int(study[first])
            splits = sorted(set(split.filter(pc.equal(joined.column("study_id"), bad_study)).to_pylist()))
            raise InputError(
                f"{where(split_path, row=joined.column('_split_row')[first].as_py(), field='split')}: "
                f"study {bad_study} has images in {' and '.join(splits)} (a study belongs to one split)"
            )
        dropped = pc.is_in(joined.column("study_id"), pa.array(np.unique(study[1:][clash])))
        self.skipped[f"{split_path.name}: study in several splits"] += int(pc.sum(dropped).as_py())
        return joined.filter(pc.invert(dropped))

    def studies(self) -> pa.Table:
        """One row per study: study_id, subject_id, split, n_images (sorted by subject, study)."""
        images = self._image_index()  # sorted by subject, study: a study's images are contiguous
        study = images.column("study_id").to_numpy()
        if len(study) == 0:
            return pa.table(
                {
                    "study_id": pa.array([], pa.int64()),
                    "subject_id": pa.array([], pa.int64()),
                    "split": pa.array([], pa.string()),
                    "n_images": pa.array([], pa.int64()),
                }
            )
        starts = np.flatnonzero(np.r_[True, study[1:] != study[:-1]])
        counts = np.diff(np.r_[starts, len(study)])
        index = pa.array(starts)
        return pa.table(
            {
                "study_id": images.column("study_id").take(index),
                "subject_id": images.column("subject_id").take(index),
                "split": images.column("split").take(index),
                "n_images": pa.array(counts, pa.int64()),
            }
        )

    # ---- labels ------------------------------------------------------------------------------

    def study_labels(self, splits: Iterable[str] | None = None, source: str = "chexpert") -> pa.Table:
        """Study-level labels: study_id, subject_id, split and one float32 column per observation
        (1.0 / 0.0 / -1.0, null = blank). `source`: "chexpert", "negbio" or "test-set-labeled"
        (2.1.0 radiologist labels; subject_id and split filled in from the metadata). Only studies
        with a label row are returned."""
        if source not in LABEL_SOURCES:
            raise InputError(f"unknown label source {source!r}; expected one of {', '.join(LABEL_SOURCES)}")
        if source not in self._labels:
            self._labels[source] = self._load_labels(source)
        table = self._labels[source]
        if splits is not None:
            table = table.filter(pc.is_in(table.column("split"), pa.array(_normalize_splits(splits))))
        return table

    def _label_plan(self, source: str) -> tuple[Path, dict[str, str], list[str], dict[str, pa.DataType]]:
        """Check a label CSV's header: (path, canonical -> header name, columns to read, their types)."""
        path = self._require_csv(LABEL_SOURCES[source])
        header = read_header(path)
        needs_subject = source != "test-set-labeled"
        check_columns(path, header, ["subject_id", "study_id"] if needs_subject else ["study_id"])
        label_columns: dict[str, str] = {}  # canonical -> header spelling
        for name in header:
            if name in ("subject_id", "study_id") or name == "":
                continue
            if not is_observation(name):
                # A misspelt observation is an error; other extra columns of users' copies (a
                # pandas index "Unnamed: 0", dicom_id, split, Path...) are not labels: ignored.
                near = difflib.get_close_matches(name.lower(), [o.lower() for o in OBSERVATIONS], 1, 0.8)
                if near:
                    raise InputError(
                        f"{where(path, field=name)}: unknown label column (expected the 14 observations; "
                        f"did you mean {OBSERVATIONS[[o.lower() for o in OBSERVATIONS].index(near[0])]!r}?)"
                    )
                continue
            canonical = canonical_name(name)
            if canonical in label_columns:
                raise InputError(f"{where(path, field=name)}: observation {canonical!r} appears twice")
            label_columns[canonical] = name
        missing = [o for o in OBSERVATIONS if o not in label_columns]
        if missing:
            raise InputError(
                f"{where(path, field=missing[0])}: missing label column (missing: {', '.join(missing)})"
            )
        id_columns = ["subject_id", "study_id"] if needs_subject else ["study_id"]
        types = {name: pa.int64() for name in id_columns} | {
            name: pa.float32() for name in label_columns.values()
        }
        return path, label_columns, id_columns + list(label_columns.values()), types

    def _prefetch_labels(self, pool: ThreadPoolExecutor, source: str = "chexpert") -> None:
        """Start reading a label CSV in the background; problems surface when the labels are used."""
        try:
            path, _, columns, types = self._label_plan(source)
        except InputError:
            return
        self._label_reads[source] = pool.submit(self._read_table, path, columns, types)

    def _load_labels(self, source: str) -> pa.Table:
        path, label_columns, columns, types = self._label_plan(source)
        needs_subject = source != "test-set-labeled"
        prefetched = self._label_reads.pop(source, None)
        raw = prefetched.result() if prefetched is not None else self._read_table(path, columns, types)
        check = Validator(path, raw, self.lenient, self.skipped)
        study_id = check.integer("study_id")
        data: dict[str, pa.ChunkedArray | pa.Array] = {"study_id": study_id}
        if needs_subject:
            data["label_subject_id"] = check.integer("subject_id")
        for canonical in OBSERVATIONS:
            data[canonical] = check.label(label_columns[canonical])
        check.duplicates(study_id, "study_id", "study_id")
        data["_row"] = pa.array(np.arange(1, raw.num_rows + 1))
        labels = pa.table(data).filter(pa.array(check.keep()))

        studies = self.studies().select(["study_id", "subject_id", "split"])
        joined = labels.join(studies, keys="study_id", join_type="left outer")
        unknown = pc.is_null(joined.column("subject_id"))
        problems = [(unknown, "study_id", f"study not in {METADATA_CSV}", "study not in metadata")]
        if needs_subject:
            disagree = pc.fill_null(
                pc.not_equal(joined.column("subject_id"), joined.column("label_subject_id")), False
            )
            problems.append(
                (disagree, "subject_id", f"subject_id disagrees with {METADATA_CSV}", "ids disagree")
            )
        drop = np.zeros(joined.num_rows, dtype=bool)
        for mask, field_name, problem, reason in problems:
            values = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
            if not values.any():
                continue
            first = int(np.flatnonzero(values)[0])
            if not self.lenient:
                raise InputError(
                    f"{where(path, row=joined.column('_row')[first].as_py(), field=field_name)}: {problem} "
                    f"(study_id {joined.column('study_id')[first].as_py()})"
                )
            self.skipped[f"{path.name}: {reason}"] += int((values & ~drop).sum())
            drop |= values
        joined = joined.filter(pa.array(~drop)).sort_by(
            [("subject_id", "ascending"), ("study_id", "ascending")]
        )
        return joined.select(["study_id", "subject_id", "split", *OBSERVATIONS])

    # ---- reports -----------------------------------------------------------------------------

    def report_path(self, subject_id: int, study_id: int) -> Path:
        """Where the report of a study lives (under `reports_root`)."""
        return self.reports_root / report_relpath(subject_id, study_id)

    def report_text(self, subject_id: int, study_id: int) -> str | None:
        """The raw report text, or None when the study has no report. Read from
        ``files/pXX/pSUBJECT/sSTUDY.txt`` under `reports_root`, else from the DICOM release's
        mimic-cxr-reports.zip (`reports_root` itself, or that file inside it) without unpacking."""
        path = self.report_path(subject_id, study_id)
        if not self._reports_in_zip:
            try:
                return self._report_from(path.read_bytes(), where(path))
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise InputError(f"{where(path)}: cannot read report: {exc.strerror or exc}") from None
        index = self._report_archive_index()
        if not index:
            return None
        member = index.get(f"p{subject_id}/s{study_id}.txt")
        if member is None:
            return None
        assert self._reports_zip is not None
        try:
            data = self._reports_zip.read(member)
        except (OSError, zipfile.BadZipFile, zlib.error) as exc:
            raise InputError(f"{where(self._reports_zip.filename)}: cannot read {member}: {exc}") from None
        return self._report_from(data, f"{where(self._reports_zip.filename)}: {member}")

    @staticmethod
    def _report_from(data: bytes, source: str) -> str:
        """A report file's text; bytes that are not text are an error naming the file (which
        ``lenient`` selections count and go without, as for any unreadable report)."""
        problem = binary_report(data)
        if problem is not None:
            raise InputError(f"{source}: not a text report: {problem}; replace it with the release's .txt")
        return decode_report(data)

    def _report_archive_index(self) -> dict[str, str]:
        """ "pSUBJECT/sSTUDY.txt" -> member name of the reports zip (empty when there is none)."""
        if self._reports_zip_index is None:
            archive = self.reports_root if self._reports_in_zip else self.reports_root / REPORTS_ZIP
            self._reports_zip_index = {}
            if archive.is_file():
                try:
                    self._reports_zip = zipfile.ZipFile(archive)
                except (OSError, zipfile.BadZipFile) as exc:
                    raise InputError(f"{where(archive)}: not a readable zip of reports: {exc}") from None
                for name in self._reports_zip.namelist():
                    parts = name.rstrip("/").split("/")
                    if len(parts) >= 2 and parts[-1].endswith(".txt"):
                        self._reports_zip_index[f"{parts[-2]}/{parts[-1]}"] = name
        return self._reports_zip_index

    def report(self, subject_id: int, study_id: int) -> ReportSections | None:
        """The parsed report of a study, or None when it has no report file."""
        text = self.report_text(subject_id, study_id)
        return None if text is None else parse_report(text)

    def _report_or_skip(self, subject_id: int, study_id: int) -> ReportSections | object | None:
        """`report`; lenient, a report file that cannot be read (a folder in its place, an I/O
        error) is counted and gives `_UNREADABLE` instead of stopping the run."""
        try:
            return self.report(subject_id, study_id)
        except InputError:
            if not self.lenient:
                raise
            self.skipped["reports: unreadable (sections left null)"] += 1
            return _UNREADABLE

    # ---- selection ---------------------------------------------------------------------------

    def select(
        self,
        splits: Iterable[str] | None = None,
        views: Iterable[str] | None = None,
        require_positive: bool = False,
        k: int | None = None,
        seed: int = 0,
        shard: str | tuple[int, int] | None = None,
        exclude_subjects: Iterable[int] | str | os.PathLike | None = None,
        one_per_study: bool = True,
        *,
        source: str = "chexpert",
        with_reports: bool = True,
        check_files: bool = True,
        verify_images: bool = False,
    ) -> pa.Table:
        """Select images (see the module docstring for the rules) as a table with
        `shards.SELECTION_SCHEMA`, sorted by subject, study, dicom_id. Opens no image: with
        `check_files` it only checks that the selected images exist (a missing one is an error,
        or a counted skip when lenient); `verify_images` decodes each selected image (cheaply) so
        corrupt files are found now rather than mid-generation; with `with_reports` it reads the
        selected studies' reports."""
        table = self._image_index()
        table = table.append_column("_order", pa.array(np.arange(table.num_rows)))
        table = self._filter(table, splits, views, exclude_subjects, require_positive, source)
        if one_per_study and table.num_rows:
            table = _one_per_study(table)
        if k is not None:
            table = _sample_studies(table, k, seed)
        parsed_shard = parse_shard(shard)
        if parsed_shard is not None:
            index, count = parsed_shard
            in_shard = (_mix64(table.column("study_id").to_numpy()) % np.uint64(count)) == np.uint64(index)
            table = table.filter(pa.array(in_shard))
        table = table.sort_by("_order").drop_columns(["_order"])
        table = table.append_column("image_path", self._image_paths(table))
        if check_files or verify_images:
            table = self._check_images_exist(table)
        if verify_images:
            table = self._verify_images(table)
        return self._attach(table, source=source, with_reports=with_reports)

    def _filter(
        self,
        table: pa.Table,
        splits: Iterable[str] | None,
        views: Iterable[str] | None,
        exclude_subjects: Iterable[int] | str | os.PathLike | None,
        require_positive: bool,
        source: str,
    ) -> pa.Table:
        """The rows of `table` in `splits` and `views`, of subjects not excluded, of positive studies."""
        if splits is not None:
            table = table.filter(pc.is_in(table.column("split"), pa.array(_normalize_splits(splits))))
        if views is not None:
            present = set(pc.unique(table.column("view").drop_null()).to_pylist()) - {""}
            wanted = _normalize_views(views, present)
            table = table.filter(pc.is_in(table.column("view"), pa.array(sorted(wanted), pa.string())))
        if exclude_subjects is not None:
            if isinstance(exclude_subjects, (str, os.PathLike)):
                exclude_subjects = read_subject_ids(exclude_subjects)
            excluded = pa.array(sorted({int(s) for s in exclude_subjects}), pa.int64())
            table = table.filter(pc.invert(pc.is_in(table.column("subject_id"), excluded)))
        if require_positive:
            labels = self.study_labels(source=source)
            positive = np.zeros(labels.num_rows, dtype=bool)
            for name in FINDINGS:
                positive |= np.asarray(
                    pc.fill_null(pc.equal(labels.column(name), 1.0), False).to_numpy(), dtype=bool
                )
            table = table.filter(
                pc.is_in(table.column("study_id"), labels.column("study_id").filter(pa.array(positive)))
            )
        return table

    def _check_images_exist(self, table: pa.Table) -> pa.Table:
        paths = table.column("image_path").to_pylist()
        present = np.array([(self.root / p).is_file() for p in paths], dtype=bool)
        if present.all():
            return table
        first = int(np.flatnonzero(~present)[0])
        if not self.lenient:
            found = "a directory" if (self.root / paths[first]).is_dir() else "absent"
            raise InputError(
                f"{where(self.root / paths[first])}: image listed in {METADATA_CSV} (dicom_id "
                f"{table.column('dicom_id')[first].as_py()}) but {found}"
            )
        self.skipped["images: listed but absent"] += int((~present).sum())
        return table.filter(pa.array(present))

    def _verify_images(self, table: pa.Table) -> pa.Table:
        """Decode every selected image cheaply; corrupt ones are errors (lenient: counted skips)."""
        keep = np.ones(table.num_rows, dtype=bool)
        for index, relative in enumerate(table.column("image_path").to_pylist()):
            try:
                verify(self.root / relative)
            except ImageError:
                if not self.lenient:
                    raise
                keep[index] = False
        if not keep.all():
            self.skipped["images: corrupt or undecodable"] += int((~keep).sum())
            table = table.filter(pa.array(keep))
        return table

    def _attach(self, table: pa.Table, source: str, with_reports: bool) -> pa.Table:
        """Add the labels struct and report sections; cast to SELECTION_SCHEMA."""
        labels = self._labels_if_present(source, table.num_rows)
        if labels is not None and table.num_rows:
            label_part = labels.select(["study_id", *OBSERVATIONS])
            order_column = pa.array(np.arange(table.num_rows))
            joined = (
                table.select(["study_id"])
                .append_column("_order", order_column)
                .join(label_part, keys="study_id", join_type="left outer")
                .sort_by("_order")
            )
            struct = pa.StructArray.from_arrays(
                [joined.column(name).combine_chunks().cast(pa.float32()) for name in OBSERVATIONS],
                fields=list(LABELS_TYPE),
            )
        else:
            struct = pa.nulls(table.num_rows, LABELS_TYPE)
        findings: list[str | None] = []
        impressions: list[str | None] = []
        last: list[str | None] = []
        if with_reports:
            cache: dict[int, ReportSections | None] = {}
            missing = 0
            for subject_id, study_id in zip(
                table.column("subject_id").to_pylist(), table.column("study_id").to_pylist(), strict=True
            ):
                if study_id not in cache:
                    cache[study_id] = sections = self._report_or_skip(subject_id, study_id)
                    missing += sections is None
                    if sections is _UNREADABLE:
                        cache[study_id] = None
                sections = cache[study_id]
                findings.append(sections.findings if sections else None)
                impressions.append(sections.impression if sections else None)
                last.append(sections.last_paragraph if sections else None)
            if missing:
                self.skipped["reports: missing (sections left null)"] += missing
        else:
            findings = impressions = last = [None] * table.num_rows
        return pa.table(
            {
                "sample_id": table.column("dicom_id"),
                "dicom_id": table.column("dicom_id"),
                "subject_id": table.column("subject_id"),
                "study_id": table.column("study_id"),
                "split": table.column("split"),
                "view": table.column("view"),
                "image_path": table.column("image_path"),
                "study_date": table.column("study_date"),
                "study_time": table.column("study_time"),
                "labels": struct,
                "findings": pa.array(findings, pa.string()),
                "impression": pa.array(impressions, pa.string()),
                "last_paragraph": pa.array(last, pa.string()),
            },
            schema=SELECTION_SCHEMA,
        )

    # ---- summary -----------------------------------------------------------------------------

    def summary(
        self,
        reports: bool = True,
        source: str = "chexpert",
        progress: Callable[[int, int], None] | None = None,
    ) -> dict:
        """Counts for `cxrmax mimic summary`: studies/images/subjects per split, subjects whose
        studies fall in more than one split (a train/test leak), images per split and view, label prevalence (1/0/-1/blank and studies without a label row), report coverage.
        `progress(done, total)` is called while reports are parsed (227,835 files on the release)."""
        images = self._image_index()
        studies = self.studies()
        result: dict = {"root": str(self.root), "layout": self.layout, "version": self.version}
        per_split = {}
        for split in SPLITS:
            part = images.filter(pc.equal(images.column("split"), split))
            per_split[split] = {
                "images": part.num_rows,
                "studies": pc.count_distinct(part.column("study_id")).as_py() if part.num_rows else 0,
                "subjects": pc.count_distinct(part.column("subject_id")).as_py() if part.num_rows else 0,
            }
        result["splits"] = per_split
        # The release splits by patient; a subject in two splits leaks between train and test.
        spread = images.group_by("subject_id").aggregate([("split", "count_distinct")])
        leaking = spread.filter(pc.greater(spread.column("split_count_distinct"), 1))
        result["subjects_in_several_splits"] = sorted(leaking.column("subject_id").to_pylist())
        views = images.group_by(["split", "view"]).aggregate([("dicom_id", "count")])
        result["views"] = {
            (row["split"], row["view"] or ""): row["dicom_id_count"] for row in views.to_pylist()
        }
        labels = self._labels_if_present(source, studies.num_rows)
        if labels is not None:
            result["labels"] = _label_summary(labels, source, studies.num_rows)
        if reports:
            result["reports"] = self._report_coverage(studies, progress)
        result["skipped"] = dict(self.skipped)
        return result

    def _labels_if_present(self, source: str, rows: int) -> pa.Table | None:
        """`study_labels(source)`, or None for a release without that label file (a bad one raises;
        an absent one is counted against the `rows` whose labels are left null)."""
        try:
            return self.study_labels(source=source)
        except InputError:
            if find_csv(self.root, LABEL_SOURCES[source]) is not None:
                raise
            self._refuse_csv_directory(LABEL_SOURCES[source])
            # Said, not silent: every label of the selection (or summary) is null.
            if rows:
                self.skipped[f"labels: no {LABEL_SOURCES[source]}(.gz) (labels left null)"] = rows
            return None

    def _report_coverage(self, studies: pa.Table, progress: Callable[[int, int], None] | None) -> dict:
        """How many studies have a report, and which sections those reports have."""
        coverage: Counter = Counter()
        for done, (subject_id, study_id) in enumerate(
            zip(studies.column("subject_id").to_pylist(), studies.column("study_id").to_pylist(), strict=True)
        ):
            if progress is not None and done % 1000 == 0:
                progress(done, studies.num_rows)
            sections = self._report_or_skip(subject_id, study_id)
            if sections is None or sections is _UNREADABLE:
                coverage["missing"] += 1
                continue
            coverage["reports"] += 1
            coverage["findings"] += sections.findings is not None
            coverage["impression"] += sections.impression is not None
            coverage["both"] += sections.findings is not None and sections.impression is not None
            coverage["last_paragraph_only"] += sections.findings is None and sections.impression is None
            coverage["addenda"] += bool(sections.addenda)
        kinds = ("reports", "findings", "impression", "both", "last_paragraph_only", "addenda", "missing")
        return {"studies": studies.num_rows, **{kind: coverage[kind] for kind in kinds}}


def _label_summary(labels: pa.Table, source: str, n_studies: int) -> dict:
    """Prevalence of 1 / 0 / -1 / blank per observation, and how many studies have a label row."""
    prevalence = {}
    for name in OBSERVATIONS:
        column = labels.column(name)
        prevalence[name] = {
            "1": int(pc.sum(pc.equal(column, 1.0)).as_py() or 0),
            "0": int(pc.sum(pc.equal(column, 0.0)).as_py() or 0),
            "-1": int(pc.sum(pc.equal(column, -1.0)).as_py() or 0),
            "blank": int(column.null_count),
        }
    return {
        "source": source,
        "studies_with_labels": labels.num_rows,
        "studies_without_labels": n_studies - labels.num_rows,
        "prevalence": prevalence,
    }


def _sorted_by_subject_study_dicom(table: pa.Table) -> bool:
    """Whether rows are already ordered by (subject_id, study_id, dicom_id): integer checks with
    numpy, string comparisons only between neighbours of the same study."""
    if table.num_rows < 2:
        return True
    subject = table.column("subject_id").to_numpy()
    study = table.column("study_id").to_numpy()
    step_subject, step_study = np.diff(subject), np.diff(study)
    if (step_subject < 0).any():
        return False
    same_subject = step_subject == 0
    if (step_study[same_subject] < 0).any():
        return False
    ties = np.flatnonzero(same_subject & (step_study == 0))
    if ties.size == 0:
        return True
    dicom = table.column("dicom_id")
    return bool(pc.all(pc.less_equal(dicom.take(pa.array(ties)), dicom.take(pa.array(ties + 1)))).as_py())


def _normalize_splits(splits: Iterable[str]) -> list[str]:
    if isinstance(splits, str):
        splits = [splits]
    result = []
    for split in splits:
        value = canonical_split(split) or split.strip().lower()
        if value not in SPLITS:
            raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        result.append(value)
    return result


def _normalize_views(views: Iterable[str], present: set[str] | None = None) -> set[str]:
    """ViewPosition values for ``views`` ("frontal" and "lateral" name groups, case ignored).

    A view that is neither a group nor a ViewPosition of this release (``present``) is a typo
    ("frontl"), not a wish for zero images: it is an InputError listing the valid spellings."""
    if isinstance(views, str):
        views = [views]
    wanted: set[str] = set()
    for view in views:
        value = view.strip().upper()
        if value == "FRONTAL":
            wanted.update(FRONTAL_VIEWS)
        elif value in ("LATERAL", "LATERALS"):
            wanted.update(LATERAL_VIEWS)
        elif present is not None and value not in present and value not in FRONTAL_VIEWS + LATERAL_VIEWS:
            valid = ", ".join(["frontal", "lateral", *sorted(present)])
            raise InputError(f"unknown view {view!r}; this release has: {valid}")
        elif value:
            wanted.add(value)
    return wanted


def _one_per_study(table: pa.Table) -> pa.Table:
    """One row per study: PA first, then AP, then other views, then views left blank; ties go to
    the lowest _order (images() is sorted by subject, study, dicom_id: its row number is a
    deterministic tie-break that costs no string comparisons)."""
    order = table.column("_order").to_numpy()
    views_np = table.column("view").fill_null("").to_numpy(zero_copy_only=False)
    rank = np.where(views_np == "PA", 0, np.where(views_np == "AP", 1, np.where(views_np == "", 3, 2)))
    study = table.column("study_id").to_numpy()
    by_study = np.lexsort((order, rank, study))
    first = np.ones(len(by_study), dtype=bool)
    first[1:] = study[by_study][1:] != study[by_study][:-1]
    keep = np.zeros(table.num_rows, dtype=bool)
    keep[by_study[first]] = True
    return table.filter(pa.array(keep))


def _sample_studies(table: pa.Table, k: int, seed: int) -> pa.Table:
    """The k rows with the smallest seeded hash of their study_id (ties: the lowest _order)."""
    if k < 0:
        raise InputError(f"k must be >= 0, got {k}")
    order = table.column("_order").to_numpy()
    key = _seeded_hash(table.column("study_id").to_numpy(), seed)
    chosen = np.lexsort((order, key))[:k]
    mask = np.zeros(table.num_rows, dtype=bool)
    mask[chosen] = True
    return table.filter(pa.array(mask))
