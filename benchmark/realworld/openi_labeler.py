"""Score the cxrmax labeler on real radiology reports: the OpenI (Indiana University) chest X-rays.

    python benchmark/realworld/openi_labeler.py              # after table, plus the before table
    python benchmark/realworld/openi_labeler.py --no-before  # after table only
    python benchmark/realworld/openi_labeler.py --errors 5   # up to 5 example sentences per cause

Texts: the 3,955 report XMLs in torchxrayvision 1.5.7's wheel (`torchxrayvision/data/NLMCXR_reports.tgz`,
CC BY-NC-ND 4.0). The wheel is fetched once with `pip download --no-deps` into $CXRMAX_CACHE (default
~/.cache/cxrmax) unless $CXRMAX_OPENI_WHEEL names it, and read in place (zipfile + tarfile, in memory):
no report text is ever written to disk; example sentences go to stdout only.

Gold: the human-coded labels of the 3,080 development reports (../shared/data/openi/openi_gold_dev.csv,
or $CXRMAX_OPENI_GOLD). Only ids in that file are scored: the other 771 reports (NegBio's openi-testset)
are held out and never read into a score.

Sections read: FINDINGS + IMPRESSION (what a radiologist reports about this film; INDICATION,
COMPARISON and the rest describe the request). Label mapping (ChestX-ray14 -> CheXpert):
see LABEL_MAP. A report is predicted positive for a label when the labeler says positive (and, under
the uncertain=positive policy, uncertain).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path and not os.environ.get("CXRMAX_BASELINE"):
    sys.path.insert(0, str(REPO))  # the baseline run (see baseline_scores) brings its own cxrmax

from cxrmax.labeler import label_text  # noqa: E402

WHEEL_NAME = "torchxrayvision-1.5.7-py3-none-any.whl"
WHEEL_REQUIREMENT = "torchxrayvision==1.5.7"
REPORTS_MEMBER = "torchxrayvision/data/NLMCXR_reports.tgz"
#: The shared data folder: beside the checkout (../shared), or inside it (shared/, as a copied checkout has it).
SHARED_OPENI = next(
    (
        d
        for d in (REPO.parent / "shared" / "data" / "openi", REPO / "shared" / "data" / "openi")
        if d.is_dir()
    ),
    REPO.parent / "shared" / "data" / "openi",
)
DEFAULT_GOLD = SHARED_OPENI / "openi_gold_dev.csv"
SECTIONS = ("FINDINGS", "IMPRESSION")
#: The labeler's state at the start of issue 12 (the "before" table).
BASELINE_REF = "5155f22"

#: CheXpert observation -> the OpenI (ChestX-ray14) gold columns whose OR is its label.
LABEL_MAP: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("Atelectasis",),
    "Cardiomegaly": ("Cardiomegaly",),
    "Pleural Effusion": ("Effusion",),
    "Pneumonia": ("Pneumonia",),
    "Pneumothorax": ("Pneumothorax",),
    "Consolidation": ("Consolidation",),
    "Lung Lesion": ("Mass", "Nodule"),
}
#: How an uncertain label is counted: always positive (U-ones), always negative (U-zeros), or by the
#: labeler's grade of the hedge (`ObservationLabel.certainty`): "probable" positive, "possible" negative.
POLICIES = ("uncertain=positive", "uncertain=negative", "uncertain=graded")

# Stems that show a report talks about a label at all (for the error causes below).
_STEMS: dict[str, re.Pattern] = {
    "Atelectasis": re.compile(r"atelecta|collapse|volume loss"),
    "Cardiomegaly": re.compile(r"cardiomegal|heart|cardiac"),
    "Pleural Effusion": re.compile(r"effusion|pleural fluid"),
    "Pneumonia": re.compile(r"pneumoni|infect"),
    "Pneumothorax": re.compile(r"pneumothora"),
    "Consolidation": re.compile(r"consolidat"),
    "Lung Lesion": re.compile(r"nodul|mass|lesion|tumor|neoplas|granulom"),
}
# Words whose reading CheXpert's definitions and OpenI's coding are known to differ on (an error with
# one of them in its evidence is tagged "definition"): OpenI codes "nodular opacity" as an opacity,
# not a nodule, a hydropneumothorax as neither, and an "enlarged cardiac silhouette" often not as
# cardiomegaly.
_DEFINITION_TERMS: dict[str, re.Pattern] = {
    "Lung Lesion": re.compile(r"nodular (?:opacit|densit)"),
    "Pneumothorax": re.compile(r"hydropneumothora"),
    "Pleural Effusion": re.compile(r"hydropneumothora|pleural space"),
    "Cardiomegaly": re.compile(r"silhouette"),
}
_NEGATION_WORD = re.compile(
    r"\b(?:no|not|without|clear of|free of|negative|resolved|removed|absent|normal|unremarkable|"
    r"within (?:the )?(?:limits of )?normal|cleared|clearing)\b"
)
_HEDGE_WORD = re.compile(
    r"\b(?:may|might|could|possibl[ey]|probabl[ey]|likely|suspect\w*|question\w*|suggest\w*|"
    r"concern\w*|versus|vs|cannot|differential|consider\w*|atypical|equivocal|borderline)\b"
)


def cache_dir() -> Path:
    """Where the wheel is kept: $CXRMAX_CACHE or ~/.cache/cxrmax (never inside the repository)."""
    return Path(os.environ.get("CXRMAX_CACHE", Path.home() / ".cache" / "cxrmax"))


def find_wheel(fetch: bool = True) -> tuple[Path | None, str]:
    """(path of the torchxrayvision 1.5.7 wheel, how it was found or why not). Fetches it with
    `pip download --no-deps` into cache_dir() when it is not there and `fetch` is true."""
    named = os.environ.get("CXRMAX_OPENI_WHEEL")
    if named:
        path = Path(named)
        return (path, f"$CXRMAX_OPENI_WHEEL={path}") if path.is_file() else (None, f"no file {path}")
    shared = SHARED_OPENI / WHEEL_NAME
    if shared.is_file():
        return shared, f"shared at {shared}"
    path = cache_dir() / WHEEL_NAME
    if path.is_file():
        return path, f"cached at {path}"
    if not fetch:
        return None, f"not cached at {path} (fetching disabled)"
    path.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            WHEEL_REQUIREMENT,
            "-d",
            str(path.parent),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if done.returncode != 0 or not path.is_file():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return None, f"pip download {WHEEL_REQUIREMENT} failed: {tail[0]}"
    return path, f"downloaded to {path}"


def read_reports(wheel: Path, ids: Iterable[str] | None = None) -> dict[str, dict[str, str]]:
    """OpenI uId -> {section label: text} for the report XMLs inside the wheel, read in memory; only
    the reports whose id is in `ids` when it is given (the held-out ones are then never kept)."""
    wanted = None if ids is None else set(ids)
    with zipfile.ZipFile(wheel) as archive:
        blob = archive.read(REPORTS_MEMBER)
    reports: dict[str, dict[str, str]] = {}
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".xml"):
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            root = ET.fromstring(handle.read())
            uid = root.find("uId")
            rid = "" if uid is None else uid.get("id", "")
            if not rid or (wanted is not None and rid not in wanted):
                continue
            reports[rid] = {
                node.get("Label", ""): (node.text or "").strip() for node in root.iter("AbstractText")
            }
    return reports


def load_gold(path: Path) -> dict[str, dict[str, int]]:
    """Report id -> CheXpert observation -> 0/1, through LABEL_MAP."""
    gold: dict[str, dict[str, int]] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            gold[row["filename"]] = {
                name: int(any(row[column] == "1" for column in columns))
                for name, columns in LABEL_MAP.items()
            }
    return gold


def report_text(sections: dict[str, str], read: Iterable[str] = SECTIONS) -> str:
    """The text the labeler reads: the chosen sections, each as its own paragraph with its heading."""
    parts = [f"{name}: {sections[name]}" for name in read if sections.get(name)]
    return "\n\n".join(parts)


def label_reports(reports: dict[str, dict[str, str]], ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """Report id -> observation -> status ("positive", "negative", "absent", or "uncertain" with its
    grade: "uncertain probable", "uncertain possible")."""
    out: dict[str, dict[str, str]] = {}
    for rid in ids:
        labeled = label_text(report_text(reports.get(rid, {})))
        out[rid] = {name: _status(labeled.observations[name]) for name in LABEL_MAP}
    return out


def _status(observation) -> str:
    if observation.status != "uncertain":
        return observation.status
    # The before-labeler (see baseline_scores) did not grade its hedges.
    return f"uncertain {getattr(observation, 'certainty', None) or 'possible'}"


def predicted(status: str, policy: str) -> int:
    """1 when `status` counts as positive under `policy`."""
    if status.startswith("uncertain"):
        return int(
            policy == "uncertain=positive" or (policy == "uncertain=graded" and status.endswith("probable"))
        )
    return int(status == "positive")


def score(gold: dict[str, dict[str, int]], statuses: dict[str, dict[str, str]]) -> dict:
    """Per policy and label: tp, fp, fn, precision, recall, f1; plus micro P/R/F1 over the labels."""
    result: dict[str, dict] = {}
    for policy in POLICIES:
        per: dict[str, dict[str, float]] = {}
        total = Counter()
        for name in LABEL_MAP:
            counts = Counter()
            for rid, truth in gold.items():
                guess = predicted(statuses[rid][name], policy)
                if guess and truth[name]:
                    counts["tp"] += 1
                elif guess:
                    counts["fp"] += 1
                elif truth[name]:
                    counts["fn"] += 1
            total.update(counts)
            per[name] = _prf(counts)
        per["micro"] = _prf(total)
        result[policy] = per
    return result


def _prf(counts: Counter) -> dict[str, float]:
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall, "f1": f1}


def evaluate(wheel: Path, gold_path: Path = DEFAULT_GOLD) -> tuple[dict, dict, dict, dict]:
    """(scores, gold, statuses, reports) for the development ids only."""
    gold = load_gold(gold_path)
    reports = read_reports(wheel, gold)
    statuses = label_reports(reports, gold)
    return score(gold, statuses), gold, statuses, reports


def format_table(scores: dict, title: str) -> str:
    """The per-label P/R/F1 table for every uncertainty policy."""
    lines = [title, f"{'label':<18}" + "".join(f"| {p:^29} " for p in POLICIES)]
    lines.append(
        f"{'':<18}" + "| {:>6} {:>6} {:>6} {:>8} ".format("P", "R", "F1", "tp/fp/fn") * len(POLICIES)
    )
    for name in [*LABEL_MAP, "micro"]:
        row = f"{name:<18}"
        for policy in POLICIES:
            s = scores[policy][name]
            row += (
                f"| {s['precision']:6.3f} {s['recall']:6.3f} {s['f1']:6.3f} {s['tp']:>3}/{s['fp']}/{s['fn']} "
            )
        lines.append(row)
    return "\n".join(lines)


def error_cause(name: str, kind: str, status: str, sections: dict[str, str], evidence: list[str]) -> str:
    """A heuristic tag for one error (kind "fp" or "fn" under uncertain=positive):

    - section: the report talks about the label only outside FINDINGS/IMPRESSION (fn);
    - scope: a negation or normality word sits in the sentence the labeler read as positive (fp), or
      the labeler negated a mention that the coders call present (fn);
    - cue: the labeler read a hedge as uncertain and the coders call the label absent (fp);
    - definition: the report uses the label's words but the labeler, following CheXpert's
      definitions, does not count them ("calcified nodule", "pericardial effusion") (fn), or the
      evidence is a term CheXpert counts and OpenI's coding does not ("nodular opacity",
      "hydropneumothorax", "enlarged cardiac silhouette") or none of the label's words (fp);
    - openi-coding: a plain, unhedged, unnegated mention that OpenI's coders did not code (fp), or a
      report with no word of the label at all that they coded positive (fn): disagreements with
      OpenI's coding rather than reading errors.
    """
    read = " ".join(sections.get(s, "") for s in SECTIONS).lower()
    if kind == "fn":
        if status.startswith("uncertain"):
            return "cue"  # a hedge graded "possible" that the coders call present
        if _STEMS[name].search(read):
            return "scope" if status == "negative" else "definition"
        if any(_STEMS[name].search(v.lower()) for k, v in sections.items() if k not in SECTIONS):
            return "section"
        return "openi-coding"
    text = " ".join(evidence).lower()
    if status.startswith("uncertain"):
        return "cue"
    if name in _DEFINITION_TERMS and _DEFINITION_TERMS[name].search(text):
        return "definition"
    if _NEGATION_WORD.search(text):
        return "scope"
    if _HEDGE_WORD.search(text):
        return "cue"
    if not _STEMS[name].search(text):
        return "definition"
    return "openi-coding"


def error_listing(
    gold: dict, statuses: dict, reports: dict, examples: int, policy: str = "uncertain=positive"
) -> tuple[Counter, dict]:
    """Counts of errors under `policy` per (label, kind, cause) and example sentences per cause (stdout only)."""
    counts: Counter = Counter()
    samples: dict[str, list[str]] = defaultdict(list)
    for rid, truth in gold.items():
        sections = reports.get(rid, {})
        for name in LABEL_MAP:
            status = statuses[rid][name]
            guess = predicted(status, policy)
            if guess == truth[name]:
                continue
            kind = "fp" if guess else "fn"
            evidence: list[str] = []
            if kind == "fp":
                labeled = label_text(report_text(sections))
                evidence = [labeled.steps[e.step].text for e in labeled.observations[name].evidence]
            cause = error_cause(name, kind, status, sections, evidence)
            counts[(name, kind, cause)] += 1
            key = f"{cause} {kind}"
            if len(samples[key]) < examples:
                where = "; ".join(evidence) if evidence else report_text(sections)[:300]
                samples[key].append(f"{rid} {name} [{status}]: {' '.join(where.split())}")
    return counts, samples


def format_errors(counts: Counter, policy: str = "uncertain=positive") -> str:
    """Error counts: per cause, then per label x cause."""
    causes = ["scope", "cue", "definition", "section", "openi-coding"]
    lines = [f"errors under {policy}, by cause (heuristic tags; see error_cause)"]
    lines.append(f"{'label':<18}" + "".join(f"{c + ' ' + k:>18}" for c in causes for k in ("fp", "fn")))
    for name in [*LABEL_MAP, "all"]:
        row = f"{name:<18}"
        for cause in causes:
            for kind in ("fp", "fn"):
                value = sum(
                    v for (n, k, c), v in counts.items() if c == cause and k == kind and name in (n, "all")
                )
                row += f"{value:>18}"
        lines.append(row)
    return "\n".join(lines)


def baseline_scores(ref: str, wheel: Path, gold_path: Path) -> dict | None:
    """Scores of the labeler as it was at git `ref`: that commit's cxrmax package is exported to a
    temporary folder and this script runs on it in a subprocess (None when git cannot do it)."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", ref, "cxrmax"], capture_output=True, check=False
        )
        if archive.returncode != 0:
            return None
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        code = (
            "import json, sys, runpy; sys.path.insert(0, sys.argv[1]);"
            "m = runpy.run_path(sys.argv[2]);"
            "print(json.dumps(m['evaluate'](m['Path'](sys.argv[3]), m['Path'](sys.argv[4]))[0]))"
        )
        env = dict(os.environ, PYTHONPATH=tmp, CXRMAX_BASELINE="1")
        done = subprocess.run(
            [sys.executable, "-c", code, tmp, __file__, str(wheel), str(gold_path)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gold", type=Path, default=Path(os.environ.get("CXRMAX_OPENI_GOLD", DEFAULT_GOLD)))
    parser.add_argument("--no-fetch", action="store_true", help="do not pip download the wheel")
    parser.add_argument("--no-before", action="store_true", help="skip the before table")
    parser.add_argument("--before-ref", default=BASELINE_REF, help="git ref of the before labeler")
    parser.add_argument("--errors", type=int, default=3, help="example sentences per cause (stdout)")
    args = parser.parse_args()
    wheel, how = find_wheel(fetch=not args.no_fetch)
    if wheel is None:
        print(f"OpenI report texts not available: {how}")
        return 2
    print(f"reports: {wheel.name} ({how}); gold: {args.gold}")
    print(f"sections read: {' + '.join(SECTIONS)}")
    print("label mapping: " + "; ".join(f"{k} = {' or '.join(v)}" for k, v in LABEL_MAP.items()))
    scores, gold, statuses, reports = evaluate(wheel, args.gold)
    print(f"development reports scored: {len(gold)} (held-out ids are not in the gold file)\n")
    if not args.no_before:
        before = baseline_scores(args.before_ref, wheel, args.gold)
        if before is None:
            print(f"before ({args.before_ref}): not available (git archive failed)\n")
        else:
            print(format_table(before, f"BEFORE (labeler at {args.before_ref})") + "\n")
    print(format_table(scores, "AFTER (this checkout)") + "\n")
    counts, _ = error_listing(gold, statuses, reports, 0)
    print(format_errors(counts) + "\n")
    counts, samples = error_listing(gold, statuses, reports, args.errors, "uncertain=graded")
    print(format_errors(counts, "uncertain=graded") + "\n")
    for key in sorted(samples):
        print(f"-- examples: {key}")
        for line in samples[key]:
            print("   " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
