"""Do the demo's teachers keep reading sides when fine-tuned from the pretrained base reader?

``cxrmax.toy.reader`` pretrains the tiny VLM on thousands of new studies until it states, with the
paper's prompt, the side it reads from the film (benchmark/studies/README.md, "Films drawn anew every
step"). Real teachers are pretrained VLMs with biases of their own; this study starts each named
teacher from a reader checkpoint and fine-tunes it with the demo's teacher recipe (apo_train's SFT
stage on the mini MIMIC-CXR's frontal train films, the teacher's biased targets, the paper's prompt)
at each learning rate, then measures on held-out films, as side_reading.py does: first-mention side
accuracy by teacher forcing and the side error of the teacher's own sampled answers against the report.

    python benchmark/studies/reader_finetune.py --reader /tmp/reader --lr 1e-3 --lr 8e-3
    python benchmark/studies/reader_finetune.py --reader /tmp/reader --teacher faithful --teacher swaps-sides
    python benchmark/studies/reader_finetune.py --reader /tmp/reader --fresh-studies 1200  # the demo's teachers

Results go to stdout; nothing is written outside --work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from side_reading import first_mention_accuracy, generated_side_error, study_films, wilson  # noqa: E402

from cxrmax.generate.prompts import load_prompt  # noqa: E402
from cxrmax.toy import teachers as sim  # noqa: E402
from cxrmax.toy.reader import fresh_studies  # noqa: E402
from cxrmax.toy.tinyvlm import copy_tiny_vlm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reader", type=Path, action="append", required=True, help="reader folder (repeatable)"
    )
    parser.add_argument("--teacher", action="append", help="teacher name (default faithful and swaps-sides)")
    parser.add_argument("--lr", type=float, action="append", help="fine-tuning rate (default 1e-3)")
    parser.add_argument("--steps", type=int, default=300, help="fine-tuning steps (the demo's 300)")
    parser.add_argument("--studies", type=int, default=800, help="mini MIMIC-CXR size (default 800)")
    parser.add_argument("--train-films", type=int, default=148, help="train films used (the demo's 148)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--freeze-vision", action="store_true", help="fine-tune the language model only")
    parser.add_argument(
        "--fresh-studies",
        type=int,
        default=0,
        help="fine-tune on this many new studies (the demo's toy.reader.fresh_studies) instead of the train films",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = args.teacher or ["faithful", "swaps-sides"]
    specs = {t.name: t for t in sim.default_teachers()}
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work or Path(scratch)
        train_examples, held_examples, gold = study_films(work, args.studies, args.seed)
        train_examples = train_examples[: args.train_films]
        learnt_from = f"{len(train_examples)} train films"
        if args.fresh_studies:
            train_examples = fresh_studies(
                work / "fresh", args.fresh_studies, args.seed, load_prompt("rationale")
            )
            learnt_from = f"{args.fresh_studies} new studies (fresh_studies), not the train films"
        print(
            f"mini MIMIC-CXR {args.studies} studies, {len(held_examples)} held out; teachers learn from "
            f"{learnt_from}; paper's prompt; {args.steps} fine-tuning steps of 16"
        )
        print(
            "| reader | teacher | lr | last loss | held-out first-mention acc. [95%] | side error of its answers [95%] | s |"
        )
        print("|---|---|---|---|---|---|---|")
        for reader in args.reader:
            for lr in [None] + (args.lr or [1e-3]):
                for name in names if lr is not None else ["(reader itself)"]:
                    started = time.perf_counter()
                    path = copy_tiny_vlm(reader, work / f"model-{len(list(work.glob('model-*')))}")
                    loss = float("nan")
                    if lr is not None:
                        targets = sim.assign_targets(train_examples, specs[name], args.seed)
                        loss = sim.train_teacher(
                            path,
                            targets,
                            steps=args.steps,
                            lr=lr,
                            seed=args.seed,
                            freeze_vision=args.freeze_vision,
                        ).last_loss
                    hc, hn = first_mention_accuracy(path, held_examples, 112)
                    errors, compared = generated_side_error(path, held_examples, gold, 112)
                    a_low, a_high = wilson(hc, hn)
                    e_low, e_high = wilson(errors, compared)
                    print(
                        f"| {reader.name} | {name} | {lr if lr is not None else '-'} | {loss:.3f} | "
                        f"{hc}/{hn} = {hc / max(hn, 1):.2f} [{a_low:.2f}, {a_high:.2f}] | "
                        f"{errors}/{compared} = {errors / max(compared, 1):.2f} [{e_low:.2f}, {e_high:.2f}] | "
                        f"{time.perf_counter() - started:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
