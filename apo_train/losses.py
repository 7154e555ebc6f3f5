"""Preference losses for APO (Autonomous Preference Optimization): one positive against several negatives.

Notation (see ARCHITECTURE.md, "Training"): for every sample the positive (consensus) trajectory t+
and N negative (source) trajectories tau_1..tau_N have summed completion log-probabilities under the
policy and under the reference (the Stage-1 model). The implicit reward is

    r(t) = beta * (log pi_theta(t | v, l) - log pi_ref(t | v, l)).

Losses, all per sample (shape [B]) and all computed in float32 whatever the model's dtype:

* ``plackett_luce``: -log P(t+ ranked above every negative) = logsumexp([r+, r_1..r_N]) - r+, i.e. the
  cross-entropy of the logits [r+, r_1..r_N] with target 0. With N = 1 it is DPO's -log sigmoid(r+ - r_1).
* ``pairwise``: the surrogate mean (or sum) over negatives of -log sigmoid(r+ - r_u), what "split into
  pairs and run DPO" optimises.
* ``listwise``: full Plackett-Luce over the ranking t+ > tau_(1) > ... > tau_(N) (negatives given in
  ranking order, best first): -sum_k log(exp r_k / sum_{m>=k} exp r_m).

Variable numbers of negatives are handled with a boolean mask ``rejected_mask`` [B, N]; a masked
negative contributes exactly nothing (the loss equals the loss with that negative dropped).
This is *not* TRL's ``loss_type="apo_zero"/"apo_down"``: those are Anchored Preference Optimization,
a different method that shares the acronym.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSS_TYPES = ("plackett-luce", "pairwise", "listwise")

_NEG_INF = float("-inf")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    """Promote to float32 (keep float64 for gradcheck); bf16/fp16 log-probs lose too much for a margin."""
    return x if x.dtype == torch.float64 else x.float()


def _default_mask(rejected: torch.Tensor, rejected_mask: torch.Tensor | None) -> torch.Tensor:
    if rejected_mask is None:
        return torch.ones_like(rejected, dtype=torch.bool)
    if rejected_mask.shape != rejected.shape:
        raise ValueError(
            f"rejected_mask shape {tuple(rejected_mask.shape)} != rejected {tuple(rejected.shape)}"
        )
    return rejected_mask.to(torch.bool)


def implicit_rewards(policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float) -> torch.Tensor:
    """r = beta * (policy log-prob - reference log-prob), in float32 (float64 stays float64)."""
    return beta * (_as_float(policy_logps) - _as_float(reference_logps))


def plackett_luce_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    rejected_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-negative Plackett-Luce (top-1) loss per sample: logsumexp([r+, r_1..r_N]) - r+.

    chosen_rewards [B], rejected_rewards [B, N], rejected_mask [B, N] (True = a real negative).
    A sample whose negatives are all masked has loss 0 (log(1) with only the positive in the softmax).
    """
    chosen = _as_float(chosen_rewards)
    rejected = _as_float(rejected_rewards)
    mask = _default_mask(rejected, rejected_mask)
    # Masked negatives become -inf logits: exp(-inf) = 0 drops them from the normaliser exactly.
    rejected = rejected.masked_fill(~mask, _NEG_INF)
    logits = torch.cat([chosen.unsqueeze(1), rejected], dim=1)
    return torch.logsumexp(logits, dim=1) - chosen


def pairwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    rejected_mask: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Pairwise DPO surrogate per sample: mean (or sum) over real negatives of -log sigmoid(r+ - r_u)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    chosen = _as_float(chosen_rewards)
    rejected = _as_float(rejected_rewards)
    mask = _default_mask(rejected, rejected_mask)
    margins = chosen.unsqueeze(1) - rejected
    # where() rather than multiplying by the mask so that a masked garbage value (inf/nan) cannot leak.
    per_pair = torch.where(mask, -F.logsigmoid(margins), torch.zeros_like(margins))
    total = per_pair.sum(dim=1)
    if reduction == "sum":
        return total
    return total / mask.sum(dim=1).clamp(min=1).to(total.dtype)


