"""A mini MIMIC-CXR with the exact release layout, made from a seed, for tests and demos.

`make_mini_mimic(out, studies=40, seed=0)` writes::

    out/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id,subject_id,study_id,PerformedProcedureStepDescription,
                                          ViewPosition,Rows,Columns,StudyDate,StudyTime,...
    out/mimic-cxr-2.0.0-split.csv.gz      dicom_id,study_id,subject_id,split
    out/mimic-cxr-2.0.0-chexpert.csv.gz   subject_id,study_id,<14 observations>
    out/mimic-cxr-2.0.0-negbio.csv.gz     same header (same labels: the reports are unambiguous)
    out/files/pXX/pSUBJECT/sSTUDY/<dicom_id>.jpg    (or .dcm with dicom=True, the DICOM layout,
                                                     plus cxr-record-list.csv.gz / cxr-study-list.csv.gz)
    out/files/pXX/pSUBJECT/sSTUDY.txt               free-text report
    out/MS_CXR_T_temporal_image_classification_v1.0.0.csv
    (version="2.1.0" adds mimic-cxr-2.1.0-test-set-labeled.csv: study_id + labels, "Airspace Opacity")

Splits are assigned per subject (as in MIMIC-CXR) and all three are always present. Views: each study
has one frontal image (PA or AP), often a LATERAL (sometimes LL), sometimes a second AP and, rarely,
an image with an empty ViewPosition. Images are synthetic chest films that show every positive
(and, fainter, every uncertain) finding of the study where its report puts it (`cxrmax.testing.films`:
a meniscus at the stated costophrenic angle, a pneumothorax rim on the stated side, a wide heart, ...),
mostly small; `large_images` of them (default 2) are
the size of real MIMIC-CXR-JPG films (about 2,500 x 3,000).

Reports and labels
------------------
Labels are drawn first, then the report is written from them with a small, clean set of phrasings, so
the chexpert CSV is exactly what a careful labeler reads from the text. Every labelled observation is
stated in every clinical section the report has (FINDINGS and IMPRESSION carry the same sentences), so
the labels hold whichever section (or the whole text) a labeler reads; no other sentence of the
report (examination, indication, technique, comparison, addenda, filler) mentions an observation.

* positive (1):   "There is <phrase>." / "There are <plural phrase>."
* uncertain (-1): "Possible <phrase without article>." or "<Phrase> cannot be excluded."
* negative (0):   one fixed sentence per observation (below); when both Pleural Effusion and
                  Pneumothorax are negative they may be joined: "There is no pleural effusion or
                  pneumothorax."
* blank (None):   the observation is not mentioned at all.
* No Finding:     1 when no finding other than Support Devices is positive or uncertain (CheXpert
                  rule, `pathologies.no_finding`), else blank; such reports' IMPRESSION also says
                  "No acute cardiopulmonary process."

Phrases (side = left | right | bilateral, or no side where shown as "-"):

=========================== ================================================= ==========================
observation                 positive / uncertain phrase                        negative sentence
=========================== ================================================= ==========================
Atelectasis                 {side} basilar atelectasis; - "mild atelectasis"  No atelectasis.
Cardiomegaly                moderate cardiomegaly                             No cardiomegaly. / The heart
                                                                              size is normal.
Consolidation               {side} lower lobe consolidation                   No focal consolidation.
Edema                       mild pulmonary edema                              No pulmonary edema.
Enlarged Cardiomediastinum  widening of the mediastinum                       No mediastinal widening.
Fracture                    an acute fracture of the {side} sixth rib;        No acute fracture.
                            bilateral: acute fractures of the bilateral
                            sixth ribs
Lung Lesion                 a 1.5 cm nodule in the {side} upper lobe;         No pulmonary nodules.
                            bilateral: multiple nodules in the bilateral
                            upper lobes; - "a 1.5 cm pulmonary nodule"
Lung Opacity                an opacity at the {side} lung base; bilateral:    No focal opacity.
                            opacities at the bilateral lung bases
Pleural Effusion            a small {side} pleural effusion; bilateral:       No pleural effusion.
                            small bilateral pleural effusions; - "a small
                            pleural effusion"
Pleural Other               {side} apical pleural thickening                  No pleural thickening.
Pneumonia                   {side} lower lobe pneumonia                       No evidence of pneumonia.
Pneumothorax                a small {side} apical pneumothorax; bilateral:    No pneumothorax.
                            small bilateral pneumothoraces
Support Devices             an endotracheal tube in standard position /       (never negative or
                            a nasogastric tube in the stomach (positive only)  uncertain)
=========================== ================================================= ==========================

Report styles cycle through the sectioning cases a reader must handle: FINDINGS + IMPRESSION,
IMPRESSION only, FINDINGS only, an addendum on top separated by a line of underscores, misspelled
headers ("FINDING:", "IMPRESSON:"), and no clinical headers at all (labels in the last paragraph).
PHI appears as "___" as in the release.
"""

