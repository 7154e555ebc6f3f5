"""Study: the demo's drift intervals over answers (as the demo prints them) against intervals over films.

The demo answers each test film several times (3 at the default size, 5 at --size large) and pools
the students' 3 seeds, so a student's rates rest on 9 or 15 answers per film. Its 95% intervals
resample answers, as issue 14 defines them; answers to one film share the film and are not
independent, so an interval that resamples films (each with all its answers: ``drift_rates(...,
by_film=True)``) is the honest one for "this model drifts less on films like these". Comparing two
students that answered the same films, pairing by film (``paired_film_difference``: the difference of
rates, films resampled with both students' answers kept together) removes how hard each film is from
the comparison. This script reads a finished demo folder and prints, per drift rate, the SFT, APO and
DPO students' pooled rates with both intervals, whether APO's lies apart from SFT's under each, and the
paired APO - SFT difference over films with its interval.

    cxrmax demo --size large --out demo-large
    python benchmark/studies/film_intervals.py demo-large
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("demo_out", type=Path, help="a finished `cxrmax demo` output folder")
    args = parser.parse_args()

    from cxrmax.generate import read_trajectories
    from cxrmax.mimic import MimicCXR
    from cxrmax.toy import teachers as sim
    from cxrmax.toy.demo import _report_text, drift_counts, drift_rates, paired_film_difference
    from cxrmax.toy.report import RATE_NAMES

    out = args.demo_out
    test = MimicCXR(out / "mimic").select(splits=["test"], views=["PA", "AP"])
    gold = {row["sample_id"]: sim.report_sides(_report_text(row)) for row in test.to_pylist()}
    table = read_trajectories(out / "eval-pooled", ordered=True)
    by_answer = drift_rates(table, gold)
    by_film = drift_rates(table, gold, by_film=True)
    paired = paired_film_difference(drift_counts(table, gold), "student-apo", "student-sft")
    films = len(set(table["sample_id"].to_pylist()))
    print(
        f"{out}: {films} test films; answers per student: {by_answer['student-sft']['answers']} (seeds pooled)"
    )

    def cell(rates, key):
        low, high = rates["ci"][key]
        return f"{rates[key]:.2f} [{low:.2f}, {high:.2f}]"

    def apart(a, b, key):
        return a["ci"][key][1] < b["ci"][key][0] or b["ci"][key][1] < a["ci"][key][0]

    print(f"{'rate':<28} {'student':<12} {'over answers':<20} {'over films':<20}")
    for key, name in RATE_NAMES.items():
        for student in ("student-sft", "student-apo", "student-dpo"):
            print(
                f"{name:<28} {student:<12} {cell(by_answer[student], key):<20} {cell(by_film[student], key):<20}"
            )
        sft, apo = "student-sft", "student-apo"
        difference, low, high = paired[key]
        print(
            f"{'':<28} APO apart from SFT: over answers {apart(by_answer[apo], by_answer[sft], key)}, "
            f"over films {apart(by_film[apo], by_film[sft], key)}; paired by film APO - SFT "
            f"{difference:+.2f} [{low:+.2f}, {high:+.2f}]{' (excludes 0)' if high < 0 or low > 0 else ''}"
        )


if __name__ == "__main__":
    main()
