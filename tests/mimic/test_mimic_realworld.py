"""The MIMIC-CXR reader on inputs shaped like the real releases and like real users' copies.

Reports are written in the style of the release (centred "FINAL REPORT", one leading space per line,
hard wraps near 70-78 columns, "___" PHI blanks, WET READ blocks and addenda split off by a line of
underscores) plus what copies add on the way (CRLF, tabs, BOMs, cp1252 bytes, reports flattened onto
one line). CSVs follow the release headers with the variations that renamed, re-saved or
hand-edited copies carry. Every case either reads correctly or fails with an InputError naming the
file, the row and the field (or, lenient, a counted skip).
"""

from __future__ import annotations

import csv
import gzip
import io
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from cxrmax.core.errors import InputError
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.mimic import MimicCXR, detect_layout
from cxrmax.mimic.reports import decode_report, parse_report

SKIP = object()  # an expectation that is not checked
SEPARATOR = " " + "_" * 78
HEADER_WORDS = re.compile(
    r"\b(FINAL REPORT|FINAL ADDENDUM|FINDINGS|IMPRESSIONS?|IMPRESSON|CONCLUSION|WET READ|ADDENDUM|"
    r"EXAMINATION|INDICATION|TECHNIQUE|COMPARISON|NOTIFICATION|RECOMMENDATION)\b\s*:?"
)


@dataclass(frozen=True)
class Report:
    """One report text and what its sections must be (SKIP: not checked)."""

    name: str
    text: str
    findings: object = SKIP
    impression: object = SKIP
    last: object = SKIP
    addenda: object = SKIP  # a tuple of exact texts, or an int count
    wet_read: object = SKIP  # None, or a substring the wet read must contain
    header_free: bool = True  # no header word may leak into findings / impression / last paragraph


def release_style(text: str) -> str:
    """A report body written indented in this file, with the release's one leading space per line."""
    return (
        "\n".join(
            f" {line}" if line.strip() else " " for line in textwrap.dedent(text).strip("\n").split("\n")
        )
        + "\n"
    )


CENTRED = " " * 33 + "FINAL REPORT"

STANDARD = (
    CENTRED
    + "\n"
    + release_style("""
    EXAMINATION:  CHEST (PA AND LAT)

    INDICATION:  ___F with new onset ascites  // eval for infection

    TECHNIQUE:  Chest PA and lateral

    COMPARISON:  None.

    FINDINGS:

    There is no focal consolidation, pleural effusion or pneumothorax.  Bilateral
    nodular opacities that most likely represent nipple shadows. The
    cardiomediastinal silhouette is normal.  Clips project over the left lung,
    potentially within the breast. The imaged upper abdomen is unremarkable.

    IMPRESSION:

    No acute cardiopulmonary process.
""")
)
STANDARD_FINDINGS = (
    "There is no focal consolidation, pleural effusion or pneumothorax. Bilateral nodular opacities that "
    "most likely represent nipple shadows. The cardiomediastinal silhouette is normal. Clips project over "
    "the left lung, potentially within the breast. The imaged upper abdomen is unremarkable."
)

PORTABLE = (
    CENTRED
    + "\n"
    + release_style("""
    EXAMINATION:  CHEST (PORTABLE AP)

    INDICATION:  ___ year old man with hypoxia  // ?pna

    COMPARISON:  Chest radiograph from ___ at 05:12.

    FINDINGS:

    Endotracheal tube terminates 4.5 cm above the carina.  Enteric tube courses
    below the diaphragm with the tip out of view.  Right internal jugular
    central venous catheter tip is in the mid SVC.  Heart size is mildly enlarged.
    Moderate pulmonary edema has worsened.  Small bilateral pleural effusions
    with bibasilar atelectasis.  No pneumothorax.

    IMPRESSION:

    1.  Worsening moderate pulmonary edema.
    2.  Lines and tubes in standard position.
""")
)

WET_READ = " WET READ: ___ ___ ___ 5:12 PM\n" + release_style("""
     Mild pulmonary vascular congestion without frank edema.
""")

