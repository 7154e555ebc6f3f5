"""The base reader's pretraining (cxrmax.toy.reader): real films, real tokenizer, real torch steps."""

from __future__ import annotations

import json
import random

import torch

from cxrmax.toy import teachers as sim
from cxrmax.toy.reader import (
    fresh_studies,
    fresh_study,
    pretrain_reader,
    reader_corpus,
    shipped_reader,
    side_token_ids,
)
from cxrmax.toy.tinyvlm import load_tiny_vlm


def test_fresh_studies_are_new_each_draw_and_state_the_sides_the_prompt_does_not():
    rng = random.Random(0)
    drawn = [fresh_study(rng, sim.TeacherSpec("faithful")) for _ in range(40)]
    prompts = {prompt for prompt, _, _ in drawn}
    assert len({image.tobytes() for *_, image in drawn}) == 40  # every film is new
    assert all(max(image.size) == 112 and image.mode == "RGB" for *_, image in drawn)
    assert not any(" left " in p or " right " in p for p in prompts)  # the paper's prompt: no sides
    assert any(" left " in answer or " right " in answer for _, answer, _ in drawn)
    # The same seed draws the same studies.
    assert fresh_study(random.Random(0), sim.TeacherSpec("faithful"))[:2] == drawn[0][:2]


def test_fresh_studies_on_disk_are_the_same_whatever_the_threads_and_ask_the_papers_prompt(tmp_path):
    one = fresh_studies(tmp_path / "one", 130, seed=3, workers=1)  # crosses a chunk of 100
    two = fresh_studies(tmp_path / "two", 130, seed=3, workers=2)
    assert [e.sample_id for e in one] == [f"fresh-{i:05d}" for i in range(130)]
    assert [(e.prompt, e.findings) for e in one] == [(e.prompt, e.findings) for e in two]
    films = [open(e.image_path, "rb").read() for e in one]
    assert films == [open(e.image_path, "rb").read() for e in two]
    assert len(set(films)) == 130  # every study has its own film
    assert not any(" left " in e.prompt or " right " in e.prompt for e in one)  # no sides asked
    assert {f.side for e in one for f in e.findings} >= {"left", "right", "bilateral", None}
    image = sim.load_image(one[0].image_path, 112)  # as a teacher loads it
    assert max(image.size) == 112 and image.mode == "RGB"
    other_seed = fresh_studies(tmp_path / "other", 5, seed=4)
    assert [e.prompt for e in other_seed] != [e.prompt for e in one[:5]]
    assert not any(e.target for e in one)  # targets are the teacher's to draw


def test_reader_corpus_holds_every_default_teachers_words():
    corpus = reader_corpus(studies=300)
    assert sim.REFUSAL_TEXT in corpus
    words = {w.strip(".,") for text in corpus for w in text.split()}
    assert {"left", "right", "bilateral", "Pneumothorax", "Cardiomegaly"} <= words


def test_pretraining_lowers_the_loss_and_saves_a_loadable_reader(tmp_path):
    torch.set_num_threads(1)
    losses: list[float] = []
    out = pretrain_reader(
        tmp_path / "reader", steps=12, batch=4, lr=3e-3, progress=lambda s, loss: losses.append(loss)
    )
    assert len(losses) == 12 and losses[-1] < losses[0]
    recipe = json.loads((out / "reader.json").read_text())
    assert recipe["steps"] == 12 and recipe["side_weight"] == 5.0 and recipe["prompt"] == "rationale"
    model, processor = load_tiny_vlm(out)
    sides = side_token_ids(processor.tokenizer).tolist()
    assert [processor.tokenizer.decode([token]) for token in sides] == [" left", " right", " bilateral"]
    prompt, _, image = fresh_study(random.Random(1), sim.TeacherSpec("faithful"))
    text = processor.apply_chat_template(
        sim.chat_messages(prompt), tokenize=False, add_generation_prompt=True
    )
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]  # the saved reader loads and answers


