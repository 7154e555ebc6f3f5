"""build-preferences end to end: hand-built trajectories with known drift give exactly the expected
annotations, consensus and ranking; a run over generate-format shards of a mini MIMIC-CXR; outputs
that load with datasets/TRL; exports; bad input; the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxrmax.core import schemas
from cxrmax.core.errors import CxrmaxError, InputError
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.preferences.build import BuildOptions, build_preferences
from cxrmax.preferences.load import load_trajectories

PROMPT = (
    "This is a patient's chest DR image. The patient is diagnosed with atelectasis, pleural effusion and "
    "support devices. Please explain the basis for the diagnosis of atelectasis, pleural effusion and "
    "support devices."
)
#: Five sources with known drift for one study (ground truth: left atelectasis, bilateral effusions,
#: pacemaker, no pneumothorax).
TEXTS = {
    # A and B agree with each other and with the ground truth.
    "A": "**Findings**\n1. There is left lower lobe atelectasis.\n2. Bilateral pleural effusions are present.\n"
    "3. A pacemaker is seen in the left chest wall.\n4. No pneumothorax.\n\nThese findings support the diagnosis.",
    "B": "There is left lower lobe atelectasis. There are bilateral pleural effusions. A cardiac pacemaker is in "
    "place. There is no pneumothorax.",
    # C puts the atelectasis on the wrong side (laterality conflict).
    "C": "Right lower lobe atelectasis is seen. Bilateral pleural effusions are noted. A pacemaker is present.",
    # D refuses.
    "D": "As an AI, I'm not capable of providing medical diagnoses. Please consult a radiologist.",
    # E hallucinates cardiomegaly and omits the pacemaker.
    "E": "Left lower lobe atelectasis is present. There are bilateral pleural effusions. The heart is enlarged, "
    "consistent with cardiomegaly.",
}
GT = {"Atelectasis": 1, "Pleural Effusion": 1, "Support Devices": 1, "Pneumothorax": 0}


def trajectory_row(sample_id: str, model: str, text: str, **extra) -> dict:
    row = {
        "request_key": f"{model}:{sample_id}:{extra.get('sample_index', 0)}",
        "sample_id": sample_id,
        "dicom_id": sample_id,
        "subject_id": extra.pop("subject_id", 10000001),
        "study_id": extra.pop("study_id", 50000001),
        "split": extra.pop("split", "train"),
        "view": "PA",
        "image_path": extra.pop("image_path", f"files/p10/p10000001/s50000001/{sample_id}.jpg"),
        "labels": schemas.labels_to_struct(extra.pop("labels", GT)),
        "model": model,
        "served_model": model,
        "backend": "openai",
        "prompt_id": "cxrmax-explain",
        "prompt": extra.pop("prompt", PROMPT),
        "sample_index": 0,
        "text": text,
        "finish_reason": "stop",
    }
    row.update(extra)
    return row


def write_generate_shards(out: Path, rows: list[dict]) -> Path:
    """Write rows as generate does: OUT/trajectories/<model>/part-*.arrow (Arrow IPC stream)."""
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    for model, model_rows in by_model.items():
        directory = out / "trajectories" / model
        directory.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(model_rows, schema=schemas.TRAJECTORY_SCHEMA)
        with pa.ipc.new_stream(str(directory / "part-all-0-000000.arrow"), table.schema) as writer:
            writer.write_table(table)
    return out


def known_drift_rows() -> list[dict]:
    rows = [trajectory_row("s-known", model, text) for model, text in TEXTS.items()]
    # A sample answered by only one source: skipped with --min-sources 2.
    rows.append(trajectory_row("s-lonely", "A", TEXTS["A"], study_id=50000002, split="test"))
    return rows


@pytest.fixture(scope="module")
def known_build(tmp_path_factory):
    out = write_generate_shards(tmp_path_factory.mktemp("known"), known_drift_rows())
    summary = build_preferences([out], out, BuildOptions(processes=1))
    return out, summary


def read_ipc(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).read_all()


def test_known_drift_ranking_and_consensus(known_build):
    import datasets

    out, summary = known_build
    assert summary.skipped_few_sources == 1 and summary.skipped_few_sources_examples == ["s-lonely"]
    prefs = datasets.load_from_disk(str(out / "preferences"))
    assert set(prefs) == {"train", "validate", "test"}
    assert len(prefs["train"]) == 1 and len(prefs["test"]) == 0
    row = prefs["train"][0]
    # Most drifting first: refusal (1), E (2 errors of 4), C (1 side error of 3), then A, B tied at 0.
    assert row["rejected_models"] == ["D", "E", "C", "A", "B"]
    assert row["rejected_drift"] == pytest.approx([1.0, 0.5, 1 / 3, 0.0, 0.0])
    assert row["rejected"][0] == TEXTS["D"]
    consensus = {k: v for k, v in row["consensus_labels"].items() if v is not None}
    # Pneumothorax: A and B negate, the others are silent: negation ties absence -> negative.
    assert consensus == {
        "Atelectasis": 1.0,
        "Pleural Effusion": 1.0,
        "Support Devices": 1.0,
        "Pneumothorax": 0.0,
    }
    assert row["chosen_source"] == "consensus-vote" and row["consensus_flagged"] is False
    chosen = row["chosen"]
    assert "There is left lower lobe atelectasis." in chosen
    assert "Right" not in chosen and "cardiomegaly" not in chosen.lower() and "As an AI" not in chosen
    assert chosen.endswith(
        "In summary: Left atelectasis. Bilateral pleural effusion. Support devices. There is no pneumothorax."
    )
    assert row["labels"]["Atelectasis"] == 1.0 and row["labels"]["Cardiomegaly"] is None
    assert 0.0 < row["drift_score"] <= 1.0


def test_known_drift_annotations(known_build):
    out, _ = known_build
    samples = read_ipc(out / "annotations" / "samples.arrow").to_pylist()
    assert len(samples) == 1
    s = samples[0]
    assert s["models"] == ["A", "B", "C", "D", "E"] and s["refusals"] == ["D"]
    assert s["laterality_conflicts"] == ["Atelectasis"]
    ate, car, sup = (OBSERVATIONS.index(n) for n in ("Atelectasis", "Cardiomegaly", "Support Devices"))
    assert s["vote_positive"][ate] == 4 and s["vote_absent"][ate] == 1
    assert s["vote_positive"][car] == 1 and s["vote_positive"][sup] == 3
    assert s["vote_entropy"][car] == pytest.approx(-(0.2 * math.log2(0.2) + 0.8 * math.log2(0.8)))
    assert s["consensus_laterality"]["Atelectasis"] == "left"
    assert s["consensus_laterality"]["Pleural Effusion"] == "bilateral"
    # A and B disagree on nothing; C differs from A on the side of atelectasis and the pneumothorax
    # negation it does not state.
    matrix = s["disagreement"]
    assert matrix[0][1] == 0.0 and matrix[0][2] == pytest.approx(2 / 14) and matrix[2][0] == matrix[0][2]
    assert len(s["dispersion_profile"]) == 11 and len(s["drift_profile"]) == 10
    assert s["n_negatives"] == 5 and s["consensus_flagged"] is False

    traj = {r["model"]: r for r in read_ipc(out / "annotations" / "trajectories.arrow").to_pylist()}
    assert set(traj) == {"A", "B", "C", "D", "E"}
    assert traj["E"]["gt_hallucinated"] == ["Cardiomegaly"] and traj["E"]["gt_omitted"] == ["Support Devices"]
    assert traj["E"]["gt_precision"] == pytest.approx(2 / 3) and traj["E"]["gt_recall"] == pytest.approx(
        2 / 3
    )
    assert traj["E"]["cons_hallucinated"] == ["Cardiomegaly"] and traj["E"]["cons_omitted"] == [
        "Support Devices"
    ]
    assert traj["C"]["cons_side_errors"] == ["Atelectasis"] and traj["C"]["cons_side_agreement"] == 0.5
    assert traj["A"]["gt_f1"] == 1.0 and traj["A"]["cons_side_agreement"] == 1.0
    assert (
        traj["D"]["refusal"] is True and traj["D"]["gt_recall"] == 0.0 and traj["D"]["gt_precision"] is None
    )
    assert traj["D"]["gt_omitted"] == ["Atelectasis", "Pleural Effusion", "Support Devices"]
    assert [traj[m]["negative_rank"] for m in "DECAB"] == [0, 1, 2, 3, 4]
    assert traj["A"]["labels"]["Pneumothorax"] == 0.0 and traj["A"]["laterality"]["Atelectasis"] == "left"


@pytest.mark.slow  # imports trl (transformers, torch)
def test_known_drift_sft_and_exports(known_build, tiny_vlm_path):
    import datasets
    from trl.data_utils import apply_chat_template, is_conversational

    from cxrmax.toy.tinyvlm import load_tiny_vlm

    out, _ = known_build
    sft = datasets.load_from_disk(str(out / "sft"))
    assert sorted(sft["train"]["model"]) == ["A", "B", "C", "D", "E"]
    assert list(sft["train"].features) == schemas.SFT_SCHEMA.names

    trl = datasets.load_from_disk(str(out / "exports" / "trl"))
    train = trl["train"]
    assert len(train) == 5 and train["rejected_model"] == ["D", "E", "C", "A", "B"]
    example = train[0]
    assert is_conversational(example)
    assert example["prompt"][0]["role"] == "user"
    assert [part["type"] for part in example["prompt"][0]["content"]] == ["image", "text"]
    assert example["chosen"][0]["role"] == "assistant" and example["rejected"][0]["role"] == "assistant"
    assert example["rejected"][0]["content"][0]["text"] == TEXTS["D"]
    assert example["images"] == ["files/p10/p10000001/s50000001/s-known.jpg"]  # no root: paths kept
    # TRL renders the rows with a VLM processor's chat template: image placeholder + texts.
    _, processor = load_tiny_vlm(tiny_vlm_path)
    rendered = apply_chat_template({k: example[k] for k in ("prompt", "chosen", "rejected")}, processor)
    assert "<|image_pad|>" in rendered["prompt"] and PROMPT in rendered["prompt"]
    assert rendered["chosen"].startswith(example["chosen"][0]["content"][0]["text"])
    assert rendered["rejected"].startswith(TEXTS["D"])

    lines = (out / "exports" / "swift" / "train.jsonl").read_text().splitlines()
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert first["messages"][0]["content"].startswith("<image>") and first["rejected_response"] == TEXTS["D"]
    assert first["messages"][1]["role"] == "assistant" and first["images"] == [example["images"][0]]

    card = (out / "README.md").read_text()
    assert "| E | 1 |" in card and "config_name: preferences" in card
    for name in ("agreement.png", "drift_chart.png", "drift_profile.png"):
        assert (out / "figures" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "build_report.json").read_text())
    assert report["counts"]["preference_rows"] == 1 and report["counts"]["refusals"] == 1


def test_ranking_options(tmp_path):
    import datasets

    out = write_generate_shards(tmp_path / "run", known_drift_rows())
    build_preferences(
        [out],
        tmp_path / "opts",
        BuildOptions(
            processes=1, drop_non_drifting=True, max_negatives=2, exclude_refusals_from_sft=True, card=False
        ),
    )
    row = datasets.load_from_disk(str(tmp_path / "opts" / "preferences"))["train"][0]
    assert row["rejected_models"] == ["D", "E"]
    sft = datasets.load_from_disk(str(tmp_path / "opts" / "sft"))["train"]
    assert "D" not in sft["model"] and len(sft) == 4
    # --min-sources 1 keeps the lonely sample; its only source agrees with itself: no negative left.
    summary = build_preferences(
        [out], tmp_path / "min1", BuildOptions(processes=1, min_sources=1, drop_non_drifting=True, card=False)
    )
    assert summary.skipped_few_sources == 0 and summary.counts["samples_without_negatives"] == 1
    # A sample where every source refuses has no consensus: no preference row, counted.
    refused = [trajectory_row("s-refused", m, TEXTS["D"], study_id=50000003) for m in ("A", "B")]
    out2 = write_generate_shards(tmp_path / "run2", known_drift_rows() + refused)
    summary = build_preferences([out2], tmp_path / "refused", BuildOptions(processes=1, card=False))
    assert summary.counts["samples_without_consensus"] == 1 and summary.counts["preference_rows"] == 1
    assert summary.counts["sft_rows"] == 7


def test_parallel_build_matches_serial(tmp_path):
    """Chunks processed by worker processes give the same rows, in the same order."""
    import datasets

    rows = []
    for i in range(6):
        for model, text in TEXTS.items():
            rows.append(
                trajectory_row(f"s{i}", model, text, study_id=50000100 + i, split=("train", "test")[i % 2])
            )
    out = write_generate_shards(tmp_path / "run", rows)
    build_preferences([out], tmp_path / "serial", BuildOptions(processes=1, chunk_samples=2, card=False))
    build_preferences([out], tmp_path / "parallel", BuildOptions(processes=2, chunk_samples=2, card=False))
    for split in ("train", "test"):
        a = datasets.load_from_disk(str(tmp_path / "serial" / "preferences"))[split]
        b = datasets.load_from_disk(str(tmp_path / "parallel" / "preferences"))[split]
        assert a.to_list() == b.to_list() and len(a) == 3


# ---------------------------------------------------------------------------------------------
# Mini MIMIC-CXR end to end
# ---------------------------------------------------------------------------------------------


def _sentences(labels: dict) -> str:
    parts = []
    for name in OBSERVATIONS:
        if labels.get(name) == 1.0 and name != "No Finding":
            parts.append(f"There is {name.lower()}.")
    return " ".join(parts) or "No acute cardiopulmonary process."


@pytest.mark.slow
def test_end_to_end_on_mini_mimic(mini_mimic, tmp_path):
    import datasets
    from PIL import Image

    from cxrmax.mimic.reader import MimicCXR, read_ms_cxr_t

    mimic = MimicCXR(mini_mimic)
    selection = mimic.select()
    assert selection.num_rows >= 10
    rows = []
    for i, sel in enumerate(selection.to_pylist()):
        labels = {k: v for k, v in (sel["labels"] or {}).items() if v is not None}
        report = mimic.report(sel["subject_id"], sel["study_id"])
        common = {
            "subject_id": sel["subject_id"],
            "study_id": sel["study_id"],
            "split": sel["split"],
            "image_path": sel["image_path"],
            "labels": labels,
        }
        rows.append(
            trajectory_row(sel["sample_id"], "reporter", report.best() if report else "Normal.", **common)
        )
        rows.append(trajectory_row(sel["sample_id"], "lister", _sentences(labels), **common))
        refusal = "As an AI, I cannot interpret medical images. Please consult a radiologist."
        rows.append(
            trajectory_row(sel["sample_id"], "shy", refusal if i % 3 == 0 else _sentences(labels), **common)
        )
    out = write_generate_shards(tmp_path / "run", rows)
    ms_csv = Path(mini_mimic) / "MS_CXR_T_temporal_image_classification_v1.0.0.csv"
    ms_subjects = {int(s) for s in read_ms_cxr_t(ms_csv).column("subject_id").to_pylist()}
    export_dir = tmp_path / "parquet"
    summary = build_preferences(
        [out],
        out,
        BuildOptions(processes=1, mimic_root=Path(mini_mimic), ms_cxr_t=ms_csv, export_parquet=export_dir),
    )
    prefs = datasets.load_from_disk(str(out / "preferences"))
    sft = datasets.load_from_disk(str(out / "sft"))
    by_id = {r["sample_id"]: r for r in selection.to_pylist()}
    for split, ds in prefs.items():
        for r in ds:
            assert by_id[r["sample_id"]]["split"] == split
            if split == "train":
                assert r["subject_id"] not in ms_subjects
    assert sum(len(ds) for ds in prefs.values()) == summary.counts["preference_rows"] > 0
    assert sum(len(ds) for ds in sft.values()) == summary.counts["sft_rows"]
    removed = sum(1 for r in rows if r["split"] == "train" and r["subject_id"] in ms_subjects)
    assert summary.ms_cxr_t_excluded_rows == removed
    assert summary.studies_not_in_mimic == 0

    traj = read_ipc(out / "annotations" / "trajectories.arrow")
    similarity = traj.column("similarity").to_pylist()
    reporter_sim = [
        s for s, m in zip(similarity, traj.column("model").to_pylist(), strict=True) if m == "reporter"
    ]
    assert all(s is not None and s > 0.9 for s in reporter_sim)  # the report itself vs the report
    # Ground-truth sides come from the report: the report itself agrees with them wherever compared.
    side_rows = [r for r in traj.to_pylist() if r["model"] == "reporter" and r["gt_side_compared"]]
    assert side_rows and all(r["gt_side_agreement"] == 1.0 for r in side_rows)

    trl = datasets.load_from_disk(str(out / "exports" / "trl"))
    split = next(name for name, ds in trl.items() if len(ds))
    example = trl[split][0]
    assert isinstance(example["images"][0], Image.Image)  # images resolved under the MIMIC root

    for name in ("preferences", "sft"):
        for s in ("train", "validate", "test"):
            assert pq.read_table(export_dir / name / f"{s}-00000-of-00001.parquet").num_rows == len(
                datasets.load_from_disk(str(out / name))[s]
            )
    assert (export_dir / "README.md").exists() and (export_dir / "figures" / "agreement.png").exists()


# ---------------------------------------------------------------------------------------------
# Inputs and bad input
# ---------------------------------------------------------------------------------------------


def test_duplicate_keys_error_or_lenient_skip(tmp_path):
    rows = known_drift_rows()
    out = write_generate_shards(tmp_path / "run", rows)
    extra = tmp_path / "run" / "trajectories" / "A" / "part-all-1-000000.arrow"
    table = pa.Table.from_pylist(
        [trajectory_row("s-known", "A", "Left atelectasis again.")], schema=schemas.TRAJECTORY_SCHEMA
    )
    with pa.ipc.new_stream(str(extra), table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(InputError, match=r"duplicate key: sample 's-known' answered by model 'A'.*row 1"):
        load_trajectories([out])
    loaded, report = load_trajectories([out], lenient=True)
    assert report.duplicates_skipped == 1 and loaded.num_rows == len(rows)


def test_mismatched_ids_error_or_lenient_skip(tmp_path):
    rows = known_drift_rows()
    rows[1]["study_id"] = 59999999  # B says another study for the same sample id
    out = write_generate_shards(tmp_path / "run", rows)
    with pytest.raises(
        InputError, match=r"mismatched ids: sample 's-known' has study_id 50000001 vs 59999999"
    ):
        load_trajectories([out])
    loaded, report = load_trajectories([out], lenient=True)
    assert report.conflicting_samples_skipped == 1
    assert set(loaded.column("sample_id").to_pylist()) == {"s-lonely"}


def test_empty_texts_are_counted_skips(tmp_path):
    rows = known_drift_rows()
    rows[0]["text"] = "   "
    rows[1]["text"] = None
    out = write_generate_shards(tmp_path / "run", rows)
    summary = build_preferences([out], out, BuildOptions(processes=1, card=False))
    assert summary.load["empty_texts"] == 2 and summary.counts["trajectories"] == 3


def test_cxr_max_style_jsonl_with_aliases_and_unknown_columns(tmp_path):
    import datasets

    path = tmp_path / "cxrmax.jsonl"
    with path.open("w") as handle:
        for model, text in TEXTS.items():
            record = {
                "dicom_id": "d1",
                "source": model,
                "response": text,
                "split": "validation",
                "mood": "happy",
            }
            record.update({name: value for name, value in GT.items()})
            handle.write(json.dumps(record) + "\n")
    summary = build_preferences([str(path)], tmp_path / "out", BuildOptions(processes=1, card=False))
    assert summary.load["ignored_columns"] == {str(path): ["mood"]}
    row = datasets.load_from_disk(str(tmp_path / "out" / "preferences"))["validate"][0]
    assert row["sample_id"] == "d1" and row["rejected_models"][0] == "D"
    assert row["labels"]["Atelectasis"] == 1.0  # flat label columns mapped by name


def test_missing_required_column_names_file_and_field(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"sample_id": ["x"], "model": ["A"], "words": ["hi"]}), path)
    with pytest.raises(InputError, match=r"bad\.parquet field 'text': required column missing.*words"):
        load_trajectories([path])
    with pytest.raises(InputError, match="no such file"):
        load_trajectories([tmp_path / "nowhere"])


def test_push_to_hub_offline_fails_cleanly(known_build, monkeypatch):
    import huggingface_hub.constants

    from cxrmax.preferences.export import push_to_hub

    out, _ = known_build
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CxrmaxError, match="cannot push to the Hugging Face Hub repository 'me/cxr-max'.*HF_HUB_OFFLINE"
    ):
        push_to_hub(out, "me/cxr-max")
    # Without the variable, the library's own offline switch (or no network at all) ends the same way.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CxrmaxError, match="Nothing was uploaded"):
        push_to_hub(out, "me/cxr-max")
    assert not [p for p in out.iterdir() if p.name.startswith(".hub-")]


def test_cli_build_and_drift_report(tmp_path):
    from typer.testing import CliRunner

    from cxrmax.cli import app

    out = write_generate_shards(tmp_path / "run", known_drift_rows())
    runner = CliRunner()
    result = runner.invoke(
        app, ["build-preferences", str(out), "--out", str(out), "-j", "1", "--max-negatives", "3"]
    )
    assert result.exit_code == 0, result.output
    output = " ".join(result.output.split())  # rich wraps long lines
    assert "1 preference rows (3 negatives)" in output
    assert "samples with fewer than --min-sources sources: 1" in output
    result = runner.invoke(app, ["drift-report", str(out)])
    assert result.exit_code == 0, result.output
    assert "refusal" in result.output and "figure:" in result.output
    result = runner.invoke(app, ["drift-report", str(out), "--json", "-"])
    stats = json.loads(result.output)
    assert stats["per_model"]["D"]["refusal_rate"] == 1.0
    assert stats["agreement"][0][1] == 1.0 and stats["agreement"][0][2] == pytest.approx(1 - 2 / 14)
    assert stats["agreement_pairs"][0][1] == 1
    assert stats["per_model"]["C"]["laterality_error_rate"] == 1.0
    result = runner.invoke(
        app, ["build-preferences", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2


# ---------------------------------------------------------------------------------------------
# --consensus model (a real OpenAI-compatible server on 127.0.0.1)
# ---------------------------------------------------------------------------------------------

GOOD_CONSENSUS = (  # one line: the test server's stub answers normalise whitespace
    "1. There is left lower lobe atelectasis. 2. Bilateral pleural effusions are present. "
    "3. A pacemaker is in place. 4. There is no pneumothorax. "
    "In summary, the findings support left lower lobe atelectasis, bilateral pleural effusions and a pacemaker."
)


def test_model_consensus_exactly_once_and_flagging(tmp_path):
    import datasets

    from cxrmax.testing.openai_server import serve_in_thread

    out = write_generate_shards(tmp_path / "run", known_drift_rows())

    def build(server, target):
        options = BuildOptions(
            processes=1,
            consensus="model",
            card=False,
            export_trl=False,
            export_swift=False,
            model_backend={"backend": "openai", "model": "student", "base_urls": [server.base_url]},
        )
        summary = build_preferences([out], target, options)
        return summary, datasets.load_from_disk(str(target / "preferences"))["train"][0]

    with serve_in_thread(served_model_name="student", stub_text=GOOD_CONSENSUS) as server:
        server.set_faults(script=[500])  # the first try fails, the retry answers
        summary, row = build(server, out)
        assert row["chosen"] == GOOD_CONSENSUS and row["chosen_source"] == "consensus-model"
        assert row["consensus_flagged"] is False
        assert summary.counts["consensus_model_requests"] == 2 and server.stats["completed"] == 1
        # The answer is in generate's store (a committed shard under OUT/consensus/student/).
        shards_written = sorted((out / "consensus" / "student").glob("part-*.arrow"))
        stored = pa.concat_tables(pa.ipc.open_stream(str(p)).read_all() for p in shards_written)
        assert stored.column("text").to_pylist() == [GOOD_CONSENSUS]
        sent = stored.column("prompt")[0].as_py()
        assert "4 answers" in sent and "Answer 4:" in sent and "As an AI" not in sent  # refusal left out
        assert stored.column("model")[0].as_py() == "consensus/student"
        # A rerun sends nothing: exactly once.
        server.reset_stats()
        summary, row = build(server, out)
        assert server.stats["requests"] == 0 and summary.counts.get("consensus_model_requests", 0) == 0
        assert row["chosen"] == GOOD_CONSENSUS

    # Another model that answers with a wrong side and a hallucination is flagged.
    bad = "Right lower lobe atelectasis and cardiomegaly. Bilateral pleural effusions. A pacemaker."
    with serve_in_thread(served_model_name="sloppy", stub_text=bad) as server:
        options = BuildOptions(
            processes=1,
            consensus="model",
            card=False,
            model_backend={"backend": "openai", "model": "sloppy", "base_urls": [server.base_url]},
        )
        summary = build_preferences([out], tmp_path / "sloppy", options)
        row = datasets.load_from_disk(str(tmp_path / "sloppy" / "preferences"))["train"][0]
        assert row["chosen"] == bad and row["consensus_flagged"] is True
        assert summary.counts["consensus_flagged_model"] == 1


def test_consensus_prompt_template(tmp_path):
    from cxrmax.preferences.model_consensus import ConsensusPrompt

    prompt = ConsensusPrompt.load()
    text = prompt.render("Why?", ["first answer", "second answer"])
    assert prompt.id == "cxrmax-consensus-v1"
    assert "Question:\nWhy?" in text and "Answer 2:\nsecond answer" in text and "2 answers" in text
    bad = tmp_path / "bad.txt"
    bad.write_text("id: x\n---\nHello {name}\n")
    with pytest.raises(InputError, match="bad template field"):
        ConsensusPrompt.load(bad)


@pytest.mark.slow
def test_over_real_generate_output(mini_mimic, tmp_path):
    """generate (C's orchestrator, real HTTP to stub teachers on 127.0.0.1) -> build-preferences."""
    import datasets

    from cxrmax.generate.orchestrator import GenerateOptions, generate
    from cxrmax.generate.prompts import load_prompt
    from cxrmax.generate.roster import resolve_model
    from cxrmax.mimic.reader import MimicCXR, write_selection
    from cxrmax.testing.openai_server import serve_in_thread

    selection = write_selection(MimicCXR(mini_mimic).select(k=12, seed=0), tmp_path / "selection.parquet")
    teachers = {
        "left-1": "There is left lower lobe atelectasis. A pacemaker is in place.",
        "left-2": "Left lower lobe atelectasis is present. A cardiac pacemaker is seen.",
        "right": "Right lower lobe atelectasis is seen. A pacemaker is present. There is cardiomegaly.",
        "refuser": "As an AI, I'm not capable of providing medical diagnoses. Please consult a radiologist.",
    }
    out = tmp_path / "run"
    for name, text in teachers.items():
        with serve_in_thread(served_model_name=name, stub_text=text) as server:
            options = GenerateOptions(
                model=resolve_model(name),
                selection=selection,
                mimic_root=Path(mini_mimic),
                out=out,
                prompt=load_prompt("rationale"),
                base_urls=[server.base_url],
                concurrency=4,
                timeout=30.0,
            )
            generate(options)
    summary = build_preferences(
        [out], out, BuildOptions(processes=1, mimic_root=Path(mini_mimic), card=False)
    )
    assert sorted(summary.models) == sorted(teachers)
    assert summary.counts["trajectories"] == 4 * 12 and summary.counts["refusals"] == 12
    prefs = datasets.load_from_disk(str(out / "preferences"))
    rows = [r for ds in prefs.values() for r in ds]
    assert len(rows) == 12
    from cxrmax.generate import read_trajectories

    sent = read_trajectories(out, columns=["sample_id", "prompt", "image_path"]).to_pylist()
    sent_by_id = {r["sample_id"]: r for r in sent}
    for row in rows:
        assert row["prompt"] == sent_by_id[row["sample_id"]]["prompt"]
        assert row["image_path"] == sent_by_id[row["sample_id"]]["image_path"]
        assert row["rejected_models"][:2] == ["refuser", "right"]
        assert row["rejected_drift"][1] == pytest.approx(2 / 3)  # wrong side + hallucinated cardiomegaly
        assert (
            row["consensus_labels"]["Atelectasis"] == 1.0 and row["consensus_labels"]["Cardiomegaly"] is None
        )
        assert "left" in row["chosen"] and row["consensus_flagged"] is False


def test_datasets_directory_input_and_hub_id_offline(tmp_path, monkeypatch):
    import datasets
    import datasets.config
    import huggingface_hub.constants

    table = pa.Table.from_pylist(known_drift_rows(), schema=schemas.TRAJECTORY_SCHEMA)
    datasets.DatasetDict({"train": datasets.Dataset(table)}).save_to_disk(str(tmp_path / "saved"))
    loaded, report = load_trajectories([tmp_path / "saved"])
    assert loaded.num_rows == 6 and len(report.files) == 1 and report.files[0].endswith(".arrow")

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        InputError, match="nobody/cxr-max: no such local path, and cannot load from the Hugging Face Hub"
    ):
        load_trajectories(["nobody/cxr-max"])


