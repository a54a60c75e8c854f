"""The routed experts' data movement as custom operators (``torch.ops.align.*``): tokens to expert order and
the weighted top-k sum back (SwiGLU is fused into the LoRA linears of :mod:`align.kernels.lora_ops`).

As operators they are opaque to ``torch.compile``: a compiled decoder layer calls them as they are instead of
tracing them into inductor kernels, which for these gathers were several times slower than the Triton kernels
of :mod:`align.kernels.triton_kernels` (``bench/results/moe_kernels_cuda.json``). CUDA tensors go through those
kernels when Triton is there; everything else through the reference code below, which is also what the tests
compare the kernels with.

Shapes: T tokens, k experts per token, H hidden size; ``perm`` [T*k] sorts
the flattened top-k slots by expert and ``inv`` is its inverse permutation.
"""

from __future__ import annotations

import torch

from align.kernels import triton_kernels


@torch.library.custom_op("align::dispatch", mutates_args=())
def dispatch(hidden: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """Token rows copied to expert order: out[i] = hidden[perm[i] // k]; hidden [T, H] -> [T*k, H].

    Autograd's backward of ``hidden[index]`` would be an atomic index_put; :func:`gather_sum` instead gathers
    each token's k rows through the inverse permutation and sums them."""
    return hidden.index_select(0, perm // k)


@dispatch.register_fake
def _(hidden, perm, inv, k):
    return hidden.new_empty(perm.shape[0], hidden.shape[1])


@torch.library.custom_op("align::gather_sum", mutates_args=())
def gather_sum(grad: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """The backward of :func:`dispatch`: the k expert-order rows of each token summed; [T*k, H] -> [T, H]."""
    if triton_kernels.usable(grad, inv):
        return triton_kernels.gather_sum(grad, inv, k)
    return grad[inv].view(-1, k, grad.shape[-1]).sum(1)


@gather_sum.register_fake
def _(grad, inv, k):
    return grad.new_empty(grad.shape[0] // k, grad.shape[1])


def _dispatch_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[2])
    ctx.k = inputs[3]


def _dispatch_backward(ctx, grad):
    (inv,) = ctx.saved_tensors
    return gather_sum(grad, inv, ctx.k), None, None, None


dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("align::combine", mutates_args=())
def combine(out: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Expert outputs [T*k, H] (expert order) weighted by the router weights [T, k], summed per token -> [T, H].

    Replaces transformers' weighted copy and atomic ``index_add_`` (which rounds every partial sum to bf16):
    each token's k rows are read through ``inv`` and summed in fp32."""
    if triton_kernels.usable(out, weights, inv):
        return triton_kernels.combine_forward(out, weights, inv)
    per_token = out[inv].view(weights.shape[0], weights.shape[1], -1)
    return torch.bmm(weights.unsqueeze(1), per_token).squeeze(1)


@combine.register_fake
def _(out, weights, inv):
    return out.new_empty(weights.shape[0], out.shape[1])


@torch.library.custom_op("align::combine_backward", mutates_args=())
def combine_backward(out: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor,
                     grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`combine` w.r.t. ``out`` [T*k, H] and ``weights`` [T, k] for ``grad`` [T, H]."""
    if triton_kernels.usable(out, weights, inv, grad):
        return triton_kernels.combine_backward(out, weights, inv, grad)
    per_token = out[inv].view(weights.shape[0], weights.shape[1], -1)
    grad_w = torch.bmm(per_token, grad.unsqueeze(-1)).squeeze(-1)
    grad_out = torch.empty_like(out)
    grad_out[inv] = (weights.unsqueeze(-1) * grad.unsqueeze(1)).view(-1, out.shape[-1])
    return grad_out, grad_w


@combine_backward.register_fake
def _(out, weights, inv, grad):
    return torch.empty_like(out), torch.empty_like(weights)


def _combine_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _combine_backward(ctx, grad):
    out, weights, inv = ctx.saved_tensors
    return (*combine_backward(out, weights, inv, grad), None)


combine.register_autograd(_combine_backward, setup_context=_combine_setup)
