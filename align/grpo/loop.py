"""The GRPO loop: rollout -> score -> advantages -> log-probs -> update -> weight sync; thin by design.

Each phase lives in its own module (``rollout/``, ``rewards/``, :mod:`align.advantages`,
:mod:`align.grpo.update`); this file only orders them, times them, logs and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_scheduler, set_seed

from align import data as data_mod
from align import plots, rundir
from align.advantages import get_advantage
from align.config import AlignConfig
from align.dist import Dist
from align.errors import AlignError
from align.grpo import state as ckpt
from align.grpo.batch import build_batch
from align.grpo.logprobs import CompletionLogprobs
from align.grpo.update import check_accumulation, fill_old_and_ref, policy_update
from align.moe import ExpertMonitor, RouterReplay
from align.policy import Policy, load_policy
from eval.core import held_out_summary
from rewards import Combined, configure
from rollout import SamplingSettings, make_engine, render_prompts

log = logging.getLogger(__name__)


class PromptStream:
    """Deterministic epoch-shuffled prompt order; its position is part of the checkpoint."""

    def __init__(self, n: int, seed: int, position: int = 0):
        self.n, self.seed, self.position = n, seed, position

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            epoch, i = divmod(self.position, self.n)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            out.append(order[i])
            self.position += 1
        return out


def _score(rewards: Combined, rows: list[dict], rollouts, g: int) -> tuple[torch.Tensor, dict]:
    completions = [c.text for ro in rollouts for c in ro.completions]
    cols = {k: [r.get(k) for r in rows for _ in range(g)] for k in ("answer", "test", "entry_point", "tests", "prompt_text")}
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


def _rollout_phase(cfg: AlignConfig, engine, tokenizer, rows_all, stream, rewards, adv_fn, step: int, dist: Dist):
    """Sample this rank's groups until its share of B informative groups (dynamic sampling) or the
    retry budget is spent. Every rank advances the prompt stream alike and takes its own prompts;
    each prompt is sampled with its own seed (step, position), so the samples do not depend on the
    number of ranks."""
    b, g = cfg.grpo.prompts_per_step, cfg.rollout.num_generations
    mine = dist.prompt_indices(b, g, cfg.grpo.minibatch_size)
    base_seed = cfg.rollout.seed * 100003 + step
    kept_rows, kept_rollouts, kept_rewards, metrics, t_gen, t_score = [], [], [], {}, 0.0, 0.0
    for attempt in range(3 if cfg.grpo.dynamic_sampling else 1):
        taken = stream.take(b if dist.world > 1 else b - len(kept_rows))
        pick = mine[: len(mine) - len(kept_rows)] if dist.world > 1 else range(len(taken))
        rows = [rows_all[taken[j]] for j in pick]
        settings = SamplingSettings(n=g, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                    max_new_tokens=cfg.rollout.max_new_tokens, stop=cfg.rollout.stop,
                                    seed=base_seed, seeds=[(base_seed * 31 + attempt) * 4099 + j for j in pick])
        t = time.perf_counter()
        rollouts = engine.generate(render_prompts(tokenizer, [r["prompt"] for r in rows]), settings)
        t_gen += time.perf_counter() - t
        t = time.perf_counter()
        r, m = _score(rewards, rows, rollouts, g)
        t_score += time.perf_counter() - t
        if attempt == 0:
            metrics = m
        if cfg.grpo.dynamic_sampling:
            spread = torch.nan_to_num(r, nan=0.0).std(-1) > 0
            metrics["dynamic/kept_frac"] = metrics.get("dynamic/kept_frac", float(spread.float().mean()))
            keep = spread.nonzero().flatten().tolist()
        else:
            keep = list(range(len(rows)))
        kept_rows += [rows[i] for i in keep]
        kept_rollouts += [rollouts[i] for i in keep]
        kept_rewards += [r[i] for i in keep]
        if len(kept_rows) >= b:
            break
    metrics["time/rollout"], metrics["time/score"] = t_gen, t_score
    if not kept_rows:
        return None, metrics
    rewards_t = torch.stack(kept_rewards)
    adv, am = adv_fn(rewards_t)
    metrics.update(am)
    comps = [c for ro in kept_rollouts for c in ro.completions]
    metrics["completion/len_mean"] = sum(len(c.token_ids) for c in comps) / len(comps)
    metrics["completion/truncated_frac"] = sum(c.truncated for c in comps) / len(comps)
    metrics["completion/tokens"] = sum(len(c.token_ids) for c in comps)
    prompt_ids = [ro.prompt_ids for ro in kept_rollouts for _ in ro.completions]
    batch = build_batch(prompt_ids, comps, adv.flatten(), tokenizer.pad_token_id, cfg.grpo.mask_truncated)
    return batch, metrics


def _held_out(cfg: AlignConfig, engine, policy: Policy, rows: list[dict]) -> dict:
    return held_out_summary(engine, policy.tokenizer, rows, dict(cfg.rewards.functions), cfg.eval, cfg.rollout.seed)


def _within_length(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Drop prompts longer than ``data.max_length`` tokens, saying how many."""
    lengths = [len(ids) for ids in render_prompts(tokenizer, [r["prompt"] for r in rows])]
    kept = [r for r, n in zip(rows, lengths) if n <= max_length]
    if len(kept) < len(rows):
        log.warning("dropped %d of %d prompts longer than data.max_length=%d tokens", len(rows) - len(kept),
                    len(rows), max_length)
    if not kept:
        raise AlignError(f"data.max_length={max_length}: every prompt is longer (shortest: {min(lengths)} tokens)")
    return kept


