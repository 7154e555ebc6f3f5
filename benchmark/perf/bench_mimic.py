"""Benchmark: read + validate + join release-sized MIMIC-CXR CSVs and select 24,426 studies.

Writes full-size synthetic metadata / split / chexpert CSVs (377,110 images, 227,827 studies,
65,379 subjects; gzipped, the release's headers; `cxrmax.testing.mini_mimic.write_synthetic_csvs`), then in a
fresh child process per case (seconds include imports and reading; peak RSS is the child's own):
  - cxrmax: `MimicCXR(root).select(k=24426, seed=0)` (columnar validation of every cell, metadata x
    split join with id cross-checks, label join, one image per study, seeded sample; no report or
    image access since the synthetic set has none);
  - cxrmax + frontal + require-positive + shard 0/4: the same with the filters later stages use;
  - pandas peer: `pd.read_csv` x 3, merge, one row per study, `sample(24426)`; no validation.

    /work/venv/bin/python benchmark/perf/bench_mimic.py            # full size
    /work/venv/bin/python benchmark/perf/bench_mimic.py --quick    # 10x smaller
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CXRMAX_CASE = """
import json, resource, sys, time
start = time.perf_counter()
from cxrmax.mimic import MimicCXR
mimic = MimicCXR(sys.argv[1])
images = mimic.images()
joined = time.perf_counter()
table = mimic.select(k=int(sys.argv[2]), seed=0, with_reports=False, check_files=False, **json.loads(sys.argv[3]))
end = time.perf_counter()
print(json.dumps({"seconds": end - start, "read_join_s": joined - start, "rows": table.num_rows,
                  "images": images.num_rows, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""

PANDAS_CASE = """
import json, resource, sys, time
start = time.perf_counter()
import pandas as pd
root = sys.argv[1]
meta = pd.read_csv(f"{root}/mimic-cxr-2.0.0-metadata.csv.gz", usecols=["dicom_id", "subject_id", "study_id",
                   "ViewPosition", "StudyDate", "StudyTime"])
split = pd.read_csv(f"{root}/mimic-cxr-2.0.0-split.csv.gz")
labels = pd.read_csv(f"{root}/mimic-cxr-2.0.0-chexpert.csv.gz")
images = meta.merge(split[["dicom_id", "split"]], on="dicom_id")
joined = time.perf_counter()
studies = images.sort_values(["study_id", "dicom_id"]).drop_duplicates("study_id")
studies = studies.merge(labels.drop(columns=["subject_id"]), on="study_id", how="left")
table = studies.sample(n=min(int(sys.argv[2]), len(studies)), random_state=0)
end = time.perf_counter()
print(json.dumps({"seconds": end - start, "read_join_s": joined - start, "rows": len(table),
                  "images": len(images), "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_case(code: str, root: Path, k: int, options: dict | None = None) -> dict:
    argv = [sys.executable, "-c", code, str(root), str(k)]
    if options is not None:
        argv.append(json.dumps(options))
    result = subprocess.run(argv, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10x smaller")
    parser.add_argument("--root", type=Path, default=None, help="reuse (or create) the synthetic CSVs here")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    n_images, n_studies, n_subjects, k = 377_110 // scale, 227_827 // scale, 65_379 // scale, 24_426 // scale
    with tempfile.TemporaryDirectory(prefix="bench-mimic-") as tmp:
        root = args.root or Path(tmp) / "mimic"
        if not (root / "mimic-cxr-2.0.0-metadata.csv.gz").exists():
            # In a child too: Linux carries a parent's peak RSS into children it forks, so this
            # process must stay small for the children's figures to be their own.
            start = time.perf_counter()
            code = (
                "import sys; from cxrmax.testing.mini_mimic import write_synthetic_csvs; "
                "write_synthetic_csvs(sys.argv[1], n_images=int(sys.argv[2]), n_studies=int(sys.argv[3]), "
                "n_subjects=int(sys.argv[4]), seed=0)"
            )
            argv = [sys.executable, "-c", code, str(root), str(n_images), str(n_studies), str(n_subjects)]
            subprocess.run(argv, check=True)
            print(f"wrote synthetic CSVs ({n_images:,} images) in {time.perf_counter() - start:.1f} s")
        cases = [
            ("cxrmax select k", run_case(CXRMAX_CASE, root, k, {})),
            (
                "cxrmax frontal+positive+shard 0/4",
                run_case(
                    CXRMAX_CASE, root, k, {"views": ["frontal"], "require_positive": True, "shard": [0, 4]}
                ),
            ),
            ("pandas read+merge+sample (peer)", run_case(PANDAS_CASE, root, k)),
        ]
    print(f"{n_images:,} images / {n_studies:,} studies; select k={k:,}")
    print(f"{'case':<36}{'total s':>9}{'read+join s':>13}{'rows':>9}{'peak RSS MB':>13}")
    for name, result in cases:
        print(
            f"{name:<36}{result['seconds']:>9.2f}{result['read_join_s']:>13.2f}{result['rows']:>9,}{result['rss_mb']:>13.0f}"
        )
    ours, peer = cases[0][1], cases[2][1]
    print(
        f"cxrmax / pandas time: {ours['seconds'] / peer['seconds']:.2f}x; RSS: {ours['rss_mb'] / peer['rss_mb']:.2f}x"
    )


if __name__ == "__main__":
    main()
