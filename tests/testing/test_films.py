"""The synthetic films draw each finding on the side the study states (patient left = image right)."""

import numpy as np
import pytest

from cxrmax.testing.films import SIDED, synthetic_chest


def _change(name: str, value: int, side: str | None, seed: int) -> np.ndarray:
    plain = synthetic_chest(180, 220, seed=seed).astype(np.int16)
    drawn = synthetic_chest(180, 220, seed=seed, labels={name: value}, sides={name: side}).astype(np.int16)
    return np.abs(drawn - plain)


@pytest.mark.parametrize("name", SIDED)
@pytest.mark.parametrize("side", ["left", "right"])
def test_a_sided_finding_changes_only_its_side(name, side):
    for seed in range(3):
        change = _change(name, 1, side, seed)
        half = change.shape[1] // 2
        image_right, image_left = change[:, half:].sum(), change[:, :half].sum()
        assert image_right + image_left > 0, "the finding is not drawn"
        on_side = image_right if side == "left" else image_left
        assert on_side / (image_right + image_left) > 0.9


@pytest.mark.parametrize("name", SIDED)
def test_bilateral_findings_change_both_sides_and_uncertain_ones_are_fainter(name):
    change = _change(name, 1, "bilateral", 0)
    half = change.shape[1] // 2
    assert change[:, :half].sum() > 0 and change[:, half:].sum() > 0
    assert _change(name, -1, "bilateral", 0).sum() < change.sum()


def test_cardiomegaly_widens_the_heart_and_films_vary_per_seed():
    big = synthetic_chest(180, 220, seed=1, labels={"Cardiomegaly": 1})
    normal = synthetic_chest(180, 220, seed=1)
    row = int(220 * 0.68)  # through the heart
    assert (big[row] > 150).sum() > 1.3 * (normal[row] > 150).sum()
    assert not np.array_equal(synthetic_chest(180, 220, seed=2), normal)
    assert np.array_equal(synthetic_chest(180, 220, seed=1), normal)


def test_negative_and_unmentioned_findings_are_not_drawn():
    plain = synthetic_chest(120, 140, seed=3)
    labels = {name: 0 for name in SIDED} | {"Cardiomegaly": None}
    assert np.array_equal(synthetic_chest(120, 140, seed=3, labels=labels), plain)
