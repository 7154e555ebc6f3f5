"""Benchmark: a training step of the demo's tiny VLM, stock transformers against cxrmax's changes.

The demo spends most of its time in SFT steps of a ~200k-parameter Qwen2-VL (teachers and students).
Three changes in the loading and SFT code cut that time without changing the loss (all are tested):
  - ``cxrmax.core.hf.linear_patch_embeds``: the vision patch embedding (a Conv3d whose kernel equals
    its stride) run as one matrix product over the already cut patches;
  - ``apo_train.trainer.sft_loss``: the LM head and its log-softmax only from the batch's first label
    on (``logits_to_keep``), where the model's own loss runs them over image and prompt tokens too;
  - ``apo_train.data.sampling``: each step's rows sorted by length and cut into accumulated
    micro-batches (``cxrmax.toy.teachers.MICRO_BATCHES``), so short rows are not padded to the
    step's longest; the loss is normalised by the step's token count, so the gradient is the same.
This script trains the demo's faithful teacher (``cxrmax.toy.teachers.train_teacher``: apo_train's SFT
stage on transformers' Trainer, its shuffled batches of 16, so batch shapes vary as in the demo) for
``--steps`` steps from the same initial weights in each combination (and, for the last two, on the
SFT student's kind of rows: every teacher's targets mixed, from 23-word answers to 86-word ones),
round-robin so the machine's load hits all alike, one thread; per combination the median seconds per
step over ``--rounds`` rounds (after one warm-up round), and the last logged loss (equal across
columns to float rounding).

    python benchmark/perf/bench_train_step.py                 # 240-study mini MIMIC-CXR, 100 steps x 3
    python benchmark/perf/bench_train_step.py --rounds 2 --steps 50
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=240, help="mini MIMIC-CXR size (the demo's 240)")
    parser.add_argument("--steps", type=int, default=100, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="60 studies, 10 steps, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.studies, args.steps, args.rounds = 60, 10, 1

    import datasets
    import torch
    from transformers import Trainer
    from transformers.utils import logging as hf_logging

    import cxrmax.core.hf as hf
    from apo_train.trainer import SFTStageTrainer
    from cxrmax.mimic.reader import MimicCXR
    from cxrmax.testing.mini_mimic import make_mini_mimic
    from cxrmax.toy import teachers as sim
    from cxrmax.toy.tinyvlm import build_tiny_vlm

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    linear, kept, micro = hf.linear_patch_embeds, SFTStageTrainer.compute_loss, sim.MICRO_BATCHES
    combos = {
        "stock (Conv3d, LM head on every position)": (lambda model: model, Trainer.compute_loss, 1),
        "patch embedding as a linear layer": (linear, Trainer.compute_loss, 1),
        "LM head from the first label on": (lambda model: model, kept, 1),
        "both": (linear, kept, 1),
        f"both + rows by length in {micro} micro-batches (cxrmax)": (linear, kept, micro),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mimic"
        make_mini_mimic(root, studies=args.studies, seed=0)
        selection = MimicCXR(root).select(splits=["train"], views=["PA", "AP"])
        examples, _ = sim.examples_from_selection(selection, root)
        teachers = sim.default_teachers()
        spec = teachers[0]  # the faithful teacher
        # The SFT student's kind of rows: every teacher's targets of every image, mixed.
        mixed = [t for teacher in teachers for t in sim.assign_targets(examples, teacher, 0, copies=1)]
        runs = {
            ("faithful teacher", name): (sim.assign_targets(examples, spec, 0), combo)
            for name, combo in combos.items()
        }
        for name in list(combos)[-2:]:
            runs[("five teachers' rows mixed", name)] = (mixed, combos[name])
        initial = build_tiny_vlm(
            Path(tmp) / "initial", corpus=sim.teacher_corpus(examples, teachers, 0), seed=0
        )
        images: dict = {}  # decoded once, shared by every run (the demo caches them the same way)
        times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        last_loss: dict[tuple[str, str], float] = {}
        for round_ in range(args.rounds + 1):  # round 0 warms up (allocator, primitives) and is not kept
            for key, (targets, (patches, compute_loss, micro_batches)) in runs.items():
                model_dir = Path(tmp) / "run"
                shutil.rmtree(model_dir, ignore_errors=True)
                shutil.copytree(initial, model_dir)
                hf.linear_patch_embeds, SFTStageTrainer.compute_loss = patches, compute_loss
                sim.MICRO_BATCHES = micro_batches
                try:
                    stats = sim.train_teacher(model_dir, targets, steps=args.steps, seed=0, images=images)
                finally:
                    hf.linear_patch_embeds, SFTStageTrainer.compute_loss = linear, kept
                    sim.MICRO_BATCHES = micro
                if round_:
                    times[key].append(stats.seconds / stats.steps)
                last_loss[key] = stats.last_loss
        print(
            f"{args.studies}-study mini MIMIC-CXR ({len(examples)} images), the teachers' recipe (batch 16, "
            f"lr 8e-3), {args.steps} steps x {args.rounds} rounds, 1 thread; seconds per step include "
            "tokenizing and saving, the same in every column"
        )
        print(f"{'rows':<26} {'setting':<52} {'s/step':>8} {'vs stock':>9} {'last loss':>10}")
        baseline: dict[str, float] = {}
        for (rows, name), values in times.items():
            median = statistics.median(values)
            baseline.setdefault(rows, median)
            print(
                f"{rows:<26} {name:<52} {median:>8.4f} {median / baseline[rows]:>8.2f}x "
                f"{last_loss[(rows, name)]:>10.5f}"
            )
        print("(vs stock: against the first row of the same rows; the mixed rows start at 'both')")


if __name__ == "__main__":
    main()
