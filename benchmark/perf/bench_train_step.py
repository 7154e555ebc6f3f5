"""Benchmark: a training step of the demo's tiny VLM, stock transformers against cxrmax's two changes.

The demo spends most of its time in SFT steps of a ~200k-parameter Qwen2-VL (teachers and students).
Two changes in the loading and SFT code cut that time without changing the loss (both are tested):
  - ``cxrmax.core.hf.linear_patch_embeds``: the vision patch embedding (a Conv3d whose kernel equals
    its stride) run as one matrix product over the already cut patches;
  - ``apo_train.trainer.sft_loss``: the LM head and its log-softmax only from the batch's first label
    on (``logits_to_keep``), where the model's own loss runs them over image and prompt tokens too.
This script trains the demo's faithful teacher (``cxrmax.toy.teachers.train_teacher``: apo_train's SFT
stage on transformers' Trainer, its shuffled batches of 16, so batch shapes vary as in the demo) for
``--steps`` steps from the same initial weights in the four combinations, round-robin so the machine's
load hits all alike, one thread; per combination the median seconds per step over ``--rounds`` rounds
(after one warm-up round), and the last logged loss (equal across columns to float rounding).

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
    linear, kept = hf.linear_patch_embeds, SFTStageTrainer.compute_loss
    combos = {
        "stock (Conv3d, LM head on every position)": (lambda model: model, Trainer.compute_loss),
        "patch embedding as a linear layer": (linear, Trainer.compute_loss),
        "LM head from the first label on": (lambda model: model, kept),
        "both (what cxrmax runs)": (linear, kept),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "mimic"
        make_mini_mimic(root, studies=args.studies, seed=0)
        selection = MimicCXR(root).select(splits=["train"], views=["PA", "AP"])
        examples, _ = sim.examples_from_selection(selection, root)
        spec = sim.default_teachers()[0]  # the faithful teacher
        targets = sim.assign_targets(examples, spec, 0)
        initial = build_tiny_vlm(
            Path(tmp) / "initial", corpus=sim.teacher_corpus(examples, [spec], 0), seed=0
        )
        images: dict = {}  # decoded once, shared by every run (the demo caches them the same way)
        times: dict[str, list[float]] = {name: [] for name in combos}
        last_loss: dict[str, float] = {}
        for round_ in range(args.rounds + 1):  # round 0 warms up (allocator, primitives) and is not kept
            for name, (patches, compute_loss) in combos.items():
                model_dir = Path(tmp) / "run"
                shutil.rmtree(model_dir, ignore_errors=True)
                shutil.copytree(initial, model_dir)
                hf.linear_patch_embeds, SFTStageTrainer.compute_loss = patches, compute_loss
                try:
                    stats = sim.train_teacher(model_dir, targets, steps=args.steps, seed=0, images=images)
                finally:
                    hf.linear_patch_embeds, SFTStageTrainer.compute_loss = linear, kept
                if round_:
                    times[name].append(stats.seconds / stats.steps)
                last_loss[name] = stats.last_loss
        print(
            f"{args.studies}-study mini MIMIC-CXR ({len(targets)} targets), the faithful teacher's recipe "
            f"(batch 16, lr 8e-3), {args.steps} steps x {args.rounds} rounds, 1 thread; seconds per step "
            "include tokenizing and saving, the same in every column"
        )
        stock = statistics.median(times[next(iter(combos))])
        print(f"{'setting':<44} {'s/step':>8} {'vs stock':>9} {'last loss':>10}")
        for name in combos:
            median = statistics.median(times[name])
            print(f"{name:<44} {median:>8.4f} {median / stock:>8.2f}x {last_loss[name]:>10.5f}")


if __name__ == "__main__":
    main()
