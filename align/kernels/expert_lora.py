"""LoRA on fused routed experts without materializing W + ΔW.

PEFT 0.21 reaches ``experts.gate_up_proj`` / ``experts.down_proj`` through ``ParamWrapper``, which on
every forward builds the full adapted weight stack (64 experts x (2816x2048 + 2048x1408) values per
V2-Lite layer, about 1.1 GB in bf16) and keeps it for the backward pass. Here the same PEFT
parameters are applied as low-rank grouped products on the routed tokens only:

    y = grouped_mm(x, W) + s * grouped_mm(grouped_mm(x, A), B)

which is the same function (same adapter, same saved format), with O(tokens x r) extra activations. The
operators of :mod:`align.kernels.lora_ops` compute it with the low-rank term fused into the add (and into the SwiGLU);
for SwiGLU experts the dispatch, both linears and the SwiGLU are one operator (``lora_expert_mlp``) that keeps less
for the backward.
Only the forward of the outermost wrapper changes; merging, disabling, saving and loading stay PEFT's.
"""

from __future__ import annotations


import torch

from align.kernels import lora_ops, moe_ops
from align.kernels.swap import swap_forwards


def _factors(wrapper, adapter: str):
    """(in->r, r->out) weight stacks [E, in, r], [E, r, out] of one ParamWrapper, scaling folded into the
    second (a small tensor) rather than into the [S, out] product."""
    lhs, rhs, scaling = wrapper.get_delta_factors(adapter)  # delta [E, out, in] = lhs [E, out, r] @ rhs [E, r, in]
    return rhs.transpose(-2, -1), lhs.transpose(-2, -1) * scaling


def _forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
             *args, **kwargs) -> torch.Tensor:
    inner = self.base_layer
    experts = inner.base_layer
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or inner.merged or len(adapters) != 1 or args or kwargs:
        return self._peft_forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
    k = top_k_index.shape[-1]
    expert_ids, perm = torch.sort(top_k_index.reshape(-1))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    counts = torch.histc(expert_ids.float() if expert_ids.device.type == "cpu" else expert_ids.int(),
                         bins=experts.num_experts, min=0, max=experts.num_experts - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gate_up = (experts.gate_up_proj, *_factors(inner, adapters[0]))
    down = (experts.down_proj, *_factors(self, adapters[0]))
    if experts.config.hidden_act == "silu":  # dispatch, SwiGLU and both linears in one operator (less kept)
        out = lora_ops.expert_mlp(hidden_states, perm, inv, k, gate_up, down, offs)
    else:
        h = _act(experts, lora_ops.linear(moe_ops.dispatch(hidden_states, perm, inv, k), *gate_up, offs))
        out = lora_ops.linear(h, *down, offs)
    weights = top_k_weights.reshape(-1, k).to(out.dtype)
    return moe_ops.combine(out, weights, inv).to(hidden_states.dtype)


def _act(experts, gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return experts.act_fn(gate) * up


def use_grouped_expert_lora(model: torch.nn.Module) -> int:
    """Route every PEFT-wrapped fused-experts module through :func:`_forward`; returns how many."""
    def fused_experts(module) -> bool:
        inner = getattr(module, "base_layer", None)
        return (type(module).__name__ == "ParamWrapper" and getattr(module, "parameter_name", "") == "down_proj"
                and getattr(inner, "parameter_name", "") == "gate_up_proj"
                and hasattr(getattr(inner, "base_layer", None), "gate_up_proj"))

    return swap_forwards(filter(fused_experts, model.modules()), _forward, "_peft_forward")
