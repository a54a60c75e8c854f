"""Hand-written Triton kernels for the routed experts' memory-bound steps: the weighted combine of the top-k
expert outputs, the per-token sum of dispatched gradients, and the LoRA terms with the SwiGLU.

On V2-Lite (8,192 tokens x top-6 = 49,152 expert rows) inductor's versions of these ran at a quarter to a
sixth of the H100's memory bandwidth (``bench/results/profile_update_compiled_before_ops_cuda.txt``: SwiGLU backward
840 us, the dispatch gather 805 us, its backward sum 559 us per layer), and eager's combine is a gather plus a
batched GEMV. The combine and sum kernels are one program per token, read each input row once and do their
arithmetic in fp32 rounded once; :mod:`align.kernels.moe_ops` wraps them as custom operators.

The LoRA kernels (``_lora_*``) work on tiles of expert-sorted rows: they add the low-rank term
``a[rows] @ b[expert]`` (r <= 16 columns of ``a``, padded to 16 for ``tl.dot``) to a base product in place, or
feed it straight into the SwiGLU, so the [S, out] low-rank product is never written. :mod:`align.kernels.lora_ops`
wraps them.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - every supported install has triton; the eager path needs none
    triton = None


if triton is not None:
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

    @triton.jit
    def _lowrank(a_ptr, b_ptr, offs_ptr, rows, cols, row_hi, n_rows, n_cols, b_stride, n_experts,
                 R: tl.constexpr, RP: tl.constexpr, EP: tl.constexpr, IEEE: tl.constexpr):
        """fp32 tile a[rows] @ b[expert(row)][:, cols] (cols < n_cols; b's rows ``b_stride`` apart) for rows
        sorted by expert (``offs``: cumulative row counts). A tile spans one expert or, at boundaries, a few:
        one small dot per expert present."""
        experts = tl.arange(0, EP)
        ends = tl.load(offs_ptr + experts, mask=experts < n_experts, other=2147483647)
        first = tl.sum((ends <= tl.min(rows, 0)).to(tl.int32), 0)
        last = tl.sum((ends <= row_hi).to(tl.int32), 0)
        rank = tl.arange(0, RP)
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * R + rank[None, :],
                    mask=(rows[:, None] < n_rows) & (rank[None, :] < R), other=0.0)
        acc = tl.zeros([rows.shape[0], cols.shape[0]], tl.float32)
        for e in range(first, last + 1):
            start = tl.load(offs_ptr + e - 1, mask=e > 0, other=0)
            end = tl.load(offs_ptr + e)
            mine = ((rows >= start) & (rows < end))[:, None] & (rank[None, :] < R)
            b = tl.load(b_ptr + e * R * b_stride + rank[:, None] * b_stride + cols[None, :],
                        mask=(rank[:, None] < R) & (cols[None, :] < n_cols), other=0.0)
            if IEEE:
                acc += tl.dot(tl.where(mine, a, tl.zeros_like(a)), b, input_precision="ieee")
            else:
                acc += tl.dot(tl.where(mine, a, tl.zeros_like(a)), b)
        return acc

    @triton.jit
    def _lora_add(y_ptr, a_ptr, b_ptr, offs_ptr, n_rows, n_cols, n_experts, R: tl.constexpr, RP: tl.constexpr,
                  EP: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """y[rows of e] += a[rows of e] @ b[e] in place, rounded once."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_hi = tl.minimum(tl.program_id(0) * BM + BM, n_rows) - 1
        low = _lowrank(a_ptr, b_ptr, offs_ptr, rows, cols, row_hi, n_rows, n_cols, n_cols, n_experts, R, RP, EP,
                       IEEE)
        mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
        ptr = y_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        y = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) + low
        tl.store(ptr, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _lora_gate_up(gu_ptr, a_ptr, b_ptr, offs_ptr, rows, cols, row_hi, n_rows, inter, n_experts,
                      R: tl.constexpr, RP: tl.constexpr, EP: tl.constexpr, IEEE: tl.constexpr):
        """fp32 gate and up tiles of base + a @ b[e] (b [E, R, 2 * inter], gate columns first)."""
        mask = (rows[:, None] < n_rows) & (cols[None, :] < inter)
        ptr = gu_ptr + rows[:, None].to(tl.int64) * 2 * inter + cols[None, :]
        g = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(ptr + inter, mask=mask, other=0.0).to(tl.float32)
        g += _lowrank(a_ptr, b_ptr, offs_ptr, rows, cols, row_hi, n_rows, inter, 2 * inter, n_experts,
                      R, RP, EP, IEEE)
        u += _lowrank(a_ptr, b_ptr + inter, offs_ptr, rows, cols, row_hi, n_rows, inter, 2 * inter, n_experts,
                      R, RP, EP, IEEE)
        return g, u, mask

    @triton.jit
    def _lora_swiglu_fwd(gu_ptr, a_ptr, b_ptr, offs_ptr, h_ptr, n_rows, inter, n_experts, R: tl.constexpr,
                         RP: tl.constexpr, EP: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_hi = tl.minimum(tl.program_id(0) * BM + BM, n_rows) - 1
        g, u, mask = _lora_gate_up(gu_ptr, a_ptr, b_ptr, offs_ptr, rows, cols, row_hi, n_rows, inter, n_experts,
                                   R, RP, EP, IEEE)
        h = g * tl.sigmoid(g) * u
        tl.store(h_ptr + rows[:, None].to(tl.int64) * inter + cols[None, :], h.to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _lora_swiglu_bwd(gu_ptr, a_ptr, b_ptr, offs_ptr, dh_ptr, dgu_ptr, n_rows, inter, n_experts,
                         R: tl.constexpr, RP: tl.constexpr, EP: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr,
                         BN: tl.constexpr):
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        cols = tl.program_id(1) * BN + tl.arange(0, BN)
        row_hi = tl.minimum(tl.program_id(0) * BM + BM, n_rows) - 1
        g, u, mask = _lora_gate_up(gu_ptr, a_ptr, b_ptr, offs_ptr, rows, cols, row_hi, n_rows, inter, n_experts,
                                   R, RP, EP, IEEE)
        dh = tl.load(dh_ptr + rows[:, None].to(tl.int64) * inter + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        silu = g * sig
        out = dgu_ptr.dtype.element_ty
        ptr = dgu_ptr + rows[:, None].to(tl.int64) * 2 * inter + cols[None, :]
        tl.store(ptr, (dh * u * (sig + silu * (1.0 - sig))).to(out), mask=mask)
        tl.store(ptr + inter, (dh * silu).to(out), mask=mask)


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these kernels can run on ``tensors`` (Triton installed, all on a GPU)."""
    return triton is not None and all(t.is_cuda for t in tensors)


def _row_block(hidden: int) -> int:
    return triton.next_power_of_2(hidden)


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


_BM, _BN = 64, 64


def _lora_meta(a: torch.Tensor, offs: torch.Tensor) -> dict:
    rank = a.shape[1]
    return dict(R=rank, RP=max(16, triton.next_power_of_2(rank)), EP=max(16, triton.next_power_of_2(offs.numel())),
                IEEE=a.dtype == torch.float32, BM=_BM, BN=_BN)


def lora_add_(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y[rows of e] += a[rows of e] @ b[e] in place: y [S, N] (rows sorted by expert), a [S, r], b [E, r, N],
    offs [E] cumulative row counts. Replaces the [S, N] low-rank product and the add of a LoRA path."""
    assert y.is_contiguous()
    a, b, offs = a.contiguous(), b.contiguous(), offs.contiguous()
    if y.shape[0]:
        grid = (triton.cdiv(y.shape[0], _BM), triton.cdiv(y.shape[1], _BN))
        _lora_add[grid](y, a, b, offs, y.shape[0], y.shape[1], offs.numel(), **_lora_meta(a, offs))
    return y


def lora_swiglu_forward(gate_up: torch.Tensor, a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """SwiGLU of ``gate_up + a @ b[e]`` row-wise: gate_up [S, 2I], a [S, r], b [E, r, 2I] -> [S, I]; the
    adapted pre-activation is never written."""
    gate_up, a, b, offs = gate_up.contiguous(), a.contiguous(), b.contiguous(), offs.contiguous()
    inter = gate_up.shape[1] // 2
    h = gate_up.new_empty(gate_up.shape[0], inter)
    if h.shape[0]:
        grid = (triton.cdiv(h.shape[0], _BM), triton.cdiv(inter, _BN))
        _lora_swiglu_fwd[grid](gate_up, a, b, offs, h, h.shape[0], inter, offs.numel(), **_lora_meta(a, offs))
    return h


def lora_swiglu_backward(gate_up, a, b, offs, dh) -> torch.Tensor:
    """Gradient [S, 2I] w.r.t. the adapted pre-activation of :func:`lora_swiglu_forward` for ``dh`` [S, I]."""
    gate_up, a, b, offs, dh = (t.contiguous() for t in (gate_up, a, b, offs, dh))
    dgu = torch.empty_like(gate_up)
    if dh.shape[0]:
        grid = (triton.cdiv(dh.shape[0], _BM), triton.cdiv(dh.shape[1], _BN))
        _lora_swiglu_bwd[grid](gate_up, a, b, offs, dh, dgu, dh.shape[0], dh.shape[1], offs.numel(),
                               **_lora_meta(a, offs))
    return dgu
