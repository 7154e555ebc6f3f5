"""Leaderboard scoring speed and memory.

Cases (each run in a fresh child process, so that seconds include imports and reading and the peak
RSS is the child's own):
- labels: a 100,000-study label submission (CSV, 1/0/-1/blank) against 100,000 reference studies,
  with 1,000 bootstrap resamples (goal <= 5 s);
- labels-submit: the same file scored and stored on a fresh SQLite board (fingerprint, canonical
  predictions hashed and kept, one transaction; goal <= 5 s);
- labels-parquet: the same as Parquet probabilities (AUROC path);
- reports: a 10,000-report ReXrank-style JSON against 10,000 reference findings: BLEU-1..4, ROUGE-L,
  CIDEr-D, ReXrank's BLEU-2, clinical-efficacy F1 through the labeler on both sides, 1,000 bootstrap
  resamples (goal <= 30 s);
- reports-submit: the same scored and stored on a fresh board (goal <= 30 s).
Peers measured in the same run on the same data: scikit-learn f1_score (micro+macro over 14 labels)
and sacrebleu corpus BLEU + rouge-score ROUGE-L (one metric pass each, no labeling, no CIs).

    python benchmark/perf/bench_leaderboard.py            # full size
    python benchmark/perf/bench_leaderboard.py --quick    # 10x smaller
    python benchmark/perf/bench_leaderboard.py --stream-mib 1024   # the reader on a 1 GiB file
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _make_label_data(out: Path, n: int) -> tuple[Path, Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrmax.core.pathologies import OBSERVATIONS

    rng = np.random.default_rng(0)
    ids = 50_000_000 + np.arange(n) * 3
    ref = rng.choice([1.0, 0.0, -1.0, np.nan], size=(n, 14), p=[0.2, 0.3, 0.05, 0.45]).astype(np.float32)
    pq.write_table(
        pa.table({"study_id": ids, **{o: ref[:, j] for j, o in enumerate(OBSERVATIONS)}}),
        out / "label_refs.parquet",
    )
    pred = np.where(rng.random(ref.shape) < 0.8, ref, rng.choice([1.0, 0.0, -1.0, np.nan], size=ref.shape))
    order = rng.permutation(n)  # submissions need not be sorted
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["study_id", *OBSERVATIONS])
        for i in order:
            writer.writerow([int(ids[i]), *("" if np.isnan(v) else int(v) for v in pred[i])])
    prob = np.clip(np.nan_to_num(ref, nan=0.0) * 0.5 + rng.random(ref.shape) * 0.5, 0.001, 0.999).round(4)
    pq.write_table(
        pa.table({"study_id": ids[order], **{o: prob[order, j] for j, o in enumerate(OBSERVATIONS)}}),
        out / "probs.parquet",
    )
    return out / "label_refs.parquet", out / "labels.csv", out / "probs.parquet"


def _report(rnd: random.Random, labels: dict[str, int | None]) -> str:
    from cxrmax.testing.mini_mimic import statement

    sides = ("left", "right", "bilateral", None)
    parts = ["PA and lateral views of the chest."]
    for obs, value in labels.items():
        if value is not None:
            parts.append(statement(obs, value, rnd.choice(sides), rnd.randrange(4)))
    return " ".join(parts)


def _make_report_data(out: Path, n: int) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cxrmax.core.pathologies import FINDINGS

    rnd = random.Random(0)
    ids, refs, preds = [], [], []
    for i in range(n):
        truth = {o: rnd.choice([1, 0, -1, None, None, None]) for o in FINDINGS if o != "Support Devices"}
        guess = {o: (v if rnd.random() < 0.75 else rnd.choice([1, 0, None])) for o, v in truth.items()}
        ids.append(50_000_000 + i)
        refs.append(_report(rnd, truth))
        preds.append(_report(rnd, guess))
    pq.write_table(pa.table({"study_id": ids, "findings": refs}), out / "report_refs.parquet")
    (out / "reports.json").write_text(
        json.dumps({str(s): {"model_prediction": p} for s, p in zip(ids, preds, strict=True)})
    )
    (out / "texts.json").write_text(json.dumps({"refs": refs, "preds": preds}))
    return out / "report_refs.parquet", out / "reports.json"


def _make_big_files(out: Path, mib: int) -> None:
    """A report submission of about ``mib`` MiB as JSONL and as ReXrank JSON (2 kB per row)."""
    text = json.dumps("Heart size is normal. No focal consolidation, effusion or pneumothorax. " * 28)
    rows = mib * 2**20 // 2100
    with open(out / "big.jsonl", "w") as jsonl, open(out / "big.json", "w") as obj:
        obj.write("{")
        for i in range(rows):
            jsonl.write(f'{{"study_id": {50_000_000 + i}, "report": {text}}}\n')
            obj.write(("," if i else "") + f'"{50_000_000 + i}": {{"model_prediction": {text}}}')
        obj.write("}")


def _child(case: str, data: Path) -> None:
    start = time.perf_counter()
    result: dict[str, object] = {}
    if case in ("labels", "labels-submit", "labels-parquet", "reports", "reports-submit"):
        from cxrmax.leaderboard import score

        if case in ("labels", "labels-submit"):
            r = score(data / "labels.csv", "mimic-cxr-labels", data / "label_refs.parquet", n_boot=1000)
        elif case == "labels-parquet":
            r = score(data / "probs.parquet", "mimic-cxr-labels", data / "label_refs.parquet", n_boot=1000)
        else:
            r = score(
                data / "reports.json",
                "mimic-cxr-report",
                data / "report_refs.parquet",
                n_boot=1000,
                processes=2,
            )
        result = {k: round(v, 4) for k, v in r.headline.items() if isinstance(v, float)}
        result["n_scored"] = r.n_scored
        if "rexrank_bleu_2" in r.extra:
            result["rexrank_bleu_2"] = round(r.extra["rexrank_bleu_2"], 4)
        if case.endswith("-submit"):
            from cxrmax.leaderboard.store import Board

            with tempfile.TemporaryDirectory() as board_dir, Board(Path(board_dir) / "board.sqlite") as board:
                result["entry"] = board.submit(r, "bench")
                blob = board._conn.execute("SELECT length(data) FROM predictions").fetchone()[0]
                result["stored_predictions_MiB"] = round(blob / 2**20, 2)
    elif case.startswith("stream-"):
        from cxrmax.leaderboard.submissions import iter_batches

        path = data / f"big.{case.split('-', 1)[1]}"
        rows = sum(len(batch) for batch in iter_batches(path))
        result = {"rows": rows, "MiB": round(path.stat().st_size / 2**20), "MiB/s": None}
    elif case == "sklearn":
        import pandas as pd
        import pyarrow.parquet as pq
        from sklearn.metrics import f1_score

        from cxrmax.core.pathologies import OBSERVATIONS

        refs = pq.read_table(data / "label_refs.parquet").to_pandas().set_index("study_id")
        sub = pd.read_csv(data / "labels.csv").set_index("study_id").loc[refs.index]
        y_true = (refs[list(OBSERVATIONS)].abs() == 1).to_numpy().astype(int)  # uncertain counts positive
        y_pred = (sub[list(OBSERVATIONS)].abs() == 1).to_numpy().astype(int)
        result = {
            "micro_f1_14": round(f1_score(y_true, y_pred, average="micro"), 4),
            "macro_f1_14": round(f1_score(y_true, y_pred, average="macro", zero_division=0), 4),
        }
    elif case == "sacrebleu+rouge-score":
        import sacrebleu
        from rouge_score import rouge_scorer

        texts = json.loads((data / "texts.json").read_text())
        bleu = sacrebleu.corpus_bleu(texts["preds"], [texts["refs"]])
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        rouge = float(
            np.mean(
                [
                    scorer.score(r, p)["rougeL"].fmeasure
                    for r, p in zip(texts["refs"], texts["preds"], strict=True)
                ]
            )
        )
        result = {"bleu_4(13a)": round(bleu.score / 100, 4), "rouge_l": round(rouge, 4)}
    result["seconds"] = round(time.perf_counter() - start, 2)
    if "MiB/s" in result:
        result["MiB/s"] = round(result["MiB"] / result["seconds"])
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_seconds"] = round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 2)
    result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


def _run(case: str, data: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, "--data", str(data)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{case} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10x smaller inputs")
    parser.add_argument(
        "--stream-mib", type=int, default=None, help="size of the streamed-file case (default 512, quick 64)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.data)
        return
    n_labels, n_reports = (10_000, 1_000) if args.quick else (100_000, 10_000)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        t = time.perf_counter()
        _make_label_data(data, n_labels)
        _make_report_data(data, n_reports)
        stream_mib = args.stream_mib if args.stream_mib is not None else (64 if args.quick else 512)
        if stream_mib:
            _make_big_files(data, stream_mib)
        print(
            f"generated data in {time.perf_counter() - t:.1f} s: {n_labels:,} label studies "
            f"({(data / 'labels.csv').stat().st_size / 2**20:.1f} MiB CSV), {n_reports:,} reports "
            f"({(data / 'reports.json').stat().st_size / 2**20:.1f} MiB JSON)"
        )
        rows = [
            (f"cxrmax labels CSV, {n_labels:,} studies, 1000 bootstrap", "labels", "<= 5 s"),
            (f"cxrmax labels CSV scored + stored on a board, {n_labels:,}", "labels-submit", "<= 5 s"),
            (f"cxrmax labels Parquet probabilities (AUROC), {n_labels:,}", "labels-parquet", "<= 5 s"),
            (f"peer: pandas + sklearn f1_score, {n_labels:,}", "sklearn", ""),
            (
                f"cxrmax reports JSON, {n_reports:,}, BLEU/ROUGE-L/CIDEr-D/CE-F1 + bootstrap",
                "reports",
                "<= 30 s",
            ),
            (f"cxrmax reports JSON scored + stored on a board, {n_reports:,}", "reports-submit", "<= 30 s"),
            (f"peer: sacrebleu BLEU + rouge-score ROUGE-L, {n_reports:,}", "sacrebleu+rouge-score", ""),
        ]
        if stream_mib:
            rows += [
                (f"reader only: {stream_mib} MiB JSONL streamed (memory flat)", "stream-jsonl", ""),
                (f"reader only: {stream_mib} MiB ReXrank JSON streamed (memory flat)", "stream-json", ""),
            ]
        from cxrmax.leaderboard.textmetrics import wordnet_available

        meteor = "included (WordNet found)" if wordnet_available() else "not computed (no WordNet data)"
        print(f"METEOR in the reports case: {meteor}")
        print(
            f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (wall seconds grow with it; CPU seconds less so)"
        )
        print(f"{'case':<72} {'seconds':>8} {'CPU s':>7} {'peak RSS MiB':>13} {'goal':>8}  figures")
        for label, case, goal in rows:
            result = _run(case, data)
            seconds, cpu, rss = result.pop("seconds"), result.pop("cpu_seconds"), result.pop("peak_rss_mib")
            print(f"{label:<72} {seconds:>8} {cpu:>7} {rss:>13} {goal:>8}  {result}")


if __name__ == "__main__":
    main()
