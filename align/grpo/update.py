"""One GRPO policy update: old/ref log-probs, then mu passes of clipped minibatch steps.

``fwd`` is the policy's log-prob module as ``accelerate`` prepared it; with several processes each
rank holds its share of every minibatch and losses are normalized by global counts (see
:func:`align.losses.aggregate`), so gradients averaged over ranks equal the single-process ones.
"""

from __future__ import annotations

import math

import torch

from align.config import GRPOConfig
from align.dist import Dist, combine_metrics
from align.errors import AlignError
from align.grpo.batch import UpdateBatch, minibatches
from align.losses import get_loss, mismatch_metrics, tis_weights


def _logp(fwd, b: UpdateBatch, temperature: float, pack_tokens: int, entropy: bool = False):
    return fwd(b.input_ids, b.attention_mask, b.position_ids, b.prompt_width, temperature, with_entropy=entropy,
               pack_tokens=pack_tokens)


def local_chunks(n_local: int, minibatch_size: int, dist: Dist | None) -> list[torch.Tensor]:
    """Row sets of this rank's minibatches; every rank gets the same number (one collective each)."""
    if dist is None or dist.world == 1:
        return minibatches(n_local, minibatch_size)
    n_global = int(dist.sum([n_local])[0])
    return list(torch.arange(n_local).tensor_split(max(1, math.ceil(n_global / minibatch_size))))


def micro_count(n_local: int, micro_batch_size: int, dist: Dist | None) -> int:
    """Micro-batches per minibatch, the same on every rank (sharded weights make every forward a
    collective): enough that no rank's parts exceed ``micro_batch_size``, never more than a rank has rows."""
    want = math.ceil(n_local / micro_batch_size) if micro_batch_size > 0 and n_local else 1
    if dist is None or dist.world == 1:
        return max(1, want)
    want = -dist.min(-want)
    return int(max(1, min(want, dist.min(n_local))))


def plan(mb: UpdateBatch, micro_batch_size: int, max_tokens: int, dist: Dist | None,
         real: bool = False) -> list[tuple]:
    """The micro-batches of one minibatch as (row indices, part): by token budget when ``max_tokens`` > 0 (padded
    tokens, or the rows' own when ``real``: packed rows), else ``micro_batch_size`` rows each; every rank runs the
    same number (each forward may be a collective)."""
    if max_tokens <= 0:
        return mb.micro_batches(micro_count(mb.size, micro_batch_size, dist))
    want = len(mb.by_tokens(max_tokens, real)) if mb.size else 1
    if dist is not None and dist.world > 1:
        want = int(min(-dist.min(-want), dist.min(mb.size)))
    return mb.token_micro_batches(max_tokens, max(1, want), real)


def check_accumulation(dist: Dist | None, accumulates: bool) -> None:
    """Refuse micro-batches under DeepSpeed before any work is done (called at launch)."""
    if accumulates and dist is not None and dist.backend.startswith("deepspeed"):
        raise AlignError("grpo.micro_batch_size: gradient accumulation inside a minibatch is not supported "
                         "under DeepSpeed yet (its engine steps after every backward); use DDP or FSDP2 "
                         "(recipes/accelerate/ddp.yaml, fsdp2.yaml) or set grpo.micro_batch_size=0")


def _widen(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1])) if t.shape[1] < width else t


@torch.no_grad()
def fill_old_and_ref(policy, fwd, batch: UpdateBatch, cfg: GRPOConfig, temperature: float, replay=None,
                     need_old: bool = True, dist: Dist | None = None) -> None:
    """Old-policy log-probs (recording routing for replay) when ``need_old``, and reference log-probs
    (adapter off) when beta > 0, a micro-batch at a time."""
    model = policy.model
    was = model.training
    model.eval()
    device = next(fwd.parameters()).device
    width = batch.completion_width
    olds, refs = torch.zeros(batch.size, width), torch.zeros(batch.size, width)
    # No backward here: larger parts than the update's, except the old pass under router replay, whose
    # recorded routing is keyed by the update's own micro-batches.
    big = cfg.logprob_tokens_per_micro_batch or cfg.max_tokens_per_micro_batch
    real, pack = cfg.pack_tokens > 0, cfg.pack_tokens
    try:
        for k, idx in enumerate(local_chunks(batch.size, cfg.minibatch_size, dist)):
            mb = batch.rows(idx).to(device)
            large = plan(mb, cfg.micro_batch_size, big, dist, real) if cfg.beta > 0 or replay is None else None
            if need_old:
                # Router replay keys its recorded routing by the update's own micro-batches.
                parts = large if replay is None else plan(mb, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch,
                                                          dist, real)
                for j, (rows, part) in enumerate(parts):
                    with replay("record", key=(k, j)) if replay is not None else _nullctx():
                        olds[idx[rows.cpu()]] = _widen(_logp(fwd, part, temperature, pack)[0].float().cpu(), width)
            if cfg.beta > 0:
                for rows, part in large:
                    with policy.reference():
                        refs[idx[rows.cpu()]] = _widen(_logp(fwd, part, temperature, pack)[0].float().cpu(), width)
        batch.old_logp = olds if need_old else None
        batch.ref_logp = refs if cfg.beta > 0 else None
    finally:
        model.train(was)


