"""Group-relative advantage estimators, registered by name; all vectorized over [B, G] groups.

Unscorable samples arrive as NaN rewards: they get advantage 0 and do not enter group statistics.
"""

from __future__ import annotations

from typing import Callable

import torch

ADVANTAGES: dict[str, Callable] = {}


def register_advantage(name: str):
    def deco(fn):
        ADVANTAGES[name] = fn
        return fn
    return deco


def get_advantage(name: str) -> Callable:
    if name not in ADVANTAGES:
        raise KeyError(f"unknown advantage {name!r}; known: {', '.join(sorted(ADVANTAGES))}")
    return ADVANTAGES[name]


def _group_stats(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Masked per-group count, mean and unbiased std of [B, G] rewards (NaN = missing)."""
    valid = ~torch.isnan(rewards)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    n = valid.sum(-1, keepdim=True).to(rewards.dtype)
    mean = r.sum(-1, keepdim=True) / n.clamp_min(1)
    var = (torch.where(valid, r - mean, torch.zeros_like(r)) ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    return valid, n, mean, var.sqrt()


@register_advantage("grpo")
def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> tuple[torch.Tensor, dict]:
    """GRPO outcome advantages  A_i = (r_i - mean(r)) / (std(r) + eps)  within each group.

    rewards: [B, G]  ->  advantages [B, G].  DeepSeekMath (arXiv:2402.03300), sec. 4.1.2; std is
    unbiased, as in TRL.

    >>> grpo_advantages(torch.tensor([[1., 0., 0., 1.]]))[0]
    tensor([[ 0.8659, -0.8659, -0.8659,  0.8659]])
    """
    valid, _, mean, std = _group_stats(rewards)
    adv = torch.where(valid, (rewards - mean) / (std + eps), torch.zeros_like(rewards))
    return adv, _metrics(rewards, std)


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Dr. GRPO: A_i = r_i - mean(r), no std normalization (Liu et al. 2025, arXiv:2503.20783).

    rewards: [B, G] -> [B, G].
    """
    valid, _, mean, std = _group_stats(rewards)
    return torch.where(valid, rewards - mean, torch.zeros_like(rewards)), _metrics(rewards, std)


@register_advantage("rloo")
def rloo_advantages(rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """RLOO: A_i = r_i - mean_{j != i} r_j = n/(n-1) (r_i - mean)  (Ahmadian et al. 2024, arXiv:2402.14740).

    rewards: [B, G] -> [B, G]; groups with one valid sample get 0.
    """
    valid, n, mean, std = _group_stats(rewards)
    scale = torch.where(n > 1, n / (n - 1).clamp_min(1), torch.zeros_like(n))
    return torch.where(valid, scale * (rewards - mean), torch.zeros_like(rewards)), _metrics(rewards, std)


def _metrics(rewards: torch.Tensor, std: torch.Tensor) -> dict:
    return {
        "adv/zero_std_frac": float((std.squeeze(-1) == 0).float().mean()),
        "adv/unscorable": int(torch.isnan(rewards).sum()),
    }
