"""GPU tier: align_varlen's flash path (CUDA, bf16) against its SDPA reference at V2-Lite's MLA head widths."""

import pytest
import torch

from align.kernels import varlen

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
