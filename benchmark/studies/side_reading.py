"""Can the demo's tiny VLM read a finding's side from the synthetic films, asked with the paper's prompt?

Issue 14 asks for films a tiny VLM reads sides from (faithful teacher's side error <= 0.10 with the
paper's prompt, whose diagnosis list has no sides). This study measures how far the demo's teacher
recipe is from that, and whether model settings change it: for each variant it trains the faithful
teacher (cxrmax.toy.teachers, apo_train's SFT stage) on the frontal train images of a mini MIMIC-CXR
with the paper's prompt, then scores **first-mention side accuracy** by teacher forcing: at the first
"left"/"right" the answer states for each lateralised finding, is the correct side more likely than
the other? Later mentions are left out because they copy the first (counting them inflated an earlier
estimate). Held-out = the test and validate images, which no teacher saw; 0.5 is chance.

    python benchmark/studies/side_reading.py                        # the default variants, ~10 min
    python benchmark/studies/side_reading.py --steps 300 --variant base --variant theta=10+mrope=[1,1,6]
    python benchmark/studies/side_reading.py --studies 240 --weight-decay 0.1 --variant base

A variant is ``base`` or ``+``-joined config overrides of the tiny Qwen2-VL: ``theta=V`` (the language
model's rope theta), ``mrope=[t,h,w]`` (its multimodal rope sections), ``v.KEY=V`` (vision config),
``KEY=V`` (text config). Results go to stdout; nothing is written outside --work.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from cxrmax.mimic.reader import MimicCXR
from cxrmax.testing.mini_mimic import make_mini_mimic
from cxrmax.toy import teachers as sim
from cxrmax.toy.tinyvlm import build_tiny_vlm, load_tiny_vlm


def _override(config: dict, variant: str) -> dict:
    for part in variant.split("+"):
        if part == "base":
            continue
        key, _, value = part.partition("=")
        parsed = json.loads(value)
        if key.startswith("v."):
            config["vision_config"][key[2:]] = parsed
        elif key in ("theta", "mrope"):
            config["text_config"]["rope_parameters"]["rope_theta" if key == "theta" else "mrope_section"] = (
                parsed
            )
        else:
            config["text_config"][key] = parsed
    return config


def train_variant(
    path: Path, variant: str, examples: list, steps: int, edge: int, seed: int, weight_decay: float = 0.0
) -> float:
    """Build the tiny VLM with ``variant``'s overrides and train it as the faithful teacher (AdamW with
    ``weight_decay``; the demo's teachers use none); returns its last training loss."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    faithful = sim.TeacherSpec("faithful")
    build_tiny_vlm(path, corpus=sim.teacher_corpus(examples, [faithful], seed), seed=seed)
    config = _override(json.loads((path / "config.json").read_text()), variant)
    (path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(path)).save_pretrained(path)
    stats = sim.train_teacher(
        path,
        sim.assign_targets(examples, faithful, seed),
        steps=steps,
        seed=seed,
        max_edge=edge,
        weight_decay=weight_decay,
    )
    return stats.last_loss


def first_mention_accuracy(path: Path, examples: list, edge: int) -> tuple[int, int]:
    """(correct, scored) first mentions of a lateralised finding's side, by teacher forcing."""
    model, processor = load_tiny_vlm(path)
    tokenizer = processor.tokenizer
    left, right = tokenizer.convert_tokens_to_ids("Ġleft"), tokenizer.convert_tokens_to_ids("Ġright")
    start_token = tokenizer.convert_tokens_to_ids("<|im_start|>")
    correct = scored = 0
    for ex in examples:
        sided = sum(f.side in ("left", "right") for f in ex.findings)
        if not sided:
            continue
        text = processor.apply_chat_template(
            sim.chat_messages(ex.prompt, sim.faithful_answer(ex.findings)), tokenize=False
        )
        inputs = processor(text=[text], images=[sim.load_image(ex.image_path, edge)], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0]
        ids = inputs["input_ids"][0].tolist()
        answer_start = len(ids) - 1 - ids[::-1].index(start_token)
        # The answer names each finding's side first in its opening sentence ("... diagnosed with
        # left X and right Y"); the first `sided` side words are those first mentions.
        positions = [p for p in range(answer_start, len(ids)) if ids[p] in (left, right)][:sided]
        for p in positions:
            other = right if ids[p] == left else left
            correct += int(logits[p - 1, ids[p]] > logits[p - 1, other])
            scored += 1
    return correct, scored


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion."""
    if n == 0:
        return float("nan"), float("nan")
    p = correct / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=800, help="mini MIMIC-CXR size (default 800)")
    parser.add_argument("--steps", type=int, action="append", help="teacher steps (repeatable; default 300)")
    parser.add_argument("--variant", action="append", help="model variant (repeatable; see above)")
    parser.add_argument("--edge", type=int, default=112, help="image longest edge (the demo's 112)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (demo: 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    variants = args.variant or ["base", "theta=10+mrope=[1,1,6]"]
    steps_list = args.steps or [300]
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        root = work / f"mimic-{args.studies}"
        if not (root / "mimic-cxr-2.0.0-split.csv.gz").exists():
            make_mini_mimic(root, studies=args.studies, seed=args.seed)
        mimic = MimicCXR(root)
        train = mimic.select(splits=["train"], views=["PA", "AP"])
        held_out = mimic.select(splits=["test", "validate"], views=["PA", "AP"])
        train_examples, prompt = sim.examples_from_selection(train, root, side_hint=False)
        held_examples, _ = sim.examples_from_selection(held_out, root, side_hint=False, prompt=prompt)
        print(
            f"mini MIMIC-CXR {args.studies} studies: {len(train_examples)} train and {len(held_examples)} "
            f"held-out frontal images; paper's prompt (no sides); images {args.edge} px; "
            f"weight decay {args.weight_decay}"
        )
        print("| variant | steps | last loss | train first-mention acc. | held-out acc. [95% CI] | seconds |")
        print("|---|---|---|---|---|---|")
        for variant in variants:
            for steps in steps_list:
                started = time.perf_counter()
                path = work / f"model-{len(list(work.glob('model-*')))}"
                loss = train_variant(
                    path, variant, train_examples, steps, args.edge, args.seed, args.weight_decay
                )
                tc, tn = first_mention_accuracy(path, train_examples[:120], args.edge)
                hc, hn = first_mention_accuracy(path, held_examples, args.edge)
                low, high = wilson(hc, hn)
                print(
                    f"| {variant} | {steps} | {loss:.3f} | {tc}/{tn} = {tc / max(tn, 1):.2f} | "
                    f"{hc}/{hn} = {hc / max(hn, 1):.2f} [{low:.2f}, {high:.2f}] | "
                    f"{time.perf_counter() - started:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
