"""Dense LoRA layers as one fused multiply-add: ``y = addmm(x W^T, x A^T, (s B)^T)``.

PEFT's ``lora.Linear`` computes ``base + lora_B(lora_A(x)) * scaling``: two extra full-size elementwise
kernels (the scale and the add) per adapted projection, forward and backward, and again in every
gradient-checkpoint recomputation — about a sixth of a V2-Lite update's GPU time went to such adds and
multiplies (``bench/results/profile_update_cuda.txt``). Folding the scale into the small ``B`` [out, r]
and the add into the GEMM's epilogue gives the same function with neither kernel. Only the forward of
plain, unmerged, single-adapter ``nn.Linear`` layers without dropout changes; anything else (adapters
disabled for the reference pass, merged weights, dropout, DoRA, mixed adapters, fp32 adapters on a bf16
model) keeps PEFT's forward.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F

from align.kernels.swap import swap_forwards


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if self.disable_adapters or self.merged or args or kwargs or len(adapters) != 1:
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    base, lora_A, lora_B = self.base_layer, self.lora_A[name], self.lora_B[name]
    if (name in self.lora_variant or not isinstance(self.lora_dropout[name], torch.nn.Identity)
            or lora_B.bias is not None or type(base) is not torch.nn.Linear
            or not x.dtype == base.weight.dtype == lora_A.weight.dtype):
        return self._peft_forward(x, *args, **kwargs)
    x2 = x.reshape(-1, x.shape[-1])
    up = lora_B.weight * self.scaling[name] if self.scaling[name] != 1 else lora_B.weight
    out = torch.addmm(F.linear(x2, base.weight, base.bias), F.linear(x2, lora_A.weight), up.t())
    return out.view(*x.shape[:-1], out.shape[-1])


def use_addmm_lora(model: torch.nn.Module) -> int:
    """Route every PEFT ``lora.Linear`` through :func:`_forward`; returns how many layers."""
    from peft.tuners.lora.layer import Linear

    return swap_forwards((m for m in model.modules() if type(m) is Linear), _forward, "_peft_forward")
