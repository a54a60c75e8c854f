"""GRPO checkpoints restore every trainable tensor, the optimizer and the schedule exactly."""

import torch
from transformers import get_scheduler

from align.config import LoraConfig, ModelConfig
from align.grpo import state as ckpt
from align.policy import load_policy


def test_grpo_checkpoint_restores_every_trainable_tensor(tmp_path):
    policy = load_policy(ModelConfig(), LoraConfig(r=4, alpha=8))
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = get_scheduler("cosine", opt, num_warmup_steps=1, num_training_steps=10)
    sum(p.sum() for p in params).backward()
    opt.step()
    sched.step()
    saved = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    assert any("experts" in n for n in saved)
    path = ckpt.save(tmp_path, 3, policy, opt, sched, {"data_position": 7}, keep=2)
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    opt.step()
    sched.step()
    step, extra = ckpt.load(path, policy, opt, sched)
    assert step == 3 and extra == {"data_position": 7} and sched.last_epoch == 1
    for n, p in policy.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, saved[n]), n
