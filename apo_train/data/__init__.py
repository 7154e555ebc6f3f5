"""Training data for APO: read preferences/ and sft/, tokenize with the model's chat template, collate.

* :mod:`apo_train.data.load`: ``load_split`` (one split of a ``save_to_disk`` dataset) and the column
  checks, so a malformed dataset fails before any row is read;
* :mod:`apo_train.data.tokenize`: ``ChatEncoder`` (chat template + processor) and
  ``tokenize_preferences`` / ``tokenize_sft`` with the truncation policy and its ``TruncationStats``;
* :mod:`apo_train.data.collators`: ``APOCollator`` (one positive row + N negative rows per sample) and
  ``SFTCollator``, padding and vision tensors;
* :mod:`apo_train.data.sampling`: ``LengthSortedSteps`` (each optimizer step's rows sorted by length
  before they are cut into accumulation micro-batches: less padding, the same gradient).

The public names are re-exported here, so ``from apo_train.data import X`` is the import to use.
"""

from apo_train.data.collators import APO_BOOKKEEPING_KEYS, IGNORE_INDEX, APOCollator, SFTCollator
from apo_train.data.load import PREFERENCE_COLUMNS, SFT_COLUMNS, check_column_types, load_split
from apo_train.data.sampling import LengthSortedSteps, sort_by_length
from apo_train.data.tokenize import ChatEncoder, TruncationStats, tokenize_preferences, tokenize_sft

__all__ = [
    "APO_BOOKKEEPING_KEYS",
    "IGNORE_INDEX",
    "PREFERENCE_COLUMNS",
    "SFT_COLUMNS",
    "APOCollator",
    "ChatEncoder",
    "LengthSortedSteps",
    "SFTCollator",
    "TruncationStats",
    "check_column_types",
    "load_split",
    "sort_by_length",
    "tokenize_preferences",
    "tokenize_sft",
]
