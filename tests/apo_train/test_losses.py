"""The APO losses: DPO equivalence, order invariance, masking, listwise, gradients, float32 under bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from apo_train.losses import (
    apo_loss,
    listwise_loss,
    pairwise_loss,
    plackett_luce_loss,
    reward_metrics,
)


def _rewards(b: int = 5, n: int = 7, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, generator=g, dtype=dtype) * 3, torch.randn(b, n, generator=g, dtype=dtype) * 3


def test_single_negative_equals_dpo():
    chosen, rejected = _rewards(n=1, dtype=torch.float32)
    dpo = -F.logsigmoid(chosen - rejected[:, 0])
    for loss in (plackett_luce_loss, listwise_loss, pairwise_loss):
        assert torch.allclose(loss(chosen, rejected), dpo, atol=1e-6, rtol=0), loss.__name__


def test_apo_loss_single_negative_matches_dpo_formula_from_logps():
    g = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(4, generator=g) * 20 - 100 for _ in range(4))
    beta = 0.1
    out = apo_loss(pc, pr[:, None], rc, rr[:, None], beta=beta)
    dpo = -F.logsigmoid(beta * ((pc - rc) - (pr - rr)))
    assert torch.allclose(out.loss, dpo, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss", [plackett_luce_loss, pairwise_loss])
def test_invariant_to_order_of_negatives(loss):
    chosen, rejected = _rewards()
    perm = torch.randperm(rejected.shape[1], generator=torch.Generator().manual_seed(1))
    assert torch.allclose(loss(chosen, rejected), loss(chosen, rejected[:, perm]), atol=1e-12)


def test_listwise_depends_on_order_but_its_first_term_is_plackett_luce():
    chosen, rejected = _rewards()
    flipped = listwise_loss(chosen, rejected.flip(1))
    assert not torch.allclose(listwise_loss(chosen, rejected), flipped)
    # The first factor of the listwise likelihood is the top-1 (multi-negative PL) probability.
    two_stage = listwise_loss(chosen, rejected) - listwise_loss(rejected[:, 0], rejected[:, 1:])
    assert torch.allclose(two_stage, plackett_luce_loss(chosen, rejected), atol=1e-10)


@pytest.mark.parametrize("loss", [plackett_luce_loss, pairwise_loss, listwise_loss])
def test_masking_equals_dropping(loss):
    chosen, rejected = _rewards(b=4, n=6)
    keep = [[0, 2, 5], [1], [0, 1, 2, 3, 4, 5], [3, 4]]
    mask = torch.zeros_like(rejected, dtype=torch.bool)
    garbage = rejected.clone()
    for i, cols in enumerate(keep):
        mask[i, cols] = True
    garbage[~mask] = float("nan")  # masked values must not leak, even as nan
    masked = loss(chosen, garbage, mask)
    for i, cols in enumerate(keep):
        dropped = loss(chosen[i : i + 1], rejected[i : i + 1, cols])
        assert torch.allclose(masked[i], dropped[0], atol=1e-12), (loss.__name__, i)


def test_all_negatives_masked_gives_zero_loss_and_finite_grad():
    chosen, rejected = _rewards(b=2, n=3)
    chosen.requires_grad_(True)
    mask = torch.zeros_like(rejected, dtype=torch.bool)
    for loss in (plackett_luce_loss, pairwise_loss, listwise_loss):
        value = loss(chosen, rejected, mask)
        assert torch.equal(value, torch.zeros_like(value))
        (grad,) = torch.autograd.grad(value.sum(), chosen)
        assert torch.isfinite(grad).all()


@pytest.mark.parametrize("loss", [plackett_luce_loss, pairwise_loss, listwise_loss])
def test_gradients_match_finite_differences(loss):
    chosen, rejected = _rewards(b=3, n=4)
    chosen.requires_grad_(True)
    rejected.requires_grad_(True)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda c, r: loss(c, r, mask), (chosen, rejected), eps=1e-6, atol=1e-6)


def test_apo_loss_gradients_through_logps_match_finite_differences():
    g = torch.Generator().manual_seed(5)
    pc = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    pr = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    rc, rr = torch.randn(3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    counts = torch.tensor([3, 5, 7])
    for loss_type in ("plackett-luce", "pairwise", "listwise"):

        def f(c, r, loss_type=loss_type):
            return apo_loss(
                c, r, rc, rr, beta=0.5, loss_type=loss_type, nll_alpha=0.3, chosen_token_counts=counts
            ).loss

        assert torch.autograd.gradcheck(f, (pc, pr), eps=1e-6, atol=1e-6)


def test_stable_for_huge_rewards_and_float32_under_bf16():
    chosen = torch.tensor([1000.0, -1000.0]).to(torch.bfloat16)
    rejected = torch.tensor([[-1000.0, 900.0], [1000.0, 0.0]]).to(torch.bfloat16)
    for loss in (plackett_luce_loss, pairwise_loss, listwise_loss):
        value = loss(chosen, rejected)
        assert value.dtype == torch.float32
        assert torch.isfinite(value).all()
    assert plackett_luce_loss(chosen, rejected)[0].item() < 1e-6
    assert plackett_luce_loss(chosen, rejected)[1].item() == pytest.approx(2000.0, rel=1e-3)


def test_pairwise_sum_is_n_times_mean_and_pl_bounds():
    chosen, rejected = _rewards()
    n = rejected.shape[1]
    assert torch.allclose(
        pairwise_loss(chosen, rejected, reduction="sum"), n * pairwise_loss(chosen, rejected)
    )
    # PL >= each pairwise term's max (more competitors) and <= the sum of pairwise terms (union bound).
    pl = plackett_luce_loss(chosen, rejected)
    pairs = -F.logsigmoid(chosen[:, None] - rejected)
    assert (pl >= pairs.max(dim=1).values - 1e-12).all()
    assert (pl <= pairs.sum(dim=1) + 1e-12).all()


def test_reward_metrics_definitions():
    pc = torch.tensor([0.0, 0.0])
    rc = torch.tensor([-10.0, -10.0])  # chosen reward = beta * 10 = 1
    pr = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    rr = torch.tensor(
        [[-5.0, -20.0, 99.0], [-5.0, -12.0, -20.0]]
    )  # rewards 0.5, 2.0, (masked) / 0.5, 1.2, 2.0
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = apo_loss(pc, pr, rc, rr, mask, beta=0.1)
    m = reward_metrics(out, pc, pr)
    assert torch.allclose(m["rewards/chosen"], torch.tensor([1.0, 1.0]))
    assert torch.allclose(m["rewards/rejected"], torch.tensor([1.25, 3.7 / 3]))
    assert torch.allclose(m["rewards/margins"], torch.tensor([-0.25, 1 - 3.7 / 3]))
    assert torch.allclose(m["rewards/margins_max"], torch.tensor([-1.0, -1.0]))
    assert torch.equal(m["rewards/accuracies"], torch.tensor([0.0, 0.0]))
    out2 = apo_loss(pc, pr, rc, rr, torch.tensor([[True, False, False], [True, False, False]]), beta=0.1)
    m2 = reward_metrics(out2, pc, pr)
    assert torch.equal(m2["rewards/accuracies"], torch.tensor([1.0, 1.0]))


def test_bad_arguments_raise():
    chosen, rejected = _rewards()
    with pytest.raises(ValueError):
        apo_loss(chosen, rejected, chosen, rejected, loss_type="apo_zero")
    with pytest.raises(ValueError):
        pairwise_loss(chosen, rejected, reduction="max")
    with pytest.raises(ValueError):
        plackett_luce_loss(chosen, rejected, torch.ones(2, 2, dtype=torch.bool))
