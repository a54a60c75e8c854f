"""One GRPO update on hand-made rollouts: learning direction, NaN guard, batch layout."""

import torch
from transformers import get_scheduler

from align.config import GRPOConfig, LoraConfig, ModelConfig
from align.grpo.batch import build_batch
from align.grpo.logprobs import completion_logprobs
from align.grpo.logprobs import CompletionLogprobs
from align.grpo.update import policy_update
from align.policy import load_policy
from rewards.registry import Combined
from rollout.base import Completion


def _setup():
    torch.manual_seed(0)
    policy = load_policy(ModelConfig(), LoraConfig(r=4, alpha=8))
    prompts = [[1, 5, 30, 31], [1, 5, 32]]
    comps = [Completion([40, 41, 2], "", [0.0, 0.0, 0.0], "stop"), Completion([50, 51, 52], "", [0.0] * 3, "length"),
             Completion([42, 2], "", [0.0, 0.0], "stop"), Completion([53, 2], "", [0.0, 0.0], "stop")]
    pids = [prompts[0], prompts[0], prompts[1], prompts[1]]
    batch = build_batch(pids, comps, torch.tensor([1.0, -1.0, 1.0, -1.0]), 0, mask_truncated=True)
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-2)
    return policy, batch, opt, get_scheduler("constant", opt)


def _seq_logp(policy, batch):
    with torch.no_grad():
        lp, _ = completion_logprobs(policy.model, batch.input_ids, batch.attention_mask, batch.position_ids,
                                    batch.prompt_width)
    return (lp * (batch.input_ids[:, batch.prompt_width:] != 0)).sum(-1)


def test_batch_layout_and_truncation_mask():
    _, batch, _, _ = _setup()
    assert batch.prompt_width == 4 and batch.input_ids[2, :1].tolist() == [0]  # left padding
    assert batch.completion_mask[1].sum() == 0 and bool(batch.truncated[1])
    assert batch.completion_mask[0].tolist() == [1, 1, 1] and batch.completion_mask[2].tolist() == [1, 1, 0]


def test_update_moves_logprobs_in_the_advantage_direction():
    policy, batch, opt, sched = _setup()
    before = _seq_logp(policy, batch)
    for _ in range(3):
        metrics, finite = policy_update(policy, CompletionLogprobs(policy.model), batch, GRPOConfig(minibatch_size=4), opt, sched, 1.0, 3, 1.0)
    after = _seq_logp(policy, batch)
    assert finite and after[0] > before[0] and after[2] > before[2] and after[3] < before[3]
    assert {"actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/clipfrac"} <= set(metrics)


def test_non_finite_loss_skips_the_step():
    policy, batch, opt, sched = _setup()
    batch.advantages = torch.tensor([float("nan"), 1.0, 1.0, -1.0])
    params = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    _, finite = policy_update(policy, CompletionLogprobs(policy.model), batch, GRPOConfig(minibatch_size=4), opt, sched, 1.0, 3, 1.0)
    assert not finite
    for n, p in policy.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, params[n]), n


def test_crashing_reward_scores_zero_and_is_logged(caplog, monkeypatch):
    from rewards import registry

    def boom(completion, answer=None):
        raise RuntimeError("verifier broke")

    monkeypatch.setitem(registry._REGISTRY, "boom", registry.Reward("boom", boom, ("answer",), isolated=False))
    total, per, reasons = Combined({"boom": 1.0}).score(["x", "y"], answer=["1", "2"])
    assert total == [0.0, 0.0] and "verifier broke" in reasons["boom"][0]
    assert "verifier broke" in caplog.text
