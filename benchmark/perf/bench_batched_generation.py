"""Benchmark: `generate` with the in-process transformers backend, one request at a time vs batched.

The demo's teachers and students answer with a ~200k-parameter Qwen2-VL on CPU; at that size a decode
step is mostly Python and kernel-launch overhead, paid once per step whatever the batch, so answering
``--batch-size`` requests together amortises it. This script runs the real `generate` (orchestrator,
store, Arrow shards) over the test split of a demo's output folder (2 answers a film) with each trained teacher, once per
batch size, round-robin so the machine's load hits all alike, one thread; it prints per batch size
the seconds for all answers, the generated tokens per second and the ratio to batch size 1, and how
many answers are word for word those of batch size 1 (each row samples from its own seeded generator,
so only float rounding in the last bits, from padding and matrix shapes, can move a sampled token).

    cxrmax demo --out demo-out                                          # once, for trained teachers
    python benchmark/perf/bench_batched_generation.py demo-out           # batch 1, 8, 16, 32; 2 rounds
    python benchmark/perf/bench_batched_generation.py demo-out --batch-sizes 1 16 --rounds 1
    python benchmark/perf/bench_batched_generation.py --quick            # no folder: a small demo first
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "demo_out",
        type=Path,
        nargs="?",
        help="a `cxrmax demo` output folder (its teachers and test split); default: run `cxrmax demo --size "
        "small` into a temporary folder first",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--teachers", nargs="+", default=None, help="teacher names (default: all)")
    parser.add_argument("--quick", action="store_true", help="batch sizes 1 and 16, one round")
    args = parser.parse_args()
    if args.quick:
        args.batch_sizes, args.rounds = [1, 16], 1

    import json

    import torch

    from cxrmax.generate import read_trajectories
    from cxrmax.generate.orchestrator import GenerateOptions, generate
    from cxrmax.generate.roster import ModelSpec
    from cxrmax.toy.demo import demo_prompt

    scratch = Path(tempfile.mkdtemp(prefix="bench-batched-"))
    out = args.demo_out
    if out is None:
        from cxrmax.toy.demo import run_demo

        out = scratch / "demo"
        print("no demo folder given: running `cxrmax demo --size small` for trained teachers", flush=True)
        run_demo(out, size="small", seed=0)
    torch.set_num_threads(1)
    spec = json.loads((out / "teachers" / "drift_spec.json").read_text())
    names = args.teachers or [t["name"] for t in spec["teachers"]]
    prompt = demo_prompt()  # the demo's own prompt

    seconds: dict[int, list[float]] = {b: [] for b in args.batch_sizes}
    tokens: dict[int, int] = {}
    answers: dict[int, dict[str, str]] = {}
    try:
        for round_ in range(args.rounds + 1):  # round 0 warms the caches up and is not counted
            for batch in args.batch_sizes:
                run = scratch / f"r{round_}-b{batch}"
                started = time.perf_counter()
                for name in names:
                    options = GenerateOptions(
                        model=ModelSpec(
                            name=name,
                            hf_id=name,
                            sampling={"temperature": 1.0, "top_p": 1.0, "max_tokens": 160},
                            in_roster=False,
                        ),
                        selection=out / "selection-test.parquet",
                        mimic_root=out / "mimic",
                        out=run,
                        prompt=prompt,
                        backend="transformers",
                        model_path=str(out / "teachers" / name),
                        samples=2,
                        seed=0,
                        concurrency=2,
                        batch_size=batch,
                        image_max_edge=112,
                        image_cache=scratch / "images",
                    )
                    generate(options)
                elapsed = time.perf_counter() - started
                table = read_trajectories(run, columns=["request_key", "text", "completion_tokens"])
                tokens[batch] = sum(table["completion_tokens"].to_pylist())
                answers[batch] = dict(
                    zip(table["request_key"].to_pylist(), table["text"].to_pylist(), strict=True)
                )
                if round_:
                    seconds[batch].append(elapsed)
                shutil.rmtree(run)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    base = statistics.median(seconds[args.batch_sizes[0]])
    reference = answers[args.batch_sizes[0]]
    print(
        f"{len(names)} teachers x {len(reference) // len(names)} test answers, one thread, {args.rounds} round(s)"
    )
    print(f"{'batch':>5} {'seconds':>8} {'tokens/s':>9} {'vs first':>8} {'same answers':>13}")
    for batch in args.batch_sizes:
        median = statistics.median(seconds[batch])
        same = sum(answers[batch].get(k) == v for k, v in reference.items())
        print(
            f"{batch:>5} {median:>8.2f} {tokens[batch] / median:>9.0f} {median / base:>7.2f}x "
            f"{same:>6}/{len(reference)}"
        )


if __name__ == "__main__":
    main()
