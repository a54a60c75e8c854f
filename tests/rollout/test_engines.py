"""vLLM(-CPU) engine vs the trainer's transformers model on the tiny DeepSeek-V2 (real engine, CPU)."""

import pytest
import torch

from align.config import LoraConfig, ModelConfig, RolloutConfig
from align.grpo.batch import build_batch
from align.grpo.logprobs import completion_logprobs
from align.policy import load_policy
from rollout import SamplingSettings, make_engine, render_prompts
from rollout.hf import HFEngine

pytestmark = pytest.mark.integration  # real SFT/GRPO/vLLM runs: make test-integration

vllm = pytest.importorskip("vllm")
QUESTIONS = [f"What is {a}+{b}?" for a, b in [(3, 4), (12, 7), (25, 5), (9, 18), (30, 0), (14, 14)]]


@pytest.fixture(scope="module")
def setup(sft_checkpoint):
    policy = load_policy(ModelConfig(name_or_path=str(sft_checkpoint / "final")), LoraConfig(r=8, alpha=16))
    engine = make_engine("vllm", policy, RolloutConfig(), "float32", 256)
    prompts = render_prompts(policy.tokenizer, [[{"role": "user", "content": q}] for q in QUESTIONS])
    return policy, engine, prompts


def _greedy(engine, prompts, n=1):
    out = engine.generate(prompts, SamplingSettings(n=n, temperature=0.0, max_new_tokens=16))
    return [[c.token_ids for c in ro.completions] for ro in out]


def _perturb(policy, seed, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_greedy_matches_hf_before_and_after_sync(setup):
    policy, engine, prompts = setup
    hf = HFEngine(policy.model, policy.tokenizer)
    # The engine started from dummy weights: the first (full) sync alone makes it the policy.
    assert engine.startup["first_sync_s"] > 0 and engine.last_sync["tensors"] == len(policy.merged_state_dict())
    assert _greedy(engine, prompts) == _greedy(hf, prompts)
    _perturb(policy, 0, scale=0.2)
    assert _greedy(engine, prompts) != _greedy(hf, prompts), "perturbation should change greedy output"
    adapted = policy.merged_state_dict(only_adapted=True)
    assert 0 < len(adapted) < len(policy.merged_state_dict()), "only adapter-reachable weights travel"
    assert not any("norm" in k or "embed" in k or k.endswith("mlp.gate.weight") for k in adapted)
    secs = engine.update_weights(adapted)
    assert _greedy(engine, prompts) == _greedy(hf, prompts)
    assert engine.last_sync["tensors"] == len(adapted) and secs < 30


def test_sampling_logprobs_match_trainer(setup):
    policy, engine, prompts = setup
    _perturb(policy, 1)
    engine.update_weights(policy.merged_state_dict(only_adapted=True))
    out = engine.generate(prompts, SamplingSettings(n=4, temperature=1.0, max_new_tokens=16, seed=3))
    comps = [c for ro in out for c in ro.completions]
    pids = [ro.prompt_ids for ro in out for _ in ro.completions]
    b = build_batch(pids, comps, torch.zeros(len(comps)), policy.tokenizer.pad_token_id, mask_truncated=False)
    with torch.no_grad():
        lp, _ = completion_logprobs(policy.model.eval(), b.input_ids, b.attention_mask, b.position_ids, b.prompt_width)
    m = b.completion_mask.bool()
    diff = (lp - b.rollout_logp)[m].abs()
    print(f"train/infer |dlogp| mean {diff.mean():.2e} max {diff.max():.2e} over {int(m.sum())} tokens")
    assert diff.mean() < 1e-4 and diff.max() < 1e-3


def test_groups_stop_and_length(setup):
    policy, engine, prompts = setup
    out = engine.generate(prompts[:3], SamplingSettings(n=5, temperature=1.0, max_new_tokens=16, seed=0))
    assert [len(ro.completions) for ro in out] == [5, 5, 5]
    assert all(ro.prompt_ids == p for ro, p in zip(out, prompts[:3]))
    short = engine.generate(prompts[:2], SamplingSettings(n=1, temperature=0.0, max_new_tokens=3))
    assert all(c.finish_reason == "length" and len(c.token_ids) == 3 and c.truncated
               for ro in short for c in ro.completions)
    full = engine.generate(prompts[:2], SamplingSettings(n=1, temperature=0.0, max_new_tokens=30))
    assert all(c.finish_reason == "stop" for ro in full for c in ro.completions)
    stopped = engine.generate(prompts[:2], SamplingSettings(n=1, temperature=0.0, max_new_tokens=30, stop=["="]))
    assert all("=" not in c.text and c.finish_reason == "stop" for ro in stopped for c in ro.completions)


def test_hf_fallback_same_interface(setup):
    policy, _, prompts = setup
    hf = HFEngine(policy.model, policy.tokenizer)
    out = hf.generate(prompts[:2], SamplingSettings(n=3, temperature=1.0, max_new_tokens=8, seed=0))
    assert [len(ro.completions) for ro in out] == [3, 3]
    c = out[0].completions[0]
    assert len(c.logprobs) == len(c.token_ids) and c.finish_reason in ("stop", "length")


def test_lean_outputs_equal_vllm_text_and_logprob_dicts(setup):
    """Text decoded once at the end and flat logprobs = vLLM's per-step detokenization and per-token dicts."""
    _, engine, prompts = setup
    settings = SamplingSettings(n=3, temperature=1.0, max_new_tokens=16, seeds=list(range(len(prompts))))
    assert engine.lean_outputs
    lean = [c for ro in engine.generate(prompts, settings) for c in ro.completions]
    engine.lean_outputs = False
    try:
        full = [c for ro in engine.generate(prompts, settings) for c in ro.completions]
    finally:
        engine.lean_outputs = True
    assert [c.token_ids for c in lean] == [c.token_ids for c in full]
    assert [c.text for c in lean] == [c.text for c in full] and any(c.text for c in lean)
    assert [c.logprobs for c in lean] == [c.logprobs for c in full]
    assert all(len(c.logprobs) == len(c.token_ids) for c in lean)
    assert [c.finish_reason for c in lean] == [c.finish_reason for c in full]
