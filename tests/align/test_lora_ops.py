"""The routed experts' LoRA operators: reference paths against autograd of the plain per-expert expressions and
finite differences, the Triton kernels (Triton's CPU interpreter) against the reference, and opacity to compile."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from align.kernels import lora_ops, triton_kernels as triton_ops

ROOT = Path(__file__).resolve().parents[2]


def _problem(counts=(3, 0, 5, 1), d_in=8, d_out=16, r=4, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    e, rows = len(counts), sum(counts)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(rows, d_in, generator=g, dtype=dtype)
    weight = torch.randn(e, d_out, d_in, generator=g, dtype=dtype)
    down = torch.randn(e, d_in, r, generator=g, dtype=dtype)
    up = torch.randn(e, r, d_out, generator=g, dtype=dtype)
    return x, weight, down, up, offs


def _plain(x, weight, down, up, offs):
    """Per-expert loop with autograd: the definition the operators must reproduce."""
    parts, start = [], 0
    for e, end in enumerate(offs.tolist()):
        rows = x[start:end]
        parts.append(rows @ weight[e].T + (rows @ down[e]) @ up[e])
        start = end
    return torch.cat(parts)


def _swiglu(y):
    gate, up = y.chunk(2, -1)
    return F.silu(gate) * up


@pytest.mark.parametrize("fused_swiglu", [False, True])
def test_ops_match_autograd_of_the_per_expert_loop(fused_swiglu):
    x, weight, down, up, offs = _problem()
    inputs = [t.clone().requires_grad_() for t in (x, down, up)]
    op = lora_ops.swiglu_linear if fused_swiglu else lora_ops.linear
    want_fn = (lambda *a: _swiglu(_plain(*a))) if fused_swiglu else _plain
    got = op(inputs[0], weight, inputs[1], inputs[2], offs)
    ref = [t.clone().requires_grad_() for t in (x, down, up)]
    want = want_fn(ref[0], weight, ref[1], ref[2], offs)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, inputs, grad), torch.autograd.grad(want, ref, grad)):
        torch.testing.assert_close(a, b)


def test_backwards_match_finite_differences():
    x, weight, down, up, offs = _problem(counts=(2, 0, 3), d_in=4, d_out=6, r=2, dtype=torch.float64, seed=1)
    args = [t.requires_grad_() for t in (x, down, up)]
    assert torch.autograd.gradcheck(lambda a, d, u: lora_ops.linear(a, weight, d, u, offs), args)
    assert torch.autograd.gradcheck(lambda a, d, u: lora_ops.swiglu_linear(a, weight, d, u, offs), args)


def test_ops_stay_whole_inside_a_compiled_graph():
    x, weight, down, up, offs = _problem(seed=2)

    def f(x, down, up):
        return lora_ops.linear(lora_ops.swiglu_linear(x, weight, down, up, offs), weight[:, :4].contiguous(),
                               down, up[:, :, :4].contiguous(), offs)

    explained = torch._dynamo.explain(f)(x, down, up)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert {"align.lora_linear.default", "align.lora_swiglu_linear.default"} <= ops
    args = [t.clone().requires_grad_() for t in (x, down, up)]
    compiled = torch.compile(f, backend="aot_eager")(*args)
    torch.testing.assert_close(compiled, f(x, down, up))
    compiled.sum().backward()
    assert all(a.grad is not None and a.grad.abs().sum() > 0 for a in args)


def test_fake_kernels_agree_with_the_ops_on_transposed_factors():
    """Compiled layers hand the factors over as views (``A^T`` of PEFT's layout): the meta functions must
    promise the shapes and strides the real ops return."""
    x, weight, down, up, offs = _problem(seed=3)
    down_t = down.transpose(-2, -1).contiguous().transpose(-2, -1)
    up_t = up.transpose(-2, -1).contiguous().transpose(-2, -1)
    grad = torch.randn(x.shape[0], weight.shape[1])
    xa = x @ down[0]
    for op, args in [(lora_ops.lora_linear, (x, weight, down_t, up_t, offs)),
                     (lora_ops.lora_swiglu_linear, (x, weight, down_t, up_t, offs)),
                     (lora_ops.lora_linear_backward, (grad, x, xa, weight, down_t, up_t, offs)),
                     (lora_ops.lora_swiglu_backward, (grad, xa, up_t, offs, grad[:, :8]))]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


TRITON_CHECK = r"""
import torch
from align.kernels import lora_ops, triton_kernels as triton_ops
from align.kernels import patches as kernels
from transformers.integrations import moe  # registers the loop fallback used as reference
_grouped_mm = torch.ops.transformers.grouped_mm_fallback
g = torch.Generator().manual_seed(4)
# 150 rows over 6 experts: 64-row tiles that span several experts, an empty expert, rank 3 padded to 16
counts = [70, 0, 5, 40, 1, 34]
offs = torch.tensor(counts).cumsum(0).to(torch.int32)
rows, r, n, inter = sum(counts), 3, 72, 40
y = torch.randn(rows, n, generator=g)
a = torch.randn(rows, r, generator=g)
b = torch.randn(len(counts), r, n, generator=g)
gu = torch.randn(rows, 2 * inter, generator=g)
bu = torch.randn(len(counts), r, 2 * inter, generator=g)
dh = torch.randn(rows, inter, generator=g)
pairs = [
    (triton_ops.lora_add_(y.clone(), a, b, offs), y + _grouped_mm(a, b, offs)),
    (triton_ops.lora_swiglu_forward(gu, a, bu, offs), kernels.swiglu(gu + _grouped_mm(a, bu, offs))),
    (triton_ops.lora_swiglu_backward(gu, a, bu, offs, dh), kernels.swiglu_grad(gu + _grouped_mm(a, bu, offs), dh)),
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
    assert run.stdout.split() == ["ok", "3"]


def _mlp_problem(dtype=torch.float32, seed=5):
    """6 tokens, top-2 over 4 experts (one empty): hidden [6, 8], gate_up 8 -> 2x8, down 8 -> 8, rank 4."""
    g = torch.Generator().manual_seed(seed)
    k, e = 2, 4
    top = torch.stack([torch.randperm(3, generator=g)[:k] for _ in range(6)])  # experts 0-2; 3 stays empty
    ids, perm = torch.sort(top.reshape(-1))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    offs = torch.bincount(ids, minlength=e).cumsum(0).to(torch.int32)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    hidden = make(6, 8)
    gate_up = (make(e, 16, 8), make(e, 8, 4), make(e, 4, 16))
    down = (make(e, 8, 8), make(e, 8, 4), make(e, 4, 8))
    return hidden, perm, inv, k, gate_up, down, offs


def _mlp_chain(hidden, perm, inv, k, gate_up, down, offs):
    """The same MLP through the separate operators (dispatch -> SwiGLU linear -> linear)."""
    from align.kernels import moe_ops

    x = moe_ops.dispatch(hidden, perm, inv, k)
    return lora_ops.linear(lora_ops.swiglu_linear(x, gate_up[0], gate_up[1], gate_up[2], offs), *down, offs)


def test_expert_mlp_equals_the_chain_of_operators_and_finite_differences():
    hidden, perm, inv, k, gate_up, down, offs = _mlp_problem()
    leaves = lambda: [t.clone().requires_grad_() for t in (hidden, gate_up[1], gate_up[2], down[1], down[2])]  # noqa
    a, b = leaves(), leaves()
    got = lora_ops.expert_mlp(a[0], perm, inv, k, (gate_up[0], a[1], a[2]), (down[0], a[3], a[4]), offs)
    want = _mlp_chain(b[0], perm, inv, k, (gate_up[0], b[1], b[2]), (down[0], b[3], b[4]), offs)
    torch.testing.assert_close(got, want)
    grad = torch.randn_like(want)
    for x, y in zip(torch.autograd.grad(got, a, grad), torch.autograd.grad(want, b, grad)):
        torch.testing.assert_close(x, y)
    h64, perm, inv, k, gu64, d64, offs = _mlp_problem(torch.float64)
    args = [t.requires_grad_() for t in (h64, gu64[1], gu64[2], d64[1], d64[2])]
    assert torch.autograd.gradcheck(
        lambda h, a1, b1, a2, b2: lora_ops.expert_mlp(h, perm, inv, k, (gu64[0], a1, b1), (d64[0], a2, b2), offs),
        args)


def test_expert_mlp_keeps_neither_the_dispatched_tokens_nor_the_swiglu_output():
    """What the backward keeps, counted by saved-tensor hooks: the chain keeps x [S, H] and h [S, I] more, the
    fused operator the sort order ``perm`` [S] (to gather x again; both keep ``inv``)."""
    hidden, perm, inv, k, gate_up, down, offs = _mlp_problem()

    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        h = hidden.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(h, perm, inv, k, gate_up, down, offs)
        seen.pop(h.untyped_storage().data_ptr(), None)  # the layer holds its input either way
        return sum(seen.values())

    rows, width = perm.numel(), hidden.shape[1] + down[0].shape[2]  # S rows of H + I values
    fused = saved_bytes(lambda h, *a: lora_ops.expert_mlp(h, *a))
    assert saved_bytes(_mlp_chain) - fused == rows * width * hidden.element_size() - perm.nbytes


def test_expert_mlp_fake_kernel_and_one_compiled_graph():
    hidden, perm, inv, k, gate_up, down, offs = _mlp_problem(seed=6)
    torch.library.opcheck(lora_ops.lora_expert_mlp, (hidden, perm, inv, k, *gate_up, *down, offs),
                          test_utils=("test_schema", "test_faketensor"))
    explained = torch._dynamo.explain(lora_ops.expert_mlp)(hidden, perm, inv, k, gate_up, down, offs)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_expert_mlp_backward_traces_through_operators_only(monkeypatch):
    """A compiled layer's backward is traced with fake tensors: the recomputed SwiGLU must be an operator there,
    or on CUDA the trace reaches the Triton launch itself (the H200 failed with "Cannot access data pointer of
    Tensor" inside ``model.compile_layers``). The SwiGLU helper may only ever see real tensors."""
    hidden, perm, inv, k, gate_up, down, offs = _mlp_problem(seed=7)
    swiglu_of = lora_ops._swiglu_of

    def real_only(*tensors):
        assert all(type(t) is torch.Tensor for t in tensors), [type(t).__name__ for t in tensors]
        return swiglu_of(*tensors)

    monkeypatch.setattr(lora_ops, "_swiglu_of", real_only)
    leaves = lambda: [t.clone().requires_grad_() for t in (hidden, gate_up[1], gate_up[2], down[1], down[2])]  # noqa
    f = lambda h, a1, b1, a2, b2: lora_ops.expert_mlp(h, perm, inv, k, (gate_up[0], a1, b1),  # noqa: E731
                                                      (down[0], a2, b2), offs)
    a, b = leaves(), leaves()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(*a)
    want = f(*b)
    torch.testing.assert_close(got, want)
    w = torch.randn_like(want)
    for x, y in zip(torch.autograd.grad(got, a, w), torch.autograd.grad(want, b, w)):
        torch.testing.assert_close(x, y)
