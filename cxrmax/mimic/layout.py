"""Where things are in a MIMIC-CXR release: file names, report and image paths, the CSV finder and
the layout (MIMIC-CXR-JPG or the DICOM release).

The CSVs sit gzipped or plain at the root and are found by name:

* ``mimic-cxr-2.0.0-metadata.csv``  one row per image (dicom_id, subject_id, study_id, ViewPosition,
  Rows, Columns, StudyDate, StudyTime, ...)
* ``mimic-cxr-2.0.0-split.csv``     dicom_id, study_id, subject_id, split (train | validate | test)
* ``mimic-cxr-2.0.0-chexpert.csv`` / ``mimic-cxr-2.0.0-negbio.csv``  one row per study: subject_id,
  study_id and the 14 observations coded 1 / 0 / -1 / blank
* ``mimic-cxr-2.1.0-test-set-labeled.csv`` (2.1.0) radiologist labels of the test studies
* ``cxr-record-list.csv`` (DICOM release; marks the DICOM layout)
* reports ``files/pXX/pSUBJECT/sSTUDY.txt`` (or inside ``mimic-cxr-reports.zip``)
* images ``files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg`` (or ``.dcm``)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cxrmax.core.errors import InputError, where

__all__ = [
    "LABEL_SOURCES",
    "METADATA_CSV",
    "SPLIT_CSV",
    "RECORD_LIST_CSV",
    "REPORTS_ZIP",
    "report_relpath",
    "image_relpath",
    "find_csv",
    "detect_layout",
    "first_image",
    "image_suffix",
]

LABEL_SOURCES: dict[str, str] = {
    "chexpert": "mimic-cxr-2.0.0-chexpert.csv",
    "negbio": "mimic-cxr-2.0.0-negbio.csv",
    "test-set-labeled": "mimic-cxr-2.1.0-test-set-labeled.csv",
}
METADATA_CSV = "mimic-cxr-2.0.0-metadata.csv"
SPLIT_CSV = "mimic-cxr-2.0.0-split.csv"
RECORD_LIST_CSV = "cxr-record-list.csv"
#: How the DICOM release ships its reports (files/pXX/pSUBJECT/sSTUDY.txt inside); read in place.
REPORTS_ZIP = "mimic-cxr-reports.zip"


def report_relpath(subject_id: int, study_id: int) -> str:
    """Relative path of a study's report: ``files/pXX/pSUBJECT/sSTUDY.txt``."""
    return f"files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}.txt"


def image_relpath(subject_id: int, study_id: int, dicom_id: str, extension: str = ".jpg") -> str:
    """Relative path of an image: ``files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg``."""
    return f"files/p{str(subject_id)[:2]}/p{subject_id}/s{study_id}/{dicom_id}{extension}"


def find_csv(root: Path, name: str) -> Path | None:
    """The gzipped or plain CSV called `name` (``x.csv``) under root, or None.

    Copies are often renamed or moved: when the release name is absent, the same file under
    another version prefix or none ("mimic-cxr-2.1.0-metadata.csv", "metadata.csv.gz") is accepted,
    at the root or in one folder below it (not files/ or a pXX folder). Several such candidates are
    an error, and so is one inside a folder that has its own files/: that folder is the release root
    (the root given is the folder above it)."""
    for candidate in (root / f"{name}.gz", root / name):
        if candidate.is_file():
            return candidate
    stem = re.sub(r"^mimic-cxr-\d+(\.\d+)*-", "", name)
    pattern = re.compile(rf"(mimic-cxr-(\d+(\.\d+)*-)?)?{re.escape(stem)}(\.gz)?", re.IGNORECASE)
    try:
        folders = [root] + sorted(
            (
                entry
                for entry in root.iterdir()
                if entry.is_dir() and entry.name != "files" and not re.fullmatch(r"p\d\d", entry.name)
            ),
            key=lambda entry: entry.name,
        )
    except OSError:
        return None
    for folder in folders:
        try:
            found = sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_file())
        except OSError:
            continue
        if len(found) > 1:
            raise InputError(
                f"{where(root / name)}: missing, and several files could stand for it: "
                f"{', '.join(str(p) for p in found)} (keep one, or give it the release name)"
            )
        if found and folder != root and (folder / "files").is_dir() and not (root / "files").is_dir():
            raise InputError(
                f"{where(root)}: not the release root, but {folder} is (it has {found[0].name} and files/): "
                "pass that folder"
            )
        if found:
            return found[0]
    return None


IMAGE_SUFFIXES = {".dcm": "dicom", ".jpg": "jpg", ".jpeg": "jpg"}


def first_image(root: str | os.PathLike) -> Path | None:
    """The first image file under ``root/files`` in name order (``.dcm``, ``.jpg`` or ``.jpeg``, in
    any letter case: copies made on some file systems upper-case them), or None. Stops there, so it
    is cheap on the full release."""
    stack = [Path(root) / "files"]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir():
                stack.append(Path(entry.path))
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                return Path(entry.path)
    return None


def image_suffix(root: str | os.PathLike, layout: str) -> str:
    """The images' file suffix as this copy spells it (``.jpg``, ``.JPG``, ``.jpeg``, ``.dcm``, ...):
    that of the first image when it is of ``layout``, else the release's own (``.jpg`` / ``.dcm``)."""
    found = first_image(root)
    if found is not None and IMAGE_SUFFIXES[found.suffix.lower()] == layout:
        return found.suffix
    return ".dcm" if layout == "dicom" else ".jpg"


def detect_layout(root: str | os.PathLike) -> str:
    """ "jpg" (MIMIC-CXR-JPG) or "dicom" (MIMIC-CXR): the first image file found under files/
    decides (:func:`first_image`); without images, the DICOM release's cxr-record-list.csv(.gz)
    means DICOM. Images come first because a common copy is MIMIC-CXR-JPG's images with the DICOM
    release's record lists and reports dropped beside them. Raises InputError for a root with
    neither CSVs nor images."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{where(root)}: MIMIC-CXR root is not a directory")
    found = first_image(root)
    if found is not None:
        return IMAGE_SUFFIXES[found.suffix.lower()]
    if find_csv(root, RECORD_LIST_CSV) is not None:
        return "dicom"
    if find_csv(root, METADATA_CSV) is not None:
        return "jpg"
    hint = ""
    if root.name == "files" or re.fullmatch(r"p\d\d", root.name):
        hint = "; this looks like a folder inside the release: pass the folder that holds files/"
    raise InputError(
        f"{where(root)}: not a MIMIC-CXR root: no {METADATA_CSV}(.gz), no {RECORD_LIST_CSV}(.gz) and no "
        f"images under files/{hint}"
    )
