"""The fused-kernel sources compute exactly what transformers' DeepSeek-V2 ops compute."""

import torch
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

from align.kernels import _rms_norm, _rope, logp_from_logits, swiglu


def test_rms_norm_matches_transformers():
    torch.manual_seed(0)
    norm = m.DeepseekV2RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 64, dtype=torch.bfloat16)
    norm = norm.to(torch.bfloat16)
    assert torch.equal(_rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))


def test_rope_matches_transformers_complex_form():
    torch.manual_seed(1)
    xq, xk = torch.randn(2, 4, 7, 64), torch.randn(2, 1, 7, 64)
    angles = torch.rand(2, 7, 32) * 10
    freqs = torch.polar(torch.full_like(angles, 0.9), angles)
    for got, want in zip(_rope(xq, xk, freqs), m.apply_rotary_emb(xq, xk, freqs)):
        assert torch.allclose(got, want, atol=1e-5)


def test_swiglu_is_silu_gate_times_up():
    gu = torch.randn(5, 8)
    assert torch.allclose(swiglu(gu), torch.nn.functional.silu(gu[:, :4]) * gu[:, 4:])


def test_logp_from_logits_is_log_softmax_at_targets():
    torch.manual_seed(2)
    logits, targets = torch.randn(6, 50, dtype=torch.bfloat16), torch.randint(0, 50, (6,))
    want = (logits.float() / 0.7).log_softmax(-1)[torch.arange(6), targets]
    assert torch.allclose(logp_from_logits(logits, targets, 0.7), want, atol=1e-6)


def test_compiled_logp_matches_eager_values_and_gradients():
    """The compiled reduction (used on GPUs) is the same function, gradients included."""
    torch.manual_seed(3)
    logits = torch.randn(8, 64, requires_grad=True)
    targets = torch.randint(0, 64, (8,))
    eager = logp_from_logits(logits, targets, 1.3)
    (g_eager,) = torch.autograd.grad(eager.sum(), logits)
    compiled = torch.compile(logp_from_logits, dynamic=True, backend="aot_eager")(logits, targets, 1.3)
    (g_compiled,) = torch.autograd.grad(compiled.sum(), logits)
    assert torch.allclose(compiled, eager, atol=1e-6) and torch.allclose(g_compiled, g_eager, atol=1e-6)
