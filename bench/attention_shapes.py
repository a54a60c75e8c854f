"""Attention of packed rows at V2-Lite's MLA shape (16 heads, q/k 192, v 128, bf16), forward + backward.

Packed GRPO micro-batches reach attention as rows of ``W`` tokens holding several sequences; transformers' SDPA
path gives them a block-diagonal causal mask ``[R, 1, W, W]``. This times, per new shape ``(R, W)``, the first
call (plans, autotuning and anything else keyed by shape) against a repeat of the same shape, for:

* SDPA with that mask, whatever backend torch picks (and each backend forced, where it accepts the inputs);
* varlen flash attention over the flattened tokens (``torch.nn.attention.varlen``; v zero-padded to 192);
* SDPA causal without a mask on one unpacked sequence at a time (what the padded path would do, per sequence).

    python bench/attention_shapes.py          # GPU
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write  # noqa: E402

HEADS, QK, V = 16, 192, 128


def segments(rows: int, width: int, seed: int) -> list[list[int]]:
    """Per row, sequence lengths (prompt 40-150 + completion up to 256) filling ``width``, last one filler."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        lens, used = [], 0
        while True:
            n = int(torch.randint(40, 151, (1,), generator=g)) + int(torch.randint(1, 257, (1,), generator=g))
            if used + n > width:
                break
            lens.append(n)
            used += n
        lens.append(width - used)
        out.append(lens)
    return out


def block_mask(segs: list[list[int]], width: int, device) -> torch.Tensor:
    ids = torch.tensor([[k for k, n in enumerate(row) for _ in range(n)] for row in segs], device=device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    return (ids[:, :, None] == ids[:, None, :]) & causal


def timed(fn) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def inputs(rows: int, width: int, device, v_dim: int = V):
    q = torch.randn(rows, HEADS, width, QK, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(rows, HEADS, width, QK, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(rows, HEADS, width, v_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    return q, k, v


def sdpa_masked(rows, width, segs, device, backend=None):
    q, k, v = inputs(rows, width, device)
    mask = block_mask(segs, width, device)[:, None]

    def go():
        if backend is None:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            with torch.nn.attention.sdpa_kernel(backend):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        o.sum().backward()
    return go


def varlen(rows, width, segs, device):
    from torch.nn.attention.varlen import varlen_attn

    lens = [n for row in segs for n in row]
    cu = torch.tensor([0] + lens, device=device, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    t = rows * width
    q = torch.randn(t, HEADS, QK, device=device, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(t, HEADS, QK, device=device, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(t, HEADS, V, device=device, dtype=torch.bfloat16, requires_grad=True)
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}

    def go():
        vp = F.pad(v, (0, QK - V))
        o = varlen_attn(q, k, vp, cu, cu, max(lens), max(lens), **causal)[..., :V]
        o.sum().backward()
    return go


def per_sequence(rows, width, segs, device):
    lens = [n for row in segs for n in row[:-1]]
    tensors = [inputs(1, n, device) for n in lens]

    def go():
        for q, k, v in tensors:
            F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    return go


def main() -> None:
    device = "cuda"
    from torch.nn.attention import SDPBackend

    res: dict = {"heads": HEADS, "qk": QK, "v": V}
    try:
        from torch.nn.attention.varlen import varlen_attn
        res["varlen_signature"] = str(inspect.signature(varlen_attn))
    except ImportError as e:
        res["varlen_signature"] = f"missing: {e}"
    shapes = [(16, 1024), (17, 1024), (15, 1152), (4, 4096), (5, 4096), (16, 1024)]
    variants = {"sdpa_mask_auto": lambda r, w, s: sdpa_masked(r, w, s, device),
                "sdpa_mask_cudnn": lambda r, w, s: sdpa_masked(r, w, s, device, SDPBackend.CUDNN_ATTENTION),
                "sdpa_mask_efficient": lambda r, w, s: sdpa_masked(r, w, s, device, SDPBackend.EFFICIENT_ATTENTION),
                "varlen_flash": lambda r, w, s: varlen(r, w, s, device),
                "sdpa_causal_per_sequence": lambda r, w, s: per_sequence(r, w, s, device)}
    for name, make in variants.items():
        rows = []
        for i, (r, w) in enumerate(shapes):
            segs = segments(r, w, seed=i)
            try:
                go = make(r, w, segs)
                first = timed(go)
                again = min(timed(go) for _ in range(3))
                rows.append({"rows": r, "width": w, "first_s": first, "repeat_s": again,
                             "tokens_per_s_repeat": r * w / again})
            except Exception as e:  # a backend that refuses these inputs: say so, go on
                rows.append({"rows": r, "width": w, "error": f"{type(e).__name__}: {str(e)[:160]}"})
                break
        res[name] = rows
        print(name, rows, flush=True)
    write("attention_shapes_cuda", res)


if __name__ == "__main__":
    main()
