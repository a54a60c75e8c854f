"""Peak memory of completion log-probs + backward: naive full fp32 logits vs chunked recompute.

    python bench/logprobs.py                         # V2-Lite head (vocab 102400, hidden 2048), 8 x 4096 tokens
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.grpo.logprobs import token_logprobs  # noqa: E402
from bench.common import write  # noqa: E402


def naive(hidden, head, targets):
    logits = head(hidden).float()
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def run(fn, hidden, head, targets, device):
    h = hidden.detach().clone().requires_grad_(True)
    head.weight.grad = None
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t = time.perf_counter()
    logp = fn(h, head, targets)
    logp.sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    out = {"seconds": time.perf_counter() - t}
    if device == "cuda":
        out["peak_extra_gib"] = (torch.cuda.max_memory_allocated() - base) / 2**30
    return out, logp.detach(), h.grad.detach(), head.weight.grad.detach().clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=102400)
    ap.add_argument("--hidden", type=int, default=2048)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    head = torch.nn.Linear(a.hidden, a.vocab, bias=False, device=device, dtype=dtype)
    hidden = torch.randn(a.batch, a.seq, a.hidden, device=device, dtype=dtype)
    targets = torch.randint(0, a.vocab, (a.batch, a.seq), device=device)
    chunked = lambda h, m, y: token_logprobs(h, m, y)[0]  # noqa: E731
    run(chunked, hidden, head, targets, device)  # warm-up (kernels, allocator)
    ours, lp_o, gh_o, gw_o = run(chunked, hidden, head, targets, device)
    try:
        run(naive, hidden, head, targets, device)
        base, lp_n, gh_n, gw_n = run(naive, hidden, head, targets, device)
        check = {"max_abs_logp_diff": float((lp_o - lp_n).abs().max()),
                 "max_abs_grad_hidden_diff": float((gh_o.float() - gh_n.float()).abs().max()),
                 "grad_hidden_scale": float(gh_n.float().abs().max())}
    except torch.OutOfMemoryError:
        base, check = {"oom": True}, {}
    both = "peak_extra_gib" in ours and "peak_extra_gib" in base
    ratio = base["peak_extra_gib"] / ours["peak_extra_gib"] if both else None
    write(f"logprobs_{device}", {"tokens": a.batch * a.seq, "vocab": a.vocab, "naive": base, "chunked": ours,
                                  "memory_ratio_naive_over_chunked": ratio, "check": check})


if __name__ == "__main__":
    main()
