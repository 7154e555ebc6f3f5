"""Benchmark: cxrmax APO (one positive + N negatives per sample, positive computed once) vs TRL's
DPOTrainer fed the pairwise split (N rows of positive/negative pairs per sample), in one run.

Same model (a few-M-parameter Qwen2 text LM built in code so compute dominates overhead), same data,
same LoRA (r=8, alpha=32, all-linear), same reference handling (adapter disabled, computed on the fly),
same optimizer steps: one sample (1+N rows for cxrmax, N pairs = 2N rows for TRL) per step.
Each trainer runs in its own subprocess so peak memory is measured separately.

    python benchmark/perf/bench_apo.py            # full size (about 3-5 minutes on 2 CPU cores)
    python benchmark/perf/bench_apo.py --quick    # small sizes, seconds
    python benchmark/perf/bench_apo.py --device cuda --bf16

Prints time per sample, peak memory and the ratio cxrmax / TRL (goal <= 0.6; the compute bound with
7 negatives is 8/14 = 0.57).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


# ------------------------------------------------------------------------------------------- set-up
def build_model(path: Path, hidden: int, layers: int) -> int:
    """A Qwen2 causal LM with cxrmax's tiny tokenizer, sized so the transformer blocks dominate."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from cxrmax.toy.tinyvlm import build_tokenizer

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def build_data(path: Path, samples: int, negatives: int, words: tuple[int, int], seed: int = 0) -> None:
    """The same samples in both layouts: preferences (1 + N) and the pairwise split (N rows each)."""
    import datasets
    import pyarrow as pa

    from cxrmax.core.schemas import PREFERENCE_SCHEMA
    from cxrmax.toy.tinyvlm import RADIOLOGY_WORDS

    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(RADIOLOGY_WORDS) for _ in range(rng.randint(*words)))

    rows, pairs = [], []
    for i in range(samples):
        prompt = "This is a patient's chest DR image. Please explain the basis for the diagnosis of edema."
        chosen, rejected = text(), [text() for _ in range(negatives)]
        rows.append({"sample_id": f"s{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected})
        for r in rejected:
            pairs.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": r}],
                }
            )
    table = pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA)
    datasets.DatasetDict({"train": datasets.Dataset(table)}).save_to_disk(str(path / "preferences"))
    datasets.Dataset.from_list(pairs).save_to_disk(str(path / "pairs"))


# ------------------------------------------------------------------------------------------- workers
def _timed_train(trainer, samples: int, device: str) -> dict:
    """Wall and process-CPU seconds of trainer.train() (CPU time is robust to other load on the box)."""
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
    before = _rss_mb()
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    return {
        "seconds": time.perf_counter() - wall,
        "cpu_seconds": time.process_time() - cpu,
        "samples": samples,
        "peak_mb": _peak_memory_mb(device),
        "rss_before_mb": before,
    }


def _peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _common_args(work: Path, device: str, bf16: bool, steps: int, max_length: int) -> dict:
    return dict(
        output_dir=str(work / "out"),
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=max(1, steps),
        save_strategy="no",
        report_to="none",
        use_cpu=device == "cpu",
        bf16=bf16,
        seed=0,
        dataloader_num_workers=0,
        max_length=max_length,
        disable_tqdm=True,
    )


