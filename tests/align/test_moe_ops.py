"""The routed experts' custom operators: reference paths against autograd and finite differences, the
Triton kernels (through Triton's CPU interpreter) against the reference paths, and opacity to torch.compile."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from align.kernels import moe_ops, triton_kernels as triton_ops
from align.kernels import patches as kernels

ROOT = Path(__file__).resolve().parents[2]


def _routing(tokens=7, k=3, experts=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    top = torch.rand(tokens, experts, generator=g).topk(k, -1)
    _, perm = torch.sort(top.indices.reshape(-1))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return perm, inv, torch.softmax(top.values, -1)


def test_ops_match_autograd_of_the_plain_expressions():
    perm, inv, w = _routing()
    tokens, k = w.shape
    h = torch.randn(tokens, 6, requires_grad=True)
    w = w.clone().requires_grad_()
    gu = torch.randn(tokens * k, 8, requires_grad=True)

    def plain():
        x = h[perm // k]
        act = (kernels.swiglu(gu) * x[:, :4].sum(-1, keepdim=True)).sum(-1, keepdim=True) * x
        return torch.bmm(w.unsqueeze(1), act[inv].view(tokens, k, -1)).squeeze(1)

    def ops():
        x = moe_ops.dispatch(h, perm, inv, k)
        act = (kernels.swiglu(gu) * x[:, :4].sum(-1, keepdim=True)).sum(-1, keepdim=True) * x
        return moe_ops.combine(act, w, inv)

    grad = torch.randn(tokens, 6)
    want = torch.autograd.grad(plain(), (h, w, gu), grad)
    out = ops()
    got = torch.autograd.grad(out, (h, w, gu), grad)
    torch.testing.assert_close(out, plain())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_backwards_match_finite_differences():
    perm, inv, w = _routing(seed=1)
    tokens, k = w.shape
    d = torch.float64
    h = torch.randn(tokens, 4, dtype=d, requires_grad=True)
    out = torch.randn(tokens * k, 4, dtype=d, requires_grad=True)
    wd = w.to(d).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: moe_ops.dispatch(x, perm, inv, k), (h,))
    assert torch.autograd.gradcheck(lambda o, wt: moe_ops.combine(o, wt, inv), (out, wd))


def test_ops_stay_whole_inside_a_compiled_graph():
    perm, inv, w = _routing(seed=2)
    k = w.shape[1]

    def f(h, gu):
        return moe_ops.combine(kernels.swiglu(gu) + moe_ops.dispatch(h, perm, inv, k), w, inv)

    h, gu = torch.randn(w.shape[0], 3), torch.randn(w.numel(), 6)
    explained = torch._dynamo.explain(f)(h, gu)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"align.dispatch.default", "align.combine.default"} <= ops
    torch.testing.assert_close(torch.compile(f, backend="aot_eager")(h, gu), f(h, gu))


TRITON_CHECK = r"""
import torch
from align.kernels import moe_ops, triton_kernels as triton_ops
g = torch.Generator().manual_seed(3)
tokens, k, hidden = 6, 3, 40
top = torch.rand(tokens, 5, generator=g).topk(k, -1)
_, perm = torch.sort(top.indices.reshape(-1))
inv = torch.empty_like(perm)
inv[perm] = torch.arange(perm.numel())
w = torch.softmax(top.values, -1)
out = torch.randn(tokens * k, hidden, generator=g)
grad = torch.randn(tokens, hidden, generator=g)
pairs = [
    (triton_ops.combine_forward(out, w, inv), moe_ops.combine(out, w, inv)),
    (triton_ops.gather_sum(out, inv, k), moe_ops.gather_sum(out, inv, k)),
    *zip(triton_ops.combine_backward(out, w, inv, grad), moe_ops.combine_backward(out, w, inv, grad)),
]
for got, want in pairs:
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
print("ok", len(pairs))
"""


@pytest.mark.skipif(triton_ops.triton is None, reason="triton is not installed")
def test_triton_kernels_match_the_reference_paths():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["ok", "4"]
