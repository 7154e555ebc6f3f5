"""The demo's base reader: the tiny VLM pretrained once to state the sides it reads from the film.

Real teachers and students start from a pretrained VLM that can already see which side a finding is
on; a tiny VLM trained from scratch for the demo's few hundred steps cannot (benchmark/studies/
side_reading.py: with the paper's prompt, which names the diagnoses but no sides, every teacher
trained on the mini MIMIC-CXR's fixed train films stated sides at chance on new films). What it takes
is many films it has not seen before, each a new study (so that the side can be memorised neither
from the image nor from the prompt naming the study), and a heavier loss on the side words (one token
in about thirty of an answer whose rest restates the prompt). :func:`pretrain_reader` trains that;
5,000 steps cost about 35 minutes of one CPU core (2,101 s for the shipped reader, beside other
work). One reader so trained ships with cxrmax
(:data:`SHIPPED_READER`, its recipe in ``reader.json``): the demo fine-tunes its teachers and students
from it, as the real pipeline fine-tunes a pretrained checkpoint (benchmark/studies/README.md, "A base
reader", measures how far that gets). To make another:

    python -m cxrmax.toy.reader --out reader --steps 5000 --checkpoint-every 500

The reader's tokenizer is trained on :func:`reader_corpus` (prompts and every default teacher's
answers about studies drawn with the mini MIMIC-CXR's odds), which holds every word the demo's
teachers write, so a demo of any size can share it.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from cxrmax.core.errors import InputError
from cxrmax.core.io import atomic_write_json
from cxrmax.mimic.images import RESAMPLE, encode_jpeg, target_size
from cxrmax.testing.films import synthetic_chest
from cxrmax.testing.mini_mimic import draw_labels
from cxrmax.toy import teachers as sim
from cxrmax.toy.tinyvlm import build_tiny_vlm, copy_tiny_vlm, load_tiny_vlm

#: Film edge the reader is trained at: the demo's images.
EDGE = 112

#: The base reader shipped with cxrmax (:func:`pretrain_reader`'s output; reader.json holds its
#: recipe): the model the demo's teachers and students are fine-tuned from.
SHIPPED_READER = Path(__file__).parent / "base_reader"


def shipped_reader() -> Path:
    """The folder of the shipped base reader (an InputError naming it when the install lacks it)."""
    if not (SHIPPED_READER / "model.safetensors").is_file():
        raise InputError(
            f"{SHIPPED_READER}: the base reader's weights are missing from this install; reinstall "
            "cxrmax or make them with python -m cxrmax.toy.reader --out DIR --steps 5000"
        )
    return SHIPPED_READER


def reader_corpus(seed: int = 0, studies: int = 2000) -> list[str]:
    """Texts the reader's tokenizer is trained on: the paper's prompt and every default teacher's
    answer about ``studies`` studies drawn with the mini MIMIC-CXR's odds, plus the refusal."""
    rng = random.Random(f"reader-corpus:{seed}")
    render = sim.prompt_renderer("rationale")
    texts = {sim.REFUSAL_TEXT}
    for _ in range(studies):
        labels, sides, _ = draw_labels(rng, rng.random() < 0.2, rng.random() < 0.3)
        findings = sim.positive_findings(labels, sim.visible_sides(sides))
        texts.add(render({"labels": labels, "view": rng.choice(["PA", "AP"]), "sample_id": "x"}, findings))
        for teacher in sim.default_teachers():
            texts.add(sim.biased_answer(findings, teacher, rng)[0])
    return sorted(texts)


def draw_film(
    rng: random.Random, labels: dict[str, Any], sides: dict[str, Any], view: str, edge: int = EDGE
) -> Image.Image:
    """A new film of a study with these labels and sides (anatomy, exposure and noise drawn from
    ``rng``), resized and JPEG-compressed as the mini MIMIC-CXR's images are."""
    image = _resized_film(rng, labels, sides, view, edge)
    return Image.open(io.BytesIO(encode_jpeg(image))).convert("RGB")


def _resized_film(
    rng: random.Random, labels: dict[str, Any], sides: dict[str, Any], view: str, edge: int
) -> Image.Image:
    """:func:`draw_film` before its JPEG round trip (grayscale, ``edge`` on its long side)."""
    width = rng.randrange(300, 500)
    height = int(width * rng.uniform(1.05, 1.3))
    pixels = synthetic_chest(width, height, rng.getrandbits(32), view=view, labels=labels, sides=sides)
    return Image.fromarray(pixels).resize(target_size(width, height, edge, None), RESAMPLE)


