"""The typed state of one GRPO run and its set-up: policy, prepared forward, rollout engine, optimizer.

Every phase of :mod:`align.grpo.loop` takes a :class:`GRPORun` (no string-keyed context); the run also
owns the engine's lifecycle, so the order "wake the weights -> sync -> wake the KV cache" lives in one place.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field

import torch
from transformers import get_scheduler

from align.advantages import get_advantage
from align.config import AlignConfig
from align.dist import Dist
from align.errors import AlignError
from align.grpo.logprobs import CompletionLogprobs
from align.moe import ExpertMonitor, RouterReplay
from align.offload import FrozenOffload, use_expandable_segments
from align.stage import make_monitor
from align.policy import Policy, load_policy
from rewards import Combined
from rollout import make_engine, render_prompts

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


@contextlib.contextmanager
def timed(metrics: dict, name: str):
    """Add the wall seconds of the block to ``metrics["time/<name>"]`` (verl's ``marked_timer``)."""
    t = time.perf_counter()
    try:
        yield
    finally:
        key = f"time/{name}"
        metrics[key] = metrics.get(key, 0.0) + time.perf_counter() - t


@dataclass
class GRPORun:
    cfg: AlignConfig
    dist: Dist
    policy: Policy
    fwd: torch.nn.Module
    """The policy's log-prob module as ``accelerate`` prepared it (DDP / DeepSpeed / FSDP2)."""
    engine: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    rewards: Combined
    advantage: object
    rows: list[dict]
    stream: PromptStream
    monitor: ExpertMonitor | None
    replay: RouterReplay | None
    need_old: bool
    """Old-policy log-probs are needed: several update passes, several minibatches, or router replay."""
    engine_stale: bool = False
    """The trainer's weights changed since the engine last took them."""
    startup: dict = field(default_factory=dict)

    offload: FrozenOffload | None = None
    """``rollout.offload_policy_weights``: the trainer's frozen weights, out of the device during the rollout."""

    def ready_engine(self, metrics: dict) -> None:
        """Wake the engine for generation, syncing the policy into it first if it changed; with ``offload``, the
        trainer's frozen weights leave the device after the sync, before the engine's KV cache is allocated."""
        changed = self.engine_stale or getattr(self.engine, "needs_full_sync", False)
        sync = changed and not self.engine.shares_weights

        def between(full: bool) -> None:  # the engine's weights are awake, its KV cache not yet
            if sync:
                self.push_weights(full)
            if self.offload is not None:
                with timed(metrics, "offload"):
                    self.offload.offload()
                metrics["offload/copied_tensors"] = self.offload.copied

        with timed(metrics, "wake"):
            self.engine.wake_up(between if sync or self.offload is not None else None)
        metrics.setdefault("time/sync", 0.0)
        metrics["time/wake"] -= metrics.get("time/offload", 0.0)
        if sync:
            metrics["time/wake"] -= self.engine.last_sync.get("seconds", 0.0)
            metrics["time/sync"] = self.engine.last_sync.get("seconds", 0.0)
            metrics["sync/params"] = self.engine.last_sync.get("params", 0)
        self.engine_stale = False

    def push_weights(self, full: bool) -> None:
        """Merged policy weights into the engine: every weight, or only those an adapter can change."""
        with self.dist.full_weights(self.fwd), self.policy.merged_weights(only_adapted=not full) as weights:
            self.engine.update_weights(weights)

    def release_engine(self, metrics: dict) -> None:
        with timed(metrics, "sleep"):
            self.engine.sleep()
        if self.offload is not None:
            with timed(metrics, "restore"):
                self.offload.restore()


def within_length(rows: list[dict], tokenizer, max_length: int) -> list[dict]:
    """Drop prompts longer than ``data.max_length`` tokens, saying how many."""
    lengths = [len(ids) for ids in render_prompts(tokenizer, [r["prompt"] for r in rows])]
    kept = [r for r, n in zip(rows, lengths) if n <= max_length]
    if len(kept) < len(rows):
        log.warning("dropped %d of %d prompts longer than data.max_length=%d tokens", len(rows) - len(kept),
                    len(rows), max_length)
    if not kept:
        raise AlignError(f"data.max_length={max_length}: every prompt is longer (shortest: {min(lengths)} tokens)")
    return kept


def _optimizer(cfg: AlignConfig, policy: Policy):
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.learning_rate, weight_decay=cfg.train.weight_decay)
    rows = cfg.grpo.prompts_per_step * cfg.rollout.num_generations
    per_step = cfg.grpo.mu * math.ceil(rows / cfg.grpo.minibatch_size)
    total = cfg.grpo.steps * per_step
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer, num_warmup_steps=int(cfg.train.warmup_ratio * total),
                              num_training_steps=total)
    return optimizer, scheduler