from __future__ import annotations

import csv
import gzip
import io
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from PIL import Image

from cxrmax.core.io import replace_dir
from cxrmax.core.pathologies import FINDINGS, LATERALIZABLE, MS_CXR_T_FINDINGS, OBSERVATIONS, no_finding
from cxrmax.testing.films import synthetic_chest

__all__ = [
    "METADATA_COLUMNS",
    "SPLIT_COLUMNS",
    "LABEL_COLUMNS",
    "MS_CXR_T_COLUMNS",
    "MS_CXR_T_FILENAME",
    "REPORT_STYLES",
    "make_mini_mimic",
    "render_report",
    "synthetic_chest",
]

METADATA_COLUMNS: tuple[str, ...] = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)
SPLIT_COLUMNS: tuple[str, ...] = ("dicom_id", "study_id", "subject_id", "split")
LABEL_COLUMNS: tuple[str, ...] = ("subject_id", "study_id", *OBSERVATIONS)
MS_CXR_T_FILENAME = "MS_CXR_T_temporal_image_classification_v1.0.0.csv"
MS_CXR_T_COLUMNS: tuple[str, ...] = (
    "dicom_id",
    "previous_dicom_id",
    "study_id",
    "previous_study_id",
    "subject_id",
    *(f"{prefix}_{suffix}" for prefix in MS_CXR_T_FINDINGS for suffix in ("progression", "label_quality")),
)
REPORT_STYLES: tuple[str, ...] = (
    "standard",
    "impression_only",
    "findings_only",
    "addendum",
    "misspelled",
    "no_sections",
)
_STYLE_WEIGHTS = (60, 10, 10, 8, 7, 5)

SIDES = ("left", "right", "bilateral")
# Observations that may also be written without a side.
_SIDELESS_OK = frozenset({"Atelectasis", "Lung Lesion", "Pleural Effusion"})
_LATERAL = LATERALIZABLE

NEGATIVE_SENTENCES: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("No atelectasis.",),
    "Cardiomegaly": ("No cardiomegaly.", "The heart size is normal."),
    "Consolidation": ("No focal consolidation.",),
    "Edema": ("No pulmonary edema.",),
    "Enlarged Cardiomediastinum": ("No mediastinal widening.",),
    "Fracture": ("No acute fracture.",),
    "Lung Lesion": ("No pulmonary nodules.",),
    "Lung Opacity": ("No focal opacity.",),
    "Pleural Effusion": ("No pleural effusion.",),
    "Pleural Other": ("No pleural thickening.",),
    "Pneumonia": ("No evidence of pneumonia.",),
    "Pneumothorax": ("No pneumothorax.",),
}
JOINED_NEGATIVE = "There is no pleural effusion or pneumothorax."
NO_ACUTE = "No acute cardiopulmonary process."


def finding_phrase(observation: str, side: str | None, variant: int = 0) -> tuple[str, bool]:
    """The noun phrase stating `observation` (with its side) and whether it is plural."""
    s = side
    if observation == "Atelectasis":
        return (f"{s} basilar atelectasis" if s else "mild atelectasis"), False
    if observation == "Cardiomegaly":
        return "moderate cardiomegaly", False
    if observation == "Consolidation":
        return f"{s} lower lobe consolidation", False
    if observation == "Edema":
        return "mild pulmonary edema", False
    if observation == "Enlarged Cardiomediastinum":
        return "widening of the mediastinum", False
    if observation == "Fracture":
        if s == "bilateral":
            return "acute fractures of the bilateral sixth ribs", True
        return f"an acute fracture of the {s} sixth rib", False
    if observation == "Lung Lesion":
        if s == "bilateral":
            return "multiple nodules in the bilateral upper lobes", True
        return (f"a 1.5 cm nodule in the {s} upper lobe" if s else "a 1.5 cm pulmonary nodule"), False
    if observation == "Lung Opacity":
        if s == "bilateral":
            return "opacities at the bilateral lung bases", True
        return f"an opacity at the {s} lung base", False
    if observation == "Pleural Effusion":
        if s == "bilateral":
            return "small bilateral pleural effusions", True
        return (f"a small {s} pleural effusion" if s else "a small pleural effusion"), False
    if observation == "Pleural Other":
        return f"{s} apical pleural thickening", False
    if observation == "Pneumonia":
        return f"{s} lower lobe pneumonia", False
    if observation == "Pneumothorax":
        if s == "bilateral":
            return "small bilateral pneumothoraces", True
        return f"a small {s} apical pneumothorax", False
    if observation == "Support Devices":
        return (
            ("an endotracheal tube in standard position", False)
            if variant % 2 == 0
            else ("a nasogastric tube in the stomach", False)
        )
    raise KeyError(observation)


