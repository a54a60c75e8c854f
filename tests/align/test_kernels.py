"""The fused-kernel sources compute exactly what transformers' DeepSeek-V2 ops compute."""

import torch
from transformers.models.deepseek_v2 import modeling_deepseek_v2 as m

from align.kernels.patches import _rms_norm, _rope, logp_from_logits, swiglu


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


def test_chunked_logprobs_go_through_the_compiled_reduction_once_patched(monkeypatch):
    """Once ``use_fused_kernels`` installs the compiled reduction (GPUs), the chunked log-probs call it,
    forward and in the checkpointed backward, and get the eager values and gradients."""
    from align.kernels import patches as kernels
    from align.grpo.logprobs import token_logprobs

    torch.manual_seed(3)
    hidden = torch.randn(2, 5, 16, requires_grad=True)
    head = torch.nn.Linear(16, 64, bias=False)
    targets = torch.randint(0, 64, (2, 5))
    eager, _ = token_logprobs(hidden, head, targets, temperature=1.3, chunk_tokens=4)
    (g_eager,) = torch.autograd.grad(eager.sum(), hidden)
    compiled = torch.compile(logp_from_logits, dynamic=True, backend="aot_eager")
    calls = []
    monkeypatch.setattr(kernels, "_logp_compiled", lambda *a: (calls.append(1), compiled(*a))[1])
    got, _ = token_logprobs(hidden, head, targets, temperature=1.3, chunk_tokens=4)
    (g_got,) = torch.autograd.grad(got.sum(), hidden)
    assert len(calls) == 2 * 3, "3 chunks, each run forward and recomputed in the backward"
    assert torch.allclose(got, eager, atol=1e-6) and torch.allclose(g_got, g_eager, atol=1e-6)


def test_compiled_decoder_layers_train_like_eager_and_skip_recomputed_and_eval():
    from align.config import LoraConfig, ModelConfig
    from align.kernels import compile_decoder_layers
    from align.policy import load_policy
    from lora_check import loss_and_grads

    ids = torch.randint(5, 60, (2, 13), generator=torch.Generator().manual_seed(4))
    policy = load_policy(ModelConfig(gradient_checkpointing=True, recompute_layers=1), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    policy.model.train()
    want = loss_and_grads(policy.model, ids)
    layers = [m for m in policy.model.modules() if type(m).__name__ == "DeepseekV2DecoderLayer"]
    compiled = compile_decoder_layers(policy.model, backend="aot_eager")
    assert compiled == len(layers) - 1, "the recomputed layer stays eager"
    calls = []
    for layer in layers[1:]:
        compiled = layer._compiled_forward
        layer._compiled_forward = lambda *a, _c=compiled, **k: (calls.append(1), _c(*a, **k))[1]
    loss, grads = loss_and_grads(policy.model, ids)
    assert len(calls) == len(layers) - 1
    assert abs(loss - want[0]) < 1e-5 and all(torch.allclose(grads[k], want[1][k], atol=1e-6) for k in want[1])
    policy.model.eval()
    with torch.no_grad():
        policy.model(input_ids=ids)
    assert len(calls) == len(layers) - 1, "eval / no-grad passes stay eager"


def test_compiled_layers_trace_each_frame_once():
    """Floats are constants of the compiled graphs: a frame is not traced a second time after inductor's
    float-to-tensor pass gives up (that first attempt's work never reached the kernel cache, so warm runs repeated
    it)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import compilation_time_metrics

    from align.config import LoraConfig, ModelConfig
    from align.kernels import compile_decoder_layers
    from align.policy import load_policy

    policy = load_policy(ModelConfig(), LoraConfig(r=4, alpha=8))
    policy.model.train()
    with dynamo.config.patch(specialize_float=False):  # dynamo's default, whatever earlier tests left
        compile_decoder_layers(policy.model, backend="aot_eager")
        dynamo.reset()
        compilation_time_metrics.clear()
        ids = torch.randint(5, 60, (2, 13), generator=torch.Generator().manual_seed(0))
        policy.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert "compile_attempt_0" in compilation_time_metrics
    assert "compile_attempt_1" not in compilation_time_metrics
