"""One vLLM engine shared by a tensor-parallel group of trainer ranks (colocated, external launcher).

With ``rollout.tensor_parallel_size = k`` under ``accelerate launch``, ranks ``[i*k, (i+1)*k)`` form one
vLLM engine (``distributed_executor_backend="external_launcher"``): every rank of the group must
submit the same requests. This wrapper gathers the group's prompts and seeds, generates them all on
every member and hands each rank back its own rollouts, so the loop above never sees the difference.
"""

from __future__ import annotations

import dataclasses

import torch

from rollout.base import Rollout, SamplingSettings


def tp_groups(world: int, tp: int) -> list[list[int]]:
    """Consecutive rank groups of size ``tp`` (the layout vLLM's external launcher expects)."""
    if tp < 1 or world % tp:
        raise ValueError(f"rollout.tensor_parallel_size={tp} must divide the {world} processes")
    return [list(range(i, i + tp)) for i in range(0, world, tp)]


class TPGroupEngine:
    """Gathers prompts across ``group`` (a torch.distributed process group), generates, scatters back."""

    def __init__(self, inner, group, group_rank: int):
        self.inner, self.group, self.group_rank = inner, group, group_rank
        self.name = f"{inner.name}-tp{torch.distributed.get_world_size(group)}"
        self.shares_weights = getattr(inner, "shares_weights", False)

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[Rollout]:
        size = torch.distributed.get_world_size(self.group)
        parts: list = [None] * size
        torch.distributed.all_gather_object(parts, (prompts, settings.seeds), group=self.group)
        all_prompts = [p for ps, _ in parts for p in ps]
        seeds = None if settings.seeds is None else [s for _, ss in parts for s in ss]
        out = self.inner.generate(all_prompts, dataclasses.replace(settings, seeds=seeds))
        start = sum(len(ps) for ps, _ in parts[: self.group_rank])
        return out[start:start + len(prompts)]

    def update_weights(self, named_tensors) -> float:
        return self.inner.update_weights(named_tensors)

    def sleep(self) -> None:
        self.inner.sleep()

    def wake_up(self, push=None) -> None:
        self.inner.wake_up(push)

    @property
    def startup(self) -> dict:
        return getattr(self.inner, "startup", {})

    @property
    def needs_full_sync(self) -> bool:
        return getattr(self.inner, "needs_full_sync", False)

    @property
    def last_sync(self) -> dict:
        return getattr(self.inner, "last_sync", {})