def _strip_article(phrase: str) -> str:
    for article in ("a ", "an "):
        if phrase.startswith(article):
            return phrase[len(article) :]
    return phrase


def statement(observation: str, value: int, side: str | None, variant: int = 0) -> str:
    """One sentence stating `observation` with label `value` (1, -1 or 0), using the documented phrasings."""
    if value == 0:
        options = NEGATIVE_SENTENCES[observation]
        return options[variant % len(options)]
    phrase, plural = finding_phrase(observation, side, variant)
    if value == 1:
        return f"There {'are' if plural else 'is'} {phrase}."
    if value == -1:
        if variant % 2 == 0:
            return f"Possible {_strip_article(phrase)}."
        return f"{phrase[0].upper()}{phrase[1:]} cannot be excluded."
    raise ValueError(f"label value {value!r} has no sentence")


@dataclass
class _Study:
    subject_id: int
    study_id: int
    split: str
    date: int
    time: float
    labels: dict[str, int | None]
    sides: dict[str, str | None]
    variants: dict[str, int]
    style: str
    portable: bool
    images: list[dict] = field(default_factory=list)
    report: str = ""


def draw_labels(rng: random.Random, normal: bool, portable: bool) -> tuple[dict, dict, dict]:
    """One study's (labels, sides, phrasing variants), drawn with the mini MIMIC-CXR's odds."""
    labels: dict[str, int | None] = {}
    sides: dict[str, str | None] = {}
    variants: dict[str, int] = {}
    for name in FINDINGS:
        variants[name] = rng.randrange(4)
        if name == "Support Devices":
            labels[name] = 1 if rng.random() < (0.5 if portable else 0.12) else None
            continue
        r = rng.random()
        if normal:
            value = 0 if r < 0.3 else None
        elif r < 0.12:
            value = 1
        elif r < 0.19:
            value = -1
        elif r < 0.42:
            value = 0
        else:
            value = None
        labels[name] = value
        if value in (1, -1) and name in _LATERAL:
            sides[name] = None if (name in _SIDELESS_OK and rng.random() < 0.2) else rng.choice(SIDES)
    labels["No Finding"] = no_finding(labels)
    return labels, sides, variants


