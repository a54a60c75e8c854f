"""LoRA linears of the routed experts as custom operators (``torch.ops.align.lora_*``).

Written with autograd, ``grouped_mm(x, W) + grouped_mm(grouped_mm(x, A), B)`` writes the [S, out] low-rank
product, reads it back for the add, and in the backward does the same for the input gradient (autograd sums
the two paths' gradients). On V2-Lite those adds alone were 6% of a compiled update's GPU time
(``bench/results/profile_update_compiled_cuda.txt``). Here the low-rank term is added inside a Triton kernel
that reads the [S, r] factor product and each expert's [r, out] factor, in place on the base product
(:func:`align.kernels.triton_kernels.lora_add_`); for ``gate_up`` it goes straight into the SwiGLU, so the adapted
pre-activation is never written (the backward recomputes it from the saved base product). ``lora_expert_mlp``
runs the whole routed MLP (dispatch, both linears, SwiGLU) as one operator whose backward keeps the tokens instead of
their expert-order copy and recomputes the SwiGLU output: 41.5 KB less per token and MoE layer of V2-Lite in bf16;
on the H200 the unrecomputed update's trainer peak fell from 123.1 to 102.6 GiB at 16,384 tokens per micro-batch
(``bench/h200.sh update``, bench/README.md).

Shapes: S rows sorted by expert, ``offs`` [E] int32 cumulative row counts; ``weight`` [E, out, in] (transformers'
fused layout), ``down`` [E, in, r], ``up`` [E, r, out] (LoRA scaling folded in). CUDA tensors with Triton take
the kernels; everything else the reference code here (the CPU path and what the tests compare with). The ops
make the small factors contiguous themselves, so a compiled layer may trace their construction (one graph per layer).
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import _grouped_mm

from align.kernels import moe_ops, patches, triton_kernels


def _gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """x [S, in] @ w[e] [in, out] per expert's rows; float64 (finite-difference checks) through transformers' loop."""
    if x.is_cuda and x.dtype == w.dtype == torch.bfloat16:  # skips transformers' per-call checks (CPU time)
        return torch._grouped_mm(x, w, offs=offs)
    if torch.float64 in (x.dtype, w.dtype):  # grouped_mm kernels stop at fp32
        return torch.ops.transformers.grouped_mm_fallback(x.to(w.dtype), w, offs)
    return _grouped_mm(x, w, offs)


def _per_expert_outer(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """[E, p, q] = a_e^T @ b_e over each expert's rows of a [S, p], b [S, q] (the factors' weight gradients)."""
    if a.is_cuda and a.dtype == b.dtype == torch.bfloat16:
        return torch._grouped_mm(a.t(), b, offs=offs)
    out = a.new_zeros(offs.numel(), a.shape[1], b.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):  # reference path: one host sync, a loop over experts
        if end > start:
            torch.mm(a[start:end].t(), b[start:end], out=out[e])
        start = end
    return out


def _add_lowrank_(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y += a_e @ b_e per expert's rows, in place on the fresh product ``y``."""
    if triton_kernels.usable(y, a, b):
        return triton_kernels.lora_add_(y.contiguous(), a, b.to(a.dtype), offs)
    return y.add_(_gmm(a, b, offs))


@torch.library.custom_op("align::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, xa): y [S, out] = x_e W_e^T + (x_e A_e) B_e per expert's rows of x [S, in]; xa = x_e A_e [S, r]
    is returned for the backward."""
    down, up = down.contiguous(), up.contiguous()
    xa = _gmm(x, down, offs)
    return _add_lowrank_(_gmm(x, weight.transpose(-2, -1), offs), xa, up, offs), xa


@lora_linear.register_fake
def _(x, weight, down, up, offs):
    return x.new_empty(x.shape[0], weight.shape[1], dtype=weight.dtype), x.new_empty(x.shape[0], down.shape[2],
                                                                                     dtype=down.dtype)


@torch.library.custom_op("align::lora_linear_backward", mutates_args=())
def lora_linear_backward(grad: torch.Tensor, x: torch.Tensor, xa: torch.Tensor, weight: torch.Tensor,
                         down: torch.Tensor, up: torch.Tensor,
                         offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`lora_linear`'s y w.r.t. x [S, in], down [E, in, r] and up [E, r, out]."""
    down, up = down.contiguous(), up.contiguous()
    gb = _gmm(grad, up.transpose(-2, -1), offs)
    grad_x = _add_lowrank_(_gmm(grad, weight, offs), gb, down.transpose(-2, -1), offs)
    return grad_x, _per_expert_outer(x.to(gb.dtype), gb, offs), _per_expert_outer(xa, grad.to(xa.dtype), offs)


@lora_linear_backward.register_fake
def _(grad, x, xa, weight, down, up, offs):
    return x.new_empty(x.shape, dtype=weight.dtype), down.new_empty(down.shape), up.new_empty(up.shape)


def _linear_setup(ctx, inputs, output):
    x, weight, down, up, offs = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, output[1], weight, down, up, offs)


