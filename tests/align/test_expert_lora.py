"""Grouped expert LoRA (no W + ΔW stack) computes PEFT's function: same loss, same gradients."""

import torch

from align.config import load_config
from align.kernels.expert_lora import use_grouped_expert_lora
from align.policy import load_policy
from lora_check import assert_same_step, loss_and_grads, policy_with_random_b


def _policy():
    return policy_with_random_b("lora.enabled=true", "lora.grouped_experts=false")


def test_grouped_expert_lora_matches_peft():
    ids = torch.randint(5, 60, (3, 17), generator=torch.Generator().manual_seed(1))
    ref_policy, policy = _policy(), _policy()
    want = loss_and_grads(ref_policy.model, ids)
    assert use_grouped_expert_lora(policy.model) == policy.model.config.num_hidden_layers - 1
    assert use_grouped_expert_lora(policy.model) == 0, "patching twice is a no-op"
    got = loss_and_grads(policy.model, ids)
    assert [n for n in want[1] if "experts" in n and "lora_" in n], "the routed-expert adapters must receive gradients"
    assert_same_step(got, want)


def test_reference_pass_and_merge_still_use_peft():
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    ref_policy, policy = _policy(), _policy()
    use_grouped_expert_lora(policy.model)
    with torch.no_grad():
        with ref_policy.reference(), policy.reference():
            assert torch.allclose(ref_policy.model(input_ids=ids).logits, policy.model(input_ids=ids).logits, atol=1e-6)
        merged = {k: v.clone() for k, v in policy.merged_state_dict().items()}
        expected = {k: v.clone() for k, v in ref_policy.merged_state_dict().items()}
    for k in expected:
        assert torch.allclose(merged[k], expected[k], atol=1e-6), k


def test_load_policy_applies_it_by_default():
    cfg = load_config(None, ["lora.enabled=true"])
    policy = load_policy(cfg.model, cfg.lora)
    patched = [m for m in policy.model.modules() if hasattr(m, "_peft_forward") and type(m).__name__ == "ParamWrapper"]
    assert len(patched) == cfg.model.tiny.num_hidden_layers - 1
