"""Benchmark: time per sample of an APO step against (1 + N) SFT samples, on the demo's tiny VLM.

Issue 14's goal: an APO step's time per sample within 1.5x of (1 + N) times an SFT step's per-sample
time (N = negatives per sample): one positive and N negatives are 1 + N rows of the same shape as an
SFT row, so anything above that is overhead. Runs SFT and APO from the demo's SFT student on the demo's
own data, one thread, the same steps, in this process, and prints per-sample times with the
reference log-probs computed on the fly and precomputed once before training.

    python benchmark/perf/bench_apo_step.py --demo-out demo-out        # after `cxrmax demo --out demo-out`
    python benchmark/perf/bench_apo_step.py --demo-out DIR --steps 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def _common(demo: Path) -> dict:
    return dict(
        image_root=str(demo / "mimic"),
        max_edge=112,
        use_lora=False,
        bf16=False,
        use_cpu=True,
        seed=0,
        save_strategy="no",
        logging_steps=1000,
        dataloader_num_workers=0,
        max_length=1024,
        report_to=[],
        jsonl_log=False,
        global_batch_size=None,
        gradient_accumulation_steps=1,
    )


def _timed(run, cfg) -> float:
    started = time.perf_counter()
    run(cfg, console=None)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-out", type=Path, required=True, help="a `cxrmax demo` output folder")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import datasets
    import torch
    from datasets import load_from_disk
    from transformers.utils import logging as hf_logging

    from apo_train.config import APOConfig, SFTStageConfig
    from apo_train.trainer import run_apo, run_sft

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    demo = args.demo_out
    # The first seed's SFT student (a demo from before the student stage ran over seeds: students/).
    start = next(
        (
            d
            for d in (demo / "students" / "seed-0" / "student-sft", demo / "students" / "student-sft")
            if d.is_dir()
        ),
        None,
    )
    if start is None:
        parser.error(
            f"{demo}: no SFT student (students/seed-0/student-sft); run `cxrmax demo --out {demo}` first"
        )
    negatives = [len(r) for r in load_from_disk(str(demo / "data" / "preferences"))["train"]["rejected"]]
    n = statistics.mean(negatives)
    sft_batch, apo_batch = 8, 2
    print(f"demo data: {len(negatives)} preference samples, {n:.2f} negatives per sample on average")
    print(f"{'setting':<44} {'SFT s/sample':>13} {'APO s/sample':>13} {'APO/((1+N) SFT)':>16}")
    with tempfile.TemporaryDirectory() as tmp:
        for precompute in (False, True):
            sft_times, apo_times = [], []
            for _ in range(args.repeats):  # paired, alternating: the machine's load hits both
                sft = SFTStageConfig(
                    output_dir=f"{tmp}/sft",
                    model_name_or_path=str(start),
                    dataset_path=str(demo / "data" / "sft"),
                    learning_rate=1e-4,
                    max_steps=args.steps,
                    per_device_train_batch_size=sft_batch,
                    **_common(demo),
                )
                sft_times.append(_timed(run_sft, sft) / (args.steps * sft_batch))
                apo = APOConfig(
                    output_dir=f"{tmp}/apo",
                    model_name_or_path=str(start),
                    dataset_path=str(demo / "data" / "preferences"),
                    learning_rate=1e-4,
                    max_steps=args.steps,
                    per_device_train_batch_size=apo_batch,
                    precompute_ref_log_probs=precompute,
                    **_common(demo),
                )
                apo_times.append(_timed(run_apo, apo) / (args.steps * apo_batch))
            sft_s, apo_s = min(sft_times), min(apo_times)
            name = f"reference log-probs {'precomputed' if precompute else 'on the fly'}"
            print(f"{name:<44} {sft_s:>13.4f} {apo_s:>13.4f} {apo_s / ((1 + n) * sft_s):>16.2f}")
    print("goal: APO/((1+N) SFT) <= 1.5 (times include model loading and saving: both runs pay them)")


if __name__ == "__main__":
    main()
