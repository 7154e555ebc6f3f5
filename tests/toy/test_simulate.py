"""Drifting teachers: the injected biases (read back by the real labeler), the training examples built
from a mini MIMIC-CXR, and a real training run whose model shows its bias."""

from __future__ import annotations

import random

import pytest

from cxrmax.core.errors import InputError
from cxrmax.labeler import label_text
from cxrmax.toy import teachers as sim

FINDINGS = [
    sim.Finding("Atelectasis"),
    sim.Finding("Pleural Effusion", "left"),
    sim.Finding("Pneumothorax", "right"),
    sim.Finding("Cardiomegaly"),
]


def _positives(text: str) -> dict[str, str | None]:
    labeled = label_text(text)
    return {name: obs.laterality for name, obs in labeled.observations.items() if obs.status == "positive"}


def test_faithful_answer_states_exactly_the_findings_with_their_sides():
    text = sim.faithful_answer(FINDINGS)
    found = _positives(text)
    assert set(found) == {"Atelectasis", "Pleural Effusion", "Pneumothorax", "Cardiomegaly"}
    assert found["Pleural Effusion"] == "left" and found["Pneumothorax"] == "right"
    assert not label_text(text).is_refusal


def test_laterality_bias_swaps_left_and_right_only():
    teacher = sim.TeacherSpec("t", (sim.Bias("laterality", 1.0),))
    text, applied = sim.biased_answer(FINDINGS, teacher, random.Random(0))
    found = _positives(text)
    assert applied == ["laterality"]
    assert found["Pleural Effusion"] == "right" and found["Pneumothorax"] == "left"
    bilateral = [sim.Finding("Pleural Effusion", "bilateral")]
    text, applied = sim.biased_answer(bilateral, teacher, random.Random(0))
    assert _positives(text)["Pleural Effusion"] == "bilateral" and applied == []  # nothing to swap


def test_hallucination_asserts_an_absent_finding():
    teacher = sim.TeacherSpec("t", (sim.Bias("hallucination", 1.0, "Pneumothorax"),))
    text, applied = sim.biased_answer(FINDINGS, teacher, random.Random(0))
    extra = set(_positives(text)) - {f.observation for f in FINDINGS}
    # Pneumothorax is present already, so the next fallback is asserted instead
    assert applied == ["hallucination"] and extra == {"Fracture"}
    text, _ = sim.biased_answer([sim.Finding("Edema")], teacher, random.Random(1))
    assert set(_positives(text)) == {"Edema", "Pneumothorax"}


def test_refusal_and_verbosity_are_read_by_the_labeler():
    refuser = sim.TeacherSpec("r", (sim.Bias("refusal", 1.0),))
    text, applied = sim.biased_answer(FINDINGS, refuser, random.Random(0))
    assert applied == ["refusal"] and label_text(text).is_refusal
    verbose = sim.TeacherSpec("v", (sim.Bias("verbosity", 1.0),))
    text, applied = sim.biased_answer(FINDINGS, verbose, random.Random(0))
    assert applied == ["verbosity"]
    assert len(text.split()) > 2.5 * len(sim.faithful_answer(FINDINGS).split())
    assert set(_positives(text)) == {f.observation for f in FINDINGS}  # padding adds no claims
    assert label_text(text).hedging  # "clinical correlation is recommended"


def test_rates_are_honoured_and_deterministic():
    teacher = sim.TeacherSpec("t", (sim.Bias("refusal", 0.3),))
    examples = [sim.Example(str(i), "x.jpg", "p", FINDINGS) for i in range(2000)]
    first = sim.assign_targets(examples, teacher, seed=3)
    share = sum("refusal" in e.applied for e in first) / len(first)
    assert 0.26 < share < 0.34
    again = sim.assign_targets(examples, teacher, seed=3)
    assert [e.target for e in again] == [e.target for e in first]
    other = sim.assign_targets(examples, teacher, seed=4)
    assert [e.target for e in other] != [e.target for e in first]


def test_bias_and_teacher_parsing():
    assert sim.Bias.parse("laterality:0.7") == sim.Bias("laterality", 0.7)
    assert sim.Bias.parse("hallucination:0.5:fracture") == sim.Bias("hallucination", 0.5, "Fracture")
    mixed = sim.parse_teacher("mixed=refusal:0.2+verbosity")
    assert mixed.name == "mixed" and [b.kind for b in mixed.biases] == ["refusal", "verbosity"]
    assert sim.parse_teacher("ref=none").biases == ()
    for bad in ("colour:0.5", "refusal:1.5", "refusal:x", "hallucination:1:spleen"):
        with pytest.raises(InputError):
            sim.Bias.parse(bad)
    with pytest.raises(InputError, match="NAME=BIAS"):
        sim.parse_teacher("lefty")


def test_default_teacher_sets():
    names = [t.name for t in sim.default_teachers()]
    assert names == ["faithful", "swaps-sides", "hallucinates", "refuses", "verbose"]
    seven = sim.default_teachers(count=7, kinds=["laterality", "refusal"], rates={"refusal": 0.2})
    assert [t.name for t in seven] == [
        "faithful",
        "swaps-sides",
        "refuses",
        "swaps-sides-2",
        "refuses-2",
        "swaps-sides-3",
        "refuses-3",
    ]
    assert seven[2].rate("refusal") == 0.2 and seven[1].rate("refusal") == 0.0
    assert [t.name for t in sim.default_teachers(faithful=False, kinds=["verbosity"])] == ["verbose"]


