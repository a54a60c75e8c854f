"""Compiled patches of transformers' DeepSeek-V2 for training on GPUs (torch.compile, one graph per op).

Before these, a LoRA update of V2-Lite spent about half its GPU time in elementwise kernels: RMSNorm's fp32 round
trip, the complex-number rope and the vocabulary-wide log-softmax each launch several full-size kernels. Each is
compiled here as a pure function of its tensors (weights passed as arguments, so every layer shares one compiled
graph) and patched into transformers' DeepSeek-V2 module. :func:`compile_decoder_layers` goes further and compiles
whole layers. The routed experts' SwiGLU is not here: it runs fused into the LoRA grouped linears
(:mod:`align.kernels.lora_ops`); :func:`swiglu` / :func:`swiglu_grad` are its reference (CPU) math. GPU only: on
the CPU nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from align.kernels.cache import use_kernel_cache
from align.kernels.swap import swap_forwards

_PATCHED = False


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor):
    """transformers' DeepSeek-V2 ``apply_rotary_emb`` in real arithmetic (inductor has no complex ops)."""
    cos, sin = freqs_cis.real.unsqueeze(1), freqs_cis.imag.unsqueeze(1)

    def rot(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 2)
        a, b = pairs[..., 0], pairs[..., 1]
        return torch.stack((a * cos - b * sin, a * sin + b * cos), -1).flatten(-2).type_as(x)

    return rot(xq), rot(xk)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_grad(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient [S, 2I] of :func:`swiglu` at ``gate_up`` [S, 2I] for the output gradient ``grad`` [S, I], in fp32
    rounded once to ``gate_up``'s dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    g = grad.float()
    return torch.cat((g * up * sig * (1 + gate * (1 - sig)), g * gate * sig), -1).to(gate_up.dtype)


def logp_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T)[targets]: logits [N, V] (any float dtype), targets [N] -> [N] fp32."""
    scaled = logits.float() / temperature
    return scaled.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, -1)


_logp_compiled = None

def fused_logp_from_logits(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """:func:`logp_from_logits` as one compiled reduction (no fp32 copy of the [N, V] logits) once patched."""
    return (_logp_compiled or logp_from_logits)(logits, targets, temperature)


def can_compile_for_gpu() -> bool:
    """A GPU and Triton (inductor's GPU backend) are there."""
    if not torch.cuda.is_available():
        return False
    from torch.utils._triton import has_triton

    return has_triton()


def use_fused_kernels() -> bool:
    """Patch RMSNorm, rope and the log-prob reduction with compiled versions when a GPU is present (the
    experts' SwiGLU runs inside the LoRA operators, :mod:`align.kernels.lora_ops`)."""
    global _PATCHED, _logp_compiled
    if _PATCHED or not can_compile_for_gpu():  # without inductor's GPU backend the unfused ops stay
        return _PATCHED
    use_kernel_cache()
    _dynamo_settings()
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

    rms = torch.compile(_rms_norm, dynamic=True)
    m.DeepseekV2RMSNorm.forward = lambda self, x: rms(x, self.weight, self.variance_epsilon)
    m.apply_rotary_emb = torch.compile(_rope, dynamic=True)
    _logp_compiled = torch.compile(logp_from_logits, dynamic=True)
    _PATCHED = True
    return True


def compile_decoder_layers(model: torch.nn.Module, backend: str = "inductor") -> int:
    """``torch.compile`` every decoder layer that is not recomputed, for training forwards only.

    Inductor then fuses the elementwise work between the GEMMs (residual adds, the LoRA products' adds,
    routing weights, norms) and launches fewer kernels. Recomputed layers stay eager: a compiled layer's
    recomputation saves tensors of other metadata than its forward did, which checkpointing rejects.
    Evaluation and no-grad passes (old/reference log-probs, generation) keep the eager forward, so their
    caches and shapes never trigger recompilation. Returns how many layers were compiled.
    """
    use_kernel_cache()
    _dynamo_settings()
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")
              and not getattr(m, "gradient_checkpointing", False) and not hasattr(m, "_eager_forward")]
    for layer in layers:
        layer._compiled_forward = torch.compile(layer.forward, dynamic=True, backend=backend)
    return swap_forwards(layers, _train_dispatch, "_eager_forward")


def _dynamo_settings() -> None:
    """What align's compiled functions and layers need of dynamo (process-wide, as dynamo's config is).

    ``recompile_limit`` 64: one graph per norm width (hidden, latent), rank (training 3D, decoding 2D) and grad mode,
    and per layer kind (dense, MoE; every other layer reuses one, parameters being inputs); past dynamo's 8 the rest
    ran eagerly (seen on the H200 when align grpo's decoder followed SFT in one process).

    ``specialize_float``: Python floats (norm eps, attention and LoRA scales, the sampling temperature) are constants
    of the graphs. Left symbolic, as dynamo does by default, each new frame was traced, handed to AOT autograd and
    then traced again from the start when the float-to-tensor pass gave up ("Restarting analysis due to
    _tensorify_python_scalars"), and that first attempt's AOT-autograd entry never reached the kernel cache, so a
    warm run paid for it again. CPU, tiny model, 3 compiled layers: warm first step 8.7-9.9 s -> 4.9-6.2 s. These
    floats are fixed for a run, so no recompilation follows."""
    import torch._dynamo as dynamo

    dynamo.config.recompile_limit = max(64, dynamo.config.recompile_limit)
    dynamo.config.specialize_float = True


def runs_compiled(layers) -> bool:
    """Whether a forward through ``layers`` now takes a compiled graph (:func:`compile_decoder_layers`): training
    mode, gradients on, some layer compiled."""
    return torch.is_grad_enabled() and any(layer.training and hasattr(layer, "_compiled_forward") for layer in layers)


def _train_dispatch(layer: torch.nn.Module, *args, **kwargs):
    if layer.training and torch.is_grad_enabled():
        return layer._compiled_forward(*args, **kwargs)
    return layer._eager_forward(*args, **kwargs)
