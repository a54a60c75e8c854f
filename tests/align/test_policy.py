import pytest
import torch
from transformers import AutoModelForCausalLM

from align.config import LoraConfig, ModelConfig
from align.merge import merge_checkpoint
from align.policy import load_policy

IDS = torch.tensor([[1, 5, 30, 40, 50, 6, 20, 21]])


def _randomize_lora(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(IDS).logits


def test_lora_reaches_every_group_and_router_frozen():
    names = load_policy(ModelConfig(), LoraConfig()).trainable_parameter_names()
    for part in ("self_attn.q_proj.lora_A", "self_attn.kv_a_proj_with_mqa.lora_A", "self_attn.kv_b_proj.lora_A",
                 "self_attn.o_proj.lora_A", "layers.0.mlp.gate_proj.lora_A", "shared_experts.down_proj.lora_B",
                 "layers.1.mlp.experts.lora_A", "layers.1.mlp.experts.base_layer.lora_A"):
        assert any(part in n for n in names), part
    assert not any("mlp.gate." in n for n in names), "router must be frozen by default"
    assert not any(n.endswith("embed_tokens.weight") for n in names)


def test_groups_switch_off_and_router_trains_on_request():
    names = load_policy(ModelConfig(), LoraConfig(routed_experts=False, train_router=True)).trainable_parameter_names()
    assert not any("mlp.experts." in n for n in names)
    assert any("shared_experts.gate_proj.lora_A" in n for n in names)
    assert any("mlp.gate.modules_to_save" in n for n in names)


def test_full_finetune_freezes_only_router():
    p = load_policy(ModelConfig(), LoraConfig(enabled=False))
    frozen = [n for n, q in p.model.named_parameters() if not q.requires_grad]
    assert frozen and all(n.endswith("mlp.gate.weight") for n in frozen)


def test_reference_disables_adapter():
    p = load_policy(ModelConfig(), LoraConfig())
    base = _logits(p.model)
    _randomize_lora(p)
    adapted = _logits(p.model)
    assert (adapted - base).abs().max() > 1e-3
    with p.reference() as ref:
        torch.testing.assert_close(_logits(ref), base)


def test_reload_and_merge_reproduce_logits(tmp_path):
    p = load_policy(ModelConfig(), LoraConfig(), base_dir=tmp_path / "base")
    _randomize_lora(p)
    expected = _logits(p.model)
    p.save(tmp_path / "ckpt")
    reloaded = load_policy(ModelConfig(name_or_path=str(tmp_path / "ckpt")), LoraConfig(enabled=False))
    torch.testing.assert_close(_logits(reloaded.model), expected, atol=1e-5, rtol=1e-5)
    merge_checkpoint(str(tmp_path / "ckpt"), str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    torch.testing.assert_close(_logits(merged), expected, atol=1e-5, rtol=1e-5)
    sd = p.merged_state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd and not any("lora" in k for k in sd)


def test_missing_model_path_is_a_clear_error(tmp_path):
    from align.errors import AlignError

    with pytest.raises(AlignError, match="no such local path"):
        load_policy(ModelConfig(name_or_path=str(tmp_path / "nope")), LoraConfig())


def test_bf16_adapters_on_request():
    from align.config import load_config
    from align.policy import load_policy

    cfg = load_config(None, ["lora.enabled=true", "lora.adapter_dtype=bfloat16"])
    policy = load_policy(cfg.model, cfg.lora)
    dtypes = {p.dtype for n, p in policy.model.named_parameters() if "lora_" in n}
    assert dtypes == {torch.bfloat16}


def test_recompute_only_first_layers_keeps_gradients_and_skips_recompute():
    """Checkpointing fewer layers changes which forwards run twice, never the gradients."""
    ids = torch.randint(5, 60, (2, 11), generator=torch.Generator().manual_seed(3))
    results = {}
    for n in (-1, 1, 0):
        model_cfg = ModelConfig(gradient_checkpointing=True, recompute_layers=n)
        policy = load_policy(model_cfg, LoraConfig())
        policy.model.train()
        calls = []
        for i, layer in enumerate(m for m in policy.model.modules() if type(m).__name__ == "DeepseekV2DecoderLayer"):
            layer.mlp.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
        policy.model(input_ids=ids, labels=ids).loss.backward()
        grads = {k: p.grad.clone() for k, p in policy.model.named_parameters() if p.grad is not None}
        results[n] = (sorted(calls), grads)
    layers = model_cfg.tiny.num_hidden_layers
    assert results[-1][0] == sorted(list(range(layers)) * 2)
    assert results[1][0] == sorted([0, 0, *range(1, layers)])
    assert results[0][0] == list(range(layers))
    for n in (1, 0):
        for k, g in results[-1][1].items():
            assert torch.allclose(results[n][1][k], g, atol=1e-6), (n, k)


def test_merged_weights_leave_the_bf16_base_untouched_and_equal_peft_merge():
    """The merge is out of place: after many syncs the frozen bf16 base is bit for bit what it was (PEFT's merge +
    unmerge rounded about a third of its values each time), and each merged weight equals PEFT's merged value."""
    p = load_policy(ModelConfig(dtype="bfloat16"), LoraConfig(adapter_dtype="bfloat16"))
    _randomize_lora(p)
    frozen = {n: q.detach().clone() for n, q in p.model.named_parameters() if not q.requires_grad}
    for _ in range(3):
        with p.merged_weights() as weights:
            got = {k: v.clone() for k, v in weights}
    assert all(torch.equal(q, frozen[n]) for n, q in p.model.named_parameters() if n in frozen)
    p.model.merge_adapter()
    want = {k: v for k, v in p.model.get_base_model().state_dict().items() if "lora_" not in k}
    from align.policy import _base_name

    want = {_base_name(k): v for k, v in want.items() if ".original_module." not in k}
    assert got.keys() == want.keys()
    for k in got:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)
    base_q = frozen["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base_q)  # the adapter is in there
    p.model.unmerge_adapter()


def test_merged_weights_fail_loudly_when_an_adapted_weight_is_not_found(monkeypatch):
    """A state dict that copies weights (so their data pointers differ) must not hand the engine unadapted ones."""
    import align.policy as policy_mod

    p = load_policy(ModelConfig(), LoraConfig())
    real = policy_mod._adapted_weights
    monkeypatch.setattr(policy_mod, "_adapted_weights", lambda m: {**real(m), -1: [(None, "default")]})
    with pytest.raises(RuntimeError, match="1 of .* adapted weights are not in the model's state dict"):
        with p.merged_weights() as weights:
            list(weights)
