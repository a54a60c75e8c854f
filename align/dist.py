"""The process group as the GRPO loop sees it, on top of ``accelerate``.

``align grpo`` under ``accelerate launch`` (DDP, DeepSpeed ZeRO-2/3, FSDP2; gloo on CPU, NCCL on
GPU) runs one trainer and one rollout engine per rank. This module answers the few questions the
loop asks of the group: which prompts are mine, how are metrics reduced, which backend shards the
parameters, and how full weights are gathered for a weight sync. A plain ``align grpo`` is world
size 1, where every reduction is the identity.
"""

from __future__ import annotations

import contextlib

import torch

from align.errors import AlignError

# Metrics that add up over ranks (counts and the rank-partial loss); the rest are means, except
# maxima (``*_max``) and wall times (``time/*``), where the slowest rank is what the step waited for.
SUM_KEYS = {"reward/unscorable", "completion/tokens", "actor/pg_loss", "batch/tokens", "batch/padded_tokens"}


def combine_metrics(parts: list[dict], weights: list[float] | None = None) -> dict:
    """One metrics dict from several (ranks', or micro-batches' weighted by their tokens): sums for
    :data:`SUM_KEYS`, maxima for ``*_max`` and ``time/*``, (weighted) means for the rest; non-numbers dropped."""
    weights = weights or [1.0] * len(parts)
    out: dict = {}
    for key in dict.fromkeys(k for m in parts for k in m):
        vals = [(m[key], w) for m, w in zip(parts, weights) if key in m and isinstance(m[key], (int, float))]
        if not vals:
            continue
        if key in SUM_KEYS:
            out[key] = sum(v for v, _ in vals)
        elif key.endswith("_max") or key.startswith("time/"):
            out[key] = max(v for v, _ in vals)
        else:
            total = sum(w for _, w in vals)
            out[key] = sum(v * w for v, w in vals) / total if total else sum(v for v, _ in vals) / len(vals)
    return out


class Dist:
    """Rank, world size and collectives of the current ``accelerate`` run (a single process by default)."""

    def __init__(self, accelerator=None):
        if accelerator is None:
            from accelerate import Accelerator
            # cpu=True lets accelerate see a torchrun launch without GPUs as a gloo group.
            accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.acc = accelerator
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.device = accelerator.device

    @property
    def backend(self) -> str:
        """``ddp`` (also one process), ``deepspeed-zero<k>`` or ``fsdp2``/``fsdp1``."""
        from accelerate.utils import DistributedType

        kind = self.acc.distributed_type
        if kind == DistributedType.DEEPSPEED:
            return f"deepspeed-zero{self.acc.state.deepspeed_plugin.zero_stage}"
        if kind == DistributedType.FSDP:
            return "fsdp2" if getattr(self.acc.state.fsdp_plugin, "fsdp_version", 1) == 2 else "fsdp1"
        return "ddp"

    @property
    def shards_params(self) -> bool:
        """Whether a rank holds only a shard of the weights (generation must then run in lockstep)."""
        return self.backend in ("deepspeed-zero3", "fsdp1", "fsdp2")

    def prompt_indices(self, n_prompts: int, group: int, minibatch: int) -> list[int]:
        """This rank's prompts out of ``n_prompts`` per step (each group of ``group`` samples stays whole).

        When every optimizer minibatch (``minibatch`` sequences) splits evenly into ranks, rank r
        takes the r-th part of each minibatch's prompts, so its k-th local minibatch is exactly its
        share of the single-process k-th minibatch: the same global batch gives the same update at
        any world size. Otherwise ranks take contiguous blocks.
        """
        if n_prompts % self.world:
            raise AlignError(f"grpo.prompts_per_step={n_prompts} must be divisible by the {self.world} processes")
        per_mb = minibatch // group if minibatch % group == 0 else 0
        if self.world > 1 and per_mb and per_mb % self.world == 0 and n_prompts % per_mb == 0:
            part = per_mb // self.world
            return [b + self.rank * part + i for b in range(0, n_prompts, per_mb) for i in range(part)]
        k = n_prompts // self.world
        return list(range(self.rank * k, (self.rank + 1) * k))

    def prepare(self, module: torch.nn.Module, optimizer, micro_batch: int, max_grad_norm: float):
        """``module`` and ``optimizer`` through accelerate (DDP / DeepSpeed / FSDP2 by the launch config); DeepSpeed
        is told the micro-batch and clipping first. FSDP2 picks its root on the first forward, so one tiny no-grad
        forward makes it the wrapper before anything else calls the model."""
        ds = getattr(self.acc.state, "deepspeed_plugin", None)
        if ds is not None:
            ds.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
            ds.deepspeed_config.setdefault("gradient_accumulation_steps", 1)
            ds.deepspeed_config["gradient_clipping"] = max_grad_norm
        module, optimizer = self.acc.prepare(module, optimizer)
        if self.shards_params:
            with torch.no_grad():
                one = torch.ones(1, 2, dtype=torch.long, device=self.device)
                module(one, one, torch.arange(2, device=self.device).view(1, 2), 1)
        return module, optimizer

    def backward(self, loss: torch.Tensor, module: torch.nn.Module, sync: bool) -> None:
        """Backward of this rank's additive share of the loss. Ranks' gradients are averaged, so the share is
        scaled by the world size; gradients are reduced only when ``sync`` (the last micro-batch)."""
        with self.acc.no_sync(module) if not sync else contextlib.nullcontext():
            self.acc.backward(loss * self.world)

    def clip_grad_norm(self, params: list, max_norm: float):
        return self.acc.clip_grad_norm_(params, max_norm)

    def state_dict(self, module: torch.nn.Module) -> dict:
        """The full state dict of a (possibly sharded) module, gathered on the main rank (a collective)."""
        return self.acc.get_state_dict(module)

    def main_first(self):
        """Context: the main process runs the block first, then the others."""
        return self.acc.main_process_first()

    def local_minibatch(self, minibatch: int) -> int:
        if minibatch % self.world:
            raise AlignError(f"grpo.minibatch_size={minibatch} must be divisible by the {self.world} processes")
        return minibatch // self.world

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.to(self.device)
        torch.distributed.all_reduce(t)
        return t

    def min(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return float(t)

    def all_gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def reduce_metrics(self, metrics: dict) -> dict:
        """Means over ranks (sums for :data:`SUM_KEYS`, max for ``*_max`` and ``time/*``)."""
        if self.world == 1:
            return metrics
        return combine_metrics(self.all_gather_objects(metrics))

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def full_weights(self, module: torch.nn.Module):
        """Full (unsharded) parameters inside the block on every rank; a no-op unless the backend shards.

        ZeRO-3 gathers through ``deepspeed.zero.GatheredParameters``; FSDP2 unshards each
        ``FSDPModule`` and reshards on exit (in-place edits made inside, such as a LoRA merge, are
        dropped with the unsharded copy).
        """
        backend = self.backend
        if backend == "deepspeed-zero3":
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                yield
        elif backend == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            mods = [m for m in module.modules() if isinstance(m, FSDPModule)]
            for m in mods:
                m.unshard()
            try:
                yield
            finally:
                for m in mods:
                    m.reshard()
        elif backend == "fsdp1":
            raise AlignError("FSDP1 is not supported: use recipes/accelerate/fsdp2.yaml")
        else:
            yield

