"""Policy losses for GRPO-family updates: pure tensor functions registered by name.

Every loss takes per-token log-probs [N, T] of the current policy, the old (sampling) policy and
optionally the reference, per-sequence advantages [N], and a completion mask [N, T]; it returns
``(loss, metrics)``, metrics as detached 0-d tensors: reading one on the host waits for the GPU, so the update
reads them all at once per minibatch rather than stalling every micro-batch.
Token losses are reduced by :func:`aggregate`, the one aggregation function;
``norm={"num_seqs", "num_tokens"}`` (global minibatch counts) makes one rank's loss its additive
share of the whole minibatch's loss in multi-process runs.
"""

from __future__ import annotations

from typing import Callable

import torch

LOSSES: dict[str, Callable] = {}


def register_loss(name: str):
    def deco(fn):
        LOSSES[name] = fn
        return fn
    return deco


def get_loss(name: str) -> Callable:
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; known: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str, max_len: int | None = None,
              num_seqs: int | None = None, num_tokens: float | None = None) -> torch.Tensor:
    """Reduce [N, T] token losses to a scalar.

    - ``seq_mean_token_mean``: mean over sequences of each sequence's token mean (GRPO, DeepSeekMath).
    - ``token_mean``: one mean over all completion tokens of the batch (DAPO).
    - ``seq_mean_token_sum_norm``: sum over tokens / (N * max_len), a constant normalizer (Dr. GRPO).

    ``num_seqs`` / ``num_tokens`` replace N and the mask's token count when this [N, T] is one rank's
    part of a larger minibatch: the ranks' results then add up to the loss of the whole minibatch.
    """
    mask = mask.to(per_token.dtype)
    n = per_token.shape[0] if num_seqs is None else num_seqs
    if mode == "seq_mean_token_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1)).sum() / max(n, 1)
    if mode == "token_mean":
        denom = mask.sum().clamp_min(1) if num_tokens is None else max(num_tokens, 1.0)
        return (per_token * mask).sum() / denom
    if mode == "seq_mean_token_sum_norm":
        return (per_token * mask).sum() / (n * (max_len or per_token.shape[1]))
    raise ValueError(f"unknown aggregation {mode!r}")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || ref) estimators (Schulman 2020, "Approximating KL divergence"): [N, T] -> [N, T].

    k1 = log r', k2 = (log r')^2 / 2, k3 = exp(-log r') + log r' - 1 with log r' = logp - ref_logp.
    k3 is the one DeepSeekMath uses.
    """
    d = logp - ref_logp
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(-d) + d - 1
    raise ValueError(f"unknown KL estimator {estimator!r}")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the mask, detached (a metric)."""
    m = mask.to(x.dtype)
    return ((x * m).sum() / m.sum().clamp_min(1)).detach()


def _clipped_pg(ratio, adv, eps_low, eps_high):
    a = adv.unsqueeze(-1) if adv.dim() == 1 else adv
    unclipped = ratio * a
    clipped = ratio.clamp(1 - eps_low, 1 + eps_high) * a
    clip_hit = ((ratio < 1 - eps_low) & (a < 0)) | ((ratio > 1 + eps_high) & (a > 0))
    return -torch.minimum(unclipped, clipped), clip_hit


def _token_objective(logp, old_logp, advantages, mask, eps_low, eps_high, ref_logp, beta, kl_estimator,
                     tis_weights, mode, max_len, norm):
    ratio = torch.exp(logp - old_logp)
    per_token, clip_hit = _clipped_pg(ratio, advantages, eps_low, eps_high)
    if tis_weights is not None:
        per_token = per_token * tis_weights
    metrics = {"actor/clipfrac": _masked_mean(clip_hit.float(), mask),
               "actor/ratio_mean": _masked_mean(ratio, mask)}
    if beta and ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
        metrics["actor/kl"] = _masked_mean(kl, mask)
    loss = aggregate(per_token, mask, mode, max_len, **(norm or {}))
    metrics["actor/pg_loss"] = loss.detach()
    return loss, metrics


@register_loss("grpo")
def grpo_loss(logp, old_logp, advantages, mask, *, epsilon=0.2, ref_logp=None, beta=0.0, kl_estimator="k3",
              tis_weights=None, norm=None, **_):
    """GRPO (DeepSeekMath, arXiv:2402.03300, eq. 3): clipped ratio objective + beta*KL, token mean per
    sequence, then mean over sequences. logp/old_logp/ref_logp/mask: [N, T]; advantages: [N]."""
    return _token_objective(logp, old_logp, advantages, mask, epsilon, epsilon, ref_logp, beta, kl_estimator,
                            tis_weights, "seq_mean_token_mean", None, norm)


@register_loss("dr_grpo")
def dr_grpo_loss(logp, old_logp, advantages, mask, *, epsilon=0.2, ref_logp=None, beta=0.0, kl_estimator="k3",
                 tis_weights=None, max_len=None, norm=None, **_):
    """Dr. GRPO (arXiv:2503.20783): token sum over a constant N * max_len, removing the length bias."""
    return _token_objective(logp, old_logp, advantages, mask, epsilon, epsilon, ref_logp, beta, kl_estimator,
                            tis_weights, "seq_mean_token_sum_norm", max_len, norm)


@register_loss("dapo")
def dapo_loss(logp, old_logp, advantages, mask, *, epsilon=0.2, epsilon_high=0.28, ref_logp=None, beta=0.0,
              kl_estimator="k3", tis_weights=None, norm=None, **_):
    """DAPO (arXiv:2503.14476): clip-higher (eps_low, eps_high) and token-level mean over the batch."""
    return _token_objective(logp, old_logp, advantages, mask, epsilon, epsilon_high, ref_logp, beta, kl_estimator,
                            tis_weights, "token_mean", None, norm)


@register_loss("gspo")
def gspo_loss(logp, old_logp, advantages, mask, *, epsilon=3e-4, epsilon_high=4e-4, ref_logp=None, beta=0.0,
              kl_estimator="k3", tis_weights=None, norm=None, **_):
    """GSPO (Zheng et al. 2025, arXiv:2507.18071): sequence-level ratio
    s_i = exp(mean_t (logp - old_logp)), clipped objective per sequence, mean over sequences."""
    m = mask.to(logp.dtype)
    log_s = ((logp - old_logp) * m).sum(-1) / m.sum(-1).clamp_min(1)
    ratio = torch.exp(log_s).unsqueeze(-1).expand_as(logp)
    per_token, clip_hit = _clipped_pg(ratio, advantages, epsilon, epsilon_high)
    if tis_weights is not None:
        per_token = per_token * tis_weights
    metrics = {"actor/clipfrac": clip_hit[:, 0].float().mean(), "actor/ratio_mean": ratio[:, 0].detach().mean()}
    if beta and ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        per_token = per_token + beta * kl
        metrics["actor/kl"] = _masked_mean(kl, mask)
    loss = aggregate(per_token, mask, "seq_mean_token_mean", num_seqs=(norm or {}).get("num_seqs"))
    metrics["actor/pg_loss"] = loss.detach()
    return loss, metrics


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance weights min(pi_old / pi_rollout, cap) per token, correcting the train/infer
    mismatch between the trainer's and the rollout engine's probabilities (Yao et al. 2025, "Your
    efficient RL framework secretly brings you off-policy RL training"). [N, T] -> [N, T], no grad."""
    return torch.exp(old_logp - rollout_logp).clamp(max=cap).detach()


def mismatch_metrics(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict:
    """Train/infer mismatch: mean and max |Δ logprob| and the k3 KL(rollout || trainer) per token (0-d tensors;
    the max is 0 without completion tokens)."""
    d = (old_logp - rollout_logp).abs().detach()
    k3 = kl_penalty(rollout_logp, old_logp, "k3")
    return {
        "mismatch/abs_logp_mean": _masked_mean(d, mask),
        "mismatch/abs_logp_max": d.masked_fill(~mask.bool(), 0).amax() if d.numel() else d.new_zeros(()),
        "mismatch/kl_k3": _masked_mean(k3, mask),
    }