def test_trajectories_of_studies_missing_from_the_mimic_root_are_counted(mini_mimic, tmp_path):
    out = write_generate_shards(
        tmp_path / "run", known_drift_rows()
    )  # study 50000001/2: not in the mini root
    summary = build_preferences(
        [out], tmp_path / "o", BuildOptions(processes=1, mimic_root=Path(mini_mimic), card=False)
    )
    assert summary.studies_not_in_mimic == 6 and summary.counts["preference_rows"] == 1


def test_model_consensus_refuses_external_endpoints(tmp_path, monkeypatch):
    import cxrmax.generate.backends
    from cxrmax.generate.governance import ExternalEndpointError

    def never(*args, **kwargs):  # safety net: this test must never open a connection
        raise AssertionError("a backend was built for a public address")

    monkeypatch.setattr(cxrmax.generate.backends, "make_backend", never)
    out = write_generate_shards(tmp_path / "run", known_drift_rows())
    options = BuildOptions(
        processes=1,
        consensus="model",
        card=False,
        # A public address: classified as external and refused before anything is sent.
        model_backend={"backend": "openai", "model": "student", "base_urls": ["http://8.8.8.8:8000/v1"]},
    )
    with pytest.raises(ExternalEndpointError, match="refusing to send MIMIC-CXR"):
        build_preferences([out], tmp_path / "o", options)
    assert not (tmp_path / "o" / "preferences").exists()


