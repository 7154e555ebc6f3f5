"""MIMIC-CXR: where the release keeps things (`layout`), its CSVs (`csvs`), the joined reader
(`reader.MimicCXR`), selection manifests (`selection`), MS-CXR-T (`ms_cxr_t`), report sections
(`reports`) and images (`images`, `dicom`)."""

from cxrmax.core.splits import SPLITS
from cxrmax.mimic.csvs import read_subject_ids
from cxrmax.mimic.layout import LABEL_SOURCES, detect_layout, image_relpath, report_relpath
from cxrmax.mimic.ms_cxr_t import read_ms_cxr_t
from cxrmax.mimic.reader import FRONTAL_VIEWS, LATERAL_VIEWS, MimicCXR
from cxrmax.mimic.reports import ReportSections, parse_report
from cxrmax.mimic.selection import iter_selection, read_selection, write_selection

__all__ = [
    "FRONTAL_VIEWS",
    "LABEL_SOURCES",
    "LATERAL_VIEWS",
    "SPLITS",
    "MimicCXR",
    "ReportSections",
    "detect_layout",
    "image_relpath",
    "iter_selection",
    "parse_report",
    "read_ms_cxr_t",
    "read_selection",
    "read_subject_ids",
    "report_relpath",
    "write_selection",
]
