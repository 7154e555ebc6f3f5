"""The canonical form of a submission's predictions, and content hashes of aligned columns.

A submission file is only one spelling of its predictions: ``1`` and ``1.0`` and ``true``, a
trailing newline, CSV or JSONL, rows in any order all say the same thing. The scorers therefore
hand back a `Predictions` object holding what was actually scored (one row per scored key, sorted
by key, values parsed): its `sha256` is the key of duplicate detection on the board, and its bytes
(Arrow IPC, zstd) are what the board keeps so that `leaderboard export-predictions` can write any
stored entry in ReXrank's submission JSON (study_id -> model_prediction) for outside scorers.

`content_sha256` is the one hash of aligned columns: it also fingerprints the reference sets.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from cxrmax.core.errors import CxrmaxError

#: Kinds of predictions: label values (1/0/-1/NaN or probabilities), free text, MS-CXR-T answers
#: (one cell per finding) and rationales (several rows per study, one per model and sample).
KINDS = ("labels", "text", "answers", "rationale")
FORMAT = "cxrmax-predictions/1"
_NAN_SENTINEL = np.float32(-1e30)  # NaN bit patterns vary; hash one fixed value for "blank"


def _column_bytes(values: Any) -> bytes:
    """Bytes of one column for hashing: little-endian numbers (NaN canonical), or UTF-8 strings with
    their lengths (None has length -1, so None and "" differ)."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        if values.dtype.kind == "f":
            # + 0.0: negative zero hashes as zero (NaN is replaced by the sentinel first).
            values = np.where(np.isnan(values), _NAN_SENTINEL, values).astype("<f8") + 0.0
        else:
            values = values.astype("<i8")
        return np.ascontiguousarray(values).tobytes()
    encoded = [None if v is None else str(v).encode("utf-8") for v in values]
    lengths = np.asarray([-1 if e is None else len(e) for e in encoded], dtype="<i8")
    return lengths.tobytes() + b"".join(e for e in encoded if e)


def content_sha256(header: Mapping[str, Any], columns: Mapping[str, Any]) -> str:
    """sha256 of a small JSON header and aligned columns (numpy arrays or lists of str/None), in the
    given column order. Used for predictions and for reference sets alike."""
    digest = hashlib.sha256(json.dumps(dict(header), sort_keys=True).encode())
    for name, values in columns.items():
        digest.update(b"\x00" + name.encode() + b"\x00")
        digest.update(_column_bytes(values))
    return digest.hexdigest()