def fresh_study(
    rng: random.Random,
    teacher: sim.TeacherSpec,
    render: Callable[[dict[str, Any], list[sim.Finding]], str] | None = None,
    edge: int = EDGE,
) -> tuple[str, str, Image.Image]:
    """(prompt, ``teacher``'s answer, film) of one study drawn anew: labels, sides and view with the
    mini MIMIC-CXR's odds, the film drawn by :func:`draw_film`."""
    render = render or sim.prompt_renderer("rationale")
    labels, sides, _ = draw_labels(rng, rng.random() < 0.2, rng.random() < 0.3)
    findings = sim.positive_findings(labels, sim.visible_sides(sides))
    view = rng.choice(["PA", "AP"])
    prompt = render({"labels": labels, "view": view, "sample_id": "fresh"}, findings)
    image = draw_film(rng, labels, sides, view, edge)
    return prompt, sim.biased_answer(findings, teacher, rng)[0], image


#: Studies drawn per job of :func:`fresh_studies`: the draws do not depend on the number of workers.
_CHUNK = 100


def _fresh_chunk(arg: tuple[Path, int, int, int, int]) -> list[tuple[str, str, dict, dict, str]]:
    """Studies ``start .. start + count`` of :func:`fresh_studies`: their films saved (PNG: lossless,
    so that the one JPEG round trip is the one every image gets when loaded) and what they show."""
    folder, seed, start, count, edge = arg
    rng = random.Random(f"fresh-studies:{seed}:{start}")
    drawn = []
    for number in range(start, start + count):
        labels, sides, _ = draw_labels(rng, rng.random() < 0.2, rng.random() < 0.3)
        view = rng.choice(["PA", "AP"])
        sample_id = f"fresh-{number:05d}"
        path = folder / f"{sample_id}.png"
        _resized_film(rng, labels, sides, view, edge).save(path)
        drawn.append((sample_id, str(path), labels, sides, view))
    return drawn


def fresh_studies(
    folder: str | Path,
    count: int,
    seed: int = 0,
    prompt: Any = "rationale",
    edge: int = EDGE,
    workers: int = 1,
) -> list[sim.Example]:
    """``count`` studies drawn anew with the mini MIMIC-CXR's odds (labels, sides, view), their films
    saved under ``folder``, as teacher examples asked ``prompt`` (targets not set yet).

    The demo's teachers learn from these, not from the mini MIMIC-CXR's train films: real teachers
    were trained on other data than the study set they answer, and a tiny teacher fine-tuned on the
    148 train films a few dozen times each learns the answer of each film instead of its own rule
    (the side-swapping teacher, trained to mirror 9 sides in 10, then mirrors the first side word
    on new films about half the time: benchmark/studies/README.md, "Teachers that learn elsewhere").
    The same ``seed`` gives the same studies whatever ``workers`` (threads drawing them)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder, seed, start, min(_CHUNK, count - start), edge) for start in range(0, count, _CHUNK)]
    # Threads, not processes: drawing is numpy and Pillow work that releases the GIL, and a spawned
    # process would first spend seconds importing torch.
    with ThreadPoolExecutor(max(1, workers)) as pool:
        chunks = list(pool.map(_fresh_chunk, jobs))  # in the order of starts
    render = sim.prompt_renderer(prompt)
    examples = []
    for chunk in chunks:
        for sample_id, path, labels, sides, view in chunk:
            findings = sim.positive_findings(labels, sim.visible_sides(sides))
            prompt_text = render({"labels": labels, "view": view, "sample_id": sample_id}, findings)
            examples.append(sim.Example(sample_id, path, prompt_text, findings))
    return examples


#: The answer's side words. "bilateral" is one of them: the demo's side error compares it like the
#: others, and a reader whose extra loss covers left and right only never learns to tell a finding on
#: both sides from one on one side (benchmark/studies/README.md, "A base reader").
SIDE_WORDS = ("Ġleft", "Ġright", "Ġbilateral")


def side_token_ids(tokenizer: Any) -> torch.Tensor:
    """Ids of the answer's side words (:data:`SIDE_WORDS`)."""
    return torch.tensor([tokenizer.convert_tokens_to_ids(t) for t in SIDE_WORDS])


