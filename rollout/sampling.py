"""Batch-invariant sampling: per-prompt seeds, one Gumbel stream per sampled row.

argmax(log p + Gumbel noise) draws from p; giving every row its own seeded generator makes a
row's sample independent of the rows it shares a batch (or a rank) with. The HF and fast engines
share these, so with equal logits they draw equal samples.
"""

from __future__ import annotations

import torch

from rollout.base import SamplingSettings


def row_seeds(seeds: list[int], n: int) -> list[int]:
    """Seeds of the ``n`` sample rows of each prompt, prompt-major (the rows' order in a batch)."""
    return [seed * 1009 + j for seed in seeds for j in range(n)]


def row_generators(seeds: list[int], device) -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(s % (2 ** 63)) for s in seeds]


def gumbel_noise(gens: list[torch.Generator], vocab: int, device) -> torch.Tensor:
    """[rows, vocab] standard Gumbel noise, one stream per row."""
    u = torch.stack([torch.rand(vocab, generator=g, device=device) for g in gens])
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def prompt_seeds(settings: SamplingSettings, n_prompts: int) -> list[int]:
    """``settings.seeds``, or per-prompt seeds derived from ``settings.seed`` (random when unset)."""
    seeds = settings.seeds
    if seeds is None:
        base = settings.seed if settings.seed is not None else int(torch.randint(0, 2 ** 31, ()))
        seeds = [base * 7919 + i for i in range(n_prompts)]
    if len(seeds) != n_prompts:
        raise ValueError(f"{len(seeds)} seeds for {n_prompts} prompts")
    return seeds