@dataclass
class Predictions:
    """What was scored, one row per scored key (several per study for rationales), sorted.

    ``columns`` map a column name to a numpy array (labels: float32 per observation) or a list of
    str/None (text, answers, rationale model and text)."""

    kind: str
    key_name: str
    keys: np.ndarray
    columns: dict[str, Any]

    @classmethod
    def build(cls, kind: str, key_name: str, keys: Any, columns: Mapping[str, Any]) -> Predictions:
        """Sorted canonical predictions from unsorted aligned columns (text trimmed: outer white space
        and line-ending style change no metric)."""
        if kind not in KINDS:
            raise ValueError(f"unknown predictions kind {kind!r}")
        keys = np.asarray(keys)
        clean: dict[str, Any] = {}
        for name, values in columns.items():
            if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
                clean[name] = values
            else:
                clean[name] = [
                    None if v is None else str(v).replace("\r\n", "\n").replace("\r", "\n").strip()
                    for v in values
                ]
        if kind == "rationale":  # several rows per study: order by (model, study, text)
            order = sorted(
                range(len(keys)),
                key=lambda i: (clean["model"][i] or "", keys[i], clean["text"][i] or ""),
            )
            order = np.asarray(order, dtype=np.int64)
        else:
            order = np.argsort(keys, kind="stable")
        sorted_columns = {
            name: values[order] if isinstance(values, np.ndarray) else [values[i] for i in order]
            for name, values in clean.items()
        }
        return cls(kind, key_name, keys[order], sorted_columns)

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def sha256(self) -> str:
        """The canonical content hash: same predictions, same hash, whatever the file looked like."""
        header = {"format": FORMAT, "kind": self.kind, "key": self.key_name}
        return content_sha256(header, {self.key_name: self.keys, **self.columns})

    def to_bytes(self) -> bytes:
        """Arrow IPC stream (zstd) with the kind and key in the schema metadata."""
        arrays = {self.key_name: pa.array(self.keys.tolist())}
        for name, values in self.columns.items():
            if isinstance(values, np.ndarray):
                arrays[name] = pa.array(values, from_pandas=True)  # NaN -> null
            else:
                arrays[name] = pa.array(values, type=pa.string())
        table = pa.table(arrays).replace_schema_metadata(
            {"format": FORMAT, "kind": self.kind, "key": self.key_name}
        )
        sink = pa.BufferOutputStream()
        options = ipc.IpcWriteOptions(compression="zstd")
        with ipc.new_stream(sink, table.schema, options=options) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> Predictions:
        """Read back `to_bytes`."""
        table = ipc.open_stream(pa.py_buffer(data)).read_all()
        meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
        if meta.get("format") != FORMAT:
            raise CxrmaxError(f"stored predictions have an unknown format {meta.get('format')!r}")
        key_name = meta["key"]
        keys = np.asarray(table.column(key_name).to_pylist())
        columns: dict[str, Any] = {}
        for name in table.column_names:
            if name == key_name:
                continue
            column = table.column(name)
            if pa.types.is_floating(column.type):
                columns[name] = column.fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float32)
            else:
                columns[name] = column.to_pylist()
        return cls(meta["kind"], key_name, keys, columns)

    def models(self) -> list[str]:
        """The models of a rationale set (empty for other kinds)."""
        if self.kind != "rationale":
            return []
        return sorted({m for m in self.columns["model"] if m is not None})

    def to_rexrank(self, model: str | None = None) -> dict[str, dict[str, Any]]:
        """ReXrank's submission JSON: ``{key: {"model_prediction": ...}}``, keys as strings.

        Text (reports, free-text labels or answers) is the string itself; label values are an object
        of observation -> 1 / 0 / -1 / probability / null; MS-CXR-T answers an object of finding ->
        answer. A rationale set holds several models: ``model`` picks one (required when there are
        several); several samples of a study give ``model_prediction`` (the first in canonical order)
        and ``samples`` (all of them)."""
        if self.kind == "rationale":
            return self._rationale_rexrank(model)
        out: dict[str, dict[str, Any]] = {}
        names = list(self.columns)
        keys = self.keys.tolist()
        if names == ["text"]:
            for key, text in zip(keys, self.columns["text"], strict=True):
                out[str(key)] = {"model_prediction": text}
            return out
        values = {
            name: [_json_value(v) for v in col.tolist()] if isinstance(col, np.ndarray) else col
            for name, col in self.columns.items()
        }
        for i, key in enumerate(keys):
            out[str(key)] = {"model_prediction": {name: values[name][i] for name in names}}
        return out

    def _rationale_rexrank(self, model: str | None) -> dict[str, dict[str, Any]]:
        models = self.models()
        if model is None:
            if len(models) != 1:
                raise CxrmaxError(
                    f"this entry holds rationales of {len(models)} models ({', '.join(models)}): "
                    "choose one with --model"
                )
            model = models[0]
        elif model not in models:
            raise CxrmaxError(f"model {model!r} is not in this entry; it holds: {', '.join(models)}")
        samples: dict[str, list[str | None]] = {}
        for key, name, text in zip(
            self.keys.tolist(), self.columns["model"], self.columns["text"], strict=True
        ):
            if name == model:
                samples.setdefault(str(key), []).append(text)
        out: dict[str, dict[str, Any]] = {}
        for key, texts in samples.items():
            out[key] = {"model_prediction": texts[0]}
            if len(texts) > 1:
                out[key]["samples"] = texts
        return out


def _json_value(value: float) -> float | int | None:
    """A label value for JSON: NaN -> null, whole numbers as ints."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if float(value).is_integer():
        return int(value)
    return round(float(value), 6)
