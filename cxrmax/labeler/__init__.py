"""Rule-based labeler of the 14 CheXpert observations for radiology reports and chatbot answers.

`label_text(text)` reads one text (status, laterality, evidence per observation; steps; refusal and
hedging spans); `label_texts(texts)` labels many into an Arrow table. See core.py for the rules.
"""

from cxrmax.labeler.batch import LABEL_TABLE_SCHEMA, iter_label_tables, label_texts, laterality_column
from cxrmax.labeler.core import (
    Evidence,
    LabeledText,
    ObservationLabel,
    Span,
    Step,
    label_text,
)

__all__ = [
    "LABEL_TABLE_SCHEMA",
    "Evidence",
    "LabeledText",
    "ObservationLabel",
    "Span",
    "Step",
    "iter_label_tables",
    "label_text",
    "label_texts",
    "laterality_column",
]
