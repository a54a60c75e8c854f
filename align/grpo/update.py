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
    # Parts are planned on the host and their log-probs stay on the device until the end: one wait for the GPU per
    # pass instead of one per part.
    done: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (target, host rows, device log-probs)
    try:
        for k, idx in enumerate(local_chunks(batch.size, cfg.minibatch_size, dist)):
            mb = batch.rows(idx)
            large = plan(mb, cfg.micro_batch_size, big, dist, real) if cfg.beta > 0 or replay is None else None
            if need_old:
                # Router replay keys its recorded routing by the update's own micro-batches.
                parts = large if replay is None else plan(mb, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch,
                                                          dist, real)
                for j, (rows, part) in enumerate(parts):
                    with replay("record", key=(k, j)) if replay is not None else _nullctx():
                        done.append((olds, idx[rows], _logp(fwd, part.to(device, real), temperature, pack)[0]))
            if cfg.beta > 0:
                for rows, part in large:
                    with policy.reference():
                        done.append((refs, idx[rows], _logp(fwd, part.to(device, real), temperature, pack)[0]))
        for target, rows, logp in done:
            target[rows] = _widen(logp.float().cpu(), width)
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


def _token_stats(ent: torch.Tensor, ratio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[4] float64 sums over the completion tokens: (count, entropy, ratio - 1, (ratio - 1)^2); means and the
    ratio's variance follow from sums, so micro-batches add them on the device instead of copying tokens out."""
    m = mask.bool()
    e = torch.where(m, ent.detach().double(), 0.0)
    r = torch.where(m, ratio.detach().double() - 1, 0.0)
    return torch.stack([m.sum().double(), e.sum(), r.sum(), (r * r).sum()])


def _micro_step(fwd, part: UpdateBatch, cfg: GRPOConfig, temperature: float, max_len: int, norm: dict, monitor,
                dist: Dist | None, share: float, last: bool) -> tuple[dict, torch.Tensor | None]:
    """Loss and backward of one micro-batch (``share``: its fraction of the minibatch's rows); returns its
    metrics, completion-token sums (:func:`_token_stats`) and whether its loss was finite, all on the device
    (``None`` when some rank's loss was not: every rank then skips the backward, keeping collectives matched)."""
    world = dist.world if dist is not None else 1
    logp, ent = _logp(fwd, part, temperature, cfg.pack_tokens, entropy=True)
    old = part.old_logp if part.old_logp is not None else logp.detach()
    weights = tis_weights(old, part.rollout_logp, cfg.tis_cap) if cfg.tis_cap > 0 else None
    loss, m = get_loss(cfg.loss)(logp, old, part.advantages, part.completion_mask, epsilon=cfg.epsilon,
                                 epsilon_high=cfg.epsilon_high, ref_logp=part.ref_logp, beta=cfg.beta,
                                 kl_estimator=cfg.kl_estimator, tis_weights=weights, max_len=max_len, norm=norm)
    aux = monitor.pop_aux_loss() if monitor is not None else None
    if aux is not None:
        m["moe/balance_loss"] = aux.detach()
        loss = loss + aux * share / world
    m["finite"] = torch.isfinite(loss.detach()).double()
    if world > 1:
        if not dist.min(float(m["finite"])):
            return m, None
    # One process: a non-finite loss still runs its backward and the minibatch's step is dropped after it, when
    # the minibatch's values are read in one go (no host sync here, the GPU keeps its queue).
    if dist is not None:
        dist.backward(loss, fwd, sync=last)
    else:
        loss.backward()
    m.update(mismatch_metrics(old, part.rollout_logp, part.completion_mask))
    return m, _token_stats(ent, torch.exp(logp.detach() - old), part.completion_mask)


def _backward_minibatch(fwd, mb: UpdateBatch, k: int, cfg: GRPOConfig, temperature: float, max_len: int,
                        norm: dict, monitor, replay, dist: Dist | None, device) -> tuple | None:
    """Forward and backward of one host-side minibatch a micro-batch at a time (gradients accumulate; DDP syncs
    on the last) without stepping; returns the parts' device metrics, their completion tokens and the summed
    :func:`_token_stats`, or ``None`` when a loss was not finite on some rank."""
    micro = plan(mb, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch, dist, cfg.pack_tokens > 0)
    parts, weights, stats = [], [], []
    for j, (_, host) in enumerate(micro):
        part = host.to(device, host_mask=cfg.pack_tokens > 0)
        # The backward runs inside the replay context too: gradient checkpointing recomputes the routers
        # there and must take the same (replayed) experts as the forward did.
        with replay("replay", key=(k, j)) if replay is not None else _nullctx():
            m, st = _micro_step(fwd, part, cfg, temperature, max_len, norm, monitor, dist,
                                share=part.size / mb.size, last=j == len(micro) - 1)
        if st is None:
            return None
        parts.append(m)
        weights.append(float(host.completion_mask.sum()))
        stats.append(st)
    return parts, weights, torch.stack(stats).sum(0)


def _read(parts: list[dict], *tensors: torch.Tensor) -> tuple[list[dict], list[float]]:
    """Every tensor value of ``parts`` and ``tensors`` (0-d) on the host in one transfer: the one place a
    minibatch waits for the GPU."""
    keys = [(i, k) for i, m in enumerate(parts) for k, v in m.items() if isinstance(v, torch.Tensor)]
    flat = [parts[i][k] for i, k in keys] + list(tensors)
    if not flat:
        return parts, []
    vals = torch.cat([t.detach().double().reshape(-1).to(flat[0].device) for t in flat]).tolist()
    out = [dict(m) for m in parts]
    for (i, k), v in zip(keys, vals):
        out[i][k] = v
    return out, vals[len(keys):]


def _minibatch_step(fwd, params, mb: UpdateBatch, k: int, norm: dict, cfg: GRPOConfig, optimizer, scheduler,
                    temperature, max_len, max_grad_norm, monitor, replay, dist, device) -> tuple[dict, list] | None:
    """Backward of one minibatch, clipping and (if every loss and the gradient norm are finite) the optimizer
    step; returns its metrics and token sums, or ``None`` when the step was dropped."""
    optimizer.zero_grad(set_to_none=True)
    out = _backward_minibatch(fwd, mb, k, cfg, temperature, max_len, norm, monitor, replay, dist, device)
    if out is None:
        optimizer.zero_grad(set_to_none=True)
        return None
    parts, weights, stats = out
    gn = dist.clip_grad_norm(params, max_grad_norm) if dist is not None else \
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    norms = [torch.as_tensor(gn, dtype=torch.float64, device=stats.device)] if gn is not None else []
    parts, vals = _read(parts, stats, *norms)
    sums, grad_norm = vals[:4], (vals[4] if norms else None)
    if not all(m.pop("finite") == 1.0 for m in parts) or (grad_norm is not None and not math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    scheduler.step()
    m = combine_metrics(parts, weights)
    if grad_norm is not None:
        m["actor/grad_norm"] = grad_norm
    if sums[0] > 0:
        m["actor/entropy"] = sums[1] / sums[0]
    return m, sums


def policy_update(policy, fwd, batch: UpdateBatch, cfg: GRPOConfig, optimizer, scheduler, temperature: float,
                  max_len: int, max_grad_norm: float, monitor=None, replay=None,
                  dist: Dist | None = None) -> tuple[dict, bool]:
    """mu iterations over fixed minibatches; returns (metrics, finite). Non-finite losses skip the step
    (on every rank at once, so collectives stay matched). Minibatches are planned on the host and their
    values read once each (:func:`_read`), so the GPU runs a minibatch's micro-batches back to back."""
    fwd.train()
    params = [p for p in fwd.parameters() if p.requires_grad]
    device = params[0].device
    chunks = local_chunks(batch.size, cfg.minibatch_size, dist)
    agg: dict[str, list[float]] = {}
    finite = True
    stats = [0.0] * 4
    for _ in range(cfg.mu):
        for k, idx in enumerate(chunks):
            mb = batch.rows(idx)
            norm, tokens, some_empty = _global_counts(mb, dist)
            if tokens == 0 or some_empty:
                continue
            out = _minibatch_step(fwd, params, mb, k, norm, cfg, optimizer, scheduler, temperature, max_len,
                                  max_grad_norm, monitor, replay, dist, device)
            if out is None:
                finite = False
                continue
            m, st = out
            if st[0] == 0:
                continue
            stats = [a + b for a, b in zip(stats, st)]
            for key, v in m.items():
                agg.setdefault(key, []).append(v)
    out = {k: sum(v) / len(v) for k, v in agg.items()}
    if "mismatch/abs_logp_max" in agg:
        out["mismatch/abs_logp_max"] = max(agg["mismatch/abs_logp_max"])
    n, _, s1, s2 = stats
    if n > 0:
        out["actor/ratio_var"] = (s2 - s1 * s1 / n) / (n - 1) if n > 1 else 0.0
    out["actor/lr"] = scheduler.get_last_lr()[0]
    return out, finite and all(math.isfinite(v) for v in out.values())


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
