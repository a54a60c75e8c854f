"""Name mapping from transformers' DeepSeek-V2 weights to the rollout engine's (vLLM) names."""

from __future__ import annotations

import re
from typing import Iterator

import torch

_FUSED = re.compile(r"^(.*\.mlp\.experts)\.(gate_up_proj|down_proj)$")


def to_engine_names(named: "dict[str, torch.Tensor] | Iterator") -> Iterator[tuple[str, torch.Tensor]]:
    """Split fused routed experts into vLLM's per-expert names; pass everything else through.

    ``experts.gate_up_proj`` [E, 2I, H] -> ``experts.{e}.gate_proj.weight`` (rows :I) and ``up_proj`` (rows I:);
    ``experts.down_proj`` [E, H, I] -> ``experts.{e}.down_proj.weight``.
    """
    items = named.items() if isinstance(named, dict) else named
    for name, t in items:
        m = _FUSED.match(name)
        if not m:
            yield name, t
            continue
        prefix, kind = m.groups()
        for e in range(t.shape[0]):
            if kind == "gate_up_proj":
                gate, up = t[e].chunk(2, dim=0)
                yield f"{prefix}.{e}.gate_proj.weight", gate
                yield f"{prefix}.{e}.up_proj.weight", up
            else:
                yield f"{prefix}.{e}.down_proj.weight", t[e]