REPORTS: list[Report] = [
    Report(
        "standard PA and lateral",
        STANDARD,
        findings=STANDARD_FINDINGS,
        impression="No acute cardiopulmonary process.",
        last="No acute cardiopulmonary process.",
        addenda=(),
        wet_read=None,
    ),
    Report(
        "portable AP with numbered impression",
        PORTABLE,
        findings=SKIP,
        impression="1. Worsening moderate pulmonary edema.\n2. Lines and tubes in standard position.",
        last="1. Worsening moderate pulmonary edema.\n2. Lines and tubes in standard position.",
    ),
    Report(
        "wet read above the final report",
        WET_READ + SEPARATOR + "\n" + STANDARD,
        findings=STANDARD_FINDINGS,
        impression="No acute cardiopulmonary process.",
        addenda=(),
        wet_read="Mild pulmonary vascular congestion without frank edema.",
    ),
    Report(
        "wet read without a separator line",
        WET_READ + STANDARD,
        findings=STANDARD_FINDINGS,
        impression="No acute cardiopulmonary process.",
        addenda=(),
        wet_read="Mild pulmonary vascular congestion",
    ),
    Report(
        "provisional findings impression (PFI) above",
        " PROVISIONAL FINDINGS IMPRESSION (PFI): ___ ___ 11:56 PM\n  Right lower lobe pneumonia.\n"
        + SEPARATOR
        + "\n"
        + CENTRED
        + "\n"
        + release_style("""
            FINDINGS:  Right lower lobe consolidation.

            IMPRESSION:  Right lower lobe pneumonia.
        """),
        findings="Right lower lobe consolidation.",
        impression="Right lower lobe pneumonia.",
        wet_read="Right lower lobe pneumonia.",
        addenda=(),
    ),
    Report(
        "final addendum on top",
        " " * 33
        + "FINAL ADDENDUM\n"
        + release_style("""
            ADDENDUM:  Findings were discussed with Dr. ___ by telephone at 4:15 PM on
            ___, 5 minutes after discovery.
        """)
        + SEPARATOR
        + "\n"
        + STANDARD,
        findings=STANDARD_FINDINGS,
        impression="No acute cardiopulmonary process.",
        addenda=(
            "ADDENDUM: Findings were discussed with Dr. ___ by telephone at 4:15 PM on ___, 5 minutes after "
            "discovery.",
        ),
    ),
    Report(
        "addendum below, after a separator",
        STANDARD
        + SEPARATOR
        + "\n"
        + " " * 33
        + "FINAL ADDENDUM\n ADDENDUM:  Comparison with ___ shows no change.\n",
        findings=STANDARD_FINDINGS,
        impression="No acute cardiopulmonary process.",
        last="No acute cardiopulmonary process.",
        addenda=("ADDENDUM: Comparison with ___ shows no change.",),
    ),
    Report(
        "addendum below with no separator",
        STANDARD + " \n ADDENDUM:  On review, a subtle right seventh rib fracture is seen.\n",
        findings=STANDARD_FINDINGS,
        impression="No acute cardiopulmonary process.",
        last="No acute cardiopulmonary process.",
        addenda=("ADDENDUM: On review, a subtle right seventh rib fracture is seen.",),
    ),
    Report(
        "ADDENDUM alone on its line below",
        STANDARD + " \n ADDENDUM\n On review, a subtle right seventh rib fracture is seen.\n",
        impression="No acute cardiopulmonary process.",
        last="No acute cardiopulmonary process.",
        addenda=1,
    ),
    Report(
        "addendum chunk after a report without FINAL REPORT",
        release_style("""
            FINDINGS:  Lungs are clear.

            IMPRESSION:  No acute process.
        """)
        + SEPARATOR
        + "\n ADDENDUM:  Outside films from ___ reviewed; no change.\n",
        findings="Lungs are clear.",
        impression="No acute process.",
        last="No acute process.",
        addenda=1,
    ),
    Report(
        "two addenda on top",
        " FINAL ADDENDUM\n ADDENDUM #2:  Called to Dr. ___.\n"
        + SEPARATOR
        + "\n FINAL ADDENDUM\n ADDENDUM #1:  CT recommended.\n"
        + SEPARATOR
        + "\n"
        + STANDARD,
        impression="No acute cardiopulmonary process.",
        addenda=2,
    ),
    Report(
        "headers alone on their lines without colons",
        CENTRED
        + "\n"
        + release_style("""
            EXAMINATION:  CHEST (PA AND LAT)

            FINDINGS

            Heart size is normal.  Lungs are clear.

            IMPRESSION

            Normal chest radiograph.
        """),
        findings="Heart size is normal. Lungs are clear.",
        impression="Normal chest radiograph.",
        last="Normal chest radiograph.",
    ),
    Report(
        "title-case headers",
        " Findings: Lungs are clear. No effusion.\n Impression: Normal chest.\n",
        findings="Lungs are clear. No effusion.",
        impression="Normal chest.",
        last="Normal chest.",
    ),
    Report(
        "title-case header words alone",
        " Findings\n Lungs are clear.\n\n Impression\n Normal chest.\n",
        findings="Lungs are clear.",
        impression="Normal chest.",
    ),
    Report(
        "a wrapped line that is the lower-case word impression is text",
        release_style("""
            FINDINGS:  The opacity is less conspicuous, which supports the clinical
            impression
            of resolving pneumonia.
        """),
        findings="The opacity is less conspicuous, which supports the clinical impression of resolving pneumonia.",
        impression=None,
        header_free=False,
    ),
    Report(
        "IMPRESSION with a space before the colon",
        " FINDINGS:  Low lung volumes.\n\n IMPRESSION :  Bibasilar atelectasis.\n",
        findings="Low lung volumes.",
        impression="Bibasilar atelectasis.",
    ),
    Report(
        "IMPRESSIONS plural with numbered items on their own lines",
        release_style("""
            FINDINGS:  Low lung volumes.

            IMPRESSIONS:
            1.  Bibasilar atelectasis.
            2.  No pneumothorax.
        """),
        impression="1. Bibasilar atelectasis.\n2. No pneumothorax.",
    ),
    Report(
        "numbered items written on one line",
        " IMPRESSION: 1. No pneumonia. 2. Stable mild cardiomegaly. 3. Right IJ line tip in the SVC.\n",
        impression="1. No pneumonia.\n2. Stable mild cardiomegaly.\n3. Right IJ line tip in the SVC.",
    ),
    Report(
        "numbers inside sentences are not items",
        " IMPRESSION:  1. Nodule measures 1.5 cm, previously 1.2 cm. T12 and L1 are intact.\n",
        impression="1. Nodule measures 1.5 cm, previously 1.2 cm. T12 and L1 are intact.",
    ),
    Report(
        "numbered items hard-wrapped",
        release_style("""
            IMPRESSION:

            1. Interval placement of a left-sided PICC line which terminates in the
               low SVC.
            2. Persistent small left pleural effusion with adjacent atelectasis,
               unchanged.
        """),
        impression=(
            "1. Interval placement of a left-sided PICC line which terminates in the low SVC.\n"
            "2. Persistent small left pleural effusion with adjacent atelectasis, unchanged."
        ),
    ),
    Report(
        "FINDINGS AND IMPRESSION",
        " FINDINGS AND IMPRESSION:  Stable cardiomegaly.  No edema.\n",
        findings=None,
        impression="Stable cardiomegaly. No edema.",
        last="Stable cardiomegaly. No edema.",
    ),
    Report(
        "FINDINGS AND IMPRESSIONS",
        " FINDINGS AND IMPRESSIONS:  Stable cardiomegaly.  No edema.\n",
        findings=None,
        impression="Stable cardiomegaly. No edema.",
    ),
    Report(
        "FINDINGS/IMPRESSION",
        " FINDINGS/IMPRESSION:  Patchy left basilar opacity.\n",
        impression="Patchy left basilar opacity.",
    ),
    Report(
        "CONCLUSION after an exam title line",
        " CHEST (PA AND LAT)\n CONCLUSION:  Normal study.\n",
        impression="Normal study.",
        last="Normal study.",
    ),
    Report(
        "IMPRESSION AND RECOMMENDATION",
        " IMPRESSION AND RECOMMENDATION:  6 mm right upper lobe nodule; CT in 3 months.\n",
        impression="6 mm right upper lobe nodule; CT in 3 months.",
    ),
    Report(
        "RECOMMENDATION(S) and NOTIFICATION after the impression",
        STANDARD
        + release_style("""

            RECOMMENDATION(S):  Follow-up radiographs after treatment to document
            resolution.

            NOTIFICATION:  The findings were discussed with Dr. ___ by ___, M.D. on the
            telephone on ___ at 10:30 AM, 2 minutes after discovery of the findings.
        """),
        findings=STANDARD_FINDINGS,
        impression="No acute cardiopulmonary process.",
        last="No acute cardiopulmonary process.",
    ),
    Report(
        "misspelled headers",
        " FINDNGS:  Small left pleural effusion.\n IMPRESSON:  Small left pleural effusion.\n",
        findings="Small left pleural effusion.",
        impression="Small left pleural effusion.",
    ),
    Report(
        "FINDING singular and IMPRESION",
        " FINDING:  Right PICC tip at the cavoatrial junction.\n\n IMPRESION:  As above.\n",
        findings="Right PICC tip at the cavoatrial junction.",
        impression="As above.",
    ),
    Report(
        "only an impression",
        CENTRED
        + "\n"
        + release_style("""
            EXAMINATION:  CHEST (PORTABLE AP)

            INDICATION:  ___-year-old with chest pain.

            IMPRESSION:  No acute cardiopulmonary process.
        """),
        findings=None,
        impression="No acute cardiopulmonary process.",
    ),
    Report(
        "only findings",
        CENTRED
        + "\n"
        + release_style("""
            TECHNIQUE:  PA and lateral views of the chest.

            FINDINGS:  The lungs are clear without focal consolidation.  No pleural
            effusion or pneumothorax.  Heart size is normal.
        """),
        findings=(
            "The lungs are clear without focal consolidation. No pleural effusion or pneumothorax. Heart size is "
            "normal."
        ),
        impression=None,
        last=(
            "The lungs are clear without focal consolidation. No pleural effusion or pneumothorax. Heart size is "
            "normal."
        ),
    ),
    Report(
        "neither: free paragraphs after the exam title",
        CENTRED
        + "\n"
        + release_style("""
            CHEST RADIOGRAPH PERFORMED ON ___

            PA and lateral views of the chest were obtained.  Heart size is normal.

            No acute cardiopulmonary process.
        """),
        findings=None,
        impression=None,
        last="No acute cardiopulmonary process.",
    ),
    Report(
        "neither: text after INDICATION and COMPARISON paragraphs",
        release_style("""
            FINAL REPORT
            EXAMINATION:  CHEST (PORTABLE AP)
            INDICATION:  Dyspnea.

            Portable AP view of the chest.

            Right basilar atelectasis.  No pneumothorax.
            Dr. ___ was notified: results acknowledged.
        """),
        findings=None,
        impression=None,
        last="Right basilar atelectasis. No pneumothorax. Dr. ___ was notified: results acknowledged.",
    ),
    Report(
        "neither, followed by NOTIFICATION",
        release_style("""
            HISTORY:  Fall.

            Single portable view of the chest demonstrates a new small right apical
            pneumothorax.

            NOTIFICATION:  Dr. ___ was paged at 3:12 PM.
        """),
        last="Single portable view of the chest demonstrates a new small right apical pneumothorax.",
    ),
    Report(
        "only administrative sections",
        " EXAMINATION:  CHEST (PA AND LAT)\n INDICATION:  Cough.\n",
        findings=None,
        impression=None,
        last=SKIP,
        header_free=False,
    ),
    Report(
        "structured findings with upper-case sub-headings",
        CENTRED
        + "\n"
        + release_style("""
            EXAMINATION:  CHEST (PORTABLE AP)

            FINDINGS:

            LINES/TUBES: Right IJ central venous catheter tip in the mid SVC.
            LUNGS: Low lung volumes.  No focal consolidation.
            PLEURA: No pleural effusion or pneumothorax.
            HEART/MEDIASTINUM: Normal.
            BONES: No acute osseous abnormality.

            IMPRESSION:

            No acute cardiopulmonary process.
        """),
        findings=(
            "LINES/TUBES: Right IJ central venous catheter tip in the mid SVC.\n"
            "LUNGS: Low lung volumes. No focal consolidation.\n"
            "PLEURA: No pleural effusion or pneumothorax.\n"
            "HEART/MEDIASTINUM: Normal.\n"
            "BONES: No acute osseous abnormality."
        ),
        impression="No acute cardiopulmonary process.",
    ),
    Report(
        "mixed-case labels inside findings stay text",
        " FINDINGS:  Heart size: normal.  Lungs: clear.\n\n IMPRESSION:  Normal.\n",
        findings="Heart size: normal. Lungs: clear.",
        impression="Normal.",
    ),
    Report(
        "clock times and ratios are not headers",
        " FINDINGS:  Compared to the film at 10:42 AM the tube is unchanged.\n 5:1 ratio noted.\n",
        findings="Compared to the film at 10:42 AM the tube is unchanged. 5:1 ratio noted.",
    ),
    Report(
        "inline header content",
        " IMPRESSION: No acute process.\n",
        impression="No acute process.",
        last="No acute process.",
        findings=None,
    ),
    Report(
        "history-style old report",
        CENTRED
        + "\n"
        + release_style("""
            HISTORY:  ___-year-old man with chest pain.

            PA AND LATERAL VIEWS OF THE CHEST:  The lungs are clear.  The heart is normal
            in size.

            IMPRESSION:  No acute cardiopulmonary process.
        """),
        impression="No acute cardiopulmonary process.",
    ),
    Report(
        "CLINICAL HISTORY, REASON FOR EXAM and PA and lateral technique",
        release_style("""
            REASON FOR EXAM:  Shortness of breath.
            CLINICAL HISTORY:  ___-year-old woman with COPD.
            TECHNIQUE:  PA and lateral views of the chest.
            COMPARISON:  ___.
            FINDINGS:  Hyperinflated lungs.  No focal consolidation.
            IMPRESSION:  COPD without acute process.
        """),
        findings="Hyperinflated lungs. No focal consolidation.",
        impression="COPD without acute process.",
        last="COPD without acute process.",
    ),
    Report(
        "PHI blanks next to headers",
        release_style("""
            INDICATION:  ___ ___ with ___ // ___
            COMPARISON:  ___, ___.
            FINDINGS:  ___ tube tip is ___ cm above the carina.
            IMPRESSION:  As discussed with Dr. ___ on ___ at ___.
        """),
        findings="___ tube tip is ___ cm above the carina.",
        impression="As discussed with Dr. ___ on ___ at ___.",
    ),
    Report(
        "header lines followed by a space-only line",
        " FINDINGS: \n \n Lungs are clear. \n \n IMPRESSION: \n \n Normal. \n",
        findings="Lungs are clear.",
        impression="Normal.",
        last="Normal.",
    ),
    Report(
        "sections repeated",
        " FINDINGS:  Lungs clear.\n IMPRESSION:  Normal.\n FINDINGS:  Bones intact.\n",
        findings="Lungs clear.\nBones intact.",
        impression="Normal.",
    ),
    Report(
        "CRLF line ends",
        STANDARD.replace("\n", "\r\n"),
        findings=STANDARD_FINDINGS,
        impression="No acute cardiopulmonary process.",
    ),
    Report(
        "tabs for indentation and after colons",
        "\tFINDINGS:\tLungs clear.\n\n\tIMPRESSION:\tNo acute process.\n",
        findings="Lungs clear.",
        impression="No acute process.",
    ),
    Report(
        "BOM and non-breaking spaces",
        "\ufeff" + " FINDINGS:\u00a0Heart normal.\n\n\u00a0IMPRESSION:\u00a0Normal.\n",
        findings="Heart normal.",
        impression="Normal.",
    ),
    Report(
        "degree sign and curly quotes",
        " FINDINGS:  The patient is rotated 15\u00b0 to the right; \u201cmass\u201d not seen.\n\n"
        " IMPRESSION:  No \u2018acute\u2019 process.\n",
        findings="The patient is rotated 15\u00b0 to the right; \u201cmass\u201d not seen.",
        impression="No \u2018acute\u2019 process.",
    ),
    Report("empty file", "", findings=None, impression=None, last=None, addenda=(), wet_read=None),
    Report("whitespace only", " \n\t\n \r\n", findings=None, impression=None, last=None, addenda=()),
    Report("only FINAL REPORT", CENTRED + "\n", findings=None, impression=None, last=None),
    Report(
        "flattened onto one line",
        " ".join(STANDARD.split()),
        findings=STANDARD_FINDINGS,
        impression="No acute cardiopulmonary process.",
    ),
    Report(
        "flattened with the wet read and separator",
        " ".join((WET_READ + SEPARATOR + "\n" + PORTABLE).split()),
        impression="1. Worsening moderate pulmonary edema.\n2. Lines and tubes in standard position.",
        wet_read="Mild pulmonary vascular congestion",
    ),
    Report(
        "very long report",
        STANDARD.replace(
            "The imaged upper abdomen is unremarkable.",
            "The imaged upper abdomen is unremarkable.\n" + " Stable appearance of the chest.\n" * 4000,
        ),
        impression="No acute cardiopulmonary process.",
        last="No acute cardiopulmonary process.",
    ),
    Report(
        "WET READ inside the report body after FINAL REPORT",
        release_style("""
            FINAL REPORT
            WET READ: ___ 10:03 PM
            FINDING:  Small left pleural effusion.
            Heart size normal.
            IMPRESSON:
            1. Small left pleural effusion.
            2. No pneumothorax.
        """),
        findings="Small left pleural effusion. Heart size normal.",
        impression="1. Small left pleural effusion.\n2. No pneumothorax.",
    ),
    Report(
        "NOTE sub-heading inside the impression",
        " IMPRESSION:  Mild edema.\n NOTE: Study limited by patient rotation.\n",
        impression="Mild edema.\nNOTE: Study limited by patient rotation.",
    ),
    Report(
        "lower-case report",
        " findings: lungs clear.\n\n impression: normal.\n",
        findings="lungs clear.",
        impression="normal.",
    ),
    Report(
        "IMPRESSION in a wet read only, final report with none",
        " WET READ: ___ ___ 2:10 AM\n  IMPRESSION: No pneumothorax.\n"
        + SEPARATOR
        + "\n"
        + CENTRED
        + "\n FINDINGS:  Small right apical pneumothorax.\n",
        findings="Small right apical pneumothorax.",
        impression=None,
        wet_read="No pneumothorax.",
    ),
    Report(
        "all upper-case old report",
        release_style("""
            PORTABLE CHEST, ___ AT 05:12

            COMPARISON:  ___.

            FINDINGS:  THE ENDOTRACHEAL TUBE TERMINATES 5 CM ABOVE THE CARINA.  THE LUNGS ARE
            CLEAR.  HEART SIZE: NORMAL.

            IMPRESSION:  NO ACUTE PROCESS.
        """),
        findings="THE ENDOTRACHEAL TUBE TERMINATES 5 CM ABOVE THE CARINA. THE LUNGS ARE CLEAR. HEART SIZE: NORMAL.",
        impression="NO ACUTE PROCESS.",
    ),
    Report(
        "impression in several paragraphs",
        release_style("""
            IMPRESSION:

            Compared to prior chest radiographs ___ through ___.

            Previous mild pulmonary edema has resolved.  Heart size is normal.
        """),
        impression=(
            "Compared to prior chest radiographs ___ through ___.\n"
            "Previous mild pulmonary edema has resolved. Heart size is normal."
        ),
        last="Previous mild pulmonary edema has resolved. Heart size is normal.",
    ),
    Report(
        "an empty IMPRESSION at the end",
        " FINDINGS:  Lungs clear.\n\n IMPRESSION:\n",
        findings="Lungs clear.",
        impression=None,
        last="Lungs clear.",
    ),
    Report(
        "numbered items with parentheses on one line",
        " IMPRESSION:  1) Small effusion. 2) No pneumothorax.\n",
        impression="1) Small effusion.\n2) No pneumothorax.",
    ),
    Report(
        "headers with a parenthesised qualifier",
        " FINDINGS (PORTABLE SUPINE AP):  Lines unchanged.\n IMPRESSION (PRELIMINARY):  Stable.\n",
        findings="Lines unchanged.",
        impression="Stable.",
    ),
    Report(
        "CHEST FINDINGS and FINAL IMPRESSION",
        " CHEST FINDINGS:  Lungs clear.\n FINAL IMPRESSION:  Normal.\n",
        findings="Lungs clear.",
        impression="Normal.",
    ),
    Report(
        "numbered addendum below the report",
        " FINDINGS:  Clear.\n\n IMPRESSION:  Normal.\n\n ADDENDUM #1:  Called Dr. ___.\n",
        impression="Normal.",
        addenda=("ADDENDUM #1: Called Dr. ___.",),
    ),
    Report(
        "FINAL ADDENDUM line below with no separator",
        " FINAL REPORT\n IMPRESSION:  Normal.\n\n FINAL ADDENDUM\n Rib fracture on review.\n",
        impression="Normal.",
        last="Normal.",
        addenda=("Rib fracture on review.",),
    ),
    Report(
        "the word ADDENDUM starting a wrapped line is text",
        " IMPRESSION:  Normal. See\n ADDENDUM to follow.\n",
        impression="Normal. See ADDENDUM to follow.",
        addenda=(),
        header_free=False,
    ),
    Report(
        "IMPRESSION ended by a semicolon",
        " IMPRESSION; No acute disease.\n",
        impression="No acute disease.",
    ),
    Report(
        "History: inside INDICATION is not a header",
        " INDICATION:  History: ___F with shortness of breath\n\n FINDINGS:  Clear.\n",
        findings="Clear.",
        impression=None,
    ),
    Report(
        "a wet read saying FINAL REPORT TO FOLLOW, above a separator",
        " WET READ: ___ 5:12 PM\n  No PTX.  FINAL REPORT TO FOLLOW.\n"
        + SEPARATOR
        + "\n FINAL REPORT\n IMPRESSION:  Small PTX.\n",
        impression="Small PTX.",
        last="Small PTX.",
        addenda=(),
        wet_read="No PTX. FINAL REPORT TO FOLLOW.",
        header_free=False,
    ),
    Report(
        "a wet read saying FINAL REPORT TO FOLLOW, no separator",
        " WET READ: ___ 5:12 PM\n  No PTX.  FINAL REPORT TO FOLLOW.\n FINAL REPORT\n IMPRESSION:  Small PTX.\n",
        impression="Small PTX.",
        last="Small PTX.",
        addenda=(),
        wet_read="No PTX. FINAL REPORT TO FOLLOW.",
    ),
    Report(
        "title-case administrative headers",
        " Indication: cough\n Comparison: None\n Findings: Lungs clear.\n Impression: Normal.\n"
        " Recommendation(s): CT in 3 months.\n",
        findings="Lungs clear.",
        impression="Normal.",
        last="Normal.",
    ),
    Report(
        "escaped line ends from a JSON or CSV dump",
        STANDARD.replace("\n", "\\n"),
        findings=STANDARD_FINDINGS,
        impression="No acute cardiopulmonary process.",
        last="No acute cardiopulmonary process.",
    ),
]


