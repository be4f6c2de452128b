"""GRPO's math as pure functions of tensors: group-normalised advantages, the clipped ratio objective over the sampled
tokens and the k3 KL estimate to a reference policy. No model and no engine here: train/rl.py feeds these with
rollouts and log-probabilities (and takes pass@k from evals/passk.py).

GRPO (Shao et al. 2024, DeepSeekMath) samples a group of G completions per prompt and uses the group as its own
baseline: A_i = (r_i - mean(r)) / (std(r) + eps), one advantage per completion, shared by all of its tokens. The
policy loss is PPO's clipped surrogate per token, min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) with
rho = pi / pi_old, plus beta * KL(pi || pi_ref) estimated per token with k3. Two published variants are options:
Dr. GRPO (Liu et al. 2025) drops the std division (it up-weights groups that are almost all right or all wrong), and
DAPO (Yu et al. 2025) averages over all tokens of the batch instead of per sequence first (a long completion then
weighs by its length, not as much as a short one) and clips higher (eps_high > eps_low).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def group_advantages(rewards: Tensor, scale: bool = True, eps: float = 1e-4) -> tuple[Tensor, Tensor]:
    """rewards (n_groups, G) -> (advantages (n_groups, G) fp32, keep (n_groups,) bool).

    A = r - (group mean), divided by (group std + eps) when `scale` (std with Bessel's correction, as TRL computes
    it; Dr. GRPO: scale=False). A group whose rewards are all equal teaches nothing (every advantage is 0): keep is
    False for it, and its advantages are exactly 0."""
    r = rewards.float()
    if r.size(1) < 2:
        raise ValueError(f"a group needs at least 2 completions to be its own baseline, got {r.size(1)}")
    centered = r - r.mean(dim=1, keepdim=True)
    keep = (r.amax(dim=1) - r.amin(dim=1)) > 0  # exact: a mean/std test would round 0.1 * 3 - 0.3
    adv = centered / (r.std(dim=1, keepdim=True) + eps) if scale else centered
    return torch.where(keep[:, None], adv, torch.zeros_like(adv)), keep


def clipped_objective(logp: Tensor, old_logp: Tensor, adv: Tensor, clip_low: float,
                      clip_high: float) -> tuple[Tensor, Tensor]:
    """Per-token PPO surrogate (to maximise) and where the clip is active (its gradient is 0 there).

    logp, old_logp (B, T) log-probabilities of the tokens under the policy and the policy that sampled them
    (old_logp carries no gradient); adv (B,) one advantage per sequence. Returns (objective (B, T), clipped (B, T)
    bool): objective = min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A); clipped where the clipped term is the
    smaller one and differs: rho above 1 + clip_high with A > 0, or below 1 - clip_low with A < 0."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]  # (B,) -> (B, 1): every token of a sequence shares its advantage
    unclipped = ratio * a
    clipped = ratio.clamp(1 - clip_low, 1 + clip_high) * a
    return torch.minimum(unclipped, clipped), clipped < unclipped


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi: k3 = exp(q) - q - 1 with q = log pi_ref - log pi
    (Schulman 2020, "Approximating KL divergence"; GRPO's choice): unbiased, never negative, low variance."""
    q = ref_logp - logp
    return torch.exp(q) - q - 1


@dataclass
class LossStats:
    """Sums over one micro-batch's sampled tokens (the loop adds them up over micro-batches and ranks)."""

    tokens: float  # sampled tokens
    clipped: float  # of them, where the clip was active
    kl: float  # sum of the per-token k3 (0 without a reference)


def policy_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, mask: Tensor, *, clip_low: float = 0.2,
                clip_high: float = 0.2, ref_logp: Tensor | None = None, kl_coef: float = 0.0,
                norm: str = "token", total_tokens: float = 1.0, total_seqs: float = 1.0) -> tuple[Tensor, LossStats]:
    """One micro-batch's share of the step's loss (to minimise), so that the shares of every micro-batch and rank
    add up to the step's mean; and its stats.

    logp, old_logp, ref_logp (B, T); adv (B,); mask (B, T) 1 on the tokens the policy sampled (prompt, padding and
    tool-forced output tokens 0). Per token: l = -objective + kl_coef * k3. norm "token" (DAPO): sum(l * mask) /
    total_tokens, the sampled tokens of the whole step; "sequence" (GRPO's paper): each sequence's mean over its own
    sampled tokens, summed and divided by total_seqs, the sequences of the whole step."""
    if norm not in ("token", "sequence"):
        raise ValueError(f"norm must be 'token' or 'sequence', got {norm!r}")
    m = mask.to(logp.dtype)
    obj, clipped = clipped_objective(logp, old_logp, adv, clip_low, clip_high)
    per_token = -obj
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = kl_k3(logp, ref_logp)
        per_token = per_token + kl_coef * kl
    if norm == "token":
        loss = (per_token * m).sum() / total_tokens
    else:
        loss = ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).sum() / total_seqs
    stats = LossStats(tokens=float(m.sum()), clipped=float((clipped & m.bool()).sum()),
                      kl=float((kl.detach() * m).sum()))
    return loss, stats

