"""Routed-expert memory-bound steps at V2-Lite size (8,192 tokens x top-6): forward + backward time of eager
PyTorch, of inductor (what ``model.compile_layers`` made of them) and of align's operators (Triton) for the
dispatch and the combine, with the largest difference of outputs and gradients from eager; and the experts' LoRA
MLP (grouped GEMMs with the low-rank terms and SwiGLU) as eager autograd expressions against align's fused LoRA
operators.

    python bench/moe_kernels.py        # H100
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers.integrations.moe import _grouped_mm  # noqa: E402

from align.kernels import lora_ops, moe_ops  # noqa: E402
from align.kernels import patches as kernels  # noqa: E402
from bench.common import write  # noqa: E402


def timed(fn, reps: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def fwd_bwd(f, inputs, grad):
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    out = f(*leaves)
    out.backward(grad)
    return out.detach(), [x.grad for x in leaves if x.grad is not None]


def compare(name, cands, inputs, grad) -> dict:
    res = {}
    ref_out, ref_grads = fwd_bwd(cands[0][1], inputs, grad)
    for label, f in cands:
        out, grads = fwd_bwd(f, inputs, grad)
        res[label] = {"us": timed(lambda: fwd_bwd(f, inputs, grad)),
                      "max_abs_out": float((out.float() - ref_out.float()).abs().max()),
                      "max_abs_grad": max(float((a.float() - b.float()).abs().max()) for a, b in zip(grads, ref_grads))}
        print(name, label, res[label], flush=True)
    return res


def main() -> None:
    tokens, k, hidden, inter, experts = 8192, 6, 2048, 1408, 64
    dev, dt = "cuda", torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    inductor = lambda f: torch.compile(f, dynamic=True)  # noqa: E731  (what model.compile_layers traced them into)
    res = {}
    top = torch.rand(tokens, experts, device=dev, generator=g).topk(k, -1)
    ids, w = top.indices, torch.softmax(top.values, -1)
    _, perm = torch.sort(ids.reshape(-1))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=dev)
    out = torch.randn(tokens * k, hidden, device=dev, dtype=dt, generator=g)
    h = torch.randn(tokens, hidden, device=dev, dtype=dt, generator=g)

    def combine(o, wt):
        return torch.bmm(wt.unsqueeze(1), o[inv].view(tokens, k, hidden)).squeeze(1)

    def dispatch(x):
        return x[perm // k]

    res["combine"] = compare("combine", [("eager", combine), ("inductor", inductor(combine)),
                                         ("align (triton)", lambda o, wt: moe_ops.combine(o, wt, inv))],
                             [out, w.to(dt)], torch.randn(tokens, hidden, device=dev, dtype=dt, generator=g))
    res["dispatch"] = compare("dispatch", [("eager", dispatch), ("inductor", inductor(dispatch)),
                                           ("align (triton backward)", lambda x: moe_ops.dispatch(x, perm, inv, k))],
                              [h], torch.randn(tokens * k, hidden, device=dev, dtype=dt, generator=g))
    res["expert_lora_mlp"] = lora_mlp(ids, hidden, inter, experts, g)
    write("moe_kernels_cuda", res)


def lora_mlp(ids, hidden, inter, experts, g, rank: int = 16) -> dict:
    """gate_up + SwiGLU + down with LoRA r=16 on the expert-sorted rows (frozen bf16 weights): autograd of
    ``base + grouped(grouped(x, A), B)`` (the earlier path) against align's LoRA operators."""
    dev, dt = ids.device, torch.bfloat16
    counts = torch.bincount(ids.reshape(-1), minlength=experts)
    offs = counts.cumsum(0).to(torch.int32)
    rows = int(counts.sum())
    w_gu = torch.randn(experts, 2 * inter, hidden, device=dev, dtype=dt, generator=g) * hidden ** -0.5
    w_d = torch.randn(experts, hidden, inter, device=dev, dtype=dt, generator=g) * inter ** -0.5
    x = torch.randn(rows, hidden, device=dev, dtype=dt, generator=g)
    factors = [torch.randn(experts, hidden, rank, device=dev, dtype=dt, generator=g) * 0.02,
               torch.randn(experts, rank, 2 * inter, device=dev, dtype=dt, generator=g) * 0.02,
               torch.randn(experts, inter, rank, device=dev, dtype=dt, generator=g) * 0.02,
               torch.randn(experts, rank, hidden, device=dev, dtype=dt, generator=g) * 0.02]

    def plain(x, a1, b1, a2, b2):
        gu = _grouped_mm(x, w_gu.transpose(-2, -1), offs) + _grouped_mm(_grouped_mm(x, a1, offs), b1, offs)
        h = kernels.swiglu(gu)
        return _grouped_mm(h, w_d.transpose(-2, -1), offs) + _grouped_mm(_grouped_mm(h, a2, offs), b2, offs)

    def fused(x, a1, b1, a2, b2):
        return lora_ops.linear(lora_ops.swiglu_linear(x, w_gu, a1, b1, offs), w_d, a2, b2, offs)

    return compare("expert_lora_mlp", [("autograd (base + low-rank)", plain), ("align lora ops (triton)", fused)],
                   [x, *factors], torch.randn(rows, hidden, device=dev, dtype=dt, generator=g))


if __name__ == "__main__":
    main()
