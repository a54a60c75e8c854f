"""One GRPO policy update: old/ref log-probs, then mu passes of clipped minibatch steps."""

from __future__ import annotations

import math

import torch

from align.config import GRPOConfig
from align.grpo.batch import UpdateBatch, minibatches
from align.grpo.logprobs import completion_logprobs
from align.losses import get_loss, mismatch_metrics, tis_weights


def _logp(model, b: UpdateBatch, temperature: float, entropy: bool = False):
    return completion_logprobs(model, b.input_ids, b.attention_mask, b.position_ids, b.prompt_width,
                               temperature, with_entropy=entropy)


@torch.no_grad()
def fill_old_and_ref(policy, batch: UpdateBatch, cfg: GRPOConfig, temperature: float, replay=None,
                     need_old: bool = True) -> None:
    """Old-policy log-probs (recording routing for replay) when ``need_old``, and reference log-probs
    (adapter off) when beta > 0."""
    model = policy.model
    was = model.training
    model.eval()
    try:
        olds, refs = [], []
        for k, idx in enumerate(minibatches(batch.size, cfg.minibatch_size)):
            mb = batch.rows(idx)
            if need_old:
                with replay("record", key=k) if replay is not None else _nullctx():
                    olds.append(_logp(model, mb, temperature)[0])
            if cfg.beta > 0:
                with policy.reference():
                    refs.append(_logp(model, mb, temperature)[0])
        batch.old_logp = torch.cat(olds) if olds else None
        batch.ref_logp = torch.cat(refs) if refs else None
    finally:
        model.train(was)


def policy_update(policy, batch: UpdateBatch, cfg: GRPOConfig, optimizer, scheduler, temperature: float,
                  max_len: int, max_grad_norm: float, monitor=None, replay=None) -> tuple[dict, bool]:
    """mu iterations over fixed minibatches; returns (metrics, finite). Non-finite losses skip the step."""
    model = policy.model
    model.train()
    loss_fn = get_loss(cfg.loss)
    params = [p for p in model.parameters() if p.requires_grad]
    chunks = minibatches(batch.size, cfg.minibatch_size)
    agg: dict[str, list[float]] = {}
    finite = True
    ratios = []
    for _ in range(cfg.mu):
        for k, idx in enumerate(chunks):
            mb = batch.rows(idx)
            if mb.completion_mask.sum() == 0:
                continue
            ctx = replay("replay", key=k) if replay is not None else _nullctx()
            with ctx:
                logp, ent = _logp(model, mb, temperature, entropy=True)
            old = mb.old_logp if mb.old_logp is not None else logp.detach()
            weights = tis_weights(old, mb.rollout_logp, cfg.tis_cap) if cfg.tis_cap > 0 else None
            loss, m = loss_fn(logp, old, mb.advantages, mb.completion_mask, epsilon=cfg.epsilon,
                              epsilon_high=cfg.epsilon_high, ref_logp=mb.ref_logp, beta=cfg.beta,
                              kl_estimator=cfg.kl_estimator, tis_weights=weights, max_len=max_len)
            aux = monitor.pop_aux_loss() if monitor is not None else None
            if aux is not None:
                m["moe/balance_loss"] = float(aux)
                loss = loss + aux
            if not torch.isfinite(loss):
                finite = False
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if not torch.isfinite(gn):
                finite = False
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            scheduler.step()
            m["actor/grad_norm"] = float(gn)
            cm = mb.completion_mask.bool()
            m["actor/entropy"] = float(ent[cm].mean()) if cm.any() else 0.0
            ratios.append(torch.exp(logp.detach() - old)[cm])
            for key, v in {**m, **mismatch_metrics(old, mb.rollout_logp, mb.completion_mask)}.items():
                agg.setdefault(key, []).append(v)
    out = {k: sum(v) / len(v) for k, v in agg.items()}
    if "mismatch/abs_logp_max" in agg:
        out["mismatch/abs_logp_max"] = max(agg["mismatch/abs_logp_max"])
    if ratios:
        r = torch.cat(ratios)
        out["actor/ratio_var"] = float(r.var()) if r.numel() > 1 else 0.0
    out["actor/lr"] = scheduler.get_last_lr()[0]
    return out, finite and all(math.isfinite(v) for v in out.values())


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