def _linear_backward(ctx, grad, _):
    x, xa, weight, down, up, offs = ctx.saved_tensors
    grad_x, grad_down, grad_up = lora_linear_backward(grad, x, xa, weight, down, up, offs)
    return grad_x.to(x.dtype), None, grad_down, grad_up, None


lora_linear.register_autograd(_linear_backward, setup_context=_linear_setup)


@torch.library.custom_op("align::lora_swiglu_linear", mutates_args=())
def lora_swiglu_linear(x: torch.Tensor, weight: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                       offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, gate_up, xa): h [S, I] = SwiGLU of :func:`lora_linear`'s y (out = 2I, gate columns first); the base
    product gate_up [S, 2I] and xa [S, r] are returned for the backward."""
    down, up = down.contiguous(), up.contiguous()
    xa = _gmm(x, down, offs)
    gate_up = _gmm(x, weight.transpose(-2, -1), offs)
    return _swiglu_of(gate_up, xa, up, offs), gate_up, xa


def _swiglu_of(gate_up: torch.Tensor, xa: torch.Tensor, up: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """SwiGLU of the adapted pre-activation ``gate_up + xa_e B_e`` [S, 2I] -> [S, I] (the low-rank term added inside
    the Triton kernel on CUDA)."""
    if triton_kernels.usable(gate_up, xa, up):
        return triton_kernels.lora_swiglu_forward(gate_up, xa, up.to(xa.dtype), offs)
    return patches.swiglu(gate_up + _gmm(xa, up, offs)).to(gate_up.dtype)


@torch.library.custom_op("align::lora_swiglu", mutates_args=())
def lora_swiglu(gate_up: torch.Tensor, xa: torch.Tensor, up: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """:func:`_swiglu_of` as an operator, for backwards that recompute h [S, I]: a traced (compiled) backward may
    only call operators, never the Triton kernel itself."""
    return _swiglu_of(gate_up, xa, up.contiguous(), offs)


@lora_swiglu.register_fake
def _(gate_up, xa, up, offs):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@lora_swiglu_linear.register_fake
def _(x, weight, down, up, offs):
    rows, out = x.shape[0], weight.shape[1]
    return (x.new_empty(rows, out // 2, dtype=weight.dtype), x.new_empty(rows, out, dtype=weight.dtype),
            x.new_empty(rows, down.shape[2], dtype=down.dtype))


@torch.library.custom_op("align::lora_swiglu_backward", mutates_args=())
def lora_swiglu_backward(gate_up: torch.Tensor, xa: torch.Tensor, up: torch.Tensor, offs: torch.Tensor,
                         grad: torch.Tensor) -> torch.Tensor:
    """Gradient [S, 2I] w.r.t. the adapted pre-activation ``gate_up + xa_e B_e`` of :func:`lora_swiglu_linear`."""
    up = up.contiguous()
    if triton_kernels.usable(gate_up, xa, up, grad):
        return triton_kernels.lora_swiglu_backward(gate_up, xa, up.to(xa.dtype), offs, grad)
    return patches.swiglu_grad((gate_up + _gmm(xa, up, offs)).to(gate_up.dtype), grad)


@lora_swiglu_backward.register_fake
def _(gate_up, xa, up, offs, grad):
    return torch.empty_like(gate_up)


def _swiglu_setup(ctx, inputs, output):
    x, weight, down, up, offs = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.save_for_backward(x, output[1], output[2], weight, down, up, offs)


def _swiglu_linear_backward(ctx, grad, _gate_up, _xa):
    x, gate_up, xa, weight, down, up, offs = ctx.saved_tensors
    pre = lora_swiglu_backward(gate_up, xa, up, offs, grad)
    grad_x, grad_down, grad_up = lora_linear_backward(pre, x, xa, weight, down, up, offs)
    return grad_x.to(x.dtype), None, grad_down, grad_up, None


lora_swiglu_linear.register_autograd(_swiglu_linear_backward, setup_context=_swiglu_setup)


@torch.library.custom_op("align::lora_expert_mlp", mutates_args=())
def lora_expert_mlp(hidden: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor, k: int, gu_weight: torch.Tensor,
                    gu_down: torch.Tensor, gu_up: torch.Tensor, d_weight: torch.Tensor, d_down: torch.Tensor,
                    d_up: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                     torch.Tensor]:
    """The routed experts' adapted SwiGLU MLP, dispatch included: (out, gate_up, xa1, xa2) with out [S, H] =
    :func:`lora_linear` (down) of :func:`lora_swiglu_linear` (gate_up) of x = hidden[perm // k] ([T, H] tokens to
    S = T*k rows in expert order; ``inv`` inverts ``perm``, as for ``moe_ops.dispatch``); the rest is kept for the
    backward.

    Same function as ``dispatch`` -> ``swiglu_linear`` -> ``linear``, but the backward keeps less: the tokens [T, H]
    (held anyway by the layer) instead of their expert-order copy x [S, H], and no SwiGLU output [S, I] (recomputed
    from the saved base product): per token and MoE layer of V2-Lite, k*(H + I)*2 = 41.5 KB fewer bytes in bf16."""
    x = hidden.index_select(0, perm // k)
    h, gate_up, xa1 = lora_swiglu_linear(x, gu_weight, gu_down, gu_up, offs)
    out, xa2 = lora_linear(h, d_weight, d_down, d_up, offs)
    return out, gate_up, xa1, xa2


@lora_expert_mlp.register_fake
def _(hidden, perm, inv, k, gu_weight, gu_down, gu_up, d_weight, d_down, d_up, offs):
    rows = perm.shape[0]
    return (hidden.new_empty(rows, d_weight.shape[1], dtype=d_weight.dtype),
            hidden.new_empty(rows, gu_weight.shape[1], dtype=gu_weight.dtype),
            hidden.new_empty(rows, gu_down.shape[2], dtype=gu_down.dtype),
            hidden.new_empty(rows, d_down.shape[2], dtype=d_down.dtype))


def _mlp_setup(ctx, inputs, output):
    hidden, perm, inv, k, gu_weight, gu_down, gu_up, d_weight, d_down, d_up, offs = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.k = k
    ctx.save_for_backward(hidden, perm, inv, output[1], output[2], output[3], gu_weight, gu_down, gu_up, d_weight,
                          d_down, d_up, offs)


def _mlp_backward(ctx, grad, *_):
    hidden, perm, inv, gate_up, xa1, xa2, gu_weight, gu_down, gu_up, d_weight, d_down, d_up, offs = ctx.saved_tensors
    h = lora_swiglu(gate_up, xa1, gu_up, offs)
    grad_h, g_d_down, g_d_up = lora_linear_backward(grad, h, xa2, d_weight, d_down, d_up, offs)
    del h
    pre = lora_swiglu_backward(gate_up, xa1, gu_up, offs, grad_h.to(gate_up.dtype))
    x = hidden.index_select(0, perm // ctx.k)
    grad_x, g_gu_down, g_gu_up = lora_linear_backward(pre, x, xa1, gu_weight, gu_down, gu_up, offs)
    grad_hidden = moe_ops.gather_sum(grad_x.to(hidden.dtype), inv, ctx.k)
    return grad_hidden, None, None, None, None, g_gu_down, g_gu_up, None, g_d_down, g_d_up, None


lora_expert_mlp.register_autograd(_mlp_backward, setup_context=_mlp_setup)


def expert_mlp(hidden, perm, inv, k, gate_up: tuple, down: tuple, offs) -> torch.Tensor:
    """out [T*k, H] of :func:`lora_expert_mlp`; ``gate_up`` and ``down`` are (weight, down factor, up factor)."""
    return lora_expert_mlp(hidden, perm, inv, k, *gate_up, *down, offs)[0]


def linear(x, weight, down, up, offs) -> torch.Tensor:
    """y [S, out] of :func:`lora_linear` (differentiable in x, down and up)."""
    return lora_linear(x, weight, down, up, offs)[0]


def swiglu_linear(x, weight, down, up, offs) -> torch.Tensor:
    """h [S, I] of :func:`lora_swiglu_linear` (differentiable in x, down and up)."""
    return lora_swiglu_linear(x, weight, down, up, offs)[0]
