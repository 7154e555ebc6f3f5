"""The data card's figures say what they show: the drift chart plots drift and side error beside
precision/recall/similarity, axes and colour bars are labelled, the agreement scale follows the
data, the step-wise profile explains H(P_j) and JS(...), each figure has a caption in the card, and
each metric has one name."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cxrmax.preferences.datacard import (  # noqa: E402
    FIGURE_CAPTIONS,
    METRIC_LABELS,
    agreement_figure,
    agreement_range,
    drift_chart_figure,
    drift_profile_figure,
    drift_statistics,
    write_figures,
)


@pytest.fixture(scope="module")
def stats(mini_build):
    return drift_statistics(mini_build[0])


def legend_texts(fig) -> set[str]:
    return {t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()}


def test_drift_chart_plots_drift_and_side_error_with_labelled_axes(stats):
    fig = drift_chart_figure(plt, stats)
    assert fig._suptitle.get_text() == "Drift per source model"
    assert {"precision", "recall", "similarity to report"} <= legend_texts(fig)
    assert {"drift from consensus", "side error vs consensus", "refusal rate"} <= legend_texts(fig)
    for ax in fig.axes:
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    # The side-swapping source (glm-4.5v: right effusion vs the consensus's left) shows up.
    assert stats.per_model["glm-4.5v"]["laterality_error_rate"] == 1.0
    plt.close(fig)


def test_agreement_scale_covers_the_data_and_its_colour_bar_is_labelled(stats):
    matrix = np.array([[1.0, 0.81, 0.9], [0.81, 1.0, 0.97], [0.9, 0.97, 1.0]])
    assert agreement_range(matrix) == pytest.approx((0.81, 0.97))
    assert agreement_range(np.full((2, 2), 1.0)) == pytest.approx((0.95, 1.0))  # widened inside [0, 1]
    assert agreement_range(np.full((2, 2), np.nan)) == (0.0, 1.0)
    fig = agreement_figure(plt, stats)
    heatmap, bar = fig.axes
    off = np.array(stats.agreement)[~np.eye(len(stats.models), dtype=bool)]
    assert heatmap.images[0].get_clim() == pytest.approx((off.min(), off.max()))
    assert "agreement" in bar.get_ylabel() and heatmap.get_xlabel() and heatmap.get_ylabel()
    plt.close(fig)


def test_drift_profile_explains_its_symbols(stats):
    fig = drift_profile_figure(plt, stats)
    texts = " ".join(legend_texts(fig))
    assert "H(P_j)" in texts and "disagree" in texts and "JS(P_j || P_j+delta)" in texts and "moves" in texts
    assert "step bin" in fig.axes[0].get_xlabel() and fig.axes[0].get_ylabel()
    plt.close(fig)


def test_card_captions_each_figure_and_names_each_metric_once(mini_build, stats, tmp_path):
    card = (mini_build[0] / "README.md").read_text(encoding="utf-8")
    for name in FIGURE_CAPTIONS:
        image = next(i for i, line in enumerate(card.splitlines()) if f"figures/{name}.png" in line)
        caption = card.splitlines()[image + 2]
        assert caption.startswith("*") and len(caption) > 40
    assert "side error vs consensus" in card and "laterality error rate" not in card
    header = next(line for line in card.splitlines() if line.startswith("| model | trajectories"))
    assert METRIC_LABELS["laterality_error_rate"] in header and METRIC_LABELS["mean_drift"] in header
    paths = write_figures(stats, tmp_path / "figures")
    assert sorted(paths) == sorted(FIGURE_CAPTIONS)
    assert all(path.read_bytes()[:4] == b"\x89PNG" for path in paths.values())
