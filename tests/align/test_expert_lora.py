"""Grouped expert LoRA (no W + ΔW stack) computes PEFT's function: same loss, same gradients."""

import torch

from align.config import load_config
from align.expert_lora import use_grouped_expert_lora
from align.policy import load_policy


def _policy():
    cfg = load_config(None, ["lora.enabled=true", "lora.grouped_experts=false"])
    policy = load_policy(cfg.model, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return policy


def _loss_and_grads(policy, ids):
    policy.model.zero_grad(set_to_none=True)
    loss = policy.model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}


def test_grouped_expert_lora_matches_peft():
    ids = torch.randint(5, 60, (3, 17), generator=torch.Generator().manual_seed(1))
    ref_policy, policy = _policy(), _policy()
    ref_loss, ref_grads = _loss_and_grads(ref_policy, ids)
    assert use_grouped_expert_lora(policy.model) == policy.model.config.num_hidden_layers - 1
    assert use_grouped_expert_lora(policy.model) == 0, "patching twice is a no-op"
    loss, grads = _loss_and_grads(policy, ids)
    assert abs(loss - ref_loss) < 1e-5
    expert_grads = [n for n in ref_grads if "experts" in n and "lora_" in n]
    assert expert_grads, "the routed-expert adapters must receive gradients"
    assert ref_grads.keys() == grads.keys()
    for n in ref_grads:
        assert torch.allclose(grads[n], ref_grads[n], atol=1e-6, rtol=1e-4), n


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
