"""The data card of a build-preferences output and its figures, from real statistics.

`drift_statistics(out)` reads OUT/annotations/ (streaming the columns it needs) and returns the
per-model table (precision, recall, similarity to the report, refusal rate, laterality error rate,
mean drift), per-model-and-observation claim counts, the pairwise agreement matrix and drift
distributions. `write_figures` draws the agreement heatmap, the per-model drift chart (the paper's
precision/recall/similarity bars beside drift, side error vs consensus and refusal rate) and the
step-wise profile with matplotlib's Agg backend; `write_card` renders data_cards/cxr-max.md.tmpl
with string.Template into OUT/README.md. `METRIC_LABELS` gives each metric its one name.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from string import Template

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cxrmax.core.errors import InputError, where
from cxrmax.core.io import atomic_path, atomic_write_text, read_arrow
from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.core.splits import SPLITS
from cxrmax.preferences.layout import DATA_SETS, annotations_path, parquet_glob, parquet_name

#: Where the card template lives (next to the package in a source checkout).
TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "data_cards" / "cxr-max.md.tmpl"


@dataclass
class DriftStatistics:
    """Everything the card, the figures and `cxrmax drift-report` show."""

    models: list[str]
    per_model: dict[str, dict[str, float]]
    reference: str  # "ground truth" or "consensus" (what precision/recall are measured against)
    claims: dict[str, dict[str, int]]  # model -> observation -> trajectories claiming it
    agreement: list[list[float]]  # models x models: mean share of observations in the same state
    agreement_pairs: list[list[int]]  # samples behind each cell
    samples: int
    trajectories: int
    drift_score_quantiles: dict[str, float]
    drift_score_histogram: tuple[list[int], list[float]]
    trajectory_drift_histogram: tuple[list[int], list[float]]
    consensus_flagged: int
    laterality_conflict_samples: int
    refusal_samples: int
    mean_drift_profile: list[float] = field(default_factory=list)
    mean_dispersion_profile: list[float] = field(default_factory=list)

    def as_json(self) -> dict:
        """The statistics as strict JSON values: NaN (an undefined mean) becomes None (null)."""
        return _nan_to_none(asdict(self))


def _nan_to_none(value: object) -> object:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    return value


def _read(path: Path, columns: list[str]) -> pa.Table:
    if not path.exists():
        raise InputError(f"{where(path)}: missing; run `cxrmax build-preferences` first")
    try:
        table = read_arrow(path)
    except InputError as exc:
        raise InputError(f"{exc}; rerun `cxrmax build-preferences`") from None
    missing = [name for name in columns if name not in table.column_names]
    if missing:
        raise InputError(
            f"{where(path, field=missing[0])}: column missing (written by another cxrmax version?); "
            "rerun `cxrmax build-preferences`"
        )
    return table.select(columns)


#: Characters that would end a Markdown table cell or turn a model name into markup/HTML.
_MARKDOWN_SPECIAL = str.maketrans({c: "\\" + c for c in "\\|*_`<>[]#"} | {"\n": " ", "\r": " "})


def _cell(text: str) -> str:
    """A model name as literal Markdown text (safe inside a table cell)."""
    return str(text).translate(_MARKDOWN_SPECIAL)


def _nanmean(values: np.ndarray) -> float:
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


_TRAJECTORY_COLUMNS = [
    "model",
    "refusal",
    "hedging",
    "n_steps",
    "n_chars",
    "labels",
    "gt_precision",
    "gt_recall",
    "gt_f1",
    "cons_precision",
    "cons_recall",
    "cons_f1",
    "cons_side_errors",
    "gt_side_agreement",
    "similarity",
    "drift",
]
_SAMPLE_COLUMNS = [
    "models",
    "disagreement",
    "drift_score",
    "consensus_flagged",
    "laterality_conflicts",
    "refusals",
    "drift_profile",
    "dispersion_profile",
]


def _per_model(traj: pa.Table, models: list[str], prefix: str) -> tuple[dict, dict]:
    """Per-model means (precision/recall/f1 against `prefix`: "gt" or "cons") and claim counts."""

    def arr(name: str) -> np.ndarray:
        return traj.column(name).to_numpy().astype(np.float64)

    precision, recall, f1 = arr(f"{prefix}_precision"), arr(f"{prefix}_recall"), arr(f"{prefix}_f1")
    similarity = arr("similarity")
    report_sides = arr("gt_side_agreement")
    drift = arr("drift")
    refusal = traj.column("refusal").to_numpy(zero_copy_only=False).astype(bool)
    hedging = traj.column("hedging").to_numpy(zero_copy_only=False).astype(bool)
    steps = arr("n_steps")
    chars = arr("n_chars")
    side_err = (
        pc.list_value_length(traj.column("cons_side_errors")).to_numpy(zero_copy_only=False) > 0
    ).astype(bool)
    labels = traj.column("labels").combine_chunks()
    claims_matrix = np.stack(
        [np.isin(labels.field(name).to_numpy(zero_copy_only=False), (1.0, -1.0)) for name in OBSERVATIONS],
        axis=1,
    )
    model_np = traj.column("model").combine_chunks().to_numpy(zero_copy_only=False)
    per_model: dict[str, dict[str, float]] = {}
    claims: dict[str, dict[str, int]] = {}
    for model in models:
        m = model_np == model
        per_model[model] = {
            "trajectories": int(m.sum()),
            "precision": _nanmean(precision[m]),
            "recall": _nanmean(recall[m]),
            "f1": _nanmean(f1[m]),
            "similarity": _nanmean(similarity[m]),
            "refusal_rate": float(refusal[m].mean()),
            "hedging_rate": float(hedging[m].mean()),
            "laterality_error_rate": float(side_err[m].mean()),
            "report_side_agreement": _nanmean(report_sides[m]),
            "mean_drift": _nanmean(drift[m]),
            "mean_steps": _nanmean(steps[m]),
            "mean_chars": _nanmean(chars[m]),
        }
        counts = claims_matrix[m].sum(axis=0)
        claims[model] = {name: int(c) for name, c in zip(OBSERVATIONS, counts, strict=True)}
    return per_model, claims


def _pairwise_agreement(samples: pa.Table, models: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per model pair, mean over shared samples of 1 - disagreement, and the samples behind each cell.

    Vectorised: element e of a sample's flattened k x k matrix is the pair (e // k, e % k)."""
    index = {m: i for i, m in enumerate(models)}
    total = np.zeros((len(models), len(models)))
    pairs = np.zeros((len(models), len(models)), dtype=np.int64)
    names_col = samples.column("models").combine_chunks()
    if len(names_col):
        k = pc.list_value_length(names_col).to_numpy(zero_copy_only=False).astype(np.int64)
        flat_names = pc.list_flatten(names_col).to_pylist()
        # "model#2" (sample_index 2) counts for its model.
        model_ids = np.array(
            [index.get(n, index.get(n.split("#")[0], -1)) for n in flat_names], dtype=np.int64
        )
        values = pc.list_flatten(pc.list_flatten(samples.column("disagreement").combine_chunks()))
        values = values.to_numpy(zero_copy_only=False).astype(np.float64)
        name_offsets = np.r_[0, np.cumsum(k)[:-1]]
        per_sample = k * k
        sample_of = np.repeat(np.arange(len(k)), per_sample)
        e = np.arange(per_sample.sum()) - np.repeat(np.r_[0, np.cumsum(per_sample)[:-1]], per_sample)
        a = model_ids[name_offsets[sample_of] + e // k[sample_of]]
        b = model_ids[name_offsets[sample_of] + e % k[sample_of]]
        ok = (a >= 0) & (b >= 0) & ~np.isnan(values)
        np.add.at(total, (a[ok], b[ok]), 1.0 - values[ok])
        np.add.at(pairs, (a[ok], b[ok]), 1)
    agreement = np.divide(total, pairs, out=np.full_like(total, np.nan), where=pairs > 0)
    return agreement, pairs


def _mean_profile(samples: pa.Table, name: str) -> list[float]:
    """The mean of a fixed-width list column over samples ([] when empty or of mixed widths)."""
    column = samples.column(name).combine_chunks()
    if not len(column):
        return []
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    width = int(lengths.max())
    if not (lengths == width).all():
        return []
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(-1, width)
    return [float(v) for v in flat.mean(axis=0)]


def _samples_with_any(samples: pa.Table, name: str) -> int:
    """How many samples have a non-empty list in column `name`."""
    return int((pc.list_value_length(samples.column(name)).to_numpy(zero_copy_only=False) > 0).sum())


def drift_statistics(out: str | Path) -> DriftStatistics:
    """Aggregate OUT/annotations/ into per-model and per-pair statistics."""
    out = Path(out)
    traj = _read(annotations_path(out, "trajectories"), _TRAJECTORY_COLUMNS)
    samples = _read(annotations_path(out, "samples"), _SAMPLE_COLUMNS)
    models = sorted(set(traj.column("model").combine_chunks().to_pylist()))
    use_gt = pc.sum(pc.is_valid(traj.column("gt_recall"))).as_py() or 0
    per_model, claims = _per_model(traj, models, "gt" if use_gt else "cons")
    agreement, pairs = _pairwise_agreement(samples, models)

    drift = traj.column("drift").to_numpy().astype(np.float64)
    scores = samples.column("drift_score").to_numpy().astype(np.float64)
    bins = np.linspace(0.0, 1.0, 11)
    score_hist = np.histogram(scores[~np.isnan(scores)], bins=bins)[0]
    drift_hist = np.histogram(drift[~np.isnan(drift)], bins=bins)[0]
    quantiles = (
        {f"p{q}": float(np.quantile(scores, q / 100)) for q in (10, 25, 50, 75, 90)}
        | {"mean": float(scores.mean())}
        if len(scores)
        else {}
    )
    return DriftStatistics(
        models=models,
        per_model=per_model,
        reference="ground truth" if use_gt else "consensus",
        claims=claims,
        agreement=agreement.tolist(),
        agreement_pairs=pairs.tolist(),
        samples=samples.num_rows,
        trajectories=traj.num_rows,
        drift_score_quantiles=quantiles,
        drift_score_histogram=(score_hist.tolist(), bins.tolist()),
        trajectory_drift_histogram=(drift_hist.tolist(), bins.tolist()),
        consensus_flagged=int(pc.sum(samples.column("consensus_flagged")).as_py() or 0),
        laterality_conflict_samples=_samples_with_any(samples, "laterality_conflicts"),
        refusal_samples=_samples_with_any(samples, "refusals"),
        mean_drift_profile=_mean_profile(samples, "drift_profile"),
        mean_dispersion_profile=_mean_profile(samples, "dispersion_profile"),
    )


def drift_report(
    out: str | Path, figures: str | Path | None = None
) -> tuple[DriftStatistics, dict[str, Path]]:
    """`cxrmax drift-report`: the statistics of a build output and its figures (written to
    `figures`, default OUT/figures)."""
    stats = drift_statistics(out)
    return stats, write_figures(stats, figures if figures is not None else Path(out) / "figures")


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


#: One name per metric of the per-model table, used by the card, the figures and drift-report.
#: Side error here is always against the sample's consensus (the demo's table measures it against
#: the report, and says so).
METRIC_LABELS = {
    "precision": "precision",
    "recall": "recall",
    "f1": "F1",
    "similarity": "similarity to report",
    "refusal_rate": "refusal rate",
    "laterality_error_rate": "side error vs consensus",
    "mean_drift": "drift from consensus",
    "mean_steps": "mean steps",
}

#: One-line captions of the figures, in the card beside each one.
FIGURE_CAPTIONS = {
    "drift_chart": "Left: agreement of each source with the {reference} (precision, recall) and "
    "with the report (similarity), higher is better. Right: drift from the consensus, side error vs "
    "consensus and refusal rate, lower is better.",
    "agreement": "Share of the 14 observations on which two sources are in the same state (and side), "
    "over the samples both answered; the colour scale spans the observed range.",
    "drift_profile": "How much the sources disagree (entropy H(P_j) of their states) and how much that "
    "distribution still moves (JS divergence from bin j to j+delta) along the relative reasoning steps.",
}


def write_figures(stats: DriftStatistics, directory: str | Path) -> dict[str, Path]:
    """Write agreement.png (pairwise agreement heatmap), drift_chart.png (per model: precision,
    recall and similarity beside drift, side error vs consensus and refusal rate) and
    drift_profile.png (mean step-wise dispersion and drift), each with labelled axes and colour
    bars (`FIGURE_CAPTIONS` says what each shows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, draw in (
        ("agreement", agreement_figure),
        ("drift_chart", drift_chart_figure),
        ("drift_profile", drift_profile_figure),
    ):
        fig = draw(plt, stats)
        paths[name] = _save_fig(fig, directory / f"{name}.png")
        plt.close(fig)
    return paths


def agreement_range(matrix: np.ndarray) -> tuple[float, float]:
    """The colour scale of the agreement heatmap: the observed range of the off-diagonal cells
    (the diagonal, a source with itself, is 1 by definition), widened to at least 0.05 within
    [0, 1] so that a near-constant matrix does not turn noise into contrast; (0, 1) when nothing
    was compared."""
    off = matrix[~np.eye(len(matrix), dtype=bool)] if len(matrix) > 1 else matrix.ravel()
    off = off[~np.isnan(off)]
    if not len(off):
        return 0.0, 1.0
    lo, hi = float(off.min()), float(off.max())
    pad = max(0.0, 0.05 - (hi - lo)) / 2
    lo, hi = lo - pad, hi + pad
    shift = max(0.0, -lo) - max(0.0, hi - 1.0)  # keep the widened scale inside [0, 1]
    return lo + shift, hi + shift


def agreement_figure(plt, stats: DriftStatistics):
    """The pairwise agreement heatmap (`plt`: matplotlib.pyplot), its colour bar labelled and
    scaled to the observed range (`agreement_range`)."""
    models = stats.models
    n = len(models)
    fig, ax = plt.subplots(figsize=(2.2 + 0.8 * max(n, 2), 1.4 + 0.7 * max(n, 2)))
    matrix = np.array(stats.agreement, dtype=float) if n else np.zeros((0, 0))
    lo, hi = agreement_range(matrix)
    # The diagonal (1 by definition) would stretch the scale: it is drawn as the top colour.
    image = ax.imshow(matrix if n else np.full((1, 1), np.nan), vmin=lo, vmax=hi, cmap="viridis")
    ax.set_xticks(range(n), models, rotation=45, ha="right")
    ax.set_yticks(range(n), models)
    ax.set_xlabel("source")
    ax.set_ylabel("source")
    middle = (lo + hi) / 2
    for i in range(n):
        for j in range(n):
            if not np.isnan(matrix[i, j]):
                colour = "white" if matrix[i, j] < middle else "black"
                ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8, color=colour)
    if not n:
        ax.text(0, 0, "no samples", ha="center", va="center")
    ax.set_title("Pairwise agreement between sources", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046)
    bar.set_label("agreement (share of observations\nin the same state and side)", fontsize=8)
    fig.tight_layout()
    return fig


def _bars(ax, stats: DriftStatistics, metrics: tuple[str, ...]) -> None:
    """Grouped bars of `metrics` per model on `ax`, each labelled with its value (n/a when undefined)."""
    models = stats.models
    x = np.arange(len(models))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        values = np.array([stats.per_model[m][metric] for m in models], dtype=float)
        label = METRIC_LABELS[metric]
        if len(values) and np.isnan(values).all():  # e.g. no reports: say so instead of drawing zeros
            label += " (n/a: no reports)" if metric == "similarity" else " (n/a)"
        offset = (k - (len(metrics) - 1) / 2) * width
        bars = ax.bar(x + offset, np.nan_to_num(values), width, label=label)
        ax.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.2f}" for v in values], fontsize=6)
    ax.set_xticks(x, models, rotation=30, ha="right")
    ax.set_xlabel("source model")
    ax.set_ylim(0, 1.25)
    ax.legend(fontsize=7, loc="upper center", ncols=len(metrics))


def drift_chart_figure(plt, stats: DriftStatistics):
    """Per model: precision, recall and similarity (left) beside drift from consensus, side error
    vs consensus and refusal rate (right), so a side-swapping or refusing source stands out."""
    n = len(stats.models)
    fig, (good, bad) = plt.subplots(1, 2, figsize=(3.0 + 1.4 * max(n, 2), 4.4), sharey=True)
    _bars(good, stats, ("precision", "recall", "similarity"))
    good.set_ylabel("rate / score, 0-1")
    good.set_title(f"Agreement with the {stats.reference} (higher is better)", fontsize=9)
    _bars(bad, stats, ("mean_drift", "laterality_error_rate", "refusal_rate"))
    bad.set_title("Drift from the consensus (lower is better)", fontsize=9)
    bad.tick_params(labelleft=True)  # sharey hides them; each panel is read on its own
    bad.set_ylabel("rate / score, 0-1")
    fig.suptitle("Drift per source model", fontsize=11)
    fig.tight_layout()
    return fig


def drift_profile_figure(plt, stats: DriftStatistics):
    """The mean step-wise dispersion H(P_j) and drift JS(P_j || P_j+delta), explained in the legend."""
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    if stats.mean_dispersion_profile:
        ax.plot(
            range(len(stats.mean_dispersion_profile)),
            stats.mean_dispersion_profile,
            marker="o",
            label="dispersion H(P_j): how much the sources disagree after bin j (normalised entropy)",
        )
    if stats.mean_drift_profile:
        ax.plot(
            range(len(stats.mean_drift_profile)),
            stats.mean_drift_profile,
            marker="s",
            label="drift JS(P_j || P_j+delta): how much that distribution moves from bin j to j+delta",
        )
    ax.set_xlabel("relative reasoning step bin j (0 = before the first step)")
    ax.set_ylabel("mean over samples (0-1; 0 = no disagreement / no change)")
    ax.set_title("Step-wise drift (P_j: the sources' observation states after bin j)", fontsize=10)
    if stats.mean_dispersion_profile or stats.mean_drift_profile:  # no samples: an empty, legend-less plot
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def _save_fig(fig, path: Path) -> Path:
    # The temporary name keeps ".png": savefig picks the format from it.
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    return path


# --------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------


def _fmt(value: float) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


#: The columns of the card's per-model table, in order (headers from METRIC_LABELS).
_MODEL_TABLE_METRICS = (
    "precision",
    "recall",
    "f1",
    "similarity",
    "refusal_rate",
    "laterality_error_rate",
    "mean_drift",
    "mean_steps",
)


def model_table_markdown(stats: DriftStatistics) -> str:
    """The per-model drift table as Markdown (one name per metric: `METRIC_LABELS`)."""
    head = "| model | trajectories | " + " | ".join(METRIC_LABELS[m] for m in _MODEL_TABLE_METRICS) + " |"
    rule = "|---|---:|" + "---:|" * len(_MODEL_TABLE_METRICS)
    rows = [head, rule]
    for model in stats.models:
        m = stats.per_model[model]
        cells = " | ".join(_fmt(m[name]) for name in _MODEL_TABLE_METRICS)
        rows.append(f"| {_cell(model)} | {m['trajectories']} | {cells} |")
    return "\n".join(rows)


def _claims_markdown(stats: DriftStatistics) -> str:
    head = "| observation | " + " | ".join(map(_cell, stats.models)) + " |"
    rule = "|---|" + "---:|" * len(stats.models)
    rows = [head, rule]
    for name in OBSERVATIONS:
        rows.append(f"| {name} | " + " | ".join(str(stats.claims[m][name]) for m in stats.models) + " |")
    return "\n".join(rows)


def _agreement_markdown(stats: DriftStatistics) -> str:
    head = "| | " + " | ".join(map(_cell, stats.models)) + " |"
    rule = "|---|" + "---:|" * len(stats.models)
    rows = [head, rule]
    for i, model in enumerate(stats.models):
        rows.append(f"| {_cell(model)} | " + " | ".join(_fmt(v) for v in stats.agreement[i]) + " |")
    return "\n".join(rows)


def _histogram_markdown(hist: tuple[list[int], list[float]]) -> str:
    counts, edges = hist
    rows = ["| drift | count |", "|---|---:|"]
    for c, lo, hi in zip(counts, edges[:-1], edges[1:], strict=True):
        rows.append(f"| {lo:.1f}-{hi:.1f} | {c} |")
    return "\n".join(rows)


def _split_table(report: dict) -> str:
    rows = ["| data set | train | validate | test |", "|---|---:|---:|---:|"]
    for name in ("preferences", "sft"):
        split_rows = report.get("split_rows", {}).get(name, {})
        rows.append(
            f"| {name} | "
            + " | ".join(str(split_rows.get(s, 0)) for s in ("train", "validate", "test"))
            + " |"
        )
    return "\n".join(rows)


def split_claim(report: dict) -> str:
    """Where the card's splits come from, computed from the build report (never claimed blindly):
    the official MIMIC-CXR split only when a --mimic-root was joined."""
    rows = report.get("load", {}).get("rows", 0)
    unknown = report.get("split_unknown_rows", 0)
    if report.get("mimic_root"):
        moved = report.get("split_from_mimic_rows", 0)
        return "Splits follow the official MIMIC-CXR split (joined from --mimic-root" + (
            f"; {moved} rows whose own split disagreed were moved to it)." if moved else ")."
        )
    if rows and unknown >= rows:
        return (
            "The input had no split: every row was put in train (build with --mimic-root to use the "
            "official MIMIC-CXR split)."
        )
    text = "Splits are the input's own split column, not checked against the official MIMIC-CXR split (no --mimic-root)"
    return text + (f"; {unknown} rows without a split were put in train." if unknown else ".")


def _positive_claim(positive: str) -> str:
    if positive == "selected":
        return (
            "the source trajectory closest to the sources' consensus (`--positive selected`: the least drifting "
            "answer that is not a refusal, kept in its source's words; `chosen_source` names it)"
        )
    return "one consensus trajectory"


def render_card(out: str | Path, stats: DriftStatistics | None = None, template: Path | None = None) -> str:
    """The card text for OUT (README.md with a Hub YAML header listing the two configs)."""
    out = Path(out)
    stats = stats or drift_statistics(out)
    report_path = out / "build_report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    counts = report.get("counts", {})
    load = report.get("load", {})
    values = {
        "n_samples": stats.samples,
        "n_trajectories": stats.trajectories,
        "positive_claim": _positive_claim(report.get("positive", "composed")),
        "n_models": len(stats.models),
        "models": ", ".join(map(_cell, stats.models)) or "none",
        "reference": stats.reference,
        "split_table": _split_table(report),
        "split_claim": split_claim(report),
        "model_table": model_table_markdown(stats),
        "claims_table": _claims_markdown(stats),
        "agreement_table": _agreement_markdown(stats),
        "drift_score_histogram": _histogram_markdown(stats.drift_score_histogram),
        "trajectory_drift_histogram": _histogram_markdown(stats.trajectory_drift_histogram),
        "drift_quantiles": ", ".join(f"{k} {v:.3f}" for k, v in stats.drift_score_quantiles.items()) or "n/a",
        "consensus_flagged": stats.consensus_flagged,
        "laterality_conflict_samples": stats.laterality_conflict_samples,
        "refusal_samples": stats.refusal_samples,
        "preference_rows": counts.get("preference_rows", 0),
        "negatives": counts.get("negatives", 0),
        "sft_rows": counts.get("sft_rows", 0),
        "skipped_few_sources": report.get("skipped_few_sources", 0),
        "empty_texts": load.get("empty_texts", 0),
        "truncated_texts": load.get("truncated_texts", 0),
        "reasoning_joined": load.get("reasoning_joined", 0),
        "duplicates_skipped": load.get("duplicates_skipped", 0) + load.get("identical_duplicates_skipped", 0),
        "ms_cxr_t_excluded_rows": report.get("ms_cxr_t_excluded_rows", 0),
        "samples_without_negatives": counts.get("samples_without_negatives", 0),
        "labeler_errors": counts.get("labeler_errors", 0),
        "size_category": _size_category(stats.trajectories),
        "configs": _configs_yaml(out),
        **{
            f"caption_{name}": text.format(reference=stats.reference)
            for name, text in FIGURE_CAPTIONS.items()
        },
    }
    text = (template or TEMPLATE_PATH).read_text(encoding="utf-8")
    return Template(text).substitute(values)


def _configs_yaml(out: Path) -> str:
    """The ``configs:`` block of the card's YAML header: per data set (preferences, sft), the splits
    whose Parquet file under OUT/<name>/ holds rows. `datasets.load_dataset` refuses a declared
    split without rows ("corresponds to no data"), so empty splits (and a data set without any
    rows) are left out; their empty files stay for tools that read every split."""
    lines = []
    for name in DATA_SETS:
        splits = [
            split
            for split in SPLITS
            if (out / name / parquet_name(split)).is_file()
            and pq.ParquetFile(out / name / parquet_name(split)).metadata.num_rows > 0
        ]
        if not splits:
            continue
        lines += [f"- config_name: {name}", "  data_files:"]
        for split in splits:
            lines += [f"  - split: {split}", f"    path: {parquet_glob(name, split)}"]
    return "configs:\n" + "\n".join(lines) if lines else "configs: []"


def _size_category(n: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
    ):
        if n < limit:
            return name
    return "1M<n<10M"


def write_card(out: str | Path, figures: bool = True) -> Path:
    """Render OUT/README.md (and OUT/figures/*.png) from the build's annotations."""
    out = Path(out)
    stats = drift_statistics(out)
    if figures:
        write_figures(stats, out / "figures")
    text = render_card(out, stats)
    return atomic_write_text(out / "README.md", text)