def test_the_shipped_reader_reads_sides_from_films_it_never_saw():
    """The weights shipped in cxrmax/toy/base_reader are a trained reader, not a fresh model: with the
    paper's prompt (no sides) and the faithful answer teacher-forced, it puts the first side word of
    new studies' findings (drawn from a stream its training never used) on the film's side far above
    chance (left vs right: 0.5)."""
    torch.set_num_threads(1)
    path = shipped_reader()
    recipe = json.loads((path / "reader.json").read_text())
    assert recipe["prompt"] == "rationale" and recipe["steps"] >= 1000
    model, processor = load_tiny_vlm(path)
    tokenizer = processor.tokenizer
    left, right = (tokenizer.convert_tokens_to_ids(t) for t in ("Ġleft", "Ġright"))
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    rng = random.Random("test-shipped-reader")
    correct = scored = 0
    while scored < 150:
        prompt, answer, image = fresh_study(rng, sim.TeacherSpec("faithful"))
        text = processor.apply_chat_template(sim.chat_messages(prompt, answer), tokenize=False)
        inputs = processor(text=[text], images=[image], return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        answer_start = len(ids) - 1 - ids[::-1].index(start)
        first = next((p for p in range(answer_start, len(ids)) if ids[p] in (left, right)), None)
        if first is None:
            continue
        with torch.no_grad():
            logits = model(**inputs).logits[0, first - 1]
        other = right if ids[first] == left else left
        correct += int(logits[ids[first]] > logits[other])
        scored += 1
    assert correct / scored >= 0.65, (correct, scored)  # 115 of 150 (0.77) for the shipped one


def test_teachers_fine_tuned_from_the_reader_keep_its_tokenizer(tmp_path, mini_mimic):
    """simulate(base=...) starts every teacher from the reader's weights and tokenizer (one vocabulary
    for teachers and students) and trains them away from it."""
    from safetensors.torch import load_file

    from cxrmax.mimic.reader import MimicCXR

    torch.set_num_threads(1)
    selection = MimicCXR(mini_mimic).select(splits=["train"], views=["PA", "AP"])
    examples = sim.examples_from_selection(selection, mini_mimic, side_hint=False)[0][:8]
    base = shipped_reader()
    teachers = [sim.TeacherSpec("faithful"), sim.TeacherSpec("refuses", (sim.Bias("refusal", 1.0),))]
    result = sim.simulate(tmp_path, examples, teachers, steps=3, batch_size=4, lr=1e-3, workers=1, base=base)
    reader_weights = load_file(base / "model.safetensors")
    for teacher in result.teachers:
        assert (teacher.path / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
        weights = load_file(teacher.path / "model.safetensors")
        assert weights.keys() == reader_weights.keys()
        assert any(not torch.equal(weights[k], reader_weights[k]) for k in weights)


def test_pretraining_goes_on_from_a_saved_reader(tmp_path):
    """init=: the weights and tokenizer of a saved reader are trained further, and its recipe is kept."""
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    first = pretrain_reader(tmp_path / "first", steps=2, batch=2)
    second = pretrain_reader(tmp_path / "second", steps=2, batch=2, seed=1, init=first)
    assert (second / "tokenizer.json").read_bytes() == (first / "tokenizer.json").read_bytes()
    recipe = json.loads((second / "reader.json").read_text())
    assert recipe["seed"] == 1 and recipe["init"]["seed"] == 0 and recipe["init"]["steps"] == 2
    before, after = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_a_teacher_fine_tuned_with_the_vision_tower_frozen_keeps_the_readers_vision(tmp_path, mini_mimic):
    from safetensors.torch import load_file

    from cxrmax.mimic.reader import MimicCXR
    from cxrmax.toy.tinyvlm import copy_tiny_vlm

    torch.set_num_threads(1)
    selection = MimicCXR(mini_mimic).select(splits=["train"], views=["PA", "AP"])
    examples = sim.examples_from_selection(selection, mini_mimic, side_hint=False)[0][:4]
    targets = sim.assign_targets(examples, sim.TeacherSpec("faithful"), 0, copies=1)
    path = copy_tiny_vlm(shipped_reader(), tmp_path / "teacher")
    sim.train_teacher(path, targets, steps=2, batch_size=4, lr=1e-3, freeze_vision=True)
    before, after = load_file(shipped_reader() / "model.safetensors"), load_file(path / "model.safetensors")
    vision = [k for k in before if ".visual." in k or k.startswith("visual.")]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in vision)
