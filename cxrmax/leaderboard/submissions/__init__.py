"""Streaming submission readers and validation.

Formats (chosen by file suffix unless the content says otherwise, optionally compressed):
- ``.csv`` / ``.tsv``: header row, one row per study.
- ``.jsonl`` / ``.ndjson``: one JSON object per line.
- ``.parquet``: one row per study, read in record batches.
- ``.json``: ReXrank style, an object keyed by study_id whose values are objects with
  ``model_prediction`` (or plain strings), or an array of row objects. Parsed incrementally, so a
  large file never sits in memory whole.

Rows are keyed by ``study_id`` (8 digits, an ``s`` prefix is accepted). A row carries either one value
per observation (1 / 0 / -1 / blank, or a probability in [0, 1]), or free text (``report``,
``model_prediction``, ...), or, for MS-CXR-T, one progression answer per finding. Every problem is a
`cxrmax.core.errors.InputError` naming the file, the row (1-based data row; JSON entries count as rows,
JSONL rows are lines) and the field.

Unusual but unambiguous input is read, and documented here:
- the content decides over the name: gzip, bzip2 and xz data are decompressed with or without their
  suffix (``.gz``/``.bz2``/``.xz``; zstd and ZIP are refused by name), a Parquet file is read as
  Parquet whatever its suffix; text is UTF-8 (a byte-order mark dropped) or UTF-16 with its
  byte-order mark; other encodings are refused naming the line, never guessed; no line is read past
  64 MB;
- CSV: ``;`` or tab as the delimiter when the header holds no comma, or as Excel's ``sep=`` line
  says; blank or whitespace-only lines and rows of empty cells are skipped; unnamed columns (pandas'
  index, a trailing comma) are ignored; a first line of data instead of a header is named;
- Parquet: a pandas index named study_id is the key (also an evenly spaced one pandas keeps only in
  its metadata);
- study ids ``50414267``, ``s50414267``, ``50414267.0`` and MIMIC paths or keys holding exactly one
  ``s<digits>`` part (``p10/p10000032/s50414267``) all name study 50414267;
- label cells ``true``/``false``/``yes``/``no`` (and JSON/Parquet booleans) are 1/0.
With ``lenient``, rows that cannot be read (a broken JSON line, a CSV row with the wrong number of
fields, an unreadable study id, label value or text) are skipped and counted instead of stopping the

Layout: `reader.iter_batches` picks the reader by `cxrmax.core.formats.sniff` (csv.py, json.py for
JSONL and JSON, parquet.py); columns.py gives each column its role; values.py parses cells;
index.py maps study ids to reference slots.
"""

from __future__ import annotations

from cxrmax.leaderboard.submissions.batch import BATCH_ROWS, RawBatch, ReadLog, check_file
from cxrmax.leaderboard.submissions.columns import (
    KEY_COLUMNS,
    MODEL_COLUMNS,
    PASSTHROUGH_COLUMNS,
    TEXT_COLUMNS,
    ColumnPlan,
    expected_columns,
    plan_columns,
)
from cxrmax.leaderboard.submissions.index import StudyIndex
from cxrmax.leaderboard.submissions.reader import STRUCT_COLUMNS, iter_batches
from cxrmax.leaderboard.submissions.values import (
    LABEL_WORDS,
    parse_label_column,
    parse_or_skip,
    parse_study_ids,
    parse_text_keys,
    study_id_from_text,
    text_values,
)

__all__ = [
    "BATCH_ROWS",
    "KEY_COLUMNS",
    "LABEL_WORDS",
    "MODEL_COLUMNS",
    "PASSTHROUGH_COLUMNS",
    "STRUCT_COLUMNS",
    "TEXT_COLUMNS",
    "ColumnPlan",
    "RawBatch",
    "ReadLog",
    "StudyIndex",
    "check_file",
    "expected_columns",
    "iter_batches",
    "parse_label_column",
    "parse_or_skip",
    "parse_study_ids",
    "parse_text_keys",
    "plan_columns",
    "study_id_from_text",
    "text_values",
]
