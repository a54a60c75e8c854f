"""The GRPO loop: rollout -> score -> advantages -> log-probs -> update -> weight sync; thin by design.

Set-up and the run's state live in :mod:`align.grpo.run`, the phases before the update in
:mod:`align.grpo.phases`, the update in :mod:`align.grpo.update`; this file orders them, logs and checkpoints.
The engine sleeps while the trainer runs and is woken (weights, sync, KV cache) right before it generates.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import set_seed

from align import data as data_mod
from align import rundir, stage
from align.config import AlignConfig, to_dict
from align.dist import Dist
from align.errors import AlignError
from align.grpo import state as ckpt
from align.grpo.phases import sample_groups, to_batch
from align.grpo.run import GRPORun, setup, timed
from align.trackers import open_trackers
from align.grpo.update import check_accumulation, fill_old_and_ref, policy_update
from align.heldout import held_out_summary
from rewards import Combined, configure
from rewards.sandbox import SandboxUnavailable

log = logging.getLogger(__name__)


def train_step(run: GRPORun, step: int) -> dict:
    """One GRPO step on every rank; returns the rank-reduced metrics (``skipped`` when some rank kept
    no informative group, in which case no rank updates)."""
    cfg, dist = run.cfg, run.dist
    m: dict = {}
    with timed(m, "step"):
        run.ready_engine(m)
        groups = sample_groups(run, step, m)
        run.release_engine(m)
        if dist.min(float(groups is not None)) == 0:
            return dist.reduce_metrics({**m, "skipped": 1})
        batch = to_batch(run, groups, m)
        with timed(m, "logprobs"):
            if run.need_old or cfg.grpo.beta > 0:
                fill_old_and_ref(run.policy, run.fwd, batch, cfg.grpo, cfg.rollout.temperature, run.replay,
                                 run.need_old, dist)
        with timed(m, "update"):
            um, finite = policy_update(run.policy, run.fwd, batch, cfg.grpo, run.optimizer, run.scheduler,
                                       cfg.rollout.temperature, cfg.rollout.max_new_tokens, cfg.train.max_grad_norm,
                                       run.monitor, run.replay, dist)
        run.engine_stale = True
        m.update(um)
        m.update(_moe_metrics(run))
        m["nonfinite"] = float(not finite)
    m = dist.reduce_metrics(m)
    m["throughput/rollout_tok_s"] = m["completion/tokens"] / max(m["time/rollout"], 1e-9)
    # Real (non-padding) tokens through each trainer pass per second: old + reference passes, mu update passes.
    passes = float(run.need_old) + float(cfg.grpo.beta > 0)
    if passes and m.get("time/logprobs"):
        m["throughput/logprob_tok_s"] = passes * m["batch/tokens"] / m["time/logprobs"]
    if m.get("time/update") and "actor/pg_loss" in m:  # an update ran (no minibatch was all masked)
        m["throughput/update_tok_s"] = cfg.grpo.mu * m["batch/tokens"] / m["time/update"]
    return m


def _moe_metrics(run: GRPORun) -> dict:
    m = {}
    if run.replay is not None:
        m["moe/replay_flip_rate"] = run.replay.flip_rate()
        run.replay.clear()
    if run.monitor is not None:
        if run.dist.world > 1:
            run.monitor.merge_ranks(run.dist.sum_tensor)
        m.update(run.monitor.summary())
    return m


def held_out(run: GRPORun, held: list[dict]) -> dict:
    """Held-out accuracy on the main rank, or on every rank in lockstep when weights are sharded."""
    dist = run.dist
    if not held or not (dist.is_main or dist.shards_params):
        return {}
    m: dict = {}
    run.ready_engine(m)
    out = held_out_summary(run.engine, run.policy.tokenizer, held, dict(run.cfg.rewards.functions), run.cfg.eval,
                           run.cfg.rollout.seed)
    run.release_engine(m)
    return out


def _save_final(run_dir: Path, run: GRPORun) -> None:
    dist = run.dist

    def write_sharded(staging: Path) -> None:
        # accelerate gathers ZeRO-3 / FSDP2 shards into one full state dict (a collective).
        state = dist.state_dict(run.fwd)
        if dist.is_main:
            run.policy.save(staging, state_dict={k.removeprefix("model."): v for k, v in state.items()})

    stage.save_final(run_dir, run.policy, dist.world, dist.is_main, write_sharded, dist.barrier)


def _check_settings(cfg: AlignConfig) -> None:
    """Settings that would train nothing, be ignored, or fail only after the engine started: one line each, now."""
    from transformers import SchedulerType

    from align.advantages import get_advantage
    from align.losses import get_loss

    if cfg.rollout.num_generations < 2:
        raise AlignError(f"rollout.num_generations={cfg.rollout.num_generations}: a group of one has zero "
                         "group-relative advantage, so nothing trains (use >= 2)")
    if cfg.train.max_steps != -1:
        raise AlignError(f"train.max_steps={cfg.train.max_steps} is SFT's; GRPO runs grpo.steps={cfg.grpo.steps} "
                         "(set grpo.steps instead)")
    for key, lookup in (("grpo.loss", get_loss), ("grpo.advantage", get_advantage)):
        try:
            lookup(getattr(cfg.grpo, key.split(".")[1]))
        except KeyError as e:
            raise AlignError(f"{key}: {e.args[0]}") from None
    known = [t.value for t in SchedulerType]
    if cfg.train.lr_scheduler not in known:
        raise AlignError(f"train.lr_scheduler: unknown scheduler {cfg.train.lr_scheduler!r}; known: {', '.join(known)}")


def _check_launch(cfg: AlignConfig, dist: Dist) -> None:
    _check_settings(cfg)
    dist.local_minibatch(cfg.grpo.minibatch_size)
    dist.prompt_indices(cfg.grpo.prompts_per_step, cfg.rollout.num_generations, cfg.grpo.minibatch_size)
    check_accumulation(dist, cfg.grpo.micro_batch_size > 0 or cfg.grpo.max_tokens_per_micro_batch > 0)
    if dist.backend != "ddp" and (cfg.train.save_steps or cfg.train.resume):
        raise AlignError(f"train.save_steps / train.resume: periodic checkpoints are written for DDP runs only, "
                         f"not under {dist.backend} yet (set train.save_steps=0)")


def _start(cfg: AlignConfig) -> tuple[GRPORun, Path, list[dict]]:
    """Run directory, data, reward workers, then the run itself (policy, engine, optimizer)."""
    dist = Dist()
    _check_launch(cfg, dist)
    rewards = _rewards(cfg, dist)
    with dist.main_first():
        run_dir = rundir.prepare(cfg, cfg.train.resume, main=dist.is_main)
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    set_seed(cfg.train.seed)
    rows = data_mod.prompt_rows(cfg.data, "train")
    held = data_mod.prompt_rows(cfg.data, "eval") if cfg.data.eval else []
    # Start the scoring workers (fork) before the engine starts its threads.
    rewards.score([""], **{k: [rows[0].get(k)] for k in ("answer",) if rows[0].get(k) is not None})
    return setup(cfg, dist, rows, rewards), run_dir, held


def _rewards(cfg: AlignConfig, dist: Dist) -> Combined:
    """The configured rewards, checked before anything heavy starts (unknown names, a sandbox that cannot isolate)."""
    workers = cfg.rewards.workers or max(1, (os.cpu_count() or 1) // dist.world)
    configure(timeout_s=cfg.rewards.timeout_s, workers=workers,
              allow_unisolated_code=cfg.rewards.allow_unisolated_code)
    rewards = Combined(dict(cfg.rewards.functions))
    try:
        rewards.preflight()
    except KeyError as e:
        raise AlignError(f"rewards.functions: {e.args[0]}") from None
    except SandboxUnavailable as e:
        raise AlignError(f"rewards.functions.code: {e}") from None
    return rewards


def _resume(run: GRPORun, run_dir: Path) -> tuple[int, dict]:
    found = ckpt.latest(run_dir) if run.cfg.train.resume else None
    if found is None:
        return 0, {}
    start, extra = ckpt.load(found, run.policy, run.optimizer, run.scheduler)
    run.stream.position = extra["data_position"]
    if run.dist.is_main:
        rundir.truncate_metrics(run_dir, start)
    run.engine_stale = True
    log.info("resumed from %s (step %d)", found, start)
    return start, extra


def _progress(main: bool) -> Progress:
    return Progress(TextColumn("[bold]grpo[/]"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(), disable=not main)


def run_grpo(cfg: AlignConfig) -> dict:
    """GRPO from ``model.name_or_path`` (a Chat (SFT) checkpoint); writes ``<output.dir>/final`` = Chat (RL).

    Under ``accelerate launch`` every rank runs this function; files are written by the main rank.
    """
    t0 = time.time()
    run, run_dir, held = _start(cfg)
    dist = run.dist
    start, extra = _resume(run, run_dir)
    before = extra.get("held_out_before") or held_out(run, held)
    metrics_log = None
    if dist.is_main:
        metrics_log = rundir.MetricsLogger(run_dir, cfg.output.tensorboard,
                                           open_trackers(cfg.train.report_to, run_dir, to_dict(cfg)))
    bad, step = 0, start
    with _progress(dist.is_main) as progress:
        task = progress.add_task("grpo", total=cfg.grpo.steps, completed=start, info="")
        for step in range(start + 1, cfg.grpo.steps + 1):
            m = train_step(run, step)
            if m.get("nonfinite"):
                bad += 1
                log.warning("step %d: non-finite loss or gradient; update skipped (%d in a row)", step, bad)
                if bad >= cfg.grpo.max_bad_steps:
                    raise AlignError(f"stopping: {bad} non-finite steps in a row (lower train.learning_rate?)")
            elif not m.get("skipped"):
                bad = 0
            if cfg.grpo.eval_every and step % cfg.grpo.eval_every == 0 and not m.get("skipped"):
                m.update({f"eval/{k}": v for k, v in held_out(run, held).items()})
            if metrics_log is not None:
                metrics_log.log(step, m)
            progress.update(task, advance=1, info="no informative groups" if m.get("skipped")
                            else f"reward {m['reward/mean']:.3f}")
            if cfg.train.save_steps and step % cfg.train.save_steps == 0 and dist.is_main:
                ckpt.save(run_dir, step, run.policy, run.optimizer, run.scheduler,
                          {"data_position": run.stream.position, "held_out_before": before}, cfg.train.save_total_limit)
            dist.barrier()
    after = held_out(run, held)
    _save_final(run_dir, run)
    summary = {"stage": "grpo", "steps": step, "held_out_before": before, "held_out_after": after,
               "wall_s": round(time.time() - t0, 1), "engine": run.engine.name, "startup": run.startup,
               "final": str(run_dir / rundir.FINAL_DIR), "processes": dist.world, "backend": dist.backend}
    if dist.is_main:
        stage.finish(run_dir, "grpo", run.monitor, metrics_log, summary)
    return summary
