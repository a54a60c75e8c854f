"""GPU tier: align's training kernels on CUDA in bf16 against their references — align_varlen's flash path at
V2-Lite's MLA head widths, the fused routed-expert MLP operator (Triton inside) against the chain of operators."""

import pytest
import torch

from align.kernels import lora_ops, moe_ops, varlen

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 1


def test_flash_varlen_matches_the_block_diagonal_reference():
    """16 heads, q/k 192, v 128 (zero-padded inside), rows of 256 holding sequences of 100, 156, 60, 196: the flash
    output and gradients are within bf16 rounding of the fp32 reference."""
    assert varlen._flash() is not None, "this torch has no torch.nn.attention.varlen"
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda d: torch.randn(2, 16, 256, d, device="cuda", generator=g).bfloat16().requires_grad_()  # noqa: E731
    q, k, v = make(192), make(192), make(128)
    cu = torch.tensor([0, 100, 256, 316, 512], device="cuda", dtype=torch.int32)
    out, _ = varlen.attention(_Attn(), q, k, v, None, scaling=192 ** -0.5, cu_seq_lens_q=cu, max_length_q=256)
    ref = varlen._reference(*(t.float() for t in (q, k, v)), cu, 2, 192 ** -0.5, 0.0).transpose(1, 2)
    assert (out.float() - ref).abs().max() < 2e-2
    w = torch.randn(out.shape, device="cuda", generator=g)
    got = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want):
        assert ((a.float() - b.float()).norm() / b.float().norm()) < 2e-2


def _mlp_problem():
    """V2-Lite's routed MLP widths (H 2048, I 1408, top-6 of 64, rank 16), 512 tokens."""
    g = torch.Generator(device="cuda").manual_seed(0)
    make = lambda *s: (torch.randn(*s, device="cuda", generator=g) * 0.05).bfloat16()  # noqa: E731
    top = torch.rand(512, 64, device="cuda", generator=g).topk(6, -1).indices
    ids, perm = torch.sort(top.reshape(-1))
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device="cuda")
    offs = torch.bincount(ids, minlength=64).cumsum(0).to(torch.int32)
    gate_up = (make(64, 2816, 2048), make(64, 2048, 16), make(64, 16, 2816))
    down = (make(64, 2048, 1408), make(64, 1408, 16), make(64, 16, 2048))
    hidden = make(512, 2048)
    leaves = lambda: [t.clone().requires_grad_() for t in (hidden, gate_up[1], gate_up[2], down[1], down[2])]  # noqa
    return g, perm, inv, offs, gate_up, down, leaves


def test_fused_expert_mlp_equals_the_chain_on_cuda():
    """The one-operator MLP (which recomputes the SwiGLU in its backward) gives the chain's output and gradients
    (same kernels, same order)."""
    g, perm, inv, offs, gate_up, down, leaves = _mlp_problem()
    a, b = leaves(), leaves()
    got = lora_ops.expert_mlp(a[0], perm, inv, 6, (gate_up[0], a[1], a[2]), (down[0], a[3], a[4]), offs)
    x = moe_ops.dispatch(b[0], perm, inv, 6)
    want = lora_ops.linear(lora_ops.swiglu_linear(x, gate_up[0], b[1], b[2], offs), down[0], b[3], b[4], offs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    w = torch.randn(got.shape, device="cuda", generator=g).bfloat16()
    for p, q in zip(torch.autograd.grad(got, a, w), torch.autograd.grad(want, b, w)):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)


def test_fused_expert_mlp_compiles_on_cuda():
    """Inside a compiled decoder layer (``model.compile_layers``) inductor traces the operator's backward: it runs
    (no Triton launch on fake tensors) and equals the eager operator."""
    g, perm, inv, offs, gate_up, down, leaves = _mlp_problem()
    f = lambda h, a1, b1, a2, b2: lora_ops.expert_mlp(h, perm, inv, 6, (gate_up[0], a1, b1),  # noqa: E731
                                                      (down[0], a2, b2), offs)
    a, b = leaves(), leaves()
    got, want = torch.compile(f, dynamic=True)(*a), f(*b)
    torch.testing.assert_close(got, want)
    w = torch.randn(got.shape, device="cuda", generator=g).bfloat16()
    for p, q in zip(torch.autograd.grad(got, a, w), torch.autograd.grad(want, b, w)):
        torch.testing.assert_close(p, q, rtol=1e-2, atol=1e-3)