def test_failed_build_leaves_previous_outputs_whole(tmp_path, monkeypatch):
    import datasets

    from cxrmax.preferences import datacard

    out = write_generate_shards(tmp_path / "run", known_drift_rows())
    build_preferences([out], out, BuildOptions(processes=1, card=False))
    before = datasets.load_from_disk(str(out / "preferences"))["train"][0]

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C at the last step before publishing

    monkeypatch.setattr(datacard, "write_card", crash)
    with pytest.raises(KeyboardInterrupt):
        build_preferences([out], out, BuildOptions(processes=1, max_negatives=1))
    after = datasets.load_from_disk(str(out / "preferences"))["train"][0]
    assert after == before and len(after["rejected"]) == 5  # not the half-built max-negatives=1 run
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert (out / "exports" / "trl").is_dir() and not (out / "README.md").exists()
    # A build without exports removes the earlier ones (they would not match the new rows).
    monkeypatch.undo()
    build_preferences([out], out, BuildOptions(processes=1, card=False, export_trl=False, export_swift=False))
    assert not (out / "exports").exists()


def test_selected_positive_is_the_closest_source_answer_in_its_own_words(tmp_path):
    """--positive selected: the least drifting answer (A and B tie at 0; B is the shorter) is the
    positive as written; A, as close as it, is no negative; the drifting ones stay, most drifting first.
    An answer cut at max_tokens is never the positive."""
    import datasets

    out = write_generate_shards(tmp_path / "run", known_drift_rows())
    summary = build_preferences([out], tmp_path / "sel", BuildOptions(processes=1, positive="selected"))
    row = datasets.load_from_disk(str(tmp_path / "sel" / "preferences"))["train"][0]
    assert row["chosen"] == TEXTS["B"] and row["chosen_source"] == "selected:B"
    assert row["rejected_models"] == ["D", "E", "C"]
    assert summary.counts["negatives_tied_with_selected_positive"] == 1
    assert summary.positive == "selected"
    assert "closest to the sources' consensus" in (tmp_path / "sel" / "README.md").read_text()

    rows = known_drift_rows()
    for r in rows:
        if r["model"] == "B":
            r["finish_reason"] = "length"
    out2 = write_generate_shards(tmp_path / "run2", rows)
    build_preferences([out2], tmp_path / "cut", BuildOptions(processes=1, positive="selected", card=False))
    row = datasets.load_from_disk(str(tmp_path / "cut" / "preferences"))["train"][0]
    assert row["chosen_source"] == "selected:A" and row["rejected_models"][0] == "D"


