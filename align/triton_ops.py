"""Hand-written Triton kernels for the routed experts' memory-bound steps: SwiGLU, the weighted combine of
the top-k expert outputs and the per-token sum of dispatched gradients (forward and backward).

On V2-Lite (8,192 tokens x top-6 = 49,152 expert rows) inductor's versions of these ran at a quarter to a
sixth of the H100's memory bandwidth (``bench/results/profile_update_compiled_before_ops_cuda.txt``: SwiGLU backward
840 us, the dispatch gather 805 us, its backward sum 559 us per layer), and eager's combine is a gather plus a
batched GEMV. Each kernel here is one program per row (per token for combine and sums), reads each input row
once and does its arithmetic in fp32 rounded once. :mod:`align.moe_ops` wraps them as custom operators.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every supported install has triton; the eager path needs none
    triton = None

_BLOCK = 1024


if triton is not None:
    @triton.jit
    def _swiglu_fwd(gu_ptr, h_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(gu_ptr + row * 2 * inter + cols, mask=mask).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * inter + inter + cols, mask=mask).to(tl.float32)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + row * inter + cols, h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_bwd(gu_ptr, dh_ptr, dgu_ptr, inter, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < inter
        g = tl.load(gu_ptr + row * 2 * inter + cols, mask=mask).to(tl.float32)
        u = tl.load(gu_ptr + row * 2 * inter + inter + cols, mask=mask).to(tl.float32)
        dh = tl.load(dh_ptr + row * inter + cols, mask=mask).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        dg = dh * u * (sig + silu * (1.0 - sig))
        out = dgu_ptr.dtype.element_ty
        tl.store(dgu_ptr + row * 2 * inter + cols, dg.to(out), mask=mask)
        tl.store(dgu_ptr + row * 2 * inter + inter + cols, (dh * silu).to(out), mask=mask)

    @triton.jit
    def _rows_sum(src_ptr, w_ptr, inv_ptr, y_ptr, hidden, K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK: tl.constexpr):
        """y[t] = sum_j (w[t, j] *) src[inv[t * K + j]]: the combine's forward, or without weights the
        dispatch's backward."""
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        acc = tl.zeros([BLOCK], tl.float32)
        for j in tl.static_range(K):
            row = tl.load(inv_ptr + tok * K + j).to(tl.int64)
            x = tl.load(src_ptr + row * hidden + cols, mask=mask).to(tl.float32)
            if WEIGHTED:
                x = x * tl.load(w_ptr + tok * K + j).to(tl.float32)
            acc += x
        tl.store(y_ptr + tok * hidden + cols, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_bwd(out_ptr, w_ptr, inv_ptr, g_ptr, gout_ptr, gw_ptr, hidden, K: tl.constexpr, BLOCK: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < hidden
        g = tl.load(g_ptr + tok * hidden + cols, mask=mask).to(tl.float32)
        for j in tl.static_range(K):
            row = tl.load(inv_ptr + tok * K + j).to(tl.int64)
            w = tl.load(w_ptr + tok * K + j).to(tl.float32)
            o = tl.load(out_ptr + row * hidden + cols, mask=mask).to(tl.float32)
            tl.store(gw_ptr + tok * K + j, tl.sum(o * g, 0).to(gw_ptr.dtype.element_ty))
            tl.store(gout_ptr + row * hidden + cols, (w * g).to(gout_ptr.dtype.element_ty), mask=mask)


def _grid(rows: int, inter: int) -> tuple[int, int]:
    return rows, triton.cdiv(inter, _BLOCK)


def _row_block(hidden: int) -> int:
    return triton.next_power_of_2(hidden)


def swiglu_forward(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``gate_up`` [S, 2I] (gate columns first) -> [S, I]."""
    gate_up = gate_up.contiguous()
    rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
    h = gate_up.new_empty(rows, inter)
    if rows:
        _swiglu_fwd[_grid(rows, inter)](gate_up, h, inter, BLOCK=_BLOCK)
    return h


def swiglu_backward(gate_up: torch.Tensor, dh: torch.Tensor) -> torch.Tensor:
    """Gradient [S, 2I] of :func:`swiglu_forward` at ``gate_up`` for the output gradient ``dh`` [S, I]."""
    gate_up, dh = gate_up.contiguous(), dh.contiguous()
    dgu = torch.empty_like(gate_up)
    if gate_up.shape[0]:
        _swiglu_bwd[_grid(gate_up.shape[0], dh.shape[1])](gate_up, dh, dgu, dh.shape[1], BLOCK=_BLOCK)
    return dgu


def combine_forward(out: torch.Tensor, weights: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * out[inv[t * k + j]]: out [T*k, H], weights [T, k], inv [T*k] -> [T, H]."""
    out, weights, inv = out.contiguous(), weights.contiguous(), inv.contiguous()
    y = out.new_empty(weights.shape[0], out.shape[1])
    if weights.shape[0]:
        _rows_sum[(weights.shape[0],)](out, weights, inv, y, out.shape[1], K=weights.shape[1], WEIGHTED=True,
                                       BLOCK=_row_block(out.shape[1]), num_warps=8)
    return y


def combine_backward(out, weights, inv, grad) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`combine_forward` w.r.t. ``out`` [T*k, H] and ``weights`` [T, k]."""
    out, weights, inv, grad = out.contiguous(), weights.contiguous(), inv.contiguous(), grad.contiguous()
    grad_out, grad_w = torch.empty_like(out), torch.empty_like(weights)
    if weights.shape[0]:
        _combine_bwd[(weights.shape[0],)](out, weights, inv, grad, grad_out, grad_w, out.shape[1], K=weights.shape[1],
                                          BLOCK=_row_block(out.shape[1]), num_warps=8)
    return grad_out, grad_w


def gather_sum(grad: torch.Tensor, inv: torch.Tensor, k: int) -> torch.Tensor:
    """y[t] = sum_j grad[inv[t * k + j]]: grad [T*k, H] -> [T, H] (the backward of copying tokens to experts)."""
    grad, inv = grad.contiguous(), inv.contiguous()
    y = grad.new_empty(grad.shape[0] // k, grad.shape[1])
    if y.shape[0]:
        _rows_sum[(y.shape[0],)](grad, inv, inv, y, grad.shape[1], K=k, WEIGHTED=False,
                                 BLOCK=_row_block(grad.shape[1]), num_warps=8)
    return y
