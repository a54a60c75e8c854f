"""The phases of one GRPO step after set-up, each a function of the typed run (:class:`GRPORun`).

sample (engine) -> score (rewards) -> keep informative groups (dynamic sampling) -> advantages + batch ->
old/ref log-probs -> update. The loop (:mod:`align.grpo.loop`) orders them and handles the engine lifecycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from align.grpo.batch import UpdateBatch, build_batch
from align.grpo.run import GRPORun, timed
from rewards import Combined
from rollout import Rollout, SamplingSettings, render_prompts


@dataclass
class Groups:
    """The groups of one step that enter the update: prompt rows, their rollouts, rewards [B, G]."""

    rows: list[dict]
    rollouts: list[Rollout]
    rewards: torch.Tensor


def score(rewards: Combined, rows: list[dict], rollouts: list[Rollout], g: int) -> tuple[torch.Tensor, dict]:
    """Rewards [len(rows), g] (NaN = unscorable) and their metrics; each reward reads the columns it declares."""
    completions = [c.text for ro in rollouts for c in ro.completions]
    cols = {k: [r.get(k) for r in rows for _ in range(g)] for k in rewards.columns}
    cols = {k: v for k, v in cols.items() if any(x is not None for x in v)}
    total, per, _ = rewards.score(completions, **cols)
    r = torch.tensor([math.nan if t is None else t for t in total], dtype=torch.float32).view(len(rows), g)
    metrics = {}
    for name, vals in per.items():
        ok = [v for v in vals if v is not None]
        metrics[f"reward/{name}"] = sum(ok) / len(ok) if ok else 0.0
    valid = r[~torch.isnan(r)]
    metrics.update({"reward/mean": float(valid.mean()) if valid.numel() else 0.0,
                    "reward/std": float(valid.std()) if valid.numel() > 1 else 0.0,
                    "reward/unscorable": int(torch.isnan(r).sum())})
    return r, metrics


def _settings(run: GRPORun, step: int, attempt: int, pick) -> SamplingSettings:
    """Each prompt sampled with its own seed (step, position): samples do not depend on the number of ranks."""
    c = run.cfg.rollout
    base_seed = c.seed * 100003 + step
    return SamplingSettings(n=c.num_generations, temperature=c.temperature, top_p=c.top_p,
                            max_new_tokens=c.max_new_tokens, stop=c.stop, seed=base_seed * 31 + attempt,
                            seeds=[(base_seed * 31 + attempt) * 4099 + j for j in pick])


def sample_groups(run: GRPORun, step: int, metrics: dict) -> Groups | None:
    """Sample and score this rank's groups until its share of B informative groups (dynamic sampling) or the
    retry budget is spent. Every rank advances the prompt stream alike and takes its own prompts."""
    cfg, dist = run.cfg, run.dist
    b, g = cfg.grpo.prompts_per_step, cfg.rollout.num_generations
    mine = dist.prompt_indices(b, g, cfg.grpo.minibatch_size)
    kept = Groups([], [], torch.zeros(0, g))
    for attempt in range(3 if cfg.grpo.dynamic_sampling else 1):
        taken = run.stream.take(b if dist.world > 1 else b - len(kept.rows))
        pick = mine[: len(mine) - len(kept.rows)] if dist.world > 1 else range(len(taken))
        rows = [run.rows[taken[j]] for j in pick]
        with timed(metrics, "rollout"):
            prompts = render_prompts(run.policy.tokenizer, [r["prompt"] for r in rows])
            rollouts = run.engine.generate(prompts, _settings(run, step, attempt, pick))
        with timed(metrics, "score"):
            r, m = score(run.rewards, rows, rollouts, g)
        if attempt == 0:
            metrics.update(m)
        keep = list(range(len(rows)))
        if cfg.grpo.dynamic_sampling:
            spread = torch.nan_to_num(r, nan=0.0).std(-1) > 0
            metrics.setdefault("dynamic/kept_frac", float(spread.float().mean()))
            keep = spread.nonzero().flatten().tolist()
        kept = Groups(kept.rows + [rows[i] for i in keep], kept.rollouts + [rollouts[i] for i in keep],
                      torch.cat([kept.rewards, r[keep]]))
        if len(kept.rows) >= b:
            break
    return kept if kept.rows else None


def to_batch(run: GRPORun, groups: Groups, metrics: dict) -> UpdateBatch:
    """Group-relative advantages, completion metrics and the padded update batch."""
    adv, am = run.advantage(groups.rewards)
    metrics.update(am)
    comps = [c for ro in groups.rollouts for c in ro.completions]
    metrics["completion/len_mean"] = sum(len(c.token_ids) for c in comps) / len(comps)
    metrics["completion/truncated_frac"] = sum(c.truncated for c in comps) / len(comps)
    metrics["completion/tokens"] = sum(len(c.token_ids) for c in comps)
    prompt_ids = [ro.prompt_ids for ro in groups.rollouts for _ in ro.completions]
    batch = build_batch(prompt_ids, comps, adv.flatten(), run.policy.tokenizer.pad_token_id,
                        run.cfg.grpo.mask_truncated)
    metrics["batch/tokens"] = int(batch.attention_mask.sum())  # prompts + completions, padding excluded
    metrics["batch/padded_tokens"] = batch.attention_mask.numel()
    return batch