def _setup(cfg: AlignConfig, run_dir: Path, dist: Dist):
    """Policy, its prepared log-prob module (DDP / DeepSpeed / FSDP2 by the launch config), the rollout
    engine of this rank, optimizer and scheduler (stepped once per optimizer step, not per rank)."""
    policy = load_policy(cfg.model, cfg.lora)
    if not policy.trainable_parameter_names():
        raise AlignError("no trainable parameters: enable lora or set lora.enabled=false for full fine-tuning")
    policy.model.to(dist.device)
    engine_dir = run_dir / ".engine_model"
    if cfg.rollout.engine != "hf":
        with dist.acc.main_process_first():
            if dist.is_main:
                policy.save_merged(engine_dir)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    per_step = cfg.grpo.mu * math.ceil(cfg.grpo.prompts_per_step * cfg.rollout.num_generations / cfg.grpo.minibatch_size)
    total = cfg.grpo.steps * per_step
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total),
                              num_training_steps=total)
    ds = getattr(dist.acc.state, "deepspeed_plugin", None)
    if ds is not None:
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = dist.local_minibatch(cfg.grpo.minibatch_size)
        ds.deepspeed_config.setdefault("gradient_accumulation_steps", 1)
        ds.deepspeed_config["gradient_clipping"] = cfg.train.max_grad_norm
    fwd, optimizer = dist.acc.prepare(CompletionLogprobs(policy.model), optimizer)
    if dist.shards_params:
        # FSDP2 picks its root on the first forward: make it the wrapper, before any generate call.
        with torch.no_grad():
            one = torch.ones(1, 2, dtype=torch.long, device=dist.device)
            fwd(one, one, torch.arange(2, device=dist.device).view(1, 2), 1)
    max_len = min(policy.model.config.max_position_embeddings, cfg.data.max_length + cfg.rollout.max_new_tokens)
    engine = make_engine(cfg.rollout.engine, policy, cfg.rollout, engine_dir, cfg.model.dtype, max_len, dist,
                         full_weights=lambda: dist.full_weights(fwd))
    return policy, fwd, engine, optimizer, scheduler


def _sync(engine, policy: Policy, fwd, dist: Dist) -> None:
    """Push the merged policy into this rank's engine; the HF engine shares the live weights."""
    if engine.name in ("hf", "fast"):
        return
    with dist.full_weights(fwd), policy.merged_weights(only_adapted=True) as weights:
        engine.update_weights(weights)


