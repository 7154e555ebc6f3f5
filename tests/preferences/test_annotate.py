"""cxrmax.preferences.annotate.record_batch: batches are built by column name against the schema."""

from __future__ import annotations

import pyarrow as pa
import pytest

from cxrmax.preferences.annotate import record_batch

SCHEMA = pa.schema([pa.field("precision", pa.float32()), pa.field("recall", pa.float32())])


def test_columns_follow_the_schema_order_whatever_the_dict_order():
    batch = record_batch(
        {"recall": pa.array([0.25], pa.float32()), "precision": pa.array([0.75], pa.float32())}, SCHEMA
    )
    assert batch.schema == SCHEMA
    assert batch.column("precision").to_pylist() == [0.75]
    assert batch.column("recall").to_pylist() == [0.25]


@pytest.mark.parametrize(
    "columns",
    [
        {"precision": pa.array([1.0], pa.float32())},  # one missing
        {"precision": pa.array([1.0], pa.float32()), "recal": pa.array([1.0], pa.float32())},  # misspelt
    ],
)
def test_names_other_than_the_schema_are_refused(columns):
    with pytest.raises(ValueError, match="differ from the schema"):
        record_batch(columns, SCHEMA)
