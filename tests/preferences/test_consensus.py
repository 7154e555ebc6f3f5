"""cxrmax.preferences.consensus: the documented vote rules (plurality, ties, refusals, No Finding, sides) and
the composition of the positive from supporting source steps, re-labelled with the real labeler."""

from __future__ import annotations

import numpy as np

from cxrmax.core.pathologies import OBSERVATIONS
from cxrmax.preferences import consensus as C
from cxrmax.preferences import drift as D

ATE = OBSERVATIONS.index("Atelectasis")
CAR = OBSERVATIONS.index("Cardiomegaly")
EDE = OBSERVATIONS.index("Edema")
EFF = OBSERVATIONS.index("Pleural Effusion")
NOF = OBSERVATIONS.index("No Finding")
PNA = OBSERVATIONS.index("Pneumonia")
PTX = OBSERVATIONS.index("Pneumothorax")
SUP = OBSERVATIONS.index("Support Devices")


def sample(columns: dict[int, list[int]], k: int) -> np.ndarray:
    """(1, k, 14) states: observation index -> one state per source."""
    states = np.zeros((1, k, D.N_OBS), dtype=np.int8)
    for obs, values in columns.items():
        states[0, :, obs] = values
    return states


def run_vote(columns, k, refusal=None, sides=None):
    states = sample(columns, k)
    side_arr = np.zeros_like(states)
    for obs, values in (sides or {}).items():
        side_arr[0, :, obs] = values
    valid = np.ones((1, k), dtype=bool)
    refusal_arr = np.array([refusal or [False] * k])
    return C.vote(states, side_arr, valid, refusal_arr)


def test_vote_plurality_and_documented_ties():
    P, U, N, A = D.POSITIVE, D.UNCERTAIN, D.NEGATIVE, D.ABSENT
    vote = run_vote(
        {
            ATE: [P, P, P, A, N],  # claims are the unique plurality -> positive
            CAR: [P, U, A, A, A],  # absent wins (3 vs 2 claims)
            EDE: [P, P, N, N, A],  # claim ties negation -> uncertain
            EFF: [P, U, U, A, A],  # 3 claims, more hedged than sure -> uncertain
            PNA: [P, U, A, A, N],  # claims (2) tie absent (2) -> uncertain
            PTX: [N, N, A, A, P],  # negation ties absence -> negative
            SUP: [A, A, A, A, N],  # absent plurality
        },
        5,
    )
    got = {OBSERVATIONS[i]: int(vote.states[0, i]) for i in (ATE, CAR, EDE, EFF, PNA, PTX, SUP)}
    assert got == {
        "Atelectasis": P,
        "Cardiomegaly": A,
        "Edema": U,
        "Pleural Effusion": U,
        "Pneumonia": U,
        "Pneumothorax": N,
        "Support Devices": A,
    }
    assert vote.voters.tolist() == [5]


def test_refusals_do_not_vote():
    P, A = D.POSITIVE, D.ABSENT
    # Without the refusal, absent (2) would beat the claim (1)... with it, 1 claim vs 1 absent ties.
    vote = run_vote({EFF: [P, A, A]}, 3, refusal=[False, False, True])
    assert vote.voters.tolist() == [2]
    assert vote.states[0, EFF] == D.UNCERTAIN
    all_refuse = run_vote({EFF: [P, P]}, 2, refusal=[True, True])
    assert (all_refuse.states == D.ABSENT).all() and all_refuse.voters.tolist() == [0]


def test_no_finding_rule_and_support_devices():
    P = D.POSITIVE
    vote = run_vote({NOF: [P, P, P], SUP: [P, P, P]}, 3)
    assert vote.states[0, NOF] == P  # devices alone keep No Finding
    vote = run_vote({NOF: [P, P, P], ATE: [P, P, P]}, 3)
    assert vote.states[0, NOF] == D.ABSENT and vote.states[0, ATE] == P


def test_side_plurality_and_conflict():
    P = D.POSITIVE
    L, R, B = D.SIDE_LEFT, D.SIDE_RIGHT, D.SIDE_BILATERAL
    vote = run_vote({ATE: [P, P, P, P], EFF: [P, P, P, P]}, 4, sides={ATE: [L, L, R, 0], EFF: [L, R, B, B]})
    assert vote.sides[0, ATE] == L and not vote.side_conflict[0, ATE]
    assert vote.sides[0, EFF] == B and not vote.side_conflict[0, EFF]
    tie = run_vote({ATE: [P, P, P]}, 3, sides={ATE: [L, R, 0]})
    assert tie.sides[0, ATE] == 0 and tie.side_conflict[0, ATE]


def test_support_mask_rejects_contradictions():
    cons = run_vote({ATE: [3, 3], EFF: [3, 3], PTX: [1, 1]}, 2, sides={ATE: [1, 1]})
    steps = np.zeros((6, D.N_OBS), dtype=np.int8)
    sides = np.zeros_like(steps)
    steps[0, ATE] = 3
    sides[0, ATE] = D.SIDE_LEFT  # supports
    steps[1, ATE] = 3
    sides[1, ATE] = D.SIDE_RIGHT  # wrong side
    steps[2, EFF] = 3
    steps[2, CAR] = 3  # claims something the consensus lacks
    steps[3, PTX] = 1  # shared negation: supports
    steps[4, EFF] = 1  # negates a consensus claim
    # step 5 asserts nothing
    rep = np.repeat
    mask = C.support_mask(
        steps, sides, rep(cons.states, 6, 0), rep(cons.sides, 6, 0), rep(cons.side_conflict, 6, 0)
    )
    assert mask.tolist() == [True, False, False, True, False, False]