def _check(report: Report) -> None:
    sections = parse_report(report.text)
    for attribute, expected in (
        ("findings", report.findings),
        ("impression", report.impression),
        ("last_paragraph", report.last),
    ):
        if expected is not SKIP:
            assert getattr(sections, attribute) == expected, attribute
    if isinstance(report.addenda, int):
        assert len(sections.addenda) == report.addenda
    elif report.addenda is not SKIP:
        assert sections.addenda == report.addenda
    if report.wet_read is None:
        assert sections.wet_read is None
    elif report.wet_read is not SKIP:
        assert sections.wet_read is not None and report.wet_read in sections.wet_read
    if report.header_free:
        for text in (sections.findings, sections.impression, sections.last_paragraph):
            assert not HEADER_WORDS.search(text or ""), text
    # The wet read and the addenda never leak into the report's own sections.
    for extra in (sections.wet_read, *sections.addenda):
        for text in (sections.findings, sections.impression):
            if extra and text:
                assert extra not in text
    assert sections.best() == (sections.impression or sections.findings or sections.last_paragraph)


@pytest.mark.parametrize("report", REPORTS, ids=[report.name for report in REPORTS])
def test_report_sections(report: Report) -> None:
    _check(report)


# Whitespace, line-end and encoding changes a copy may introduce must not change the sections.
TRANSFORMS = {
    "crlf": lambda text: text.replace("\n", "\r\n"),
    "cr only": lambda text: text.replace("\n", "\r"),
    "tabs": lambda text: text.replace("\n ", "\n\t"),
    "nbsp": lambda text: text.replace("  ", "\u00a0 "),
    "trailing spaces": lambda text: text.replace("\n", "   \n"),
    "bom": lambda text: "\ufeff" + text,
    "cp1252 bytes": lambda text: decode_report(text.encode("cp1252")),
    "utf-8 bom bytes": lambda text: decode_report(b"\xef\xbb\xbf" + text.encode("utf-8")),
    "rewrapped at 50": lambda text: "\n".join(
        "\n".join(textwrap.wrap(line, 50, initial_indent=" ", subsequent_indent="   "))
        if line.strip()
        else line
        for line in text.split("\n")
    ),
}
BASES = [
    report
    for report in REPORTS
    if report.name
    in {
        "standard PA and lateral",
        "wet read above the final report",
        "final addendum on top",
        "addendum below with no separator",
        "RECOMMENDATION(S) and NOTIFICATION after the impression",
        "neither: free paragraphs after the exam title",
        "CLINICAL HISTORY, REASON FOR EXAM and PA and lateral technique",
    }
]


