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
    python benchmark/studies/side_reading.py --probe-lr 3e-3 --probe-lr 1e-3 --probe-lr 3e-4   # direct question
    python benchmark/studies/side_reading.py --studies 240 --pretrain-steps 1000 --freeze-vision --teacher-lr 1e-3
    python benchmark/studies/side_reading.py --fresh studies --steps 1200 --teacher-lr 1e-3 --side-weight 5

``--probe-lr``: no teacher; the tiny VLM is trained at that rate to answer "Which side is the <finding>
on?" about fresh films (16 new films a step, drawn like the mini MIMIC-CXR's: portrait, 112 px, JPEG,
0-2 other sided findings as distractors), and scored on 300 films it never saw: can it read a side
from pixels at all? ``--pretrain-steps``: the same question first (at ``--pretrain-lr``), then the
faithful teacher as above, optionally with the vision tower frozen (``--freeze-vision``) and at
``--teacher-lr`` (the demo's 8e-3 by default).

``--fresh``: the faithful teacher is trained by this script's own loop (AdamW, 20 warm-up steps,
linear decay, clip 1) on films drawn anew every step instead of the mini MIMIC-CXR's train images:
``renders`` draws a new film of a train study (same labels and sides, new anatomy and noise),
``studies`` a new study altogether (labels, sides and view drawn with the mini MIMIC-CXR's odds, the
faithful answer written from them), so that a side can be neither memorised from the image nor from
the prompt that names the study; ``--teacher NAME`` trains another of the demo's teachers (its biases
in its answers: swaps-sides, ...). ``--side-weight W`` adds W times the mean loss of the answer's side
words to the mean token loss. The scores stay those of the mini MIMIC-CXR's images.

