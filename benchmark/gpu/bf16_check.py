"""A short prepared device check: a few bf16 APO steps on CUDA with tiny models; also runs on CPU (dry check).

What it runs (each a few optimizer steps of cxrmax's APOTrainer, LoRA r=8 all-linear, 1 positive + 7
negatives per sample):
  1. tiny text LM, float32 weights + bf16 autocast (Trainer bf16=True)
  2. tiny text LM, bfloat16 weights (the usual LoRA-on-bf16-base setup) + bf16 autocast
  3. tiny text LM, bf16 + gradient checkpointing + precomputed reference log-probs
  4. tiny Qwen2-VL with images from a generated mini MIMIC-CXR, bf16 autocast
and, before training, compares reference log-probs of the bf16 model with float32 ones.

Prints one line per run (losses per step, final metrics, seconds/step, peak memory) and a JSON summary
line starting with "SUMMARY ". Exit status 1 when a loss or metric is not finite or a run fails.

    python benchmark/gpu/bf16_check.py                 # CUDA when available, else CPU
    python benchmark/gpu/bf16_check.py --device cpu    # dry check on CPU (bf16 autocast on CPU)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

NEGATIVES = 7


def _words(rng: random.Random, n: int) -> str:
    from cxrmax.toy.tinyvlm import RADIOLOGY_WORDS

    return " ".join(rng.choice(RADIOLOGY_WORDS) for _ in range(n))


def make_preferences(path: Path, samples: int, image_paths: list[str] | None) -> Path:
    import datasets
    import pyarrow as pa

    from cxrmax.core.schemas import PREFERENCE_SCHEMA

    rng = random.Random(0)
    positive = "bilateral pleural effusion with mild edema and no pneumothorax"
    rows = []
    for i in range(samples):
        rows.append(
            {
                "sample_id": f"s{i}",
                "prompt": "This is a patient's chest DR image. Please explain the basis for the diagnosis of effusion.",
                "chosen": positive + " " + _words(rng, 20),
                "rejected": [_words(rng, rng.randint(15, 40)) for _ in range(NEGATIVES)],
                "rejected_drift": [1.0 - j / NEGATIVES for j in range(NEGATIVES)],
                "image_path": image_paths[i % len(image_paths)] if image_paths else None,
            }
        )
    table = pa.Table.from_pylist(rows, schema=PREFERENCE_SCHEMA)
    datasets.DatasetDict({"train": datasets.Dataset(table)}).save_to_disk(str(path))
    return path


def peak_memory_mb(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def logps_bf16_vs_fp32(model_path: Path, prefs: Path, device: str) -> float:
    """Max |reference log-prob (bf16 weights) - reference log-prob (fp32)| over a batch, per token."""
    import torch

    from apo_train.data import APOCollator, ChatEncoder, load_split, tokenize_preferences
    from apo_train.modeling import load_model, load_processor
    from apo_train.trainer import completion_logps

    encoder = ChatEncoder(load_processor(model_path))
    ds, _ = tokenize_preferences(load_split(prefs), encoder, max_length=512)
    batch = APOCollator(encoder)([ds[0], ds[1]])
    batch = {k: v.to(device) for k, v in batch.items()}
    values = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(model_path, dtype).to(device).eval()
        with torch.no_grad():
            logps, counts = completion_logps(model, batch)
        values[dtype] = (logps.float(), counts)
    diff = (values["float32"][0] - values["bfloat16"][0]).abs() / values["float32"][1].clamp(min=1)
    return float(diff.max())


def run_apo(
    name: str, model_path: Path, prefs: Path, out: Path, device: str, steps: int, **overrides
) -> dict:
    import torch

    from apo_train.config import APOConfig
    from apo_train.trainer import run_apo as train

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    settings = dict(
        output_dir=str(out / name),
        model_name_or_path=str(model_path),
        dataset_path=str(prefs),
        max_steps=steps,
        learning_rate=5e-3,
        per_device_train_batch_size=2,
        global_batch_size=None,
        logging_steps=1,
        save_strategy="no",
        use_cpu=device == "cpu",
        bf16=True,
        max_length=512,
        lora_dropout=0.0,
        seed=0,
        report_to="none",
    )
    settings.update(overrides)
    start = time.perf_counter()
    result = train(APOConfig(**settings))
    seconds = time.perf_counter() - start
    logs = [h for h in result["log_history"] if "rewards/accuracies" in h]
    keys = (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/margins_max",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    )
    finite = all(math.isfinite(h[k]) for h in logs for k in keys if k in h) and len(logs) == steps
    return {
        "run": name,
        "ok": finite,
        "losses": [round(h["loss"], 5) for h in logs],
        "final": {k: round(logs[-1][k], 5) for k in keys if logs and k in logs[-1]},
        "seconds_per_step": round(seconds / max(1, steps), 4),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-vlm", action="store_true")
    args = parser.parse_args()

    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        print("CUDA requested but not available", file=sys.stderr)
        return 1
    info = {"device": device, "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    print("device:", json.dumps(info))

    from cxrmax.toy.tinyvlm import build_tiny_vlm

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bf16_check_"))
    lm = build_tiny_vlm(work / "tiny-lm", text_only=True)
    prefs = make_preferences(work / "prefs", args.samples, None)
    results, failures = [], 0

    try:
        diff = logps_bf16_vs_fp32(lm, prefs, device)
        print(f"reference log-prob bf16 vs fp32: max |diff| per token = {diff:.4g}")
        info["bf16_fp32_logp_diff_per_token"] = diff
    except Exception:  # keep going: the training runs are the main check
        traceback.print_exc()
        failures += 1

    runs = [
        ("lm-fp32-weights-bf16-autocast", lm, prefs, {}),
        ("lm-bf16-weights", lm, prefs, {"torch_dtype": "bfloat16"}),
        (
            "lm-bf16-gradckpt-precomputed-ref",
            lm,
            prefs,
            {"torch_dtype": "bfloat16", "gradient_checkpointing": True, "precompute_ref_log_probs": True},
        ),
    ]
    if not args.skip_vlm:
        try:
            from cxrmax.testing.mini_mimic import make_mini_mimic

            vlm = build_tiny_vlm(work / "tiny-vlm")
            mimic = make_mini_mimic(work / "mimic", studies=6, seed=0)
            images = sorted(p.relative_to(mimic).as_posix() for p in (mimic / "files").rglob("*.jpg"))[:4]
            vlm_prefs = make_preferences(work / "vlm-prefs", args.samples, images)
            runs.append(
                ("vlm-images-bf16-autocast", vlm, vlm_prefs, {"image_root": str(mimic), "max_edge": 224})
            )
        except Exception:
            traceback.print_exc()
            failures += 1

    for name, model_path, data, overrides in runs:
        try:
            result = run_apo(name, model_path, data, work / "runs", device, args.steps, **overrides)
        except Exception:
            traceback.print_exc()
            result = {"run": name, "ok": False, "error": traceback.format_exc(limit=3)}
        results.append(result)
        failures += 0 if result["ok"] else 1
        print(f"{name}: " + json.dumps({k: v for k, v in result.items() if k != "run"}))

    print("SUMMARY " + json.dumps({"info": info, "runs": results, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
