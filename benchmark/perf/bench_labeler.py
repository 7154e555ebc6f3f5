"""Benchmark the cxrmax labeler against a negspacy pipeline on synthetic CXR-MAX-sized data.

    python benchmark/perf/bench_labeler.py            # 170,982 texts (the size of CXR-MAX)
    python benchmark/perf/bench_labeler.py --quick    # 5,000 texts

1. Writes N synthetic ~250-word trajectories (report style and chatbot style: markdown headings,
   bullets, bold, hedges, refusals) to an Arrow file, streaming (not timed).
2. Times cxrmax: the Arrow file is read batch by batch and labelled with `label_texts` on all cores
   (2 here); prints texts/s, wall and CPU time, and peak RSS of the parent and of the worst worker.
3. Times negspacy (blank spaCy English + sentencizer + entity_ruler with the cxrmax mention phrases +
   negex, nlp.pipe with the same number of processes) on the first --peer-texts texts, in its own
   venv (default /work/peer-venvs/negspacy) through a subprocess; and cxrmax on the same texts, so
   the ratio compares like with like.
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
import textwrap
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cxrmax.labeler import iter_label_tables  # noqa: E402
from cxrmax.labeler.batch import default_processes  # noqa: E402
from cxrmax.labeler.phrases import MENTIONS, expand  # noqa: E402

CXR_MAX_SIZE = 170_982

_FINDINGS = {
    "Atelectasis": [
        "{side} lower lobe atelectasis",
        "{side} basilar atelectasis",
        "volume loss at the {side} base",
    ],
    "Cardiomegaly": ["cardiomegaly", "an enlarged cardiac silhouette", "moderate cardiomegaly"],
    "Consolidation": ["{side} lower lobe consolidation", "consolidation in the {side} upper lobe"],
    "Edema": ["pulmonary edema", "mild interstitial edema", "pulmonary vascular congestion"],
    "Enlarged Cardiomediastinum": ["a widened mediastinum", "an enlarged cardiomediastinal silhouette"],
    "Fracture": ["a fracture of the {side} sixth rib", "{side} rib fractures"],
    "Lung Lesion": ["a nodule in the {side} upper lobe", "a {side} hilar mass"],
    "Lung Opacity": ["patchy opacity at the {side} base", "{side} lower lobe airspace disease"],
    "Pleural Effusion": ["a small {side} pleural effusion", "blunting of the {side} costophrenic angle"],
    "Pleural Other": ["{side} apical pleural thickening", "pleural plaques on the {side}"],
    "Pneumonia": ["{side} lower lobe pneumonia", "an infectious process in the {side} lung"],
    "Pneumothorax": ["a small {side} apical pneumothorax", "a {side} pneumothorax"],
    "Support Devices": ["an endotracheal tube", "a right PICC line", "a pacemaker with leads in place"],
}
_FILLER = [
    "The trachea is midline and the osseous structures appear intact.",
    "This appearance is explained by increased density in the affected region compared with the contralateral side.",
    "The overall image quality is adequate for interpretation, with good inspiration and no significant rotation.",
    "Such findings are commonly evaluated together with the clinical history, laboratory values and prior imaging.",
    "The soft tissues of the chest wall are unremarkable and the upper abdomen is grossly normal.",
    "These features, taken together, provide a coherent radiographic basis for the stated diagnosis.",
    "Attention to the costophrenic angles, the hila and the retrocardiac region helps avoid missing subtle disease.",
    "Comparison with previous examinations would help to determine whether the findings are acute or chronic.",
]
_HEDGES = [
    "Clinical correlation is recommended.",
    "Please consult a qualified radiologist for a definitive diagnosis.",
    "This explanation is for educational purposes and is not a substitute for professional medical advice.",
]
_REFUSAL = "As an AI, I'm not capable of providing medical diagnoses, but I can describe general features."


def _phrase(rng: random.Random, name: str) -> str:
    return rng.choice(_FINDINGS[name]).format(side=rng.choice(["left", "right", "bilateral"]))


def synthetic_text(rng: random.Random) -> str:
    """One ~250-word trajectory in a random style (deterministic for a seeded rng)."""
    names = rng.sample(list(_FINDINGS), rng.randint(1, 4))
    negatives = rng.sample([n for n in _FINDINGS if n not in names], 2)
    style = rng.random()
    parts: list[str] = []
    if style < 0.35:  # radiology report, hard-wrapped
        body = [f"There is {_phrase(rng, n)}." for n in names]
        body += [f"No {_phrase(rng, n).split(' ', 1)[-1]}." for n in negatives]
        body += rng.sample(_FILLER, 5)
        findings = textwrap.fill(" ".join(body), 76, initial_indent=" ", subsequent_indent=" ")
        impression = " ".join(f"{_phrase(rng, n).capitalize()}." for n in names)
        parts = ["FINDINGS:", "", findings, "", "IMPRESSION:", "", " " + impression]
    else:  # chatbot answer with markdown
        if rng.random() < 0.08:
            parts.append(_REFUSAL)
        parts.append(f"## Basis for the diagnosis of {', '.join(names)}\n")
        for k, name in enumerate(names, start=1):
            parts.append(f"### {k}. **{name}**")
            parts.append(
                f"- The image shows {_phrase(rng, name)}, which supports the diagnosis of {name.lower()}."
            )
            parts.append(f"- {rng.choice(_FILLER)}")
            if rng.random() < 0.4:
                parts.append(f"- Possibly, there is also {_phrase(rng, rng.choice(list(_FINDINGS)))}.")
        parts.append("\n**Pertinent negatives:** " + ", ".join(f"no {n.lower()}" for n in negatives) + ".")
        parts.append("\n" + " ".join(rng.sample(_FILLER, 3)))
        parts.append(rng.choice(_HEDGES))
    text = "\n".join(parts)
    while len(text.split()) < 230:
        text += " " + rng.choice(_FILLER)
    return text


def write_corpus(path: Path, n: int, seed: int = 0, batch: int = 10_000) -> float:
    """Stream n synthetic texts into an Arrow IPC file; return the mean word count."""
    rng = random.Random(seed)
    schema = pa.schema([pa.field("text", pa.string())])
    words = 0
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        for start in range(0, n, batch):
            texts = [synthetic_text(rng) for _ in range(min(batch, n - start))]
            words += sum(len(t.split()) for t in texts)
            writer.write_batch(pa.record_batch([pa.array(texts, pa.string())], schema=schema))
    return words / max(n, 1)


def run_cxrmax(path: Path, processes: int, limit: int | None = None) -> dict:
    """Label the corpus batch by batch; return timing and a checksum of the labels."""
    cpu0 = os.times()
    wall0 = time.perf_counter()
    rows = 0
    positives = 0
    with pa.memory_map(str(path)) as source:
        reader = pa.ipc.open_file(source)

        def chunks():
            taken = 0
            for i in range(reader.num_record_batches):
                texts = reader.get_batch(i).column(0)
                if limit is not None:
                    if taken >= limit:
                        return
                    texts = texts.slice(0, limit - taken)
                taken += len(texts)
                yield texts

        for table in iter_label_tables(chunks(), processes=processes):
            rows += table.num_rows
            positives += sum(
                pa.compute.sum(pa.compute.equal(table.column(j), 1)).as_py() or 0 for j in range(14)
            )
    wall = time.perf_counter() - wall0
    cpu1 = os.times()
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    cpu += (cpu1.children_user - cpu0.children_user) + (cpu1.children_system - cpu0.children_system)
    return {
        "texts": rows,
        "wall_s": wall,
        "cpu_s": cpu,
        "rate": rows / wall,
        "cpu_rate": rows / max(cpu, 1e-9),
        "positives": positives,
    }


_NEGSPACY_SCRIPT = r"""
import json, os, sys, time
import spacy
from negspacy.negation import Negex  # noqa: F401  (registers the "negex" factory)
path, patterns_path, processes = sys.argv[1], sys.argv[2], int(sys.argv[3])
texts = [json.loads(line) for line in open(path)]
patterns = json.load(open(patterns_path))
nlp = spacy.blank("en")
nlp.add_pipe("sentencizer")
ruler = nlp.add_pipe("entity_ruler", config={"phrase_matcher_attr": "LOWER"})
ruler.add_patterns(patterns)
nlp.add_pipe("negex", config={"ent_types": sorted({p["label"] for p in patterns})})
start = time.perf_counter()
cpu0 = os.times()
found = negated = 0
for doc in nlp.pipe(texts, n_process=processes, batch_size=64):
    for ent in doc.ents:
        found += 1
        negated += ent._.negex
