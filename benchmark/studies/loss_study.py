"""Study: where multi-negative Plackett-Luce (APO) and pairwise DPO part ways.

With the policy equal to the reference every implicit reward is 0; the two losses' gradients are then
proportional (by 2N/(N+1)) and Adam cancels the scale, so their first updates are the same. They part
only once the negatives' rewards spread: Plackett-Luce weights each negative by its softmax share (the
hardest negatives get the most push), the pairwise mean by its own sigmoid. This study measures how
much that matters as the number of negatives N and the unevenness of their drift vary.

The policy is log-linear over drift features, log pi(t) = w . phi(t) (the reference is w = 0), so the
negatives of a sample compete for the same parameters, as they do in a real model. Each sample has a
positive (the consensus: no drift) and N negatives; a negative drifts along a few of D drift features.
"uneven" sets how unequal the negatives are: at 0 every negative carries the same amount of drift; at 1
most negatives are near-copies of the positive (one weak drift feature) and a few drift a lot, the
situation of a consensus built from mostly agreeing sources. Both losses are trained with Adam on the
same samples and scored on held-out ones:

* top-1 accuracy: the positive scores above *every* negative (what APO's loss is the likelihood of);
* pairwise accuracy: the share of (positive, negative) pairs ranked right (what DPO optimises);
* cosine between the two learnt w: 1 means the losses learnt the same thing.

    python benchmark/studies/loss_study.py                     # table + benchmark/studies/loss_study.png
    python benchmark/studies/loss_study.py --out study.png --seeds 5
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from apo_train.losses import pairwise_loss, plackett_luce_loss  # noqa: E402

FEATURES = 12


def make_samples(
    n: int, negatives: int, uneven: float, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature vectors of the positives [n, D] and the negatives [n, N, D] (drift = added features)."""
    shared = rng.normal(0, 1, size=(n, 1, FEATURES))  # what the image asks for, in every answer
    positive = shared[:, 0]
    drift = np.zeros((n, negatives, FEATURES))
    for i in range(n):
        for j in range(negatives):
            near_copy = rng.random() < uneven * 0.8
            k = 1 if near_copy else rng.integers(2, 6)
            scale = 0.3 if near_copy else 1.0 + 2 * uneven
            drift[i, j, rng.choice(FEATURES, size=k, replace=False)] = scale * rng.uniform(0.5, 1.5, size=k)
    noise = rng.normal(0, 0.3, size=(n, negatives, FEATURES))
    return torch.tensor(positive, dtype=torch.float64), torch.tensor(
        shared + drift + noise, dtype=torch.float64
    )


def train(
    positive: torch.Tensor, negatives: torch.Tensor, loss: str, steps: int, beta: float, lr: float
) -> torch.Tensor:
    """The learnt w of a log-linear policy under one loss (full batch, Adam)."""
    w = torch.zeros(FEATURES, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([w], lr=lr)
    for _ in range(steps):
        chosen = beta * (positive @ w)
        rejected = beta * (negatives @ w)
        value = (
            plackett_luce_loss(chosen, rejected)
            if loss == "plackett-luce"
            else pairwise_loss(chosen, rejected)
        )
        optimizer.zero_grad()
        value.mean().backward()
        optimizer.step()
    return w.detach()


def accuracies(w: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor) -> tuple[float, float]:
    chosen = (positive @ w)[:, None]
    rejected = negatives @ w
    return float((chosen > rejected).all(dim=1).double().mean()), float((chosen > rejected).double().mean())


def run(args: argparse.Namespace) -> list[dict]:
    rows = []
    for uneven in args.uneven:
        for n_neg in args.negatives:
            results = {"plackett-luce": [], "pairwise": [], "cos": []}
            for seed in range(args.seeds):
                rng = np.random.default_rng(seed)
                train_pos, train_neg = make_samples(args.samples, n_neg, uneven, rng)
                test_pos, test_neg = make_samples(2000, n_neg, uneven, rng)
                learnt = {}
                for loss in ("plackett-luce", "pairwise"):
                    learnt[loss] = train(train_pos, train_neg, loss, args.steps, args.beta, args.lr)
                    results[loss].append(accuracies(learnt[loss], test_pos, test_neg))
                a, b = learnt["plackett-luce"], learnt["pairwise"]
                results["cos"].append(float(a @ b / (a.norm() * b.norm() + 1e-12)))
            pl, pw = np.array(results["plackett-luce"]), np.array(results["pairwise"])
            rows.append(
                {
                    "uneven": uneven,
                    "negatives": n_neg,
                    "pl_top1": pl[:, 0].mean(),
                    "pw_top1": pw[:, 0].mean(),
                    "pl_pair": pl[:, 1].mean(),
                    "pw_pair": pw[:, 1].mean(),
                    "top1_gap_sd": (pl[:, 0] - pw[:, 0]).std(ddof=1) if args.seeds > 1 else float("nan"),
                    "cos": float(np.mean(results["cos"])),
                }
            )
    return rows


def plot(rows: list[dict], out: Path, uneven_levels: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(uneven_levels), figsize=(4 * len(uneven_levels), 3.4), sharey=True)
    for ax, uneven in zip(np.atleast_1d(axes), uneven_levels, strict=True):
        mine = [r for r in rows if r["uneven"] == uneven]
        n = [r["negatives"] for r in mine]
        ax.plot(n, [r["pl_top1"] for r in mine], "o-", label="Plackett-Luce (APO): top-1")
        ax.plot(n, [r["pw_top1"] for r in mine], "s--", label="pairwise DPO: top-1")
        ax.plot(n, [r["pl_pair"] for r in mine], "o-", alpha=0.4, label="Plackett-Luce: pairwise acc.")
        ax.plot(n, [r["pw_pair"] for r in mine], "s--", alpha=0.4, label="pairwise DPO: pairwise acc.")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("negatives per sample (N)")
        ax.set_title(f"unevenness of drift {uneven:g}")
    np.atleast_1d(axes)[0].set_ylabel("held-out accuracy")
    np.atleast_1d(axes)[-1].legend(fontsize=7, loc="lower left")
    fig.suptitle("Where the losses part ways: top-1 = positive above every negative", y=1.03)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--negatives", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--uneven", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--samples", type=int, default=64, help="training samples (the demo has 24-64)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmark" / "studies" / "loss_study.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = run(args)
    print(
        f"{'uneven':>6} {'N':>3} {'PL top-1':>9} {'DPO top-1':>10} {'gap sd':>7} {'PL pair':>8} {'DPO pair':>9} {'cos(w)':>7}"
    )
    for r in rows:
        print(
            f"{r['uneven']:>6.1f} {r['negatives']:>3d} {r['pl_top1']:>9.3f} {r['pw_top1']:>10.3f} {r['top1_gap_sd']:>7.3f} "
            f"{r['pl_pair']:>8.3f} {r['pw_pair']:>9.3f} {r['cos']:>7.3f}"
        )
    plot(rows, args.out, args.uneven)
    print(f"figure: {args.out}")


if __name__ == "__main__":
    main()