def _save_final(run_dir: Path, policy: Policy, fwd, dist: Dist) -> None:
    staging = run_dir / ".final.tmp"
    if dist.world == 1:
        policy.save(staging)
    else:
        # accelerate gathers ZeRO-3 / FSDP2 shards into one full state dict (a collective).
        state = dist.acc.get_state_dict(fwd)
        if dist.is_main:
            policy.save(staging, state_dict={k.removeprefix("model."): v for k, v in state.items()})
    if dist.is_main:
        rundir.commit_dir(staging, run_dir / rundir.FINAL_DIR)
    dist.barrier()


def _check_launch(cfg: AlignConfig, dist: Dist) -> None:
    dist.local_minibatch(cfg.grpo.minibatch_size)
    dist.prompt_indices(cfg.grpo.prompts_per_step, cfg.rollout.num_generations, cfg.grpo.minibatch_size)
    check_accumulation(dist, cfg.grpo.micro_batch_size > 0)
    if dist.backend != "ddp" and (cfg.train.save_steps or cfg.train.resume):
        raise AlignError(f"train.save_steps / train.resume: periodic checkpoints are written for DDP runs only, "
                         f"not under {dist.backend} yet (set train.save_steps=0)")


def _train_step(cfg, ctx: dict, step: int) -> dict:
    """One GRPO step on every rank; returns the rank-reduced metrics (``skipped`` when some rank kept
    no informative group, in which case no rank updates)."""
    dist, policy, fwd, engine = ctx["dist"], ctx["policy"], ctx["fwd"], ctx["engine"]
    t_step = time.perf_counter()
    engine.wake_up()
    batch, m = _rollout_phase(cfg, engine, policy.tokenizer, ctx["rows"], ctx["stream"], ctx["rewards"],
                              ctx["adv_fn"], step, dist)
    engine.sleep()
    if dist.min(float(batch is not None)) == 0:
        return dist.reduce_metrics({**m, "skipped": 1})
    t = time.perf_counter()
    if ctx["need_old"] or cfg.grpo.beta > 0:
        fill_old_and_ref(policy, fwd, batch, cfg.grpo, cfg.rollout.temperature, ctx["replay"], ctx["need_old"], dist)
    m["time/logprobs"] = time.perf_counter() - t
    t = time.perf_counter()
    um, finite = policy_update(policy, fwd, batch, cfg.grpo, ctx["optimizer"], ctx["scheduler"],
                               cfg.rollout.temperature, cfg.rollout.max_new_tokens, cfg.train.max_grad_norm,
                               ctx["monitor"], ctx["replay"], dist)
    m["time/update"] = time.perf_counter() - t
    m.update(um)
    if ctx["replay"] is not None:
        m["moe/replay_flip_rate"] = ctx["replay"].flip_rate()
        ctx["replay"].clear()
    if ctx["monitor"] is not None:
        if dist.world > 1:
            ctx["monitor"].merge_ranks(dist.sum_tensor)
        m.update(ctx["monitor"].summary())
    m["nonfinite"] = float(not finite)
    t = time.perf_counter()
    _sync(engine, policy, fwd, dist)
    m["time/sync"] = time.perf_counter() - t
    m["time/step"] = time.perf_counter() - t_step
    m = dist.reduce_metrics(m)
    m["throughput/rollout_tok_s"] = m["completion/tokens"] / max(m["time/rollout"], 1e-9)
    return m


def _held_out_all(cfg, ctx: dict, held: list[dict]) -> dict:
    """Held-out accuracy on the main rank, or on every rank in lockstep when weights are sharded."""
    dist = ctx["dist"]
    if not (dist.is_main or dist.shards_params):
        return {}
    return _held_out(cfg, ctx["engine"], ctx["policy"], held)


