"""One GRPO policy update: old/ref log-probs, then mu passes of clipped minibatch steps.

``fwd`` is the policy's log-prob module as ``accelerate`` prepared it; with several processes each
rank holds its share of every minibatch and losses are normalized by global counts (see
:func:`align.losses.aggregate`), so gradients averaged over ranks equal the single-process ones.
"""

from __future__ import annotations

import math

import torch

from align.config import GRPOConfig
from align.dist import Dist
from align.grpo.batch import UpdateBatch, minibatches
from align.losses import get_loss, mismatch_metrics, tis_weights


def _logp(fwd, b: UpdateBatch, temperature: float, entropy: bool = False):
    return fwd(b.input_ids, b.attention_mask, b.position_ids, b.prompt_width, temperature, with_entropy=entropy)


def local_chunks(n_local: int, minibatch_size: int, dist: Dist | None) -> list[torch.Tensor]:
    """Row sets of this rank's minibatches; every rank gets the same number (one collective each)."""
    if dist is None or dist.world == 1:
        return minibatches(n_local, minibatch_size)
    n_global = int(dist.sum([n_local])[0])
    return list(torch.arange(n_local).tensor_split(max(1, math.ceil(n_global / minibatch_size))))


@torch.no_grad()
def fill_old_and_ref(policy, fwd, batch: UpdateBatch, cfg: GRPOConfig, temperature: float, replay=None,
                     need_old: bool = True, dist: Dist | None = None) -> None:
    """Old-policy log-probs (recording routing for replay) when ``need_old``, and reference log-probs
    (adapter off) when beta > 0."""
    model = policy.model
    was = model.training
    model.eval()
    device = next(fwd.parameters()).device
    try:
        olds, refs = [], []
        for k, idx in enumerate(local_chunks(batch.size, cfg.minibatch_size, dist)):
            mb = batch.rows(idx).to(device)
            if need_old:
                with replay("record", key=k) if replay is not None else _nullctx():
                    olds.append(_logp(fwd, mb, temperature)[0].cpu())
            if cfg.beta > 0:
                with policy.reference():
                    refs.append(_logp(fwd, mb, temperature)[0].cpu())
        batch.old_logp = torch.cat(olds) if olds else None
        batch.ref_logp = torch.cat(refs) if refs else None
    finally:
        model.train(was)


def _global_counts(mb: UpdateBatch, dist: Dist | None) -> tuple[dict | None, float, bool]:
    """(loss normalizer over all ranks or None for one process, completion tokens everywhere, whether
    some rank has no rows in this minibatch) — one collective."""
    tokens = float(mb.completion_mask.sum())
    if dist is None or dist.world == 1:
        return None, tokens, mb.size == 0
    seqs, toks, empty = dist.sum([mb.size, tokens, float(mb.size == 0)])
    return {"num_seqs": int(seqs), "num_tokens": toks}, toks, empty > 0


def policy_update(policy, fwd, batch: UpdateBatch, cfg: GRPOConfig, optimizer, scheduler, temperature: float,
                  max_len: int, max_grad_norm: float, monitor=None, replay=None,
                  dist: Dist | None = None) -> tuple[dict, bool]:
    """mu iterations over fixed minibatches; returns (metrics, finite). Non-finite losses skip the step
    (on every rank at once, so collectives stay matched)."""
    fwd.train()
    loss_fn = get_loss(cfg.loss)
    params = [p for p in fwd.parameters() if p.requires_grad]
    device = params[0].device
    world = dist.world if dist is not None else 1
    chunks = local_chunks(batch.size, cfg.minibatch_size, dist)
    agg: dict[str, list[float]] = {}
    finite = True
    ratios = []
    for _ in range(cfg.mu):
        for k, idx in enumerate(chunks):
            mb = batch.rows(idx).to(device)
            norm, tokens, some_empty = _global_counts(mb, dist)
            if tokens == 0 or some_empty:
                continue
            ctx = replay("replay", key=k) if replay is not None else _nullctx()
            with ctx:
                logp, ent = _logp(fwd, mb, temperature, entropy=True)
            old = mb.old_logp if mb.old_logp is not None else logp.detach()
            weights = tis_weights(old, mb.rollout_logp, cfg.tis_cap) if cfg.tis_cap > 0 else None
            loss, m = loss_fn(logp, old, mb.advantages, mb.completion_mask, epsilon=cfg.epsilon,
                              epsilon_high=cfg.epsilon_high, ref_logp=mb.ref_logp, beta=cfg.beta,
                              kl_estimator=cfg.kl_estimator, tis_weights=weights, max_len=max_len, norm=norm)
            aux = monitor.pop_aux_loss() if monitor is not None else None
            if aux is not None:
                m["moe/balance_loss"] = float(aux)
                loss = loss + aux / world
            ok = dist.min(float(torch.isfinite(loss))) if dist is not None else float(torch.isfinite(loss))
            optimizer.zero_grad(set_to_none=True)
            if not ok:
                finite = False
                continue
            # Ranks' gradients are averaged; the rank losses are additive shares, so scale by the world size.
            if dist is not None:
                dist.acc.backward(loss * world)
                gn = dist.acc.clip_grad_norm_(params, max_grad_norm)
            else:
                loss.backward()
                gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if gn is not None and not torch.isfinite(torch.as_tensor(gn)):
                finite = False
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            scheduler.step()
            if gn is not None:
                m["actor/grad_norm"] = float(gn)
            cm = mb.completion_mask.bool()
            if not cm.any():
                continue
            m["actor/entropy"] = float(ent[cm].mean())
            ratios.append(torch.exp(logp.detach() - old)[cm].float().cpu())
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