def pretrain_reader(
    out: str | Path,
    steps: int = 8000,
    lr: float = 1e-3,
    side_weight: float = 5.0,
    batch: int = 16,
    seed: int = 0,
    edge: int = EDGE,
    checkpoint_every: int = 0,
    progress: Callable[[int, float], None] | None = None,
    draw: Callable[[random.Random], tuple[str, str, Image.Image]] | None = None,
    corpus: list[str] | None = None,
    rng: random.Random | None = None,
    init: str | Path | None = None,
) -> Path:
    """Build the tiny VLM with the reader's tokenizer and train it to write the faithful teacher's
    answer, with the paper's prompt, about ``batch`` new studies every step (AdamW, 20 warm-up steps,
    linear decay, gradients clipped at 1). The loss is the answer's mean token cross-entropy plus
    ``side_weight`` times that of its side words. ``checkpoint_every``: also save ``out/step-N``.

    Studies (benchmark/studies/side_reading.py): ``draw(rng)`` makes each training example instead of
    :func:`fresh_study` with the faithful teacher, ``corpus`` trains the tokenizer instead of
    :func:`reader_corpus`, ``rng`` replaces the reader's own random stream.

    ``init``: go on training a saved reader (its weights and tokenizer) instead of a new model; give
    another ``seed`` so that the studies drawn are new ones. Its recipe is kept under ``init`` in
    the new ``reader.json``."""
    out = Path(out)
    previous = None
    if init is not None:
        copy_tiny_vlm(init, out)
        recipe_file = Path(init) / "reader.json"
        previous = json.loads(recipe_file.read_text()) if recipe_file.is_file() else {"path": str(init)}
    else:
        build_tiny_vlm(out, corpus=reader_corpus(seed) if corpus is None else corpus, seed=seed)
    model, processor = load_tiny_vlm(out)
    tokenizer = processor.tokenizer
    sides = side_token_ids(tokenizer)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    if draw is None:
        faithful, render = sim.TeacherSpec("faithful"), sim.prompt_renderer("rationale")

        def draw(rng: random.Random) -> tuple[str, str, Image.Image]:
            return fresh_study(rng, faithful, render, edge)

    rng = rng or random.Random(f"reader:{seed}")
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * max(0.0, 1 - step / steps)
    )
    model.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        drawn = [draw(rng) for _ in range(batch)]
        texts = [
            processor.apply_chat_template(sim.chat_messages(prompt, answer), tokenize=False)
            for prompt, answer, _ in drawn
        ]
        inputs = processor(
            text=texts, images=[image for *_, image in drawn], return_tensors="pt", padding=True
        )
        ids = inputs["input_ids"]
        labels = ids.clone()
        for row, tokens in enumerate(ids.tolist()):
            labels[row, : len(tokens) - tokens[::-1].index(start) + 2] = -100  # prompt and "assistant\n"
        labels[inputs["attention_mask"] == 0] = -100
        logits = model(**inputs).logits[:, :-1]
        targets = labels[:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
        ).view(targets.shape)
        side = torch.isin(targets, sides)
        loss = losses[targets != -100].mean()
        token_loss = loss.item()
        if side_weight and side.any():
            loss = loss + side_weight * losses[side].mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if progress is not None:
            progress(step, token_loss)
        if checkpoint_every and step % checkpoint_every == 0 and step < steps:
            model.save_pretrained(out / f"step-{step}")
    model.eval()
    model.save_pretrained(out)
    recipe = {
        "steps": steps,
        "lr": lr,
        "side_weight": side_weight,
        "batch": batch,
        "seed": seed,
        "edge": edge,
        "prompt": "rationale",
        "last_token_loss": round(token_loss, 4),
        "seconds": round(time.perf_counter() - started),
        "torch": torch.__version__,
    }
    if previous is not None:
        recipe["init"] = previous
    atomic_write_json(out / "reader.json", recipe)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--side-weight", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--init", type=Path, default=None, help="go on training this saved reader")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    def report(step: int, loss: float) -> None:
        if step % 200 == 0:
            print(f"step {step}: token loss {loss:.3f}", flush=True)

    pretrain_reader(
        args.out,
        args.steps,
        args.lr,
        args.side_weight,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        progress=report,
        init=args.init,
    )


if __name__ == "__main__":
    main()