def test_cli_positive_selected(tmp_path):
    import datasets
    from typer.testing import CliRunner

    from cxrmax.cli import app

    out = write_generate_shards(tmp_path / "run", known_drift_rows())
    runner = CliRunner()
    result = runner.invoke(
        app, ["build-preferences", str(out), "--out", str(tmp_path / "o"), "--positive", "selected"]
    )
    assert result.exit_code == 0, result.output
    assert "1 preference rows (3 negatives)" in " ".join(result.output.split())
    row = datasets.load_from_disk(str(tmp_path / "o" / "preferences"))["train"][0]
    assert row["chosen_source"] == "selected:B"
    result = runner.invoke(
        app,
        [
            "build-preferences",
            str(out),
            "--out",
            str(tmp_path / "p"),
            "--positive",
            "selected",
            "--consensus",
            "model",
        ],
    )
    assert result.exit_code != 0 and "--positive selected" in " ".join(result.output.split())


def test_selected_positive_with_a_model_consensus_is_refused(tmp_path):
    out = write_generate_shards(tmp_path / "run", known_drift_rows())
    with pytest.raises(InputError, match="--positive selected"):
        build_preferences([out], tmp_path / "x", BuildOptions(positive="selected", consensus="model"))
    with pytest.raises(InputError, match="--positive must be"):
        build_preferences([out], tmp_path / "y", BuildOptions(positive="best"))