def _global_counts(mb: UpdateBatch, dist: Dist | None) -> tuple[dict, float, bool]:
    """(loss normalizer: sequences and completion tokens of the whole minibatch over all ranks, those
    tokens, whether some rank has no rows in this minibatch) — one collective."""
    tokens = float(mb.completion_mask.sum())
    if dist is None or dist.world == 1:
        return {"num_seqs": mb.size, "num_tokens": tokens}, tokens, mb.size == 0
    seqs, toks, empty = dist.sum([mb.size, tokens, float(mb.size == 0)])
    return {"num_seqs": int(seqs), "num_tokens": toks}, toks, empty > 0


def _micro_step(fwd, part: UpdateBatch, cfg: GRPOConfig, temperature: float, max_len: int, norm: dict, monitor,
                dist: Dist | None, share: float, last: bool, outputs: tuple[list, list]) -> tuple[dict, bool]:
    """Loss and backward of one micro-batch (``share``: its fraction of the minibatch's rows); appends the
    completion tokens' entropies and ratios to ``outputs``."""
    world = dist.world if dist is not None else 1
    logp, ent = _logp(fwd, part, temperature, cfg.pack_tokens, entropy=True)
    old = part.old_logp if part.old_logp is not None else logp.detach()
    weights = tis_weights(old, part.rollout_logp, cfg.tis_cap) if cfg.tis_cap > 0 else None
    loss, m = get_loss(cfg.loss)(logp, old, part.advantages, part.completion_mask, epsilon=cfg.epsilon,
                                 epsilon_high=cfg.epsilon_high, ref_logp=part.ref_logp, beta=cfg.beta,
                                 kl_estimator=cfg.kl_estimator, tis_weights=weights, max_len=max_len, norm=norm)
    aux = monitor.pop_aux_loss() if monitor is not None else None
    if aux is not None:
        m["moe/balance_loss"] = float(aux)
        loss = loss + aux * share / world
    ok = dist.min(float(torch.isfinite(loss))) if dist is not None else float(torch.isfinite(loss))
    if not ok:
        return m, False
    if dist is not None:
        dist.backward(loss, fwd, sync=last)
    else:
        loss.backward()
    m.update(mismatch_metrics(old, part.rollout_logp, part.completion_mask))
    cm = part.completion_mask.bool()
    if cm.any():
        outputs[0].append(ent[cm].float().cpu())
        outputs[1].append(torch.exp(logp.detach() - old)[cm].float().cpu())
    return m, True


def _backward_minibatch(fwd, mb: UpdateBatch, k: int, cfg: GRPOConfig, temperature: float, max_len: int,
                        norm: dict, monitor, replay, dist: Dist | None):
    """Forward and backward of one minibatch a micro-batch at a time (gradients accumulate; DDP syncs on
    the last); returns (metrics, entropy/ratio rows, finite) without stepping."""
    micro = plan(mb, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch, dist, cfg.pack_tokens > 0)
    parts, ents, ratios = [], [], []
    for j, (_, part) in enumerate(micro):
        # The backward runs inside the replay context too: gradient checkpointing recomputes the routers
        # there and must take the same (replayed) experts as the forward did.
        with replay("replay", key=(k, j)) if replay is not None else _nullctx():
            m, ok = _micro_step(fwd, part, cfg, temperature, max_len, norm, monitor, dist,
                                share=part.size / mb.size, last=j == len(micro) - 1, outputs=(ents, ratios))
        if not ok:
            return {}, [], [], False
        parts.append((m, float(part.completion_mask.sum())))
    return combine_metrics([m for m, _ in parts], [w for _, w in parts]), ents, ratios, True


def policy_update(policy, fwd, batch: UpdateBatch, cfg: GRPOConfig, optimizer, scheduler, temperature: float,
                  max_len: int, max_grad_norm: float, monitor=None, replay=None,
                  dist: Dist | None = None) -> tuple[dict, bool]:
    """mu iterations over fixed minibatches; returns (metrics, finite). Non-finite losses skip the step
    (on every rank at once, so collectives stay matched)."""
    fwd.train()
    params = [p for p in fwd.parameters() if p.requires_grad]
    device = params[0].device
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
            optimizer.zero_grad(set_to_none=True)
            m, ents, rs, ok = _backward_minibatch(fwd, mb, k, cfg, temperature, max_len, norm, monitor, replay, dist)
            if not ok:
                finite = False
                optimizer.zero_grad(set_to_none=True)
                continue
            if dist is not None:
                gn = dist.clip_grad_norm(params, max_grad_norm)
            else:
                gn = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            if gn is not None and not torch.isfinite(torch.as_tensor(gn)):
                finite = False
                optimizer.zero_grad(set_to_none=True)
                continue
            optimizer.step()
            scheduler.step()
            if gn is not None:
                m["actor/grad_norm"] = float(gn)
            if not ents:
                continue
            m["actor/entropy"] = float(torch.cat(ents).mean())
            ratios.extend(rs)
            for key, v in m.items():
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