A variant is ``base`` or ``+``-joined config overrides of the tiny Qwen2-VL: ``theta=V`` (the language
model's rope theta), ``mrope=[t,h,w]`` (its multimodal rope sections), ``v.KEY=V`` (vision config),
``KEY=V`` (text config). Results go to stdout; nothing is written outside --work.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from cxrmax.mimic.images import RESAMPLE, encode_jpeg, target_size
from cxrmax.mimic.reader import MimicCXR
from cxrmax.testing.films import SIDED, synthetic_chest
from cxrmax.testing.mini_mimic import make_mini_mimic
from cxrmax.toy import teachers as sim
from cxrmax.toy.reader import draw_film, fresh_study, pretrain_reader
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


#: The findings the side question asks about (those the films draw on one side).
QUESTION_FINDINGS = ("Pleural Effusion", "Pneumothorax", "Consolidation", "Atelectasis", "Lung Lesion")


def question_corpus() -> list[str]:
    """The side question's words, for the tokenizer."""
    return [
        f"Which side is the {n.lower()} on? The {n.lower()} is on the left right." for n in QUESTION_FINDINGS
    ]


def question_film(seed: int, edge: int) -> tuple[Image.Image, str, str]:
    """(image, finding, side) of one fresh film for the side question, made the way the mini
    MIMIC-CXR's films reach a teacher: portrait, downscaled to ``edge``, JPEG round trip, RGB."""
    rng = random.Random(seed)
    name, side = rng.choice(QUESTION_FINDINGS), rng.choice(["left", "right"])
    labels: dict[str, int | None] = {name: 1}
    sides: dict[str, str | None] = {name: side}
    for other in rng.sample([f for f in SIDED if f != name], rng.randint(0, 2)):
        labels[other], sides[other] = 1, rng.choice(["left", "right", None])
    if rng.random() < 0.3:
        labels["Cardiomegaly"] = 1
    width = rng.randrange(300, 500)
    height = int(width * rng.uniform(1.05, 1.3))
    pixels = synthetic_chest(width, height, seed, view=rng.choice(["PA", "AP"]), labels=labels, sides=sides)
    image = Image.fromarray(pixels).resize(target_size(width, height, edge, None), RESAMPLE)
    return Image.open(io.BytesIO(encode_jpeg(image))).convert("RGB"), name, side


class SideQuestion:
    """Train and score a tiny VLM on "Which side is the <finding> on?" over fresh films; the loss is
    the cross-entropy of the side word of the answer ("The <finding> is on the <side>.") only."""

    def __init__(self, model, processor, edge: int) -> None:
        self.model, self.processor, self.edge = model, processor, edge
        tokenizer = processor.tokenizer
        self.left, self.right = tokenizer.encode(" left")[-1], tokenizer.encode(" right")[-1]

    def _batch(self, seeds) -> tuple[dict, torch.Tensor, torch.Tensor]:
        texts, images, targets = [], [], []
        for seed in seeds:
            image, name, side = question_film(seed, self.edge)
            chat = sim.chat_messages(
                f"Which side is the {name.lower()} on?", f"The {name.lower()} is on the {side}."
            )
            texts.append(self.processor.apply_chat_template(chat, tokenize=False))
            images.append(image)
            targets.append(self.left if side == "left" else self.right)
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        sides = (self.left, self.right)
        at = [max(i for i, t in enumerate(row) if t in sides) for row in inputs["input_ids"].tolist()]
        return inputs, torch.tensor(at), torch.tensor(targets)

    def _side_logits(self, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, at, targets = self._batch(seeds)
        logits = self.model(**inputs).logits[torch.arange(len(at)), at - 1]
        return logits, targets

    def train(self, steps: int, lr: float, first_seed: int = 0, batch: int = 16, report=None) -> float:
        """``steps`` AdamW steps (no decay, clip 1) of ``batch`` new films each; returns the last loss."""
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.model.train()
        loss = torch.tensor(float("nan"))
        for step in range(1, steps + 1):
            logits, targets = self._side_logits(
                range(first_seed + (step - 1) * batch, first_seed + step * batch)
            )
            loss = torch.nn.functional.cross_entropy(logits, targets)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            optimizer.step()
            if report is not None and step % 200 == 0:
                report(step, loss.item(), self.accuracy())
        self.model.eval()
        return float(loss.item())

    def accuracy(self, n: int = 300) -> float:
        """Share of ``n`` films never trained on whose side word is the more likely one."""
        was_training = self.model.training
        self.model.eval()
        correct = 0
        seeds = range(10**6, 10**6 + n)  # training draws seeds from 0 up
        with torch.no_grad():
            for i in range(0, n, 50):
                logits, targets = self._side_logits(seeds[i : i + 50])
                picked = torch.where(logits[:, self.left] > logits[:, self.right], self.left, self.right)
                correct += int((picked == targets).sum())
        self.model.train(was_training)
        return correct / n


def train_variant(
    path: Path,
    variant: str,
    examples: list,
    steps: int,
    edge: int,
    seed: int,
    weight_decay: float = 0.0,
    pretrain: tuple[int, float] | None = None,
    freeze_vision: bool = False,
    teacher_lr: float = 8e-3,
) -> float:
    """Build the tiny VLM with ``variant``'s overrides, optionally pretrain it on the side question
    (``pretrain`` = (steps, lr)), and train it as the faithful teacher (AdamW with ``weight_decay``, the
    demo's teachers use none; ``freeze_vision``: the vision tower is not trained); returns its last
    training loss."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    faithful = sim.TeacherSpec("faithful")
    build_tiny_vlm(path, corpus=sim.teacher_corpus(examples, [faithful], seed) + question_corpus(), seed=seed)
    config = _override(json.loads((path / "config.json").read_text()), variant)
    (path / "config.json").write_text(json.dumps(config))
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(Qwen2VLConfig.from_pretrained(path)).save_pretrained(path)
    if pretrain is not None:
        model, processor = load_tiny_vlm(path)
        question = SideQuestion(model, processor, edge)
        question.train(*pretrain)
        print(
            f"  pretrained {pretrain[0]} steps at {pretrain[1]:g}: side question on unseen films "
            f"{question.accuracy():.2f}",
            flush=True,
        )
        model.save_pretrained(path)
    loader = sim.load_tiny_vlm
    if freeze_vision:

        def frozen(*args, **kwargs):
            model, processor = loader(*args, **kwargs)
            model.model.visual.requires_grad_(False)
            return model, processor

        sim.load_tiny_vlm = frozen
    try:
        stats = sim.train_teacher(
            path,
            sim.assign_targets(examples, faithful, seed),
            steps=steps,
            lr=teacher_lr,
            seed=seed,
            max_edge=edge,
            weight_decay=weight_decay,
        )
    finally:
        sim.load_tiny_vlm = loader
    return stats.last_loss


def fresh_example(
    kind: str, examples: list, render, rng: random.Random, edge: int, teacher: sim.TeacherSpec
) -> tuple[str, str, Image.Image]:
    """(prompt, ``teacher``'s answer, image) of one training film drawn anew (see ``--fresh``)."""
    if kind == "studies":
        return fresh_study(rng, teacher, render, edge)
    example = rng.choice(examples)
    labels = {f.observation: 1 for f in example.findings}
    sides = {f.observation: f.side for f in example.findings}
    image = draw_film(rng, labels, sides, rng.choice(["PA", "AP"]), edge)
    return example.prompt, sim.biased_answer(example.findings, teacher, rng)[0], image


def train_fresh_teacher(
    path: Path,
    kind: str,
    examples: list,
    prompt_template,
    steps: int,
    lr: float,
    side_weight: float,
    edge: int,
    seed: int,
    batch: int = 16,
    teacher: str = "faithful",
) -> float:
    """The teacher named ``teacher`` (one of the demo's five) trained on ``batch`` films drawn anew each
    step (``kind``: renders or studies) by the base reader's loop (``cxrmax.toy.reader.pretrain_reader``:
    the answer's mean token loss plus ``side_weight`` times that of its side words), with a tokenizer
    trained on the study's own examples. Returns the last step's token loss."""
    spec = {t.name: t for t in sim.default_teachers()}[teacher]
    render = sim.prompt_renderer(prompt_template)

    def report(step: int, loss: float) -> None:
        if step % 200 == 0:
            print(f"  step {step}: token loss {loss:.3f}", flush=True)

    pretrain_reader(
        path,
        steps,
        lr,
        side_weight,
        batch=batch,
        seed=seed,
        edge=edge,
        progress=report,
        draw=lambda rng: fresh_example(kind, examples, render, rng, edge, spec),
        corpus=sim.teacher_corpus(examples, [spec], seed),
        rng=random.Random(f"fresh:{kind}:{seed}"),
    )
    return json.loads((path / "reader.json").read_text())["last_token_loss"]


def probe(path: Path, lr: float, steps: int, edge: int, seed: int) -> None:
    """The side question alone, at ``lr``: prints its accuracy on unseen films every 200 steps."""
    build_tiny_vlm(path, corpus=question_corpus(), seed=seed)
    model, processor = load_tiny_vlm(path)
    started = time.perf_counter()

    def report(step: int, loss: float, accuracy: float) -> None:
        print(
            f"| {lr:g} | {step} | {loss:.3f} | {accuracy:.2f} | {time.perf_counter() - started:.0f} |",
            flush=True,
        )

    print(
        f"| lr | step | loss | unseen films | s |  (start: {SideQuestion(model, processor, edge).accuracy():.2f})"
    )
    SideQuestion(model, processor, edge).train(steps, lr, report=report)


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


def generated_side_error(
    path: Path, examples: list, gold: dict, edge: int, temperature: float = 1.0
) -> tuple[int, int]:
    """(errors, compared) of the sides the teacher states in its own answers, one per example (120 new
    tokens, sampled at ``temperature``, seed 0), against the report's sides: the demo's own count
    (``cxrmax.toy.demo.drift_counts``: a side compared where the answer and the study both have the
    finding and both give it a side)."""
    import pyarrow as pa

    from cxrmax.core.schemas import LABELS_TYPE
    from cxrmax.toy.demo import drift_counts

    model, processor = load_tiny_vlm(path)
    processor.tokenizer.padding_side = "left"
    torch.manual_seed(0)
    answers = []
    for i in range(0, len(examples), 16):
        batch = examples[i : i + 16]
        texts = [
            processor.apply_chat_template(
                sim.chat_messages(e.prompt), tokenize=False, add_generation_prompt=True
            )
            for e in batch
        ]
        images = [sim.load_image(e.image_path, edge) for e in batch]
        inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(
                **inputs, max_new_tokens=120, do_sample=temperature > 0, temperature=temperature or None
            )
        answers += processor.tokenizer.batch_decode(
            out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
    table = pa.table(
        {
            "model": ["teacher"] * len(examples),
            "sample_id": [e.sample_id for e in examples],
            "text": answers,
            "labels": pa.array([{f.observation: 1.0 for f in e.findings} for e in examples], LABELS_TYPE),
        }
    )
    _, _, _, _, _, errors, compared, _ = drift_counts(table, gold).counts.sum(axis=0)
    return int(errors), int(compared)


def study_films(work: Path, studies: int, seed: int) -> tuple[list, list, dict]:
    """The frontal train and held-out (test + validate) examples of a mini MIMIC-CXR of ``studies``
    made under ``work`` (once), with the paper's prompt, and the held-out reports' sides as the demo
    reads them (sample_id -> observation -> side)."""
    root = work / f"mimic-{studies}"
    if not (root / "mimic-cxr-2.0.0-split.csv.gz").exists():
        make_mini_mimic(root, studies=studies, seed=seed)
    mimic = MimicCXR(root)
    train = mimic.select(splits=["train"], views=["PA", "AP"])
    held_out = mimic.select(splits=["test", "validate"], views=["PA", "AP"])
    train_examples, prompt = sim.examples_from_selection(train, root, side_hint=False)
    held_examples, _ = sim.examples_from_selection(held_out, root, side_hint=False, prompt=prompt)
    gold = {
        row["sample_id"]: sim.report_sides(
            " ".join(filter(None, (row.get("findings"), row.get("impression"))))
        )
        for row in held_out.to_pylist()
    }
    return train_examples, held_examples, gold


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
    parser.add_argument("--probe-lr", type=float, action="append", help="side question alone at this rate")
    parser.add_argument("--probe-steps", type=int, default=800, help="side question steps (default 800)")
    parser.add_argument("--pretrain-steps", type=int, default=0, help="side question before the teacher")
    parser.add_argument("--pretrain-lr", type=float, default=3e-4, help="its learning rate (default 3e-4)")
    parser.add_argument(
        "--freeze-vision", action="store_true", help="do not train the vision tower as teacher"
    )
    parser.add_argument("--teacher-lr", type=float, default=8e-3, help="teacher learning rate (demo: 8e-3)")
    parser.add_argument(
        "--fresh", choices=("renders", "studies"), help="train on films drawn anew every step (see above)"
    )
    parser.add_argument(
        "--side-weight", type=float, default=0.0, help="with --fresh: weight of the side words' loss"
    )
    parser.add_argument(
        "--teacher",
        default="faithful",
        choices=[t.name for t in sim.default_teachers()],
        help="with --fresh: which of the demo's teachers (its biases in its answers; default faithful)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    variants = args.variant or ["base", "theta=10+mrope=[1,1,6]"]
    steps_list = args.steps or [300]
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        if args.probe_lr:
            for lr in args.probe_lr:
                probe(work / f"probe-{lr:g}", lr, args.probe_steps, args.edge, args.seed)
            return
        train_examples, held_examples, gold = study_films(work, args.studies, args.seed)
        print(
            f"mini MIMIC-CXR {args.studies} studies: {len(train_examples)} train and {len(held_examples)} "
            f"held-out frontal images; paper's prompt (no sides); images {args.edge} px; "
            f"weight decay {args.weight_decay}; teacher lr {args.teacher_lr:g}"
            + ("; vision tower frozen as teacher" if args.freeze_vision else "")
            + (
                f"; pretrained on the side question {args.pretrain_steps} steps at {args.pretrain_lr:g}"
                if args.pretrain_steps
                else ""
            )
        )
        print(
            "| variant | steps | last loss | train first-mention acc. | held-out acc. [95% CI] | seconds "
            "| held-out side error of its answers |"
        )
        print("|---|---|---|---|---|---|---|")
        for variant in variants:
            for steps in steps_list:
                started = time.perf_counter()
                path = work / f"model-{len(list(work.glob('model-*')))}"
                if args.fresh:
                    loss = train_fresh_teacher(
                        path,
                        args.fresh,
                        train_examples,
                        "rationale",  # the paper's prompt
                        steps,
                        args.teacher_lr,
                        args.side_weight,
                        args.edge,
                        args.seed,
                        teacher=args.teacher,
                    )
                else:
                    loss = train_variant(
                        path,
                        variant,
                        train_examples,
                        steps,
                        args.edge,
                        args.seed,
                        args.weight_decay,
                        pretrain=(args.pretrain_steps, args.pretrain_lr) if args.pretrain_steps else None,
                        freeze_vision=args.freeze_vision,
                        teacher_lr=args.teacher_lr,
                    )
                tc, tn = first_mention_accuracy(path, train_examples[:120], args.edge)
                hc, hn = first_mention_accuracy(path, held_examples, args.edge)
                low, high = wilson(hc, hn)
                errors, compared = generated_side_error(path, held_examples, gold, args.edge)
                print(
                    f"| {variant} | {steps} | {loss:.3f} | {tc}/{tn} = {tc / max(tn, 1):.2f} | "
                    f"{hc}/{hn} = {hc / max(hn, 1):.2f} [{low:.2f}, {high:.2f}] | "
                    f"{time.perf_counter() - started:.0f} | {errors}/{compared} = {errors / max(compared, 1):.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
