"""The one way align swaps a module's forward (routed-expert LoRA, dense LoRA, compiled decoder layers)."""

from __future__ import annotations

import types
from typing import Callable, Iterable

import torch


def swap_forwards(modules: Iterable[torch.nn.Module], forward: Callable, keep_as: str) -> int:
    """Bind ``forward(module, *args, **kwargs)`` as each module's forward, keeping the original as
    ``module.<keep_as>`` (the new forward calls it for what it does not handle). Modules that already carry
    ``keep_as`` are skipped, so swapping twice changes nothing. Returns how many were swapped."""
    n = 0
    for module in modules:
        if hasattr(module, keep_as):
            continue
        setattr(module, keep_as, module.forward)
        module.forward = types.MethodType(forward, module)
        n += 1
    return n
