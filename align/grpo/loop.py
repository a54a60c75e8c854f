"""The GRPO loop: rollout -> score -> advantages -> log-probs -> update -> weight sync; thin by design.

Each phase lives in its own module (``rollout/``, ``rewards/``, :mod:`align.advantages`,
:mod:`align.grpo.update`); this file only orders them, times them, logs and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_scheduler, set_seed

from align import data as data_mod
from align import plots, rundir
from align.advantages import get_advantage
from align.config import AlignConfig
from align.errors import AlignError
from align.grpo import state as ckpt
from align.grpo.batch import build_batch
from align.grpo.update import fill_old_and_ref, policy_update
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


def _rollout_phase(cfg: AlignConfig, engine, tokenizer, rows_all, stream, rewards, adv_fn, step: int):
    """Sample groups until B informative groups (dynamic sampling) or the retry budget is spent."""
    b, g = cfg.grpo.prompts_per_step, cfg.rollout.num_generations
    settings = SamplingSettings(n=g, temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                max_new_tokens=cfg.rollout.max_new_tokens, stop=cfg.rollout.stop,
                                seed=cfg.rollout.seed * 100003 + step)
    kept_rows, kept_rollouts, kept_rewards, metrics, t_gen, t_score = [], [], [], {}, 0.0, 0.0
    for attempt in range(3 if cfg.grpo.dynamic_sampling else 1):
        rows = [rows_all[i] for i in stream.take(b - len(kept_rows))]
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


def _setup(cfg: AlignConfig, run_dir: Path):
    policy = load_policy(cfg.model, cfg.lora)
    if not policy.trainable_parameter_names():
        raise AlignError("no trainable parameters: enable lora or set lora.enabled=false for full fine-tuning")
    engine_dir = run_dir / ".engine_model"
    if cfg.rollout.engine != "hf":
        policy.save_merged(engine_dir)
    max_len = min(policy.model.config.max_position_embeddings, cfg.data.max_length + cfg.rollout.max_new_tokens)
    engine = make_engine(cfg.rollout.engine, policy, cfg.rollout, engine_dir, cfg.model.dtype, max_len)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    per_step = cfg.grpo.mu * math.ceil(cfg.grpo.prompts_per_step * cfg.rollout.num_generations / cfg.grpo.minibatch_size)
    total = cfg.grpo.steps * per_step
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total),
                              num_training_steps=total)
    return policy, engine, optimizer, scheduler


def run_grpo(cfg: AlignConfig) -> dict:
    """GRPO from ``model.name_or_path`` (a Chat (SFT) checkpoint); writes ``<output.dir>/final`` = Chat (RL)."""
    t0 = time.time()
    run_dir = rundir.prepare(cfg, cfg.train.resume)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    set_seed(cfg.train.seed)
    configure(timeout_s=cfg.rewards.timeout_s, workers=cfg.rewards.workers)
    rows = data_mod.prompt_rows(cfg.data, "train")
    held = data_mod.prompt_rows(cfg.data, "eval") if cfg.data.eval else []
    rewards = Combined(dict(cfg.rewards.functions))
    adv_fn = get_advantage(cfg.grpo.advantage)
    # Start the scoring workers (fork) before the engine starts its threads.
    rewards.score([""], **{k: [rows[0].get(k)] for k in ("answer",) if rows[0].get(k) is not None})
    policy, engine, optimizer, scheduler = _setup(cfg, run_dir)
    rows = _within_length(rows, policy.tokenizer, cfg.data.max_length)
    monitor = ExpertMonitor(policy.model, cfg.monitor.balance_alpha1, cfg.monitor.balance_alpha2,
                            cfg.monitor.num_devices, cfg.monitor.dead_threshold) if cfg.monitor.enabled else None
    replay = RouterReplay(policy.model) if cfg.grpo.router_replay else None
    stream = PromptStream(len(rows), cfg.train.seed)
    start, extra = 0, {}
    found = ckpt.latest(run_dir) if cfg.train.resume else None
    if found is not None:
        start, extra = ckpt.load(found, policy, optimizer, scheduler)
        stream.position = extra["data_position"]
        rundir.truncate_metrics(run_dir, start)
        with policy.merged_weights(only_adapted=True) as weights:
            engine.update_weights(weights)
        log.info("resumed from %s (step %d)", found, start)
    before = extra.get("held_out_before") or _held_out(cfg, engine, policy, held)
    metrics_log = rundir.MetricsLogger(run_dir, cfg.output.tensorboard)
    need_old = cfg.grpo.mu > 1 or cfg.grpo.router_replay or \
        cfg.grpo.prompts_per_step * cfg.rollout.num_generations > cfg.grpo.minibatch_size
    bad, step = 0, start
    progress = Progress(TextColumn("[bold]grpo[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn())
    with progress:
        task = progress.add_task("grpo", total=cfg.grpo.steps, completed=start, info="")
        for step in range(start + 1, cfg.grpo.steps + 1):
            t_step = time.perf_counter()
            engine.wake_up()
            batch, m = _rollout_phase(cfg, engine, policy.tokenizer, rows, stream, rewards, adv_fn, step)
            engine.sleep()
            if batch is None:
                metrics_log.log(step, {**m, "skipped": 1})
                progress.update(task, advance=1, info="no informative groups")
                continue
            t = time.perf_counter()
            if need_old or cfg.grpo.beta > 0:
                fill_old_and_ref(policy, batch, cfg.grpo, cfg.rollout.temperature, replay, need_old)
            m["time/logprobs"] = time.perf_counter() - t
            t = time.perf_counter()
            um, finite = policy_update(policy, batch, cfg.grpo, optimizer, scheduler, cfg.rollout.temperature,
                                       cfg.rollout.max_new_tokens, cfg.train.max_grad_norm, monitor, replay)
            m["time/update"] = time.perf_counter() - t
            m.update(um)
            if replay is not None:
                m["moe/replay_flip_rate"] = replay.flip_rate()
                replay.clear()
            if monitor is not None:
                m.update(monitor.summary())
            if not finite:
                bad += 1
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, bad)
                if bad >= cfg.grpo.max_bad_steps:
                    raise AlignError(f"stopping: {bad} non-finite steps in a row (lower train.learning_rate?)")
            else:
                bad = 0
            t = time.perf_counter()
            with policy.merged_weights(only_adapted=True) as weights:
                engine.update_weights(weights)
            m["time/sync"] = time.perf_counter() - t
            m["time/step"] = time.perf_counter() - t_step
            m["throughput/rollout_tok_s"] = m["completion/tokens"] / max(m["time/rollout"], 1e-9)
            if cfg.grpo.eval_every and step % cfg.grpo.eval_every == 0:
                m.update({f"eval/{k}": v for k, v in _held_out(cfg, engine, policy, held).items()})
            metrics_log.log(step, m)
            progress.update(task, advance=1, info=f"reward {m['reward/mean']:.3f}")
            if cfg.train.save_steps and step % cfg.train.save_steps == 0:
                ckpt.save(run_dir, step, policy, optimizer, scheduler,
                          {"data_position": stream.position, "held_out_before": before}, cfg.train.save_total_limit)
    after = _held_out(cfg, engine, policy, held)
    staging = run_dir / ".final.tmp"
    policy.save(staging)
    rundir.commit_dir(staging, run_dir / rundir.FINAL_DIR)
    if monitor is not None and monitor.history:
        (run_dir / "moe_history.json").write_text(json.dumps(monitor.history))
        plots.expert_heatmap(monitor, run_dir / "plots" / "expert_load_grpo.png", "GRPO expert load (all updates)")
    metrics_log.close()
    summary = {"stage": "grpo", "steps": step, "held_out_before": before, "held_out_after": after,
               "wall_s": round(time.time() - t0, 1), "engine": engine.name, "final": str(run_dir / rundir.FINAL_DIR)}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