def run_grpo(cfg: AlignConfig) -> dict:
    """GRPO from ``model.name_or_path`` (a Chat (SFT) checkpoint); writes ``<output.dir>/final`` = Chat (RL).

    Under ``accelerate launch`` every rank runs this function; files are written by the main rank.
    """
    t0 = time.time()
    dist = Dist()
    _check_launch(cfg, dist)
    with dist.acc.main_process_first():
        run_dir = rundir.prepare(cfg, cfg.train.resume, main=dist.is_main)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    set_seed(cfg.train.seed)
    configure(timeout_s=cfg.rewards.timeout_s, workers=cfg.rewards.workers or max(1, (os.cpu_count() or 1) // dist.world))
    rows = data_mod.prompt_rows(cfg.data, "train")
    held = data_mod.prompt_rows(cfg.data, "eval") if cfg.data.eval else []
    rewards = Combined(dict(cfg.rewards.functions))
    # Start the scoring workers (fork) before the engine starts its threads.
    rewards.score([""], **{k: [rows[0].get(k)] for k in ("answer",) if rows[0].get(k) is not None})
    policy, fwd, engine, optimizer, scheduler = _setup(cfg, run_dir, dist)
    ctx = {"dist": dist, "policy": policy, "fwd": fwd, "engine": engine, "optimizer": optimizer,
           "scheduler": scheduler, "rewards": rewards, "adv_fn": get_advantage(cfg.grpo.advantage),
           "rows": _within_length(rows, policy.tokenizer, cfg.data.max_length),
           "monitor": ExpertMonitor(policy.model, cfg.monitor.balance_alpha1, cfg.monitor.balance_alpha2,
                                    cfg.monitor.num_devices, cfg.monitor.dead_threshold) if cfg.monitor.enabled else None,
           "replay": RouterReplay(policy.model) if cfg.grpo.router_replay else None,
           "need_old": cfg.grpo.mu > 1 or cfg.grpo.router_replay
           or cfg.grpo.prompts_per_step * cfg.rollout.num_generations > cfg.grpo.minibatch_size}
    ctx["stream"] = stream = PromptStream(len(ctx["rows"]), cfg.train.seed)
    start, extra = 0, {}
    found = ckpt.latest(run_dir) if cfg.train.resume else None
    if found is not None:
        start, extra = ckpt.load(found, policy, optimizer, scheduler)
        stream.position = extra["data_position"]
        if dist.is_main:
            rundir.truncate_metrics(run_dir, start)
        _sync(engine, policy, fwd, dist)
        log.info("resumed from %s (step %d)", found, start)
    before = extra.get("held_out_before") or _held_out_all(cfg, ctx, held)
    metrics_log = rundir.MetricsLogger(run_dir, cfg.output.tensorboard) if dist.is_main else None
    bad, step = 0, start
    progress = Progress(TextColumn("[bold]grpo[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                        disable=not dist.is_main)
    with progress:
        task = progress.add_task("grpo", total=cfg.grpo.steps, completed=start, info="")
        for step in range(start + 1, cfg.grpo.steps + 1):
            m = _train_step(cfg, ctx, step)
            if m.get("nonfinite"):
                bad += 1
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, bad)
                if bad >= cfg.grpo.max_bad_steps:
                    raise AlignError(f"stopping: {bad} non-finite steps in a row (lower train.learning_rate?)")
            elif not m.get("skipped"):
                bad = 0
            if cfg.grpo.eval_every and step % cfg.grpo.eval_every == 0 and not m.get("skipped"):
                m.update({f"eval/{k}": v for k, v in _held_out_all(cfg, ctx, held).items()})
            if metrics_log is not None:
                metrics_log.log(step, m)
            progress.update(task, advance=1, info="no informative groups" if m.get("skipped")
                            else f"reward {m['reward/mean']:.3f}")
            if cfg.train.save_steps and step % cfg.train.save_steps == 0 and dist.is_main:
                ckpt.save(run_dir, step, policy, optimizer, scheduler,
                          {"data_position": stream.position, "held_out_before": before}, cfg.train.save_total_limit)
            dist.barrier()
    after = _held_out_all(cfg, ctx, held)
    _save_final(run_dir, policy, fwd, dist)
    summary = {"stage": "grpo", "steps": step, "held_out_before": before, "held_out_after": after,
               "wall_s": round(time.time() - t0, 1), "engine": engine.name, "final": str(run_dir / rundir.FINAL_DIR),
               "processes": dist.world, "backend": dist.backend}
    if dist.is_main:
        if ctx["monitor"] is not None and ctx["monitor"].history:
            (run_dir / "moe_history.json").write_text(json.dumps(ctx["monitor"].history))
            plots.expert_heatmap(ctx["monitor"], run_dir / "plots" / "expert_load_grpo.png",
                                 "GRPO expert load (all updates, main rank)")
        metrics_log.close()
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