def test_examples_from_a_mini_mimic_use_generate_prompts_and_report_sides(mini_mimic):
    from cxrmax.generate.prompts import load_prompt
    from cxrmax.mimic.reader import MimicCXR

    selection = MimicCXR(mini_mimic).select(views=["PA", "AP"])
    rows = selection.to_pylist()
    paper = load_prompt("rationale")
    sided_total = 0
    for side_hint in (True, False):
        examples, prompt = sim.examples_from_selection(selection, mini_mimic, side_hint=side_hint)
        assert len(examples) == len(rows)
        for example, row in zip(examples, rows, strict=True):
            assert example.prompt == prompt.render(row)  # exactly what generate will send
            assert (mini_mimic / row["image_path"]).as_posix() == example.image_path
            positives = {n for n, v in row["labels"].items() if v == 1.0 and n != "No Finding"}
            assert {f.observation for f in example.findings} == positives
            report = " ".join(t for t in (row["findings"], row["impression"]) if t)
            for finding in example.findings:
                if finding.side is None:
                    continue
                assert finding.side == sim.report_sides(report)[finding.observation]
                if side_hint:
                    sided_total += 1
                    assert f"{finding.side} {finding.observation}" in example.prompt
                else:
                    assert finding.observation in sim.FILM_SIDED
            if not side_hint:
                assert example.prompt == paper.render(row)  # the paper's prompt, untouched
        assert prompt.id == ("rationale-v1-sided" if side_hint else "rationale-v1")
    assert sided_total >= 3


@pytest.mark.slow
def test_a_trained_teacher_shows_its_injected_bias(tmp_path, mini_mimic):
    """A real training run: the refusing teacher (rate 1) refuses, the faithful one states the labels."""
    import torch

    from cxrmax.mimic.reader import MimicCXR
    from cxrmax.toy.tinyvlm import load_tiny_vlm

    selection = MimicCXR(mini_mimic).select(splits=["train"], views=["PA", "AP"])
    examples = sim.examples_from_selection(selection, mini_mimic)[0][:12]
    teachers = [sim.TeacherSpec("faithful"), sim.TeacherSpec("refuses", (sim.Bias("refusal", 1.0),))]
    result = sim.simulate(tmp_path, examples, teachers, steps=45, batch_size=8, lr=5e-3, seed=0, max_edge=56)
    spec = (tmp_path / "drift_spec.json").read_text()
    assert '"refuses"' in spec and "refuses to interpret in 100% of answers" in spec
    outputs = {}
    for teacher in result.teachers:
        assert teacher.stats.last_loss < teacher.stats.first_loss / 3
        model, processor = load_tiny_vlm(teacher.path)
        example = examples[0]
        text = processor.apply_chat_template(sim.chat_messages(example.prompt), add_generation_prompt=True)
        inputs = processor(text=[text], images=[sim.load_image(example.image_path, 56)], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
        outputs[teacher.spec.name] = processor.tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
    assert label_text(outputs["refuses"]).is_refusal, outputs["refuses"]
    assert not label_text(outputs["faithful"]).is_refusal, outputs["faithful"]
    assert outputs["faithful"].startswith("The patient is diagnosed with")


@pytest.mark.slow
def test_simulate_cli_trains_teachers_and_generates_their_answers(tmp_path, mini_mimic):
    """`cxrmax simulate` end to end on a mini MIMIC-CXR (few steps: the mechanics, not the quality)."""
    import json

    from typer.testing import CliRunner

    from cxrmax.cli import app
    from cxrmax.generate import read_trajectories

    out = tmp_path / "sim"
    args = ["simulate", "--out", str(out), "--mimic-root", str(mini_mimic), "--teacher", "ref=none"]
    args += ["--teacher", "mixed=refusal:0.5+laterality:0.9", "--steps", "4", "--samples", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    spec = json.loads((out / "teachers" / "drift_spec.json").read_text())
    assert [t["name"] for t in spec["teachers"]] == ["ref", "mixed"]
    assert spec["teachers"][1]["biases"] == [
        {"kind": "refusal", "rate": 0.5, "observation": None},
        {"kind": "laterality", "rate": 0.9, "observation": None},
    ]
    assert 0.2 < spec["teachers"][1]["applied_rates"]["refusal"] < 0.8
    table = read_trajectories(out)
    assert set(table.column("model").to_pylist()) == {"ref", "mixed"}
    assert set(table.column("split").to_pylist()) == {"test"}
    assert "Measured drift on the test split" in result.output
    bad = CliRunner().invoke(
        app, ["simulate", "-o", str(out), "--mimic-root", str(mini_mimic), "--bias", "colour"]
    )
    assert bad.exit_code == 2 and "unknown bias" in bad.output


def test_each_image_carries_the_bias_as_a_rate_across_its_copies():
    """A teacher must learn a bias as a probability, not as a list of images to refuse: each image is
    trained on several copies, each with its own draw."""
    teacher = sim.TeacherSpec("t", (sim.Bias("refusal", 0.5),))
    examples = [sim.Example(str(i), f"{i}.jpg", "p", FINDINGS) for i in range(200)]
    targets = sim.assign_targets(examples, teacher, seed=0)
    assert len(targets) == sim.TARGET_COPIES * len(examples)
    per_image: dict[str, set[bool]] = {}
    for ex in targets:
        per_image.setdefault(ex.sample_id, set()).add("refusal" in ex.applied)
    mixed = sum(len(kinds) == 2 for kinds in per_image.values()) / len(per_image)
    assert mixed > 0.75  # 1 - 2 * 0.5**4 = 0.875 expected
