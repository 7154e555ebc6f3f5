"""cxrmax.preferences.drift: per-trajectory metrics, per-sample votes/entropy/disagreement/conflicts and the
step-wise drift, on hand-built state arrays with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.preferences import drift as D

ATE = OBSERVATIONS.index("Atelectasis")
CAR = OBSERVATIONS.index("Cardiomegaly")
EFF = OBSERVATIONS.index("Pleural Effusion")
PTX = OBSERVATIONS.index("Pneumothorax")
SUP = OBSERVATIONS.index("Support Devices")


def row(**states: int) -> np.ndarray:
    """A (14,) state row from observation-index keyword names (see the constants above)."""
    out = np.zeros(D.N_OBS, dtype=np.int8)
    for key, value in states.items():
        out[globals()[key.upper()]] = value
    return out


def test_label_and_state_codings_round_trip():
    labels = np.array([1, 0, -1, np.nan], dtype=np.float32)
    states = D.labels_array_to_states(labels)
    assert states.tolist() == [D.POSITIVE, D.NEGATIVE, D.UNCERTAIN, D.ABSENT]
    back = D.states_to_labels_array(states)
    assert back[:3].tolist() == [1.0, 0.0, -1.0] and math.isnan(back[3])
    assert [D.label_to_state(v) for v in (1, 0, -1, None)] == [3, 1, 2, 0]
    assert D.status_to_state("uncertain") == D.UNCERTAIN and D.status_to_state(None) == D.ABSENT
    assert D.side_to_code("bilateral") == D.SIDE_BILATERAL and D.side_to_code("unspecified") == D.SIDE_NONE


def test_compare_counts_hallucinated_omitted_and_sides():
    ref = np.stack([row(ate=3, eff=3, sup=3, ptx=1)] * 3)
    ref_sides = np.zeros_like(ref)
    ref_sides[:, ATE] = D.SIDE_LEFT
    pred = np.stack(
        [
            row(ate=3, eff=3, sup=3, ptx=1),  # exact
            row(
                ate=3, eff=2, car=3
            ),  # uncertain counts as a claim; cardiomegaly hallucinated; devices omitted
            row(),  # claims nothing
        ]
    )
    sides = np.zeros_like(pred)
    sides[0, ATE] = D.SIDE_LEFT
    sides[1, ATE] = D.SIDE_RIGHT
    result = D.compare(pred, sides, ref, ref_sides)
    assert result.precision[0] == 1.0 and result.recall[0] == 1.0 and result.f1[0] == 1.0
    assert result.precision[1] == pytest.approx(2 / 3) and result.recall[1] == pytest.approx(2 / 3)
    assert result.f1[1] == pytest.approx(2 / 3)
    assert np.flatnonzero(result.hallucinated[1]).tolist() == [CAR]
    assert np.flatnonzero(result.omitted[1]).tolist() == [SUP]
    assert np.flatnonzero(result.side_errors[1]).tolist() == [ATE]
    assert result.side_agreement[0] == 1.0 and result.side_agreement[1] == 0.0
    assert math.isnan(result.precision[2]) and result.recall[2] == 0.0 and math.isnan(result.f1[2])
    assert np.flatnonzero(result.omitted[2]).tolist() == [ATE, EFF, SUP]


def test_drift_from_consensus_known_values():
    cons = np.stack([row(ate=3, eff=3, sup=3)] * 5)
    cons_sides = np.zeros_like(cons)
    cons_sides[:, ATE] = D.SIDE_LEFT
    states = np.stack(
        [
            row(ate=3, eff=3, sup=3, ptx=1),  # agrees (a negation the consensus lacks is no drift)
            row(ate=3, eff=3, sup=3),  # side error on atelectasis: 1 of 3
            row(ate=3, eff=3, car=3),  # hallucinated cardiomegaly + omitted devices: 2 of 4
            row(ate=2, eff=3, sup=3),  # certainty mismatch: 0.5 of 3
            row(ate=3, eff=3, sup=3),  # refusal flag wins
        ]
    )
    sides = np.zeros_like(states)
    sides[:, ATE] = D.SIDE_LEFT
    sides[1, ATE] = D.SIDE_RIGHT
    refusal = np.array([False, False, False, False, True])
    drift = D.drift_from_consensus(states, sides, refusal, cons, cons_sides)
    assert drift.tolist() == pytest.approx([0.0, 1 / 3, 0.5, 0.5 / 3, 1.0])
    empty = D.drift_from_consensus(row()[None], row()[None], np.array([False]), row()[None], row()[None])
    assert empty.tolist() == [0.0]


def test_vote_counts_entropy_and_pairwise_disagreement():
    states = np.zeros((1, 4, D.N_OBS), dtype=np.int8)
    states[0, :2, EFF] = D.POSITIVE
    states[0, 2:, EFF] = D.NEGATIVE
    valid = np.array([[True, True, True, False]])  # the fourth source is padding
    counts = D.vote_counts(states, valid)
    assert counts[0, EFF].tolist() == [0, 1, 0, 2]  # absent, negative, uncertain, positive
    assert counts[0, ATE].tolist() == [3, 0, 0, 0]
    h = D.entropy(counts)
    assert h[0, EFF] == pytest.approx(-(1 / 3) * math.log2(1 / 3) - (2 / 3) * math.log2(2 / 3))
    assert h[0, ATE] == 0.0
    sides = np.zeros_like(states)
    sides[0, 0, EFF] = D.SIDE_LEFT
    sides[0, 1, EFF] = D.SIDE_RIGHT
    dis = D.pairwise_disagreement(states, valid, sides)
    assert dis[0, 0, 1] == pytest.approx(1 / 14)  # same state, different side
    assert dis[0, 0, 2] == pytest.approx(1 / 14)
    assert dis[0, 0, 0] == 0.0 and math.isnan(dis[0, 0, 3])
    assert D.pairwise_disagreement(states, valid)[0, 0, 1] == 0.0  # without sides


def test_laterality_conflicts_need_two_specific_sides():
    states = np.zeros((2, 3, D.N_OBS), dtype=np.int8)
    states[:, :, ATE] = D.POSITIVE
    sides = np.zeros_like(states)
    sides[0, 0, ATE], sides[0, 1, ATE] = D.SIDE_LEFT, D.SIDE_RIGHT
    sides[1, 0, ATE], sides[1, 1, ATE] = D.SIDE_LEFT, D.SIDE_LEFT  # third unspecified: no conflict
    conflicts = D.laterality_conflicts(states, sides, np.ones((2, 3), dtype=bool))
    assert conflicts[:, ATE].tolist() == [True, False]
    assert conflicts.sum() == 1


def test_cumulative_step_states_bins_by_relative_position():
    # Trajectory 0: 2 steps (effusion, then atelectasis); trajectory 1: 4 steps, effusion at step 3.
    steps = np.stack([row(eff=3), row(ate=3), row(), row(), row(), row(eff=1)])
    offsets = np.array([0, 2, 6])
    cumulative = D.cumulative_step_states(steps, offsets, bins=4)
    assert cumulative.shape == (2, 5, D.N_OBS)
    assert (cumulative[:, 0] == 0).all()  # before any step
    assert cumulative[0, :, EFF].tolist() == [0, 3, 3, 3, 3]  # step 0 -> bin 0
    assert cumulative[0, :, ATE].tolist() == [0, 0, 0, 3, 3]  # step 1 of 2 -> bin 2
    assert cumulative[1, :, EFF].tolist() == [0, 0, 0, 0, 1]  # step 3 of 4 -> bin 3
    # Priority: a later negation does not undo an earlier positive.
    again = D.cumulative_step_states(np.stack([row(eff=3), row(eff=1)]), np.array([0, 2]), bins=2)
    assert again[0, :, EFF].tolist() == [0, 3, 3]


def test_stepwise_drift_agreeing_streams_score_zero():
    cumulative = np.zeros((1, 3, 3, D.N_OBS), dtype=np.int8)
    cumulative[0, :, 1:, EFF] = D.POSITIVE  # all three assert effusion in bin 1
    result = D.stepwise_drift(cumulative, np.ones((1, 3), dtype=bool))
    assert result.score.tolist() == [0.0]
    assert result.dispersion[0].tolist() == [0.0, 0.0, 0.0]
    # P_0 (all absent) -> P_1 (all positive): JS of two point masses is 1 bit; then stationary.
    assert result.profile[0].tolist() == pytest.approx([1.0, 0.0])


def test_stepwise_drift_disagreement_and_timing():
    cumulative = np.zeros((1, 2, 3, D.N_OBS), dtype=np.int8)
    cumulative[0, 0, 1:, EFF] = D.POSITIVE  # stream 0: effusion from bin 1
    cumulative[0, 1, 2:, EFF] = D.NEGATIVE  # stream 1: denies it, later
    result = D.stepwise_drift(cumulative, np.ones((1, 2), dtype=bool))
    # One active observation; with 2 streams the maximal entropy is 1 bit.
    assert result.dispersion[0].tolist() == pytest.approx([0.0, 1.0, 1.0])
    assert result.score.tolist() == pytest.approx([1.0])
    # P_0 = {absent: 1}, P_1 = {absent: .5, positive: .5}, P_2 = {negative: .5, positive: .5}
    js01 = 0.5 * (1 * math.log2(1 / 0.75)) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert result.profile[0, 0] == pytest.approx(js01)
    assert result.profile[0, 1] == pytest.approx(0.5)
    # Padding sources are ignored.
    padded = np.concatenate([cumulative, np.full((1, 1, 3, D.N_OBS), 3, dtype=np.int8)], axis=1)
    again = D.stepwise_drift(padded, np.array([[True, True, False]]))
    assert again.score.tolist() == pytest.approx(result.score.tolist())


def test_pad_groups():
    values = np.arange(5)[:, None].repeat(2, axis=1)
    padded, valid = D.pad_groups(values, np.array([0, 2, 5]), fill=-1)
    assert padded.shape == (2, 3, 2)
    assert valid.tolist() == [[True, True, False], [True, True, True]]
    assert padded[0, 2].tolist() == [-1, -1] and padded[1, 2].tolist() == [4, 4]


def test_token_similarity():
    report = "Left lower lobe atelectasis. Small bilateral pleural effusions."
    assert D.token_similarity(report, report) == pytest.approx(1.0)
    assert D.token_similarity("Cardiomegaly.", report) == 0.0
    assert D.token_similarity("", report) is None and D.token_similarity("x y", None) is None
    partial = D.token_similarity("There is left lower lobe atelectasis.", report)
    # content tokens: rationale {left, lower, lobe, atelectasis}; report has 8; overlap 4
    assert partial == pytest.approx(2 * 1.0 * 0.5 / 1.5)