@pytest.mark.parametrize("transform", list(TRANSFORMS), ids=list(TRANSFORMS))
def test_report_sections_survive_copies(transform: str) -> None:
    for report in BASES:
        before = parse_report(report.text)
        after = parse_report(TRANSFORMS[transform](report.text))
        assert (after.findings, after.impression, after.last_paragraph) == (
            before.findings,
            before.impression,
            before.last_paragraph,
        ), report.name
        assert after.addenda == before.addenda and after.wet_read == before.wet_read, report.name


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"FINDINGS: 15\xc2\xb0 rotation.", "FINDINGS: 15\u00b0 rotation."),  # UTF-8
        (b"\xef\xbb\xbfFINDINGS: clear.", "FINDINGS: clear."),  # UTF-8 with a BOM
        (
            b"FINDINGS: 15\xb0 rotation, \x93mass\x94.",
            "FINDINGS: 15\u00b0 rotation, \u201cmass\u201d.",
        ),  # cp1252
        (b"FINDINGS: \x81\x8d\xb0", "FINDINGS: \x81\x8d\u00b0"),  # bytes cp1252 leaves undefined: Latin-1
        (b"", ""),
        (b"15\xc2\xb0 and \x93quoted\x94", "15\u00b0 and \u201cquoted\u201d"),  # UTF-8 and cp1252 mixed
    ],
)
def test_decode_report_never_loses_characters(data: bytes, expected: str) -> None:
    assert decode_report(data) == expected
    assert "\ufffd" not in decode_report(data)


