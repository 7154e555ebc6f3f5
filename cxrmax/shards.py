"""Arrow schemas shared by every stage. Defined once here; each stage reads and writes files with them.

Data flows one way: MIMIC-CXR -> selection manifest -> trajectories -> preferences/sft -> training
-> predictions -> leaderboard. A stage may add columns to its own output only by extending the schema
here (and ARCHITECTURE.md), never by writing ad-hoc columns.
"""

from __future__ import annotations

import pyarrow as pa

from cxrmax.pathologies import OBSERVATIONS

#: Ground-truth labels as a struct with one nullable float32 per observation (1, 0, -1 or null).
#: A struct keeps the names with the values, so labels are always mapped by name.
LABELS_TYPE = pa.struct([pa.field(name, pa.float32()) for name in OBSERVATIONS])

#: One selected image of MIMIC-CXR: the output of `cxrmax mimic select`, the input of `generate`.
#: `sample_id` is the dicom_id (globally unique); `image_path` is relative to the MIMIC-CXR root.
SELECTION_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("dicom_id", pa.string(), nullable=False),
        pa.field("subject_id", pa.int64(), nullable=False),
        pa.field("study_id", pa.int64(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("view", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("study_date", pa.int64()),
        pa.field("study_time", pa.float64()),
        pa.field("labels", LABELS_TYPE),
        pa.field("findings", pa.string()),
        pa.field("impression", pa.string()),
        pa.field("last_paragraph", pa.string()),
    ]
)

#: One answer of one source model to one prompt: the output of `cxrmax generate`
#: (OUT/trajectories/<model>/*.arrow). Images are referenced by path, never embedded.
TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("request_key", pa.string(), nullable=False),  # sha256 of the exactly-once key
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("dicom_id", pa.string()),
        pa.field("subject_id", pa.int64()),
        pa.field("study_id", pa.int64()),
        pa.field("split", pa.string()),
        pa.field("view", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("labels", LABELS_TYPE),
        pa.field("model", pa.string(), nullable=False),  # roster name (or the served id)
        pa.field("served_model", pa.string()),  # the id the server knows
        pa.field("backend", pa.string()),  # openai | transformers | vllm
        pa.field("prompt_id", pa.string()),
        pa.field("prompt_hash", pa.string()),  # sha256 of the exact prompt text sent
        pa.field("prompt", pa.string()),  # the exact prompt text sent (without the image)
        pa.field("sample_index", pa.int32()),  # 0..n-1 for --samples n
        pa.field("text", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("completion_tokens", pa.int32()),
        pa.field("latency_s", pa.float32()),
        pa.field("sampling", pa.string()),  # JSON of the sampling parameters (temperature, top_p, max_tokens, seed)
        pa.field("seed", pa.int64()),
        pa.field("attempts", pa.int32()),
        pa.field("created_at", pa.timestamp("ms", tz="UTC")),
    ]
)

#: One APO training example: the consensus positive and the drifting source trajectories as
#: negatives, ordered by drift from the consensus (most drifting first). OUT/preferences/.
PREFERENCE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("dicom_id", pa.string()),
        pa.field("subject_id", pa.int64()),
        pa.field("study_id", pa.int64()),
        pa.field("split", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("chosen", pa.string()),
        pa.field("chosen_source", pa.string()),  # consensus-vote | consensus-model
        pa.field("rejected", pa.list_(pa.string())),
        pa.field("rejected_models", pa.list_(pa.string())),
        pa.field("rejected_drift", pa.list_(pa.float32())),
        pa.field("consensus_labels", LABELS_TYPE),
        pa.field("labels", LABELS_TYPE),  # ground truth when known
        pa.field("drift_score", pa.float32()),
        pa.field("consensus_flagged", pa.bool_()),  # re-labelled consensus disagrees with its target
    ]
)

#: One Stage-1 (SFT) example: a source trajectory as the completion. OUT/sft/.
SFT_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("image_path", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("completion", pa.string()),
        pa.field("model", pa.string()),
    ]
)


def labels_to_struct(labels: dict[str, float | int | None]) -> dict[str, float | None]:
    """Normalise a name->label mapping to the LABELS_TYPE struct value (missing names -> None)."""
    return {name: (None if labels.get(name) is None else float(labels[name])) for name in OBSERVATIONS}
