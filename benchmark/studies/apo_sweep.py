"""Study: the learning rate and beta of the demo's APO student (issue 14).

On the artifacts of one ``cxrmax demo`` run (its preferences, test split and seed-0 SFT student), APO
(multi-negative Plackett-Luce) is trained from that SFT student for every setting of a small grid,
learning rate x beta, with the demo's other APO settings (batch, steps, warm-up); each APO student
answers the test split as in the demo and is scored by the demo's own functions. Printed per setting:
the APO student's hallucination, side-error and refusal rates with their 95% bootstrap intervals over
the test answers, its mean of precision, recall and similarity, and its last logged reward accuracy
and margin; the SFT student it starts from is the first row. Settings train in parallel, one
single-threaded process each.

    cxrmax demo --out demo-out                                   # once, the artifacts
    python benchmark/studies/apo_sweep.py demo-out               # lr {1e-4, 3e-4, 1e-3} x beta {0.1, 0.5}
    python benchmark/studies/apo_sweep.py demo-out --lr 3e-4 --beta 0.1 0.5 --steps 60 --seed 1
    python benchmark/studies/apo_sweep.py demo-out --lr 3e-4 --beta 0.1 --preferences mine=prefs/ other=prefs2/

The table's figures are for one seed of the student stage; what one setting gains over another is
only read where the intervals do not overlap.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from apo_train.config import APOConfig  # noqa: E402
from apo_train.trainer import run_apo  # noqa: E402
from cxrmax.toy import demo as D  # noqa: E402
from cxrmax.toy import teachers as sim  # noqa: E402
from cxrmax.toy.pool import pool_map, spawn_pool  # noqa: E402

KEYS = ("hallucination_rate", "laterality_error_rate", "refusal_rate")


def _prompt(demo: Path) -> Any:
    """The demo's prompt (the paper's rationale prompt, as ``cxrmax demo`` asks it)."""
    return D.demo_prompt()


def _train_one(job: dict[str, Any]) -> str:
    """APO from the SFT student at one (lr, beta), then its answers to the test split."""
    D._torch_threads()
    demo, out, size = Path(job["demo"]), Path(job["out"]), job["size"]
    cfg = APOConfig(
        output_dir=str(out / "model"),
        model_name_or_path=str(job["sft"]),
        dataset_path=str(job["preferences"]),
        loss_type=job["loss"],
        beta=job["beta"],
        learning_rate=job["lr"],
        warmup_steps=0.1,
        max_steps=size.apo_steps,
        per_device_train_batch_size=size.apo_batch,
        **D._student_settings(demo / "mimic", size, job["seed"]),  # the demo's own APO settings
    )
    run_apo(cfg, console=None)
    _answer(job["name"], out / "model", demo, out, size, job["seed"])
    return job["name"]


def _answer(name: str, model: Path, demo: Path, out: Path, size: Any, seed: int) -> None:
    D.generate_answers(
        name,
        model,
        demo / "selection-test.parquet",
        demo / "mimic",
        out / "eval",
        size,
        size.test_samples,
        seed,
        "transformers",
        _prompt(demo),
    )


def _setting(name: str) -> str:
    return name.replace("apo-", "").replace("_", " ")


def _named_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not Path(path).is_dir():
        raise SystemExit(f"--preferences {text!r}: expected NAME=FOLDER (a save_to_disk folder)")
    return name, str(Path(path).resolve())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("demo", type=Path, help="the OUT folder of a finished `cxrmax demo` run")
    parser.add_argument("--size", default="default", choices=sorted(D.SIZES))
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3])
    parser.add_argument("--beta", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--steps", type=int, default=None, help="APO steps (default: the size's)")
    parser.add_argument("--loss", default="plackett-luce", help="plackett-luce | pairwise | listwise")
    parser.add_argument("--seed", type=int, default=0, help="the seed of the demo's students to start from")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default DEMO/apo-sweep)")
    parser.add_argument(
        "--preferences",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="preference sets to train on, each a save_to_disk folder (default: the demo's own, as 'demo')",
    )
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    size = D.SIZES[args.size]
    if args.steps is not None:
        size = dataclasses.replace(size, apo_steps=args.steps)
    demo = args.demo.resolve()
    sft = demo / "students" / f"seed-{args.seed}" / "student-sft"
    if not (sft / "config.json").is_file():
        parser.error(f"{sft}: no SFT student there (run `cxrmax demo --out {args.demo}` first)")
    work = (args.out or demo / "apo-sweep").resolve()
    shutil.rmtree(work, ignore_errors=True)
    sets = dict(_named_path(text) for text in args.preferences or [f"demo={demo / 'data' / 'preferences'}"])

    def prefix(set_name: str) -> str:
        return "" if len(sets) == 1 else f"{set_name}_"

    jobs = [
        {
            "demo": str(demo),
            "preferences": path,
            "out": str(work / f"{prefix(set_name)}lr{lr:g}_beta{beta:g}"),
            "sft": str(sft),
            "size": size,
            "lr": lr,
            "beta": beta,
            "loss": args.loss,
            "seed": args.seed,
            "name": f"apo-{prefix(set_name)}lr{lr:g}_beta{beta:g}",
        }
        for set_name, path in sets.items()
        for lr in args.lr
        for beta in args.beta
    ]
    workers = max(1, min(args.workers or sim.default_workers(), len(jobs)))
    with spawn_pool(workers, initializer=D._torch_threads) as pool:
        names = list(pool_map(pool, _train_one, jobs))
    eval_out = work / "eval"
    _answer("sft", sft, demo, work, size, args.seed)
    for job, name in zip(jobs, names, strict=True):
        shutil.move(
            str(Path(job["out"]) / "eval" / "trajectories" / name), str(eval_out / "trajectories" / name)
        )
    import pyarrow.parquet as pq

    test = pq.read_table(demo / "selection-test.parquet")
    nobody = SimpleNamespace(teachers=[])
    rows = {
        row["model"]: row
        for row in D.score_models(eval_out, demo / "mimic", test, work / "lb.sqlite", nobody)
    }
    print(
        f"APO sweep: {args.loss}, {size.apo_steps} steps of {size.apo_batch} samples from the seed-{args.seed} "
        f"SFT student of {demo} ({next(iter(rows.values()))['answers']} test answers per model)\n"
    )
    head = "| setting | halluc | side | refuse | mean prec/rec/sim | words | reward acc. | margin |"
    print(head)
    print("|---" * 8 + "|")
    table = []
    for name in ["sft", *names]:
        row = rows[name]
        log = (
            D.report.read_log(work / name.replace("apo-", "") / "model" / "log.jsonl")
            if name != "sft"
            else []
        )
        last = [r for r in log if "rewards/accuracies" in r][-1:] or [{}]
        quality = sum(row[k] or 0.0 for k in ("precision", "recall", "similarity")) / 3
        cells = [D._cell(row, k) for k in KEYS]
        acc, margin = last[0].get("rewards/accuracies"), last[0].get("rewards/margins")
        print(
            f"| {'SFT (start)' if name == 'sft' else _setting(name)} | "
            + " | ".join(cells)
            + f" | {quality:.3f} | {row['mean_words']:.0f} | "
            + ("" if acc is None else f"{acc:.2f}")
            + " | "
            + ("" if margin is None else f"{margin:.2f}")
            + " |"
        )
        table.append({"setting": name, "quality": quality, "accuracy": acc, "margin": margin, **row})
    if args.json:
        args.json.write_text(json.dumps(sim.json_ready(table), indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