# ---------------------------------------------------------------------------------------------- CSVs

METADATA_HEADER = [
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
]


def dicom_id(number: int) -> str:
    digits = f"{number:08x}" + "9f3c2b1a" * 4
    return "-".join(digits[i : i + 8] for i in range(0, 40, 8))


# subject, study, view, description, StudyTime: the kinds of rows the release carries (fractional
# and short StudyTimes, empty and unusual ViewPositions, a description with a comma).
IMAGES = [
    (10000032, 50414267, "PA", "CHEST (PA AND LAT)", "213014.531"),
    (10000032, 50414267, "LATERAL", "CHEST (PA AND LAT)", "213014.531"),
    (10000032, 53189527, "AP", "CHEST (PORTABLE AP)", "165500"),
    (10000764, 57375967, "", "CHEST (PA AND LAT)", "144547.796"),
    (10000764, 57375967, "XTABLE LATERAL", "CHEST (PA AND LAT)", "144547.796"),
    (10000898, 50771383, "AP AXIAL", "CHEST, PA AND LAT", "80215.25"),
    (10000898, 50771383, "LAO", "CHEST, PA AND LAT", "80215.25"),
    (15000001, 55000002, "SWIMMERS", "CHEST (PRE-OP PA AND LAT)", "530"),
    (15000001, 55000002, "LPO", "CHEST (PRE-OP PA AND LAT)", "000530.000"),
    (19999733, 59999002, "RAO", "CHEST (PORTABLE AP)", "235959.999"),
    (19999733, 59999003, "LL", "CHEST (PA AND LAT)", "1"),
]
SPLIT_OF = {50414267: "train", 53189527: "train", 57375967: "validate", 50771383: "test"}
LABELS = {  # study -> {observation: cell}; studies 55000002.. have no label row
    50414267: {"No Finding": "1.0"},
    53189527: {"Edema": "-1.0", "Cardiomegaly": "1.0", "Pleural Effusion": "0.0"},
    57375967: {"Pneumonia": "-1.0", "Lung Opacity": "1.0"},
    50771383: {"Support Devices": "1.0", "Atelectasis": "1.0"},
}
META = "mimic-cxr-2.0.0-metadata.csv.gz"
SPLIT = "mimic-cxr-2.0.0-split.csv.gz"
CHEXPERT = "mimic-cxr-2.0.0-chexpert.csv.gz"