wall = time.perf_counter() - start
cpu1 = os.times()
cpu = sum(cpu1[i] - cpu0[i] for i in range(4))
print(json.dumps({"texts": len(texts), "wall_s": wall, "cpu_s": cpu, "rate": len(texts) / wall, "entities": found,
                  "negated": negated}))
"""


def run_negspacy(venv: Path, texts: list[str], processes: int) -> dict | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    patterns = [
        {"label": name.upper().replace(" ", "_"), "pattern": spelling}
        for name, words in MENTIONS.items()
        for word in words
        for spelling in expand(word)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "texts.jsonl"
        data.write_text("".join(json.dumps(t) + "\n" for t in texts))
        patterns_path = Path(tmp) / "patterns.json"
        patterns_path.write_text(json.dumps(patterns))
        script = Path(tmp) / "negspacy_bench.py"
        script.write_text(_NEGSPACY_SCRIPT)
        done = subprocess.run(
            [str(python), str(script), str(data), str(patterns_path), str(processes)],
            capture_output=True,
            text=True,
            check=False,
        )
    if done.returncode != 0:
        print("negspacy failed:", done.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="5,000 texts and 500 for negspacy")
    parser.add_argument("--texts", type=int, default=None, help=f"number of texts (default {CXR_MAX_SIZE})")
    parser.add_argument(
        "--peer-texts", type=int, default=None, help="texts for the negspacy comparison (default 10000)"
    )
    parser.add_argument("--processes", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--negspacy-venv", type=Path, default=Path("/work/peer-venvs/negspacy"))
    parser.add_argument("--skip-full", action="store_true", help="only the negspacy comparison")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to write the corpus (default: a temp dir)"
    )
    args = parser.parse_args()
    n = args.texts or (5_000 if args.quick else CXR_MAX_SIZE)
    peer_n = min(n, args.peer_texts or (500 if args.quick else 10_000))
    processes = args.processes or default_processes()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        corpus = Path(tmp) / "synthetic_trajectories.arrow"
        t0 = time.perf_counter()
        mean_words = write_corpus(corpus, n)
        print(
            f"corpus: {n} texts, {mean_words:.0f} words on average, written in {time.perf_counter() - t0:.1f} s"
        )
        print(f"cores: {os.cpu_count()} (using {processes} processes); load average {os.getloadavg()[0]:.1f}")

        if not args.skip_full:
            full = run_cxrmax(corpus, processes)
            rss_parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rss_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            print(
                f"cxrmax   all {full['texts']:>7d} texts: {full['wall_s']:7.1f} s wall, {full['cpu_s']:7.1f} s CPU, "
                f"{full['rate']:8.0f} texts/s; peak RSS parent {rss_parent:.0f} MiB, worker {rss_child:.0f} MiB"
            )
            idle = CXR_MAX_SIZE / full["cpu_rate"] / processes
            print(
                f"         {full['cpu_rate']:.0f} texts per CPU-second -> {CXR_MAX_SIZE} texts on {processes} idle "
                f"cores in about {idle:.0f} s"
            )
            met = "met" if full["rate"] * 60 >= CXR_MAX_SIZE else "NOT met at this load"
            print(f"goal: all {CXR_MAX_SIZE} texts in <= 60 s wall -> {met}; by CPU time {idle:.0f} s")

        sample: list[str] = []
        with pa.memory_map(str(corpus)) as source:
            reader = pa.ipc.open_file(source)
            for i in range(reader.num_record_batches):  # the first peer_n texts, across batches
                if len(sample) >= peer_n:
                    break
                sample += reader.get_batch(i).column(0).slice(0, peer_n - len(sample)).to_pylist()
        same = run_cxrmax(corpus, processes, limit=peer_n)
        peer = run_negspacy(args.negspacy_venv, sample, processes)
        print(
            f"cxrmax   on {peer_n:>6d} texts: {same['wall_s']:7.2f} s wall, {same['cpu_s']:7.2f} s CPU, "
            f"{same['rate']:8.0f} texts/s"
        )
        if peer is None:
            print(f"negspacy: not available (no venv at {args.negspacy_venv} or it failed)")
            return
        print(
            f"negspacy on {peer['texts']:>6d} texts: {peer['wall_s']:7.2f} s wall, {peer['cpu_s']:7.2f} s CPU, "
            f"{peer['rate']:8.0f} texts/s"
        )
        ratio = same["rate"] / peer["rate"]
        # per text, in case the peer read fewer texts than cxrmax
        cpu_ratio = (peer["cpu_s"] / peer["texts"]) / max(same["cpu_s"] / same["texts"], 1e-12)
        print(
            f"ratio cxrmax/negspacy, same texts and cores: {ratio:.1f}x by wall time, {cpu_ratio:.1f}x by CPU time "
            f"(goal >= 10x)"
        )


if __name__ == "__main__":
    main()
