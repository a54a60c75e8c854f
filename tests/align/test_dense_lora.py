"""Dense LoRA as one addmm computes PEFT's function: same loss and gradients, PEFT kept where it differs."""

import torch

from align.config import load_config
from align.kernels.dense_lora import use_addmm_lora
from align.policy import load_policy
from lora_check import assert_same_step, loss_and_grads, policy_with_random_b


def _policy(*overrides):
    return policy_with_random_b("lora.addmm_dense=false", "lora.alpha=48", *overrides)


def _calls(model):
    """How many patched layers took the addmm path in the next forward."""
    hits = []
    for m in model.modules():
        if hasattr(m, "_peft_forward"):
            original = m._peft_forward
            m._peft_forward = lambda *a, _o=original, **k: (hits.append(0), _o(*a, **k))[1]
    return hits


def test_addmm_lora_matches_peft():
    ids = torch.randint(5, 60, (3, 17), generator=torch.Generator().manual_seed(1))
    ref, policy = _policy(), _policy()
    want = loss_and_grads(ref.model, ids)
    n = use_addmm_lora(policy.model)
    assert n == sum(type(m).__name__ == "Linear" and hasattr(m, "lora_A") for m in policy.model.modules()) > 0
    assert use_addmm_lora(policy.model) == 0, "patching twice is a no-op"
    fallbacks = _calls(policy.model)
    got = loss_and_grads(policy.model, ids)
    assert not fallbacks, "every dense LoRA layer should take the addmm path"
    assert_same_step(got, want)


def test_reference_pass_and_dropout_keep_peft():
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    ref, policy = _policy(), _policy()
    use_addmm_lora(policy.model)
    fallbacks = _calls(policy.model)
    with torch.no_grad(), ref.reference(), policy.reference():
        assert torch.allclose(ref.model(input_ids=ids).logits, policy.model(input_ids=ids).logits, atol=1e-6)
    assert len(fallbacks) > 0, "adapters disabled: PEFT's forward"
    dropped = _policy("lora.dropout=0.1", "lora.routed_experts=false")
    use_addmm_lora(dropped.model)
    fallbacks = _calls(dropped.model)
    dropped.model(input_ids=ids)
    assert len(fallbacks) > 0, "dropout: PEFT's forward"


def test_load_policy_applies_it_by_default():
    cfg = load_config(None, [])
    policy = load_policy(cfg.model, cfg.lora)
    assert any(hasattr(m, "_peft_forward") and type(m).__name__ == "Linear" for m in policy.model.modules())