def csv_text(header: list[str], rows: list[list[object]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows([header, *rows])
    return buffer.getvalue()


def metadata_rows() -> list[list[object]]:
    return [
        [dicom_id(i), subject, study, description, view, 3056, 2544, 21800506 + i, time, description, "", ""]
        for i, (subject, study, view, description, time) in enumerate(IMAGES)
    ]


def build_root(root: Path, extension: str = ".jpg") -> Path:
    """A small root in the release layout: gzipped CSVs with the release headers, and placeholder
    image files under files/p1X/ (nothing here decodes them)."""
    root.mkdir(parents=True)
    write_text(root / META, csv_text(METADATA_HEADER, metadata_rows()))
    split_rows = [
        [dicom_id(i), study, subject, SPLIT_OF.get(study, "train")]
        for i, (subject, study, *_) in enumerate(IMAGES)
    ]
    write_text(root / SPLIT, csv_text(["dicom_id", "study_id", "subject_id", "split"], split_rows))
    subject_of = {study: subject for subject, study, *_ in IMAGES}
    label_rows = [
        [subject_of[s], s, *(cells.get(o, "") for o in OBSERVATIONS)] for s, cells in LABELS.items()
    ]
    write_text(root / CHEXPERT, csv_text(["subject_id", "study_id", *OBSERVATIONS], label_rows))
    for i, (subject, study, *_) in enumerate(IMAGES):
        image = root / f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom_id(i)}{extension}"
        image.parent.mkdir(parents=True, exist_ok=True)
        image.write_bytes(b"\xff\xd8\xff\xd9")
    return root


def write_text(path: Path, text: str, encoding: str = "utf-8") -> None:
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def read_text(path: Path) -> str:
    data = path.read_bytes()
    return (gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data).decode("utf-8-sig")


def rewrite(name: str, change) -> object:
    """A mutation of the root: `change(text) -> text` applied to one CSV."""

    def mutate(root: Path) -> None:
        write_text(root / name, change(read_text(root / name)))

    return mutate


def rename(name: str, new_name: str, gz: bool = True) -> object:
    def mutate(root: Path) -> None:
        text = read_text(root / name)
        (root / name).unlink()
        (root / new_name).parent.mkdir(parents=True, exist_ok=True)
        write_text(root / new_name, text)

    return mutate


def raw_bytes(name: str, change) -> object:
    """A mutation of the (decompressed, re-gzipped) bytes of one CSV."""

    def mutate(root: Path) -> None:
        data = change(gzip.decompress((root / name).read_bytes()))
        (root / name).write_bytes(gzip.compress(data))

    return mutate


def swap_columns(text: str) -> str:
    rows = list(csv.reader(io.StringIO(text)))
    return csv_text(rows[0][::-1], [row[::-1] for row in rows[1:]])


def add_column(name: str, value: str, first: bool = False):
    def change(text: str) -> str:
        rows = list(csv.reader(io.StringIO(text)))
        if first:
            return csv_text([name, *rows[0]], [[value, *row] for row in rows[1:]])
        return csv_text([*rows[0], name], [[*row, value] for row in rows[1:]])

    return change


# Copies that must read exactly like the release.
READS_LIKE_THE_RELEASE = {
    "release as written": lambda root: None,
    "plain csv, not gzipped": rename(META, "mimic-cxr-2.0.0-metadata.csv"),
    "utf-8 BOM": raw_bytes(META, lambda data: b"\xef\xbb\xbf" + data),
    "CRLF line ends": raw_bytes(META, lambda data: data.replace(b"\n", b"\r\n")),
    "BOM + CRLF in the label CSV": raw_bytes(
        CHEXPERT, lambda data: b"\xef\xbb\xbf" + data.replace(b"\n", b"\r\n")
    ),
    "columns in another order": rewrite(META, swap_columns),
    "label columns in another order": rewrite(CHEXPERT, swap_columns),
    "extra metadata column": rewrite(META, add_column("PatientSex", "F")),
    "pandas index column in the labels": rewrite(CHEXPERT, add_column("Unnamed: 0", "0", first=True)),
    "extra non-label column in the labels": rewrite(CHEXPERT, add_column("split", "train")),
    "spaces after the header commas": rewrite(META, lambda t: t.replace(",", ", ", 11)),
    "spaces after every comma": rewrite(META, lambda t: re.sub(r",(?=[^ \"])", ", ", t)),
    "padded ids in the split CSV": rewrite(
        SPLIT, lambda t: re.sub(r"^([0-9a-f-]{44}),", r" \1 ,", t, flags=re.M)
    ),
    "upper-case split names": rewrite(
        SPLIT, lambda t: t.replace(",train", ",TRAIN").replace(",test", ",Test")
    ),
    "padded split names": rewrite(SPLIT, lambda t: t.replace(",validate", ", validate ")),
    "val for validate": rewrite(SPLIT, lambda t: t.replace(",validate", ",val")),
    "ids written as floats by pandas": rewrite(
        CHEXPERT, lambda t: re.sub(r"^(\d{8}),(\d{8}),", r"\1.0,\2.0,", t, flags=re.M)
    ),
    "Rows/Columns written as floats": rewrite(META, lambda t: t.replace(",3056,2544,", ",3056.0,2544.0,")),
    "labels as integers": rewrite(CHEXPERT, lambda t: t.replace("-1.0", "-1").replace("1.0", "1")),
    "blank labels written as nan": rewrite(CHEXPERT, lambda t: re.sub(r",(?=,|$)", ",nan", t, flags=re.M)),
    "lower-case view positions": rewrite(META, lambda t: t.replace(",PA,", ",pa,").replace(",LAO,", ",lao,")),
    "quoted fields": rewrite(META, lambda t: t.replace("CHEST (PA AND LAT)", '"CHEST (PA AND LAT)"')),
    "quoted field with a line break": rewrite(
        META, lambda t: t.replace('"CHEST, PA AND LAT"', '"CHEST,\nPA AND LAT"')
    ),
    "no version prefix": rename(META, "metadata.csv.gz"),
    "2.1.0 version prefix": rename(SPLIT, "mimic-cxr-2.1.0-split.csv"),
    "CSVs in a subfolder": lambda root: [rename(n, f"csv/{n}")(root) for n in (META, SPLIT, CHEXPERT)],
    "trailing blank lines": raw_bytes(META, lambda data: data + b"\n\n"),
}


@pytest.fixture(scope="module")
def release_root(tmp_path_factory) -> Path:
    return build_root(tmp_path_factory.mktemp("release") / "mimic")


def copy_root(source: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(source, target)
    return target


@pytest.mark.parametrize("case", list(READS_LIKE_THE_RELEASE), ids=list(READS_LIKE_THE_RELEASE))
def test_copies_read_like_the_release(case: str, release_root: Path, tmp_path: Path) -> None:
    expected = MimicCXR(release_root).select(one_per_study=False, with_reports=False)
    expected_labels = MimicCXR(release_root).study_labels()
    root = copy_root(release_root, tmp_path / "mimic")
    READS_LIKE_THE_RELEASE[case](root)
    mimic = MimicCXR(root)
    table = mimic.select(one_per_study=False, with_reports=False)
    assert table.equals(expected)
    assert mimic.study_labels().equals(expected_labels)
    assert dict(mimic.skipped) == {}


def test_release_values_are_kept(release_root: Path) -> None:
    mimic = MimicCXR(release_root)
    images = mimic.images()
    assert images.column("view").to_pylist() == [v.upper() or None for _, _, v, _, _ in IMAGES]
    assert images.column("study_time").to_pylist()[:4] == [213014.531, 213014.531, 165500.0, 144547.796]
    assert set(images.column("image_path").to_pylist()) == {
        f"files/p{str(s)[:2]}/p{s}/s{st}/{dicom_id(i)}.jpg" for i, (s, st, *_) in enumerate(IMAGES)
    }
    # Unusual views are kept and selectable by name; the lateral group includes cross-table laterals.
    assert mimic.select(views=["lateral"], with_reports=False).column("view").to_pylist() == [
        "LATERAL",
        "XTABLE LATERAL",
        "LL",
    ]
    assert mimic.select(views=["lao", "Swimmers"], with_reports=False).column("view").to_pylist() == [
        "LAO",
        "SWIMMERS",
    ]
    # One per study prefers PA > AP > any other view > an empty one.
    picked = mimic.select(with_reports=False)
    assert dict(
        zip(picked.column("study_id").to_pylist(), picked.column("view").to_pylist(), strict=True)
    ) == {
        50414267: "PA",
        53189527: "AP",
        57375967: "XTABLE LATERAL",
        50771383: "AP AXIAL",
        55000002: "SWIMMERS",
        59999002: "RAO",
        59999003: "LL",
    }
    labels = mimic.study_labels().to_pylist()
    assert [row["study_id"] for row in labels] == [50414267, 53189527, 57375967, 50771383]
    assert (
        labels[1]["Edema"] == -1.0 and labels[1]["Pleural Effusion"] == 0.0 and labels[1]["Fracture"] is None
    )


# Copies that must fail with an InputError naming the file, the row and the field; lenient, the
# bad rows are skipped and counted under the given reason.
BAD_COPIES = {
    "a row with an extra field": (
        rewrite(META, lambda t: t.replace(",LAO,", ",LAO,EXTRA,")),
        r"metadata\.csv\.gz row 7: 13 fields where the header has 12",
        "wrong number of fields",
    ),
    "a row cut short": (
        rewrite(META, lambda t: t.rstrip("\n").rsplit(",", 3)[0] + "\n"),
        r"metadata\.csv\.gz row 11: 9 fields where the header has 12",
        "wrong number of fields",
    ),
    "a header line repeated mid-file (two files concatenated)": (
        rewrite(META, lambda t: t + t.split("\n", 1)[0] + "\n"),
        r"metadata\.csv\.gz row 12 field 'subject_id': not a positive integer id \(value 'subject_id'\)",
        "bad subject_id",
    ),
    "StudyTime with colons": (
        rewrite(META, lambda t: t.replace(",165500,", ",16:55:00,")),
        r"metadata\.csv\.gz row 3 field 'StudyTime': not a number \(value '16:55:00'\)",
        "bad StudyTime",
    ),
    "an ISO StudyDate": (
        rewrite(META, lambda t: t.replace(",21800506,", ",2180-05-06,")),
        r"metadata\.csv\.gz row 1 field 'StudyDate': not an integer",
        "bad StudyDate",
    ),
    "a label outside the coding": (
        rewrite(CHEXPERT, lambda t: t.replace("-1.0", "2.0", 1)),
        r"chexpert\.csv\.gz row 2 field 'Edema': label value is not one of 1, 0, -1 or blank",
        "label value outside 1/0/-1/blank",
    ),
    "a study whose images are in two splits": (
        rewrite(
            SPLIT,
            lambda t: t.replace(",10000032,train", ",10000032,test", 2).replace(
                ",10000032,test", ",10000032,train", 1
            ),
        ),
        r"split\.csv\.gz row 2 field 'split': study 50414267 has images in test and train",
        "study in several splits",
    ),
    "an unknown split": (
        rewrite(SPLIT, lambda t: t.replace(",test", ",holdout")),
        r"split\.csv\.gz row 6 field 'split': split is not one of train, validate, test \(value 'holdout'\)",
        "unknown split",
    ),
}


@pytest.mark.parametrize("case", list(BAD_COPIES), ids=list(BAD_COPIES))
def test_bad_rows_are_named_or_counted(case: str, release_root: Path, tmp_path: Path) -> None:
    mutate, message, reason = BAD_COPIES[case]
    root = copy_root(release_root, tmp_path / "mimic")
    mutate(root)
    with pytest.raises(InputError, match=message):
        mimic = MimicCXR(root)
        mimic.select(with_reports=False)
        mimic.study_labels()
    lenient = MimicCXR(root, lenient=True)
    lenient.select(with_reports=False)
    lenient.study_labels()
    counted = {key: value for key, value in lenient.skipped.items() if key.endswith(f": {reason}")}
    assert sum(counted.values()) >= 1, dict(lenient.skipped)
    assert all(value > 0 for value in lenient.skipped.values())  # no zero entries in the report


def flip_byte(data: bytes, where_at: float | int) -> bytes:
    """Corrupt one byte: at a fraction of the length, or at an index."""
    index = int(len(data) * where_at) if isinstance(where_at, float) else where_at
    corrupted = bytearray(data)
    corrupted[index] ^= 0xFF
    return bytes(corrupted)


# Files that are not the CSV they are named after: a clear error naming the file.
BAD_FILES = {
    "a PhysioNet login page saved by wget": (
        lambda root: (root / META).write_bytes(
            b"<!DOCTYPE html>\n<html><head><title>Login</title></head></html>\n"
        ),
        r"metadata\.csv\.gz row 0: an HTML/XML page, not a CSV",
    ),
    "a truncated download": (
        lambda root: (root / META).write_bytes((root / META).read_bytes()[:-30]),
        r"metadata\.csv\.gz: cannot parse CSV: .*SHA256SUMS",
    ),
    "a flipped byte in the gzip stream": (
        lambda root: (root / META).write_bytes(flip_byte((root / META).read_bytes(), 0.5)),
        r"metadata\.csv\.gz: cannot .*SHA256SUMS",
    ),
    "a bad gzip checksum in the label CSV": (
        lambda root: (root / CHEXPERT).write_bytes(flip_byte((root / CHEXPERT).read_bytes(), -6)),
        r"chexpert\.csv\.gz: cannot parse CSV: .*SHA256SUMS",
    ),
    "UTF-16 from a spreadsheet": (
        lambda root: (root / SPLIT).write_bytes(read_text(root / SPLIT).encode("utf-16")),
        r"split\.csv\.gz: cannot read the CSV header: not UTF-8 text",
    ),
    "a misspelt label column": (
        rewrite(CHEXPERT, lambda t: t.replace("Pleural Effusion", "Pleural Efusion", 1)),
        r"chexpert\.csv\.gz field 'Pleural Efusion': unknown label column .*did you mean 'Pleural Effusion'",
    ),
    "two candidate metadata files": (
        lambda root: [
            rename(META, "metadata.csv")(root),
            write_text(root / "mimic-cxr-metadata.csv.gz", "x\n"),
        ],
        r"several files could stand for it: .*metadata\.csv",
    ),
    "the header line lost": (
        rewrite(SPLIT, lambda t: t.split("\n", 1)[1]),
        r"split\.csv\.gz field 'dicom_id': missing column .*the first line looks like data",
    ),
    "no metadata at all": (
        lambda root: (root / META).unlink(),
        r"mimic-cxr-2\.0\.0-metadata\.csv: missing",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_files_are_named(case: str, release_root: Path, tmp_path: Path) -> None:
    mutate, message = BAD_FILES[case]
    root = copy_root(release_root, tmp_path / "mimic")
    mutate(root)
    with pytest.raises(InputError, match=message):
        mimic = MimicCXR(root, lenient=True)
        mimic.select(with_reports=False)
        mimic.study_labels()


# ---------------------------------------------------------------------------------------------- DICOM release


def record_lists(root: Path) -> None:
    """The DICOM release's cxr-record-list.csv.gz and cxr-study-list.csv.gz."""
    records = [
        [subject, study, dicom_id(i), f"files/p{str(subject)[:2]}/p{subject}/s{study}/{dicom_id(i)}.dcm"]
        for i, (subject, study, *_) in enumerate(IMAGES)
    ]
    write_text(
        root / "cxr-record-list.csv.gz", csv_text(["subject_id", "study_id", "dicom_id", "path"], records)
    )
    studies = sorted({(s, st) for s, st, *_ in IMAGES})
    write_text(
        root / "cxr-study-list.csv.gz",
        csv_text(
            ["subject_id", "study_id", "path"],
            [[s, st, f"files/p{str(s)[:2]}/p{s}/s{st}.txt"] for s, st in studies],
        ),
    )


def test_dicom_release_layout(tmp_path: Path) -> None:
    root = build_root(tmp_path / "mimic-cxr", extension=".dcm")
    record_lists(root)
    assert detect_layout(root) == "dicom"
    table = MimicCXR(root).select(with_reports=False)
    assert all(path.endswith(".dcm") for path in table.column("image_path").to_pylist())
    # The DICOM release alone has no view/split CSVs: the error says what to do.
    for name in (META, SPLIT):
        (root / name).unlink()
    with pytest.raises(InputError, match="copy MIMIC-CXR-JPG's CSVs"):
        MimicCXR(root).images()


def test_jpg_images_with_the_dicom_release_lists_and_reports_zip(tmp_path: Path) -> None:
    """The common copy: MIMIC-CXR-JPG's images and CSVs, plus the DICOM release's record lists and
    mimic-cxr-reports.zip (the only source of reports) dropped beside them, zip not unpacked."""
    import zipfile

    root = build_root(tmp_path / "mimic", extension=".jpg")
    record_lists(root)
    with zipfile.ZipFile(root / "mimic-cxr-reports.zip", "w") as archive:
        archive.writestr("files/p10/p10000032/s50414267.txt", STANDARD.encode())
        archive.writestr("files/p10/p10000032/s53189527.txt", PORTABLE.replace("\n", "\r\n").encode("cp1252"))
    assert detect_layout(root) == "jpg"
    mimic = MimicCXR(root)
    table = mimic.select(with_reports=True)
    assert all(path.endswith(".jpg") for path in table.column("image_path").to_pylist())
    impressions = dict(
        zip(table.column("study_id").to_pylist(), table.column("impression").to_pylist(), strict=True)
    )
    assert impressions[50414267] == "No acute cardiopulmonary process."
    assert impressions[53189527].startswith("1. Worsening moderate pulmonary edema.")
    assert impressions[57375967] is None and mimic.skipped["reports: missing (sections left null)"] == 5
    # --reports-root may name the zip itself.
    elsewhere = tmp_path / "mimic-cxr-reports.zip"
    (root / "mimic-cxr-reports.zip").rename(elsewhere)
    assert MimicCXR(root, reports_root=elsewhere).report(10000032, 50414267).impression == (
        "No acute cardiopulmonary process."
    )
    elsewhere.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable zip of reports"):
        MimicCXR(root, reports_root=elsewhere).report(10000032, 50414267)


def test_report_files_in_other_encodings(release_root: Path, tmp_path: Path) -> None:
    root = copy_root(release_root, tmp_path / "mimic")
    report = root / "files/p10/p10000032/s50414267.txt"
    report.write_bytes(
        STANDARD.replace("normal.", "normal (rotated 15\u00b0).").replace("\n", "\r\n").encode("cp1252")
    )
    sections = MimicCXR(root).report(10000032, 50414267)
    assert (
        "rotated 15\u00b0" in sections.findings and sections.impression == "No acute cardiopulmonary process."
    )
    (root / "files/p10/p10000032/s53189527.txt").write_bytes(b"")  # an empty report file
    empty = MimicCXR(root).report(10000032, 53189527)
    assert empty is not None and empty.best() is None


def test_root_one_level_off_says_which_folder(release_root: Path, tmp_path: Path) -> None:
    """physionet.org/files/mimic-cxr-jpg/2.0.0 is the root; the folder above it or files/ are not."""
    above = tmp_path / "mimic-cxr-jpg"
    copy_root(release_root, above / "2.0.0")
    with pytest.raises(InputError, match=r"not the release root, but .*2\.0\.0 is"):
        MimicCXR(above).images()
    with pytest.raises(InputError, match="pass the folder that holds files/"):
        MimicCXR(above / "2.0.0" / "files")
    # --reports-root may name the files/ folder of unpacked reports.
    report = above / "2.0.0/files/p10/p10000032/s50414267.txt"
    report.write_text(STANDARD)
    mimic = MimicCXR(above / "2.0.0", reports_root=above / "2.0.0" / "files")
    assert mimic.report(10000032, 50414267).impression == "No acute cardiopulmonary process."


def test_subject_lists_as_users_write_them(tmp_path: Path) -> None:
    from cxrmax.mimic import read_subject_ids

    listed = tmp_path / "ms_cxr_t_subjects.csv"
    listed.write_bytes(b"\xef\xbb\xbfdicom_id, subject_id\r\na,10000032.0\r\nb, 10000764 \r\n")
    assert read_subject_ids(listed) == {10000032, 10000764}
    listed.write_text("subject_id\n10000032\nabc\n")
    with pytest.raises(InputError, match=r"row 2 field 'subject_id': not an integer id \('abc'\)"):
        read_subject_ids(listed)


def _damage(text: str, rng) -> str:
    """One random edit of the kind hand-edited or half-copied CSVs show."""
    lines = text.split("\n")
    kind = rng.randrange(8)
    at = rng.randrange(len(text))
    if kind == 0:
        return text[:at]  # cut short
    if kind == 1:
        return text[:at] + rng.choice(',"\r;x\x00-') + text[at + 1 :]  # a stray character
    if kind == 2:
        del lines[rng.randrange(len(lines))]
    elif kind == 3:
        row = rng.randrange(len(lines))
        lines.insert(row, lines[row])  # a duplicated line (or header)
    elif kind == 4:
        row = rng.randrange(1, max(2, len(lines)))
        cells = lines[row % len(lines)].split(",")
        cells[rng.randrange(len(cells))] = rng.choice(["", "nan", " ", "-", "1e3", "N/A"])
        lines[row % len(lines)] = ",".join(cells)
    elif kind == 5:
        lines.insert(rng.randrange(len(lines)), rng.choice(["", ",,,,", "#comment", "a,b"]))
    elif kind == 6:
        cells = lines[0].split(",")
        cells[rng.randrange(len(cells))] = rng.choice(["", "dicom_id", "Edema", "x"])
        lines[0] = ",".join(cells)
    else:
        first, second = rng.randrange(len(lines)), rng.randrange(len(lines))
        lines[first], lines[second] = lines[second], lines[first]
    return "\n".join(lines)


@pytest.mark.parametrize("seed", range(16))
def test_damaged_csvs_never_raise_anything_but_input_error(
    seed: int, release_root: Path, tmp_path: Path
) -> None:
    """Whatever a damaged copy looks like, the reader reads it or raises an InputError naming the
    file; it never leaks a raw Arrow/zlib/Key error."""
    import random

    rng = random.Random(seed)
    root = copy_root(release_root, tmp_path / "mimic")
    name = (META, SPLIT, CHEXPERT)[seed % 3]
    text = read_text(root / name)
    for _ in range(rng.randint(1, 3)):
        text = _damage(text, rng)
    write_text(root / name, text)
    for lenient in (False, True):
        try:
            mimic = MimicCXR(root, lenient=lenient)
            mimic.select(with_reports=False)
            mimic.study_labels()
            mimic.summary(reports=False)
        except InputError as error:
            assert str(root) in str(error)