def listwise_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    rejected_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Full Plackett-Luce over the ranking [positive, negatives in the given order (best first)].

    L = -sum_k (r_k - logsumexp_{m >= k} r_m), over real (unmasked) entries only. The last ranked item
    contributes log(1) = 0. With one negative this equals DPO's -log sigmoid(r+ - r_1).
    """
    chosen = _as_float(chosen_rewards)
    rejected = _as_float(rejected_rewards)
    mask = _default_mask(rejected, rejected_mask)
    scores = torch.cat([chosen.unsqueeze(1), rejected], dim=1)
    full_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
    masked_scores = scores.masked_fill(~full_mask, _NEG_INF)
    # Suffix log-sum-exp: logcumsumexp over the reversed ranking, reversed back.
    suffix_lse = torch.flip(torch.logcumsumexp(torch.flip(masked_scores, dims=[1]), dim=1), dims=[1])
    # Masked positions would give -inf - (finite) or nan; they are excluded by where().
    terms = torch.where(full_mask, suffix_lse - scores, torch.zeros_like(scores))
    return terms.sum(dim=1)


def positive_nll(chosen_logps: torch.Tensor, chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """Per-sample token-mean negative log-likelihood of the positive (the optional SFT anchor term)."""
    return -_as_float(chosen_logps) / chosen_token_counts.clamp(min=1).to(_as_float(chosen_logps).dtype)


@dataclass
class APOLossOutput:
    """Per-sample loss parts and the rewards they were built from (all float32, shape [B] or [B, N])."""

    loss: torch.Tensor  # [B] total per-sample loss (preference + nll_alpha * nll)
    preference_loss: torch.Tensor  # [B]
    nll_loss: torch.Tensor | None  # [B] or None
    chosen_rewards: torch.Tensor  # [B]
    rejected_rewards: torch.Tensor  # [B, N] (masked entries are 0)
    rejected_mask: torch.Tensor  # [B, N] bool


def apo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    rejected_mask: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str = "plackett-luce",
    pairwise_reduction: str = "mean",
    nll_alpha: float = 0.0,
    chosen_token_counts: torch.Tensor | None = None,
) -> APOLossOutput:
    """Rewards from policy/reference log-probs, then the chosen preference loss (+ optional NLL)."""
    chosen_rewards = implicit_rewards(policy_chosen_logps, reference_chosen_logps, beta)
    rejected_rewards = implicit_rewards(policy_rejected_logps, reference_rejected_logps, beta)
    mask = _default_mask(rejected_rewards, rejected_mask)
    rejected_rewards = torch.where(mask, rejected_rewards, torch.zeros_like(rejected_rewards))
    if loss_type == "plackett-luce":
        pref = plackett_luce_loss(chosen_rewards, rejected_rewards, mask)
    elif loss_type == "pairwise":
        pref = pairwise_loss(chosen_rewards, rejected_rewards, mask, reduction=pairwise_reduction)
    elif loss_type == "listwise":
        pref = listwise_loss(chosen_rewards, rejected_rewards, mask)
    else:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, not {loss_type!r}")
    nll = None
    total = pref
    if nll_alpha:
        if chosen_token_counts is None:
            raise ValueError("nll_alpha > 0 needs chosen_token_counts")
        nll = positive_nll(policy_chosen_logps, chosen_token_counts)
        total = pref + nll_alpha * nll
    return APOLossOutput(total, pref, nll, chosen_rewards, rejected_rewards, mask)


def reward_metrics(
    out: APOLossOutput,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Per-sample metric values with TRL's names (average them over samples to log).

    rewards/rejected is the mean over a sample's real negatives; rewards/margins is chosen minus that
    mean; rewards/margins_max is chosen minus the strongest negative; rewards/accuracies is 1 when the
    positive beats every negative. logps/rejected is the mean over real negatives.
    """
    mask = out.rejected_mask
    count = mask.sum(dim=1).clamp(min=1).to(out.chosen_rewards.dtype)
    rejected_mean = torch.where(mask, out.rejected_rewards, 0.0).sum(dim=1) / count
    rejected_max = out.rejected_rewards.masked_fill(~mask, _NEG_INF).max(dim=1).values
    has_negative = mask.any(dim=1)
    margins_max = torch.where(has_negative, out.chosen_rewards - rejected_max, torch.zeros_like(rejected_max))
    beats_all = torch.where(mask, out.chosen_rewards.unsqueeze(1) > out.rejected_rewards, True).all(dim=1)
    rej_logps = _as_float(policy_rejected_logps)
    metrics = {
        "rewards/chosen": out.chosen_rewards.detach(),
        "rewards/rejected": rejected_mean.detach(),
        "rewards/margins": (out.chosen_rewards - rejected_mean).detach(),
        "rewards/margins_max": margins_max.detach(),
        "rewards/accuracies": beats_all.to(out.chosen_rewards.dtype),
        "logps/chosen": _as_float(policy_chosen_logps).detach(),
        "logps/rejected": (torch.where(mask, rej_logps, 0.0).sum(dim=1) / count).detach(),
    }
    if out.nll_loss is not None:
        metrics["nll_loss"] = out.nll_loss.detach()
    return metrics
