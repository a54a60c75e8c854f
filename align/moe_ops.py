"""The routed experts' data movement and SwiGLU as custom operators (``torch.ops.align.*``).

As operators they are opaque to ``torch.compile``: a compiled decoder layer calls them as they are instead of
tracing them into inductor kernels, which for these gathers and the SwiGLU backward were several times
slower than the Triton kernels of :mod:`align.triton_ops` (``bench/results/moe_kernels_cuda.json``). CUDA
tensors go through those kernels when Triton is there; everything else through the reference code below,
which is also what the tests compare the kernels with.

Shapes: T tokens, k experts per token, H hidden size, I expert intermediate size; ``perm`` [T*k] sorts
the flattened top-k slots by expert and ``inv`` is its inverse permutation.
"""

from __future__ import annotations

import torch

from align import kernels, triton_ops


def _triton(*tensors: torch.Tensor) -> bool:
    return triton_ops.triton is not None and all(t.is_cuda for t in tensors)


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
    if _triton(grad, inv):
        return triton_ops.gather_sum(grad, inv, k)
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
    if _triton(out, weights, inv):
        return triton_ops.combine_forward(out, weights, inv)
    per_token = out[inv].view(weights.shape[0], weights.shape[1], -1)
    return torch.bmm(weights.unsqueeze(1), per_token).squeeze(1)


@combine.register_fake
def _(out, weights, inv):
    return out.new_empty(weights.shape[0], out.shape[1])


@torch.library.custom_op("align::combine_backward", mutates_args=())
def combine_backward(out: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor,
                     grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`combine` w.r.t. ``out`` [T*k, H] and ``weights`` [T, k] for ``grad`` [T, H]."""
    if _triton(out, weights, inv, grad):
        return triton_ops.combine_backward(out, weights, inv, grad)
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


@torch.library.custom_op("align::swiglu", mutates_args=())
def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` [S, 2I] (gate columns first) -> [S, I]."""
    if _triton(gate_up):
        return triton_ops.swiglu_forward(gate_up)
    return kernels.swiglu(gate_up)


@swiglu.register_fake
def _(gate_up):
    return gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)


@torch.library.custom_op("align::swiglu_backward", mutates_args=())
def swiglu_backward(gate_up: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient [S, 2I] of :func:`swiglu` at ``gate_up`` for the output gradient ``grad`` [S, I]."""
    if _triton(gate_up, grad):
        return triton_ops.swiglu_backward(gate_up, grad)
    gate, up = gate_up.float().chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    g = grad.float()
    return torch.cat((g * up * sig * (1 + gate * (1 - sig)), g * gate * sig), -1).to(gate_up.dtype)


@swiglu_backward.register_fake
def _(gate_up, grad):
    return torch.empty_like(gate_up)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _swiglu_backward(ctx, grad):
    (gate_up,) = ctx.saved_tensors
    return swiglu_backward(gate_up, grad)


swiglu.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)