def setup(cfg: AlignConfig, dist: Dist, rows: list[dict], rewards: Combined, policy: Policy | None = None) -> GRPORun:
    """Everything a GRPO step needs, on this rank; ``policy``: an already built one (benchmarks)."""
    t0 = time.perf_counter()
    policy = policy or load_policy(cfg.model, cfg.lora)
    if not policy.trainable_parameter_names():
        raise AlignError("no trainable parameters: enable lora or set lora.enabled=false for full fine-tuning")
    policy.model.to(dist.device)
    t_model = time.perf_counter() - t0
    optimizer, scheduler = _optimizer(cfg, policy)
    fwd, optimizer = dist.prepare(CompletionLogprobs(policy.model), optimizer,
                                  dist.local_minibatch(cfg.grpo.minibatch_size), cfg.train.max_grad_norm)
    max_len = min(policy.model.config.max_position_embeddings, cfg.data.max_length + cfg.rollout.max_new_tokens)
    t = time.perf_counter()
    engine = make_engine(cfg.rollout.engine, policy, cfg.rollout, cfg.model.dtype, max_len, dist,
                         full_weights=lambda: dist.full_weights(fwd))
    # model_s: build + move; engine_total_s: make_engine (for vLLM: its own start engine_s + first_sync_s)
    startup = {"model_s": t_model, "engine_total_s": time.perf_counter() - t, **getattr(engine, "startup", {})}
    if cfg.train.expandable_segments:  # after the engine's start: its memory pool and CUDA graphs as vLLM made them
        log.info("train.expandable_segments: allocator config %s", use_expandable_segments())
    rows = within_length(rows, policy.tokenizer, cfg.data.max_length)
    monitor = make_monitor(policy.model, cfg.monitor)
    g = cfg.grpo
    return GRPORun(cfg=cfg, dist=dist, policy=policy, fwd=fwd, engine=engine, optimizer=optimizer,
                   scheduler=scheduler, rewards=rewards,
                   advantage=get_advantage(g.advantage), rows=rows, stream=PromptStream(len(rows), cfg.train.seed),
                   monitor=monitor, replay=RouterReplay(policy.model) if g.router_replay else None,
                   need_old=(g.mu > 1 or g.router_replay
                             or g.prompts_per_step * cfg.rollout.num_generations > g.minibatch_size),
                   startup=startup, offload=_offload(cfg, dist, policy, engine))


def _offload(cfg: AlignConfig, dist: Dist, policy: Policy, engine) -> FrozenOffload | None:
    if not cfg.rollout.offload_policy_weights:
        return None
    if engine.shares_weights:
        raise AlignError(f"rollout.offload_policy_weights: the {type(engine).__name__} generates from the trainer's "
                         "own weights, which cannot leave the device (use rollout.engine=vllm)")
    if dist.shards_params:
        raise AlignError(f"rollout.offload_policy_weights: {dist.backend} shards the weights itself (use its own "
                         "parameter offload)")
    offload = FrozenOffload(policy.model)
    log.info("rollout.offload_policy_weights: %.2f GiB of frozen weights wait in host memory during rollouts",
             offload.nbytes / 2**30)
    return offload