def render_report(study: _Study, rng: random.Random) -> str:
    """Write the free-text report of a study from its labels (see the module docstring)."""
    order = [name for name in FINDINGS if study.labels.get(name) is not None]
    rng.shuffle(order)
    sentences: list[str] = []
    joined = (
        study.labels.get("Pleural Effusion") == 0
        and study.labels.get("Pneumothorax") == 0
        and rng.random() < 0.5
    )
    for name in order:
        if joined and name in ("Pleural Effusion", "Pneumothorax"):
            if JOINED_NEGATIVE not in sentences:
                sentences.append(JOINED_NEGATIVE)
            continue
        sentences.append(statement(name, study.labels[name], study.sides.get(name), study.variants[name]))
    impression = list(sentences)
    if study.labels.get("No Finding") == 1:
        impression.append(NO_ACUTE)
    if not impression:  # nothing mentioned at all and not normal cannot happen; keep a body anyway
        impression.append(NO_ACUTE)

    names = {"PA": "PA", "AP": "AP", "LATERAL": "lateral", "LL": "left lateral"}
    views = [names[v] for v in ("PA", "AP", "LATERAL", "LL") if any(img["view"] == v for img in study.images)]
    if study.portable:
        exam, technique = "CHEST (PORTABLE AP)", "Portable AP chest radiograph."
    else:
        exam, technique = "CHEST (PA AND LAT)", "Chest PA and lateral."
    view_sentence = f"{' and '.join(views) or 'Frontal'} {'view of the chest was' if len(views) < 2 else 'views of the chest were'} obtained."
    indication = rng.choice(["cough", "shortness of breath", "chest pain", "fever", "weakness"])

    def wrap(text: str, width: int = 76) -> str:
        # Reports in the release are hard-wrapped at about 78 columns with a leading space.
        words, lines, line = text.split(), [], ""
        for word in words:
            if line and len(line) + 1 + len(word) > width:
                lines.append(" " + line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        if line:
            lines.append(" " + line)
        return "\n".join(lines)

    findings_header, impression_header = "FINDINGS:", "IMPRESSION:"
    if study.style == "misspelled":
        findings_header = rng.choice(["FINDING:", "FINDNGS:"])
        impression_header = rng.choice(["IMPRESSON:", "IMPRESION:"])
    head = [
        "                                 FINAL REPORT",
        f" EXAMINATION:  {exam}",
        " ",
        f" INDICATION:  ___ year old with {indication}.  // Evaluate for acute process.",
        " ",
        f" TECHNIQUE:  {technique}",
        " ",
        f" COMPARISON:  {rng.choice(['___.', 'None.', 'Chest radiograph from ___.'])}",
        " ",
    ]
    findings_text = wrap(" ".join([view_sentence, *sentences]))
    impression_text = wrap(" ".join(impression))
    body: list[str] = []
    if study.style in ("standard", "addendum", "misspelled", "findings_only"):
        body += [f" {findings_header}", " ", findings_text, " "]
    if study.style in ("standard", "addendum", "misspelled", "impression_only"):
        body += [f" {impression_header}", " ", impression_text, " "]
    if study.style == "no_sections":
        # No clinical headers: the statements form the last paragraph.
        body += [wrap(view_sentence), " ", impression_text, " "]
    text = "\n".join(head + body).rstrip() + "\n"
    if study.style == "addendum":
        addendum = "\n".join(
            [
                "                                 FINAL ADDENDUM",
                " ADDENDUM:  These findings were communicated to Dr. ___ by telephone at",
                " ___ on ___, ___ minutes after discovery.",
                " ",
                " " + "_" * 78,
                "",
            ]
        )
        text = addendum + text
    return text


def _hex_id(rng: random.Random) -> str:
    return "-".join(f"{rng.getrandbits(32):08x}" for _ in range(5))


def _write_csv_gz(path: Path, header: tuple[str, ...], rows: list[tuple], gz: bool = True) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    data = buffer.getvalue().encode()
    if gz:
        # mtime=0 keeps the bytes identical for a seed.
        data = gzip.compress(data, mtime=0)
    path.write_bytes(data)


def _label_cell(value: int | None) -> str:
    return "" if value is None else f"{float(value):.1f}"


def _write_dicom(path: Path, pixels: np.ndarray, image: dict, study: _Study, kind: int) -> None:
    """Write a DICOM CR/DX file: 12-bit MONOCHROME2, 12-bit MONOCHROME1 (inverted), or 16-bit with a
    rescale and a VOI LUT sequence, by `kind` (0, 1, 2)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    sop_uid = generate_uid(entropy_srcs=[image["dicom_id"]])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[str(study.study_id)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[image["dicom_id"], "series"])
    ds.PatientID = str(study.subject_id)
    ds.PatientName = "___"
    ds.StudyID = str(study.study_id)
    ds.StudyDate = str(study.date)
    ds.StudyTime = f"{study.time:010.3f}"  # DICOM TM: HHMMSS.FFF
    ds.Modality = "CR"
    ds.ViewPosition = image["view"]
    ds.SamplesPerPixel = 1
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = 16
    ds.PixelRepresentation = 0
    value = pixels.astype(np.float64) / 255.0
    if kind == 2:
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsStored, ds.HighBit = 16, 15
        stored = (value * 40000 + 8000).astype(np.uint16)
        ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
        # A linear VOI LUT over the used range, 12-bit output.
        first = 8000 - 1024
        entries = 40001
        lut = ds_item = pydicom.Dataset()
        ds_item.LUTDescriptor = [entries, first, 12]
        ds_item.LUTData = np.linspace(0, 4095, entries).astype(np.uint16).tobytes()
        ds_item["LUTData"].VR = "OW"
        ds.VOILUTSequence = Sequence([lut])
    else:
        ds.BitsStored, ds.HighBit = 12, 11
        stored = (value * 3800 + 150).astype(np.uint16)
        ds.WindowCenter, ds.WindowWidth = "2048", "4096"
        if kind == 1:
            ds.PhotometricInterpretation = "MONOCHROME1"
            stored = (4095 - stored).astype(np.uint16)
        else:
            ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def make_mini_mimic(
    out: str | os.PathLike,
    studies: int = 40,
    seed: int = 0,
    dicom: bool = False,
    *,
    version: str = "2.0.0",
    gz: bool = True,
    large_images: int = 2,
    small_edge: tuple[int, int] = (256, 512),
    overwrite: bool = False,
    split_weights: tuple[float, float, float] = (70, 15, 15),
) -> Path:
    """Write a mini MIMIC-CXR at `out` (see the module docstring) and return its path.

    Deterministic for a seed. `dicom=True` writes the DICOM layout (.dcm images, record and study
    lists; a third of the films MONOCHROME1) instead of JPGs. `version="2.1.0"` adds the radiologist
    test-set labels; `gz=False` writes plain CSVs. Needs at least 3 studies (one subject per split).
    `split_weights`: the odds of train, validate and test for every subject after the first three
    (one per split); one draw per subject whatever the weights, so moving weight between validate and
    test (train's share unchanged) leaves the train split and every film as they are.
    Built in a temporary sibling folder and renamed into place, so an interrupted run leaves no half
    data set; an existing non-empty `out` is an error unless `overwrite`."""
    if studies < 3:
        raise ValueError("make_mini_mimic needs at least 3 studies (one per split)")
    if version not in ("2.0.0", "2.1.0"):
        raise ValueError(f"unknown MIMIC-CXR version {version!r}; expected 2.0.0 or 2.1.0")
    if len(split_weights) != 3 or min(split_weights) < 0 or sum(split_weights) <= 0:
        raise ValueError(
            f"split_weights: three non-negative odds (train, validate, test), not {split_weights!r}"
        )
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (--overwrite replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        _write_mini_mimic(
            tmp, studies, seed, dicom, version, gz, large_images, small_edge, tuple(split_weights)
        )
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_mini_mimic(
    out: Path,
    studies: int,
    seed: int,
    dicom: bool,
    version: str,
    gz: bool,
    large_images: int,
    small_edge: tuple[int, int],
    split_weights: tuple[float, float, float] = (70, 15, 15),
) -> None:
    rng = random.Random(seed)  # one stream, drawn in this order: studies, images, pixels, MS-CXR-T
    plan = _plan_studies(rng, studies, split_weights)
    _plan_images(rng, plan, dicom, large_images, small_edge)
    _write_reports_and_images(out, rng, plan, dicom)
    _write_release_csvs(out, plan, version, gz, dicom)
    _write_ms_cxr_t(out / MS_CXR_T_FILENAME, plan, rng)


def _plan_studies(
    rng: random.Random, studies: int, split_weights: tuple[float, float, float] = (70, 15, 15)
) -> list[_Study]:
    """Subjects with 1-3 studies each; the first three subjects cover the three splits."""
    used_subjects: set[int] = set()
    used_studies: set[int] = set()
    plan: list[_Study] = []
    subject_index = 0
    while len(plan) < studies:
        subject_id = rng.randrange(10_000_000, 20_000_000)
        if subject_id in used_subjects:
            continue
        used_subjects.add(subject_id)
        split = (
            ("test", "validate", "train")[subject_index]
            if subject_index < 3
            else rng.choices(("train", "validate", "test"), weights=split_weights)[0]
        )
        n = 1 if subject_index < 3 else rng.choice((1, 1, 2, 2, 3))
        if subject_index == 3:
            n = max(n, 2)  # at least one subject with a previous study (an MS-CXR-T pair) when possible
        n = min(n, studies - len(plan))
        subject_index += 1
        date = rng.randrange(2110, 2200) * 10000 + rng.randrange(1, 13) * 100 + rng.randrange(1, 29)
        for _ in range(n):
            while True:
                study_id = rng.randrange(50_000_000, 60_000_000)
                if study_id not in used_studies:
                    used_studies.add(study_id)
                    break
            index = len(plan)
            style = (
                REPORT_STYLES[index]
                if index < len(REPORT_STYLES)
                else rng.choices(REPORT_STYLES, weights=_STYLE_WEIGHTS)[0]
            )
            portable = rng.random() < 0.35
            normal = rng.random() < 0.25
            labels, sides, variants = draw_labels(rng, normal, portable)
            time = (
                rng.randrange(0, 24) * 10000
                + rng.randrange(0, 60) * 100
                + rng.randrange(0, 60)
                + rng.randrange(0, 1000) / 1000
            )
            plan.append(
                _Study(subject_id, study_id, split, date, time, labels, sides, variants, style, portable)
            )
            date += rng.randrange(1, 4) * 100  # later studies of a subject are later in time
            if date % 10000 // 100 > 12:
                date = date + 10000 - 1200
    return plan


def _plan_images(
    rng: random.Random, plan: list[_Study], dicom: bool, large_images: int, small_edge: tuple[int, int]
) -> None:
    """The images of each study (views, dicom ids, sizes); `large_images` of them release-sized."""
    for study in plan:
        study.images.append({"view": "AP" if study.portable else "PA"})
        if not study.portable and rng.random() < 0.85:
            study.images.append({"view": "LL" if rng.random() < 0.08 else "LATERAL"})
        elif study.portable and rng.random() < 0.15:
            study.images.append({"view": "AP"})
        if rng.random() < 0.03:
            study.images.append({"view": ""})
        for image in study.images:
            image["dicom_id"] = _hex_id(rng)
            width = rng.randrange(small_edge[0], small_edge[1] + 1)
            image["width"], image["height"] = width, int(width * rng.uniform(1.05, 1.3))
    large = [s.images[0] for s in plan[3 : 3 + large_images]]
    for image, (w, h) in zip(large, [(2544, 3056), (2832, 2304), (2500, 3050)] * 4, strict=False):
        if not dicom:
            image["width"], image["height"] = w, h


def _write_reports_and_images(out: Path, rng: random.Random, plan: list[_Study], dicom: bool) -> None:
    """Each study's report under files/ and its images (JPEG, or DICOM with `dicom`)."""
    files = out / "files"
    for study in plan:
        study.report = render_report(study, rng)
        study_dir = files / f"p{str(study.subject_id)[:2]}" / f"p{study.subject_id}" / f"s{study.study_id}"
        study_dir.mkdir(parents=True, exist_ok=True)
        (study_dir.parent / f"s{study.study_id}.txt").write_text(study.report)
        for number, image in enumerate(study.images):
            pixels = synthetic_chest(
                image["width"],
                image["height"],
                seed=rng.getrandbits(32),
                view=image["view"] or "PA",
                labels=study.labels,
                sides=study.sides,
            )
            if dicom:
                kind = (len(study.images) + number + study.study_id) % 3
                image["path"] = study_dir / f"{image['dicom_id']}.dcm"
                _write_dicom(image["path"], pixels, image, study, kind)
            else:
                image["path"] = study_dir / f"{image['dicom_id']}.jpg"
                Image.fromarray(pixels, "L").save(image["path"], quality=92)


def _write_release_csvs(out: Path, plan: list[_Study], version: str, gz: bool, dicom: bool) -> None:
    """The release's CSVs: metadata, split, CheXpert, NegBio (2.1.0: test-set labels; DICOM: lists)."""
    suffix = ".csv.gz" if gz else ".csv"
    view_meaning = {
        "PA": "postero-anterior",
        "AP": "antero-posterior",
        "LATERAL": "lateral",
        "LL": "left lateral",
    }
    metadata_rows, split_rows, label_rows = [], [], []
    for study in plan:
        description = "CHEST (PORTABLE AP)" if study.portable else "CHEST (PA AND LAT)"
        for image in study.images:
            metadata_rows.append(
                (
                    image["dicom_id"],
                    study.subject_id,
                    study.study_id,
                    description,
                    image["view"],
                    image["height"],
                    image["width"],
                    study.date,
                    f"{study.time:.3f}",
                    description,
                    view_meaning.get(image["view"], ""),
                    "Recumbent" if study.portable else "Erect",
                )
            )
            split_rows.append((image["dicom_id"], study.study_id, study.subject_id, study.split))
        label_rows.append(
            (study.subject_id, study.study_id, *(_label_cell(study.labels.get(o)) for o in OBSERVATIONS))
        )
    _write_csv_gz(out / f"mimic-cxr-2.0.0-metadata{suffix}", METADATA_COLUMNS, metadata_rows, gz)
    _write_csv_gz(out / f"mimic-cxr-2.0.0-split{suffix}", SPLIT_COLUMNS, split_rows, gz)
    _write_csv_gz(out / f"mimic-cxr-2.0.0-chexpert{suffix}", LABEL_COLUMNS, label_rows, gz)
    _write_csv_gz(out / f"mimic-cxr-2.0.0-negbio{suffix}", LABEL_COLUMNS, label_rows, gz)
    if version == "2.1.0":
        test_header = ("study_id", *("Airspace Opacity" if o == "Lung Opacity" else o for o in OBSERVATIONS))
        test_rows = [
            (s.study_id, *(_label_cell(s.labels.get(o)) for o in OBSERVATIONS))
            for s in plan
            if s.split == "test"
        ]
        _write_csv_gz(out / "mimic-cxr-2.1.0-test-set-labeled.csv", test_header, test_rows, gz=False)
    if dicom:
        record_rows = [
            (s.subject_id, s.study_id, img["dicom_id"], img["path"].relative_to(out).as_posix())
            for s in plan
            for img in s.images
        ]
        study_rows = [
            (s.subject_id, s.study_id, f"files/p{str(s.subject_id)[:2]}/p{s.subject_id}/s{s.study_id}")
            for s in plan
        ]
        _write_csv_gz(
            out / f"cxr-record-list{suffix}", ("subject_id", "study_id", "dicom_id", "path"), record_rows, gz
        )
        _write_csv_gz(out / f"cxr-study-list{suffix}", ("subject_id", "study_id", "path"), study_rows, gz)


def _write_ms_cxr_t(path: Path, plan: list[_Study], rng: random.Random) -> None:
    """MS-CXR-T-style rows: for each subject with two or more studies, the later frontal image and
    the previous study's frontal image, with progression labels on findings present in either.
    (Header only when no subject has two studies, which needs at least 5 studies.)"""
    by_subject: dict[int, list[_Study]] = {}
    for study in plan:
        by_subject.setdefault(study.subject_id, []).append(study)
    rows = []
    for subject_studies in by_subject.values():
        ordered = sorted(subject_studies, key=lambda s: (s.date, s.time))
        for previous, current in zip(ordered, ordered[1:], strict=False):
            row = [
                current.images[0]["dicom_id"],
                previous.images[0]["dicom_id"],
                current.study_id,
                previous.study_id,
                current.subject_id,
            ]
            for observation in MS_CXR_T_FINDINGS.values():
                if 1 in (current.labels.get(observation), previous.labels.get(observation)):
                    row += [
                        rng.choice(("improving", "stable", "worsening")),
                        rng.choice(("one_expert", "multiple_experts", "disagreement")),
                    ]
                else:
                    row += ["", ""]
            rows.append(tuple(row))
    _write_csv_gz(path, MS_CXR_T_COLUMNS, rows, gz=False)


def write_synthetic_csvs(
    out: str | os.PathLike,
    n_images: int = 377_110,
    n_studies: int = 227_827,
    n_subjects: int = 65_379,
    seed: int = 0,
    gz: bool = True,
) -> Path:
    """Write full-size metadata, split, chexpert and negbio CSVs (the release's headers, realistic
    view and split mix, random labels) with no images or reports: for benchmarks and for checking
    that selecting from a release-sized table opens nothing. Vectorised: about a second for the
    default 377,110 images."""
    if not 1 <= n_subjects <= n_studies <= n_images:
        raise ValueError("need 1 <= n_subjects <= n_studies <= n_images")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)  # one stream: images first, then labels
    metadata, split, subjects, study_ids, study_subject = _synthetic_images(
        rng, n_images, n_studies, n_subjects
    )
    labels = _synthetic_labels(rng, subjects[study_subject], study_ids)
    suffix = ".csv.gz" if gz else ".csv"
    for name, table in (
        ("metadata", metadata),
        ("split", split),
        ("chexpert", labels),
        ("negbio", labels),
    ):
        target = out / f"mimic-cxr-2.0.0-{name}{suffix}"
        sink = pa.BufferOutputStream()
        pacsv.write_csv(table, sink, pacsv.WriteOptions(quoting_style="needed"))
        data = sink.getvalue().to_pybytes()
        # Level 1: Arrow's gzip default (level 9) takes half a minute on 80 MB of random hex ids.
        target.write_bytes(gzip.compress(data, compresslevel=1, mtime=0) if gz else data)
    (out / "files").mkdir(exist_ok=True)
    return out


def _synthetic_images(
    rng: np.random.Generator, n_images: int, n_studies: int, n_subjects: int
) -> tuple[pa.Table, pa.Table, np.ndarray, np.ndarray, np.ndarray]:
    """Release-sized metadata and split tables in release order: (metadata, split, subject ids,
    study ids, the subject index of each study)."""
    subjects = np.sort(rng.choice(10_000_000, n_subjects, replace=False) + 10_000_000)
    study_ids = rng.choice(10_000_000, n_studies, replace=False) + 50_000_000
    # Every subject has a study, every study an image.
    study_subject = np.concatenate(
        [np.arange(n_subjects), rng.integers(0, n_subjects, n_studies - n_subjects)]
    )
    image_study = np.concatenate([np.arange(n_studies), rng.integers(0, n_studies, n_images - n_studies)])
    image_study.sort()
    subject_split = rng.choice(np.array(["train", "validate", "test"]), n_subjects, p=[0.978, 0.008, 0.014])
    blob = rng.bytes(20 * n_images).hex()
    hexes = [blob[i : i + 40] for i in range(0, len(blob), 40)]
    dicom_ids = [f"{h[:8]}-{h[8:16]}-{h[16:24]}-{h[24:32]}-{h[32:]}" for h in hexes]
    views = rng.choice(np.array(["PA", "AP", "LATERAL", "LL", ""]), n_images, p=[0.4, 0.35, 0.2, 0.03, 0.02])
    # Release order: by subject, then study, then dicom_id.
    order = np.lexsort((np.array(dicom_ids), study_ids[image_study], subjects[study_subject[image_study]]))
    image_study = image_study[order]
    dicom_ids = [dicom_ids[i] for i in order]
    views = views[order]
    image_subject = subjects[study_subject[image_study]]
    image_study_id = study_ids[image_study]
    study_dates = (
        rng.integers(2110, 2200, n_studies) * 10000
        + rng.integers(1, 13, n_studies) * 100
        + rng.integers(1, 29, n_studies)
    )
    study_times = np.round(rng.uniform(0, 235959, n_studies), 3)
    rows = rng.integers(1800, 3100, n_images)
    cols = rng.integers(1800, 3100, n_images)
    description = pa.DictionaryArray.from_arrays(
        pa.array((views == "AP").astype(np.int8)), pa.array(["CHEST (PA AND LAT)", "CHEST (PORTABLE AP)"])
    ).cast(pa.string())
    view_array = pa.array(views)
    view_array = (
        pa.array(np.where(views == "", None, views).tolist(), pa.string())
        if (views == "").any()
        else view_array
    )
    metadata = pa.table(
        {
            "dicom_id": pa.array(dicom_ids),
            "subject_id": pa.array(image_subject),
            "study_id": pa.array(image_study_id),
            "PerformedProcedureStepDescription": description,
            "ViewPosition": view_array,
            "Rows": pa.array(rows),
            "Columns": pa.array(cols),
            "StudyDate": pa.array(study_dates[image_study]),
            "StudyTime": pa.array(study_times[image_study]),
            "ProcedureCodeSequence_CodeMeaning": description,
            "ViewCodeSequence_CodeMeaning": view_array,
            "PatientOrientationCodeSequence_CodeMeaning": pa.array(["Erect"] * n_images),
        }
    )
    split = pa.table(
        {
            "dicom_id": metadata.column("dicom_id"),
            "study_id": metadata.column("study_id"),
            "subject_id": metadata.column("subject_id"),
            "split": pa.array(subject_split[study_subject[image_study]]),
        }
    )
    return metadata, split, subjects, study_ids, study_subject


def _synthetic_labels(
    rng: np.random.Generator, study_subjects: np.ndarray, study_ids: np.ndarray
) -> pa.Table:
    """A label CSV's table for those studies (subject of each study given)."""
    n_studies = len(study_ids)
    # Label cells: 1.0 / 0.0 / -1.0 / blank, most blank; a few studies have no label row.
    labelled = np.flatnonzero(rng.random(n_studies) > 0.0005)
    codes = rng.choice(4, size=(len(labelled), len(OBSERVATIONS)), p=[0.1, 0.15, 0.05, 0.7])
    cells = pa.array(["1.0", "0.0", "-1.0"])
    label_columns = {
        name: pa.DictionaryArray.from_arrays(pa.array(codes[:, i], mask=codes[:, i] == 3), cells).cast(
            pa.string()
        )
        for i, name in enumerate(OBSERVATIONS)
    }
    return pa.table(
        {
            "subject_id": pa.array(study_subjects[labelled]),
            "study_id": pa.array(study_ids[labelled]),
            **label_columns,
        }
    )