def worker_cxrmax(work: Path, device: str, bf16: bool, samples: int, max_length: int, per_step: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apo_train.config import APOConfig
    from apo_train.data import APOCollator, ChatEncoder, load_split, tokenize_preferences
    from apo_train.modeling import attach_lora
    from apo_train.trainer import APOTrainer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    model = attach_lora(model, 8, 32, 0.0, "all-linear")
    encoder = ChatEncoder(tokenizer)
    dataset, _ = tokenize_preferences(load_split(work / "preferences"), encoder, max_length=max_length)
    args = APOConfig(
        **_common_args(work / "cxrmax", device, bf16, samples // per_step, max_length),
        per_device_train_batch_size=per_step,
        global_batch_size=None,
        jsonl_log=False,
    )
    trainer = APOTrainer(model, args, train_dataset=dataset, data_collator=APOCollator(encoder))
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return _timed_train(trainer, samples, device)


def worker_trl(
    work: Path, device: str, bf16: bool, samples: int, max_length: int, per_step: int, negatives: int
) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    pairs = datasets.load_from_disk(str(work / "pairs"))
    args = DPOConfig(
        **_common_args(work / "trl", device, bf16, samples // per_step, max_length),
        per_device_train_batch_size=per_step * negatives,  # one sample = its N pairs
        gradient_accumulation_steps=1,
        beta=0.1,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=pairs,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=8, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        ),
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return _timed_train(trainer, samples, device)


# ---------------------------------------------------------------------------------------------- main
def _parse_args() -> argparse.Namespace:
    """The command line (``--worker`` is how main() starts each measured process)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small model and few samples")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--negatives", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--per-step", type=int, default=1, help="samples per optimizer step")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads in the workers (CPU; default 1)"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", choices=("cxrmax", "trl"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    """Build the model and data once, then time each trainer in its own process."""
    args = _parse_args()
    samples = args.samples or (4 if args.quick else 24)
    hidden = args.hidden or (128 if args.quick else 256)
    layers = args.layers or (2 if args.quick else 4)
    words = (20, 40) if args.quick else (80, 140)

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.worker == "cxrmax":
            result = worker_cxrmax(
                args.workdir, args.device, args.bf16, samples, args.max_length, args.per_step
            )
        else:
            result = worker_trl(
                args.workdir, args.device, args.bf16, samples, args.max_length, args.per_step, args.negatives
            )
        print("RESULT " + json.dumps(result))
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_apo_"))
    work.mkdir(parents=True, exist_ok=True)
    params = build_model(work / "model", hidden, layers)
    build_data(work, samples, args.negatives, words)
    print(
        f"model: Qwen2 {hidden}x{layers}, {params / 1e6:.2f}M params; {samples} samples x (1 positive + "
        f"{args.negatives} negatives), {words[0]}-{words[1]} words each; device {args.device}"
        f"{' bf16' if args.bf16 else ''}; LoRA r=8 all-linear; reference = adapter disabled"
    )
    results = {}
    for name in ("cxrmax", "trl"):
        cmd = [
            sys.executable,
            __file__,
            "--worker",
            name,
            "--workdir",
            str(work),
            "--samples",
            str(samples),
            "--negatives",
            str(args.negatives),
            "--max-length",
            str(args.max_length),
            "--per-step",
            str(args.per_step),
            "--device",
            args.device,
        ]
        if args.bf16:
            cmd.append("--bf16")
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} worker failed (exit {done.returncode})")
        results[name] = json.loads(line[len("RESULT ") :])
    ours, trl = results["cxrmax"], results["trl"]
    per_ours = ours["seconds"] / ours["samples"]
    per_trl = trl["seconds"] / trl["samples"]
    memory = "GPU peak allocated" if args.device == "cuda" else "peak RSS"
    print(f"{'':24}{'cxrmax APO (PL, 1+N rows)':>28}{'TRL DPO (N pairs)':>22}{'ratio':>8}")
    print(f"{'seconds per sample':24}{per_ours:>28.3f}{per_trl:>22.3f}{per_ours / per_trl:>8.2f}")
    if args.device == "cpu":
        cpu_ours, cpu_trl = ours["cpu_seconds"] / ours["samples"], trl["cpu_seconds"] / trl["samples"]
        print(f"{'CPU seconds per sample':24}{cpu_ours:>28.3f}{cpu_trl:>22.3f}{cpu_ours / cpu_trl:>8.2f}")
    print(
        f"{memory + ' (MiB)':24}{ours['peak_mb']:>28.0f}{trl['peak_mb']:>22.0f}{ours['peak_mb'] / trl['peak_mb']:>8.2f}"
    )
    if args.device == "cpu":
        grow_ours = ours["peak_mb"] - ours["rss_before_mb"]
        grow_trl = trl["peak_mb"] - trl["rss_before_mb"]
        ratio = grow_ours / grow_trl if grow_trl > 0 else float("nan")
        print(f"{'training growth (MiB)':24}{grow_ours:>28.0f}{grow_trl:>22.0f}{ratio:>8.2f}")
    goal = "met" if per_ours / per_trl <= 0.6 else "NOT met"
    if args.device == "cpu" and cpu_ours / cpu_trl <= 0.6 < per_ours / per_trl:
        goal += " in wall time; met in CPU time (other load on this machine)"
    print(
        f"goal: time ratio <= 0.60 ({goal}); compute bound (1+N)/(2N) = {(1 + args.negatives) / (2 * args.negatives):.2f}"
    )


if __name__ == "__main__":
    main()
