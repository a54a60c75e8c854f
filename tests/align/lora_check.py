"""Shared by the tests of align's faster LoRA forwards: a tiny policy with non-zero adapters, and one
step's loss and gradients to compare against PEFT's forward."""

import torch

from align.config import load_config
from align.policy import load_policy


def policy_with_random_b(*overrides):
    """The tiny policy (config ``overrides``) with every ``lora_B`` drawn from N(0, 0.05²), seed 0."""
    cfg = load_config(None, list(overrides))
    policy = load_policy(cfg.model, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return policy


def loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(got: tuple[float, dict], want: tuple[float, dict]) -> None:
    """Same loss (1e-5) and the same gradient for every parameter (fp32 tolerances)."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert abs(loss - ref_loss) < 1e-5
    assert ref_grads.keys() == grads.keys()
    for name in ref_grads:
        assert torch.allclose(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4), name
