"""Arrow schemas shared by every stage. Defined once here; each stage reads and writes files with them.

Data flows one way: MIMIC-CXR -> selection manifest -> trajectories -> preferences/sft -> training
-> predictions -> leaderboard. A stage may add columns to its own output only by extending the schema
here (and ARCHITECTURE.md), never by writing ad-hoc columns.
"""

from __future__ import annotations

import pyarrow as pa

from cxrmax.core.pathologies import OBSERVATIONS

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
        pa.field(
            "sampling", pa.string()
        ),  # JSON of the sampling parameters (temperature, top_p, max_tokens, seed)
        pa.field("seed", pa.int64()),
        pa.field("attempts", pa.int32()),
        pa.field("created_at", pa.timestamp("ms", tz="UTC")),
        pa.field("endpoint", pa.string()),  # the base URL (or in-process backend) that answered
        pa.field("image_max_edge", pa.int32()),  # client-side downscale limit of the image sent (pixels)
        # reasoning the server returned apart from the answer (vLLM/SGLang reasoning_content); null if none
        pa.field("reasoning", pa.string()),
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
        pa.field("chosen_source", pa.string()),  # consensus-vote | consensus-model | selected:<model>
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


# --- drift annotations (issue 5, build-preferences): OUT/annotations/{trajectories,samples}.arrow ---
#: Laterality per observation as a struct of strings ("left" | "right" | "bilateral" | null).
LATERALITY_TYPE = pa.struct([pa.field(name, pa.string()) for name in OBSERVATIONS])
_OBS_LIST = pa.list_(pa.string())

#: One source trajectory, labelled and compared with the ground truth ("gt_*") and with its
#: sample's consensus ("cons_*"). `drift` is the drift from the consensus used to rank negatives.
DRIFT_TRAJECTORY_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32()),
        pa.field("split", pa.string()),
        pa.field("n_chars", pa.int32()),
        pa.field("n_steps", pa.int32()),
        pa.field("refusal", pa.bool_()),
        pa.field("hedging", pa.bool_()),
        pa.field("labeler_error", pa.string()),
        pa.field("labels", LABELS_TYPE),  # the labeler's reading of the trajectory
        pa.field("laterality", LATERALITY_TYPE),
        pa.field("gt_precision", pa.float32()),
        pa.field("gt_recall", pa.float32()),
        pa.field("gt_f1", pa.float32()),
        pa.field("gt_side_agreement", pa.float32()),
        pa.field("gt_side_compared", pa.int32()),
        pa.field("gt_hallucinated", _OBS_LIST),
        pa.field("gt_omitted", _OBS_LIST),
        pa.field("gt_side_errors", _OBS_LIST),
        pa.field("cons_precision", pa.float32()),
        pa.field("cons_recall", pa.float32()),
        pa.field("cons_f1", pa.float32()),
        pa.field("cons_side_agreement", pa.float32()),
        pa.field("cons_hallucinated", _OBS_LIST),
        pa.field("cons_omitted", _OBS_LIST),
        pa.field("cons_side_errors", _OBS_LIST),
        pa.field("similarity", pa.float32()),  # token-overlap F1 with the report (null without one)
        pa.field("drift", pa.float32()),  # drift from the consensus, [0, 1]
        pa.field("negative_rank", pa.int32()),  # 0 = first (most drifting) negative; null = not used
        pa.field("truncated", pa.bool_()),  # finish_reason "length": kept as a negative, never SFT
    ]
)

#: One sample: votes and entropy per observation (lists in OBSERVATIONS order), the pairwise
#: source disagreement matrix (rows/columns in `models` order), conflicts, the step-wise drift.
DRIFT_SAMPLE_SCHEMA = pa.schema(
    [
        pa.field("sample_id", pa.string(), nullable=False),
        pa.field("split", pa.string()),
        pa.field("models", pa.list_(pa.string())),
        pa.field("n_sources", pa.int32()),
        pa.field("refusals", pa.list_(pa.string())),
        pa.field("vote_positive", pa.list_(pa.int16())),
        pa.field("vote_uncertain", pa.list_(pa.int16())),
        pa.field("vote_negative", pa.list_(pa.int16())),
        pa.field("vote_absent", pa.list_(pa.int16())),
        pa.field("vote_entropy", pa.list_(pa.float32())),  # bits, over the four states
        pa.field("disagreement", pa.list_(pa.list_(pa.float32()))),
        pa.field("laterality_conflicts", _OBS_LIST),
        pa.field("drift_profile", pa.list_(pa.float32())),  # JS(P_j || P_{j+delta}), j = 0..bins-delta
        pa.field("dispersion_profile", pa.list_(pa.float32())),  # across-stream entropy after bin j
        pa.field("drift_score", pa.float32()),
        pa.field("consensus_labels", LABELS_TYPE),
        pa.field("consensus_laterality", LATERALITY_TYPE),
        pa.field("consensus_side_conflicts", _OBS_LIST),
        pa.field("consensus_flagged", pa.bool_()),
        pa.field("n_negatives", pa.int32()),
    ]
)
