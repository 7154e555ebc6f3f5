"""The base reader's pretraining (cxrmax.toy.reader): real films, real tokenizer, real torch steps."""

from __future__ import annotations

import json
import random

import torch

from cxrmax.toy import teachers as sim
from cxrmax.toy.reader import fresh_study, pretrain_reader, reader_corpus, side_token_ids
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
