"""Benchmark: `build-preferences` (vote consensus) over CXR-MAX-sized synthetic trajectories.

Writes 7 models x 24,426 samples = 170,982 synthetic trajectories as generate-format shards
(schemas.TRAJECTORY_SCHEMA, Arrow IPC streams), then times the full build (labelling, drift
annotations, vote consensus, composed positives, ranking, datasets + TRL + ms-swift exports, card,
figures) and records the peak RSS of the whole process tree. Side by side, in the same run: the
labelling floor alone (`cxrmax.labeler.label_texts` over the same texts, B's batched labeller).

Goal (issue 5): at most 2 minutes and 4 GB on 2 cores.

    /work/venv/bin/python benchmark/perf/bench_preferences.py            # full size
    /work/venv/bin/python benchmark/perf/bench_preferences.py --quick    # 7 x 1,000
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from cxrmax.core import schemas
from cxrmax.core.pathologies import LATERALIZABLE, OBSERVATIONS

MODELS = ("sonnet", "gpt5nano", "glm45v", "gemini", "moonshot", "qwenmax", "grok4")
PROMPT = (
    "This is a patient's chest DR image. The patient is diagnosed with {labels}. "
    "Please explain the basis for the diagnosis of {labels}."
)
FINDING_SENTENCES = {
    "Atelectasis": "There is {side}basilar opacity with volume loss, consistent with {side}atelectasis.",
    "Cardiomegaly": "The cardiac silhouette is enlarged, indicating cardiomegaly.",
    "Consolidation": "Dense {side}airspace consolidation is present.",
    "Edema": "Vascular congestion with interstitial markings suggests pulmonary edema.",
    "Enlarged Cardiomediastinum": "The mediastinum appears widened.",
    "Fracture": "A {side}rib fracture is visible.",
    "Lung Lesion": "A {side}pulmonary nodule is noted.",
    "Lung Opacity": "There is a {side}lung opacity.",
    "Pleural Effusion": "Blunting of the {side}costophrenic angle indicates {side}pleural effusion.",
    "Pleural Other": "There is {side}pleural thickening.",
    "Pneumonia": "The {side}opacity could represent pneumonia.",
    "Pneumothorax": "A {side}pneumothorax is seen.",
    "Support Devices": "A cardiac pacemaker is in place.",
}
NEGATIONS = ("No pneumothorax is identified.", "There is no pleural effusion.", "No focal consolidation.")
FILLERS = (
    "The image is a frontal chest radiograph.",
    "Overall, the lungs are otherwise clear.",
    "Bony structures are unremarkable.",
    "Correlation with clinical findings is recommended.",
)
REFUSAL = "As an AI, I'm not capable of providing medical diagnoses. Please consult a radiologist."


def synth_text(rng: np.random.Generator, positives: list[str], sides: dict[str, str], model: int) -> str:
    """One chatbot-style trajectory with model-specific drift (omissions, hallucinations, side flips)."""
    if rng.random() < 0.01 + 0.01 * (model == 4):
        return REFUSAL
    lines = ["**Analysis of the chest radiograph**", "", FILLERS[0]]
    recall = 0.6 + 0.05 * model
    for n, name in enumerate(positives, 1):
        if rng.random() > recall:
            continue
        side = sides.get(name, "")
        if side and rng.random() < 0.08 + 0.03 * (model % 3):
            side = {"left ": "right ", "right ": "left "}.get(side, side)
        lines.append(f"{n}. **{name}**: " + FINDING_SENTENCES[name].format(side=side))
    if rng.random() < 0.15 + 0.04 * model:
        extra = OBSERVATIONS[int(rng.integers(0, len(OBSERVATIONS)))]
        if extra in FINDING_SENTENCES and extra not in positives:
            lines.append("- Additionally, " + FINDING_SENTENCES[extra].format(side="").lower())
    lines.append(NEGATIONS[int(rng.integers(0, len(NEGATIONS)))])
    lines.append(FILLERS[1 + int(rng.integers(0, 3))])
    if positives:
        lines.append("")
        lines.append(
            f"**Conclusion**: The findings support the diagnosis of {', '.join(p.lower() for p in positives)}."
        )
    return "\n".join(lines)


def write_synthetic(out: Path, samples: int, seed: int = 0) -> int:
    """Write generate-format shards for `samples` samples x 7 models; returns the row count."""
    rng = np.random.default_rng(seed)
    findings = [o for o in OBSERVATIONS if o != "No Finding"]
    per_sample = []
    for i in range(samples):
        k = int(rng.integers(1, 4))
        positives = sorted(rng.choice(findings, size=k, replace=False).tolist(), key=OBSERVATIONS.index)
        sides = {
            p: ("left ", "right ", "bilateral ")[int(rng.integers(0, 3))]
            for p in positives
            if p in LATERALIZABLE
        }
        labels = {name: (1.0 if name in positives else None) for name in OBSERVATIONS}
        split = "test" if i % 50 == 0 else "validate" if i % 50 == 1 else "train"
        per_sample.append(
            (f"{i:08x}-synthetic", positives, sides, labels, split, 10_000_000 + i // 3, 50_000_000 + i)
        )
    rows = 0
    for m, model in enumerate(MODELS):
        directory = out / "trajectories" / model
        directory.mkdir(parents=True, exist_ok=True)
        with pa.ipc.new_stream(
            str(directory / "part-all-0-000000.arrow"), schemas.TRAJECTORY_SCHEMA
        ) as writer:
            batch: list[dict] = []
            for sample_id, positives, sides, labels, split, subject, study in per_sample:
                labels_text = ", ".join(p.lower() for p in positives)
                batch.append(
                    {
                        "request_key": f"{model}-{sample_id}",
                        "sample_id": sample_id,
                        "dicom_id": sample_id,
                        "subject_id": subject,
                        "study_id": study,
                        "split": split,
                        "view": "PA",
                        "image_path": f"files/p10/p{subject}/s{study}/{sample_id}.jpg",
                        "labels": labels,
                        "model": model,
                        "prompt_id": "cxrmax-explain",
                        "prompt": PROMPT.format(labels=labels_text),
                        "sample_index": 0,
                        "text": synth_text(rng, positives, sides, m),
                        "finish_reason": "stop",
                    }
                )
                if len(batch) == 4096:
                    writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schemas.TRAJECTORY_SCHEMA))
                    rows += len(batch)
                    batch = []
            if batch:
                writer.write_batch(pa.RecordBatch.from_pylist(batch, schema=schemas.TRAJECTORY_SCHEMA))
                rows += len(batch)
    return rows


class PeakRSS:
    """Samples the summed RSS (and PSS, which counts pages shared by forked workers once) of this
    process and all its children every 0.2 s."""

    def __init__(self) -> None:
        try:  # psutil comes with the train extra (accelerate, peft, trl)
            import psutil

            self.process = psutil.Process()
        except ImportError:
            self.process = None
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = pss = 0
            try:
                for proc in [self.process, *self.process.children(recursive=True)]:
                    try:
                        info = proc.memory_full_info()
                        total += info.rss
                        pss += getattr(info, "pss", info.rss)
                    except Exception:
                        pass
            except Exception:
                pass
            self.peak = max(self.peak, total)
            self.peak_pss = max(self.peak_pss, pss)
            self._stop.wait(0.2)

    def __enter__(self) -> PeakRSS:
        if self.process is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.process is not None:
            self._thread.join()
        else:  # without psutil: the largest single process (ru_maxrss is in KiB on Linux)
            import resource

            own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            self.peak = self.peak_pss = max(own, kids) * 1024


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="7 x 1,000 samples")
    parser.add_argument("--samples", type=int, default=24_426)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--skip-floor", action="store_true", help="do not time the labelling floor")
    args = parser.parse_args()
    samples = 1_000 if args.quick else args.samples
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-preferences-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        import datasets

        datasets.disable_progress_bars()
        from cxrmax.preferences.build import BuildOptions, build_preferences

        t0 = time.perf_counter()
        rows = write_synthetic(work, samples)
        print(
            f"synthetic trajectories: {rows:,} ({len(MODELS)} x {samples:,}) written in {time.perf_counter() - t0:.1f}s"
        )

        floor_s = floor_cpu = None
        if not args.skip_floor:
            from cxrmax.labeler import label_texts

            table = pa.concat_tables(
                pa.ipc.open_stream(str(p)).read_all()
                for p in sorted((work / "trajectories").rglob("*.arrow"))
            )
            texts = table.column("text").to_pylist()
            del table
            import resource

            def cpu_all() -> float:
                own = resource.getrusage(resource.RUSAGE_SELF)
                kids = resource.getrusage(resource.RUSAGE_CHILDREN)
                return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

            c0 = cpu_all()
            t0 = time.perf_counter()
            label_texts(texts, processes=args.processes)
            floor_s = time.perf_counter() - t0
            floor_cpu = cpu_all() - c0
            del texts

        import resource

        def cpu_seconds() -> float:
            own = resource.getrusage(resource.RUSAGE_SELF)
            kids = resource.getrusage(resource.RUSAGE_CHILDREN)
            return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

        load_before = os.getloadavg()[0]
        with PeakRSS() as rss:
            cpu0 = cpu_seconds()
            t0 = time.perf_counter()
            summary = build_preferences(
                [work], work, BuildOptions(processes=args.processes, chunk_samples=1000)
            )
            wall = time.perf_counter() - t0
            cpu = cpu_seconds() - cpu0
        print()
        print(f"{'':38s} {'wall s':>8s} {'CPU s':>8s} {'traj/s':>9s} {'peak RSS':>10s}")
        if floor_s is not None:
            print(
                f"{'labeler only (label_texts, floor)':38s} {floor_s:8.1f} {floor_cpu:8.1f} {rows / floor_s:9.0f}"
            )
        print(
            f"{'build-preferences --consensus vote':38s} {wall:8.1f} {cpu:8.1f} {rows / wall:9.0f} "
            f"{rss.peak / 2**30:8.2f} GB"
        )
        print(f"peak PSS (shared pages of forked workers counted once): {rss.peak_pss / 2**30:.2f} GB")
        print(f"phases (wall s): {summary.phases}")
        print(
            f"load average before the build: {load_before:.1f} on {os.cpu_count()} cores (wall is inflated above 2)"
        )
        goal = wall <= 120 and rss.peak <= 4 * 2**30
        print(f"goal (<= 120 s, <= 4 GB on {args.processes} cores): {'met' if goal else 'NOT met'}")
        if floor_s is not None:
            print(f"build / labelling floor: {wall / floor_s:.2f}x")
        print(
            f"preference rows {summary.counts.get('preference_rows', 0):,}, negatives "
            f"{summary.counts.get('negatives', 0):,}, SFT rows {summary.counts.get('sft_rows', 0):,}, "
            f"consensus flagged {summary.counts.get('consensus_flagged', 0):,}"
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