def test_compose_greedy_dedup_and_relabel_agrees():
    from cxrmax.labeler import label_text

    cons = run_vote({ATE: [3, 3], EFF: [3, 3], SUP: [3, 3]}, 2, sides={ATE: [1, 1], EFF: [3, 3]})
    cons_states, cons_sides = cons.states[0], cons.sides[0]

    def steps(*texts):
        out = []
        for text in texts:
            lab = label_text(text)
            st = np.array(
                [[D.status_to_state(lab.observations[o].status) for o in OBSERVATIONS]], dtype=np.int8
            )
            sd = np.array(
                [[D.side_to_code(lab.observations[o].laterality) for o in OBSERVATIONS]], dtype=np.int8
            )
            ok = C.support_mask(st, sd, cons.states, cons.sides, cons.side_conflict)[0]
            out.append(C.CandidateStep(text, bool(ok), int(C.observation_bits(st)[0])))
        return out

    best = steps("**There is left lower lobe atelectasis.**", "The heart is enlarged.", "Right effusion.")
    second = steps(
        "There is left lower lobe atelectasis.",  # duplicate once markdown is removed
        "Bilateral pleural effusions are present.",
        "Small bilateral pleural effusions.",  # adds nothing new
    )
    text, used = C.compose([best, second], cons_states, cons_sides, prompt="Please explain the basis for it.")
    lines = text.splitlines()
    assert lines[0] == "The basis for the diagnosis on this chest radiograph:"
    assert "- There is left lower lobe atelectasis." in lines
    assert "- Bilateral pleural effusions are present." in lines
    assert not any("heart" in line or "Right effusion" in line or "Small" in line for line in lines)
    assert used == [0, 1]
    # Support devices had no supporting step: the summary still states it.
    assert lines[-1] == "In summary: Left atelectasis. Bilateral pleural effusion. Support devices."
    relabelled = label_text(text)
    rel_states = np.array([[D.status_to_state(relabelled.observations[o].status) for o in OBSERVATIONS]])
    rel_sides = np.array([[D.side_to_code(relabelled.observations[o].laterality) for o in OBSERVATIONS]])
    assert not C.disagrees(rel_states, rel_sides, cons)[0]


def test_disagrees_flags_set_and_side_differences():
    cons = run_vote({ATE: [3, 3]}, 2, sides={ATE: [1, 1]})
    same = np.zeros((1, D.N_OBS), dtype=np.int8)
    same[0, ATE] = D.UNCERTAIN  # hedged but claimed: same set
    left = np.zeros_like(same)
    left[0, ATE] = D.SIDE_LEFT
    assert not C.disagrees(same, left, cons)[0]
    right = left.copy()
    right[0, ATE] = D.SIDE_RIGHT
    assert C.disagrees(same, right, cons)[0]
    extra = same.copy()
    extra[0, CAR] = D.POSITIVE
    assert C.disagrees(extra, left, cons)[0]


def test_compose_without_claims_states_negations():
    cons = run_vote({PTX: [1, 1], EFF: [1, 1]}, 2)
    assert cons.states[0, NOF] == D.POSITIVE  # nothing claimed: No Finding by the CheXpert rule
    text, used = C.compose([], cons.states[0], cons.sides[0])
    assert text.endswith(
        "In summary: No acute cardiopulmonary abnormality. There is no pleural effusion or pneumothorax."
    )
    assert used == []
    nobody = run_vote({PTX: [1, 1]}, 2, refusal=[True, True])
    text, _ = C.compose([], nobody.states[0], nobody.sides[0])
    assert text.endswith("In summary: the sources agree on no specific finding.")


def test_summary_phrases_read_back_as_the_consensus():
    """Every observation, with every side and hedge, survives a round trip through the labeler."""
    from cxrmax.core.pathologies import LATERALIZABLE
    from cxrmax.labeler import label_text

    for i, name in enumerate(OBSERVATIONS):
        for state in (D.POSITIVE, D.UNCERTAIN):
            for side in (0, 1, 2, 3) if name in LATERALIZABLE else (0,):
                if name == "No Finding" and (state != D.POSITIVE or side):
                    continue
                states = np.zeros((1, D.N_OBS), dtype=np.int8)
                sides = np.zeros_like(states)
                if name not in ("No Finding", "Atelectasis"):  # a neighbour with a side of its own
                    states[0, ATE], sides[0, ATE] = D.POSITIVE, D.SIDE_LEFT
                states[0, i], sides[0, i] = state, side
                text, _ = C.compose([], states[0], sides[0])
                lab = label_text(text)
                got = {
                    n: (o.status, o.laterality) for n, o in lab.observations.items() if o.status != "absent"
                }
                assert got[name][0] == D.STATE_NAMES[state], (text, got)
                if side:
                    assert got[name][1] == D.SIDE_NAMES[side], (text, got)
