"""One GRPO update on hand-made rollouts: learning direction, NaN guard, batch layout."""

import pytest
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
        metrics, finite = policy_update(policy, CompletionLogprobs(policy.model), batch, GRPOConfig(minibatch_size=4),
                                        opt, sched, 1.0, 3, 1.0)
    after = _seq_logp(policy, batch)
    assert finite and after[0] > before[0] and after[2] > before[2] and after[3] < before[3]
    assert {"actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/clipfrac"} <= set(metrics)


@pytest.mark.parametrize("micro", [0, 2])
def test_entropy_and_ratio_variance_are_those_of_the_completion_tokens(micro):
    """One minibatch, old log-probs shifted by known noise: the ratio exp(logp - old) at the starting parameters is
    exp(-noise), so ``actor/ratio_var`` is its sample variance over the completion tokens and ``actor/entropy`` the
    token mean of the policy's entropy; sums added on the device over micro-batches give the same numbers."""
    policy, batch, opt, sched = _setup()
    with torch.no_grad():
        lp, ent = completion_logprobs(policy.model, batch.input_ids, batch.attention_mask, batch.position_ids,
                                      batch.prompt_width, with_entropy=True)
    noise = torch.randn(lp.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    batch.old_logp = lp + noise
    m = batch.completion_mask.bool()
    metrics, finite = policy_update(policy, CompletionLogprobs(policy.model), batch,
                                    GRPOConfig(minibatch_size=4, micro_batch_size=micro), opt, sched, 1.0, 3, 1.0)
    assert finite
    assert metrics["actor/ratio_var"] == pytest.approx(float(torch.exp(-noise)[m].double().var()), rel=1e-4)
    assert metrics["actor/entropy"] == pytest.approx(float(ent[m].mean()), rel=1e-5)


def test_non_finite_loss_skips_the_step():
    policy, batch, opt, sched = _setup()
    batch.advantages = torch.tensor([float("nan"), 1.0, 1.0, -1.0])
    params = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    _, finite = policy_update(policy, CompletionLogprobs(policy.model), batch, GRPOConfig(minibatch_size=4), opt,
                              sched, 1.0, 3, 1.0)
    assert not finite
    for n, p in policy.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, params[n]), n


def test_crashing_reward_scores_zero_and_is_logged(caplog, monkeypatch):
    from rewards import registry

    def boom(completion, answer=None):
        raise RuntimeError("verifier broke")

    monkeypatch.setitem(registry.REGISTRY, "boom", registry.Reward("boom", boom, ("answer",), isolated=False))
    total, per, reasons = Combined({"boom": 1.0}).score(["x", "y"], answer=["1", "2"])
    assert total == [0.0, 0.0] and "verifier broke" in reasons["boom"][0]
    assert "verifier broke" in caplog.text


def test_trimmed_and_micro_batches_keep_every_row_and_drop_only_padding():
    _, batch, _, _ = _setup()
    parts = batch.micro_batches(3)
    rows = torch.cat([idx for idx, _ in parts])
    assert sorted(rows.tolist()) == list(range(batch.size))
    lengths = batch.attention_mask[:, batch.prompt_width:].sum(-1)
    assert lengths[rows].tolist() == sorted(lengths.tolist()), "rows grouped by completion length"
    for idx, part in parts:
        assert part.completion_width == max(1, int(lengths[idx].max()))
        assert torch.equal(part.input_ids, batch.input_ids[idx, :batch.prompt_width + part.completion_width])
        assert torch.equal(part.completion_mask, batch.completion_mask[idx, :part.completion_width])
    assert batch.trimmed().completion_width == 3 and batch.rows(slice(2, 4)).trimmed().completion_width == 2


def _perturbed_with_sgd():
    """The tiny policy with non-zero adapters (so LoRA has gradients everywhere) and plain SGD: the parameter
    change is the (clipped) gradient itself; Adam's first step would amplify noise."""
    policy, batch, _, _ = _setup()
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return policy, batch, torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=1.0)


def _update_with(micro: int):
    from align.grpo.update import fill_old_and_ref

    policy, batch, opt = _perturbed_with_sgd()
    sched = get_scheduler("constant", opt)
    cfg = GRPOConfig(minibatch_size=4, micro_batch_size=micro, beta=0.1)
    fwd = CompletionLogprobs(policy.model)
    fill_old_and_ref(policy, fwd, batch, cfg, 1.0)
    metrics, finite = policy_update(policy, fwd, batch, cfg, opt, sched, 1.0, 3, 1.0)
    params = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    return batch, metrics, params


def test_micro_batches_accumulate_to_the_whole_minibatch_step():
    whole, m_whole, p_whole = _update_with(0)
    split, m_split, p_split = _update_with(1)
    real = whole.attention_mask[:, whole.prompt_width:].bool()  # trimmed padding columns stay 0
    assert torch.allclose(split.old_logp[real], whole.old_logp[real], atol=1e-6)
    assert torch.allclose(split.ref_logp[real], whole.ref_logp[real], atol=1e-6)
    assert (split.old_logp[~real] == 0).all() and (~real).any()
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/entropy", "actor/kl", "actor/clipfrac"):
        assert m_split[key] == pytest.approx(m_whole[key], rel=1e-5, abs=1e-7), key
    for n in p_whole:
        assert torch.allclose(p_split[n], p_whole[n], atol=1e-6), n


def test_micro_count_agrees_over_ranks_and_refuses_deepspeed():
    from align.errors import AlignError
    from align.grpo.update import check_accumulation, micro_count

    class Ranks:
        world, backend = 2, "deepspeed-zero2"

        def __init__(self, others):
            self.others = others

        def min(self, v):
            return min([v, *self.others.pop(0)])

    assert micro_count(8, 3, None) == 3 and micro_count(8, 0, None) == 1
    # This rank wants 3 parts (8 rows / 3); the other rank wants 4 but has only 2 rows.
    assert micro_count(8, 3, Ranks([[-4], [2]])) == 2
    with pytest.raises(AlignError, match="grpo.micro_batch_size"):
        check_accumulation(Ranks([]), True)
    check_accumulation(Ranks([]), False)


def _replayed_update(checkpointing: bool):
    from align.grpo.update import fill_old_and_ref
    from align.moe import RouterReplay

    torch.manual_seed(0)
    policy = load_policy(ModelConfig(gradient_checkpointing=checkpointing), LoraConfig(r=4, alpha=8))
    _, batch, _, _ = _setup()
    opt = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=1.0)
    fwd, replay = CompletionLogprobs(policy.model), RouterReplay(policy.model)
    policy.model.train()
    cfg = GRPOConfig(minibatch_size=4, micro_batch_size=2)
    fill_old_and_ref(policy, fwd, batch, cfg, 1.0, replay, need_old=True)
    _, finite = policy_update(policy, fwd, batch, cfg, opt, get_scheduler("constant", opt), 1.0, 3, 1.0, replay=replay)
    params = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    return finite, params, replay.total


def test_router_replay_survives_gradient_checkpointing():
    """Recomputed routers must take the replayed experts (else checkpointing fails or routes differently)
    and must not count flips twice."""
    finite, params, total = _replayed_update(True)
    ref_finite, ref_params, ref_total = _replayed_update(False)
    assert finite and ref_finite and total == ref_total > 0
    for n in ref_params:
        assert torch.allclose(params[n], ref_params[n], atol=1e-6), n


def _token_budget_update(loss: str, budget: int, replay_on: bool):
    from align.grpo.update import fill_old_and_ref
    from align.moe import RouterReplay

    policy, batch, opt = _perturbed_with_sgd()
    cfg = GRPOConfig(minibatch_size=4, max_tokens_per_micro_batch=budget, logprob_tokens_per_micro_batch=4 * budget,
                     beta=0.1, loss=loss, mu=2, tis_cap=2.0)
    fwd = CompletionLogprobs(policy.model)
    replay = RouterReplay(policy.model) if replay_on else None
    batch.rollout_logp = torch.randn(batch.rollout_logp.shape, generator=torch.Generator().manual_seed(1)) * 0.1 - 1
    fill_old_and_ref(policy, fwd, batch, cfg, 1.0, replay, need_old=True)
    metrics, finite = policy_update(policy, fwd, batch, cfg, opt, get_scheduler("constant", opt), 1.0, 3, 1.0,
                                    replay=replay)
    assert finite
    return metrics, {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
@pytest.mark.parametrize("replay_on", [False, True])
def test_token_budget_micro_batches_give_the_unsplit_step(loss, replay_on):
    """Budgets of 7 and 14 tokens split the 4 rows (prompt width 4, completions of 3, 3, 2, 2 tokens) into 4 and 2
    parts (the no-grad passes take 4x the budget, except the old pass under replay): same loss, same parameters
    after mu=2 passes as the whole minibatch in one part."""
    m_whole, p_whole = _token_budget_update(loss, 10_000, replay_on)
    for budget in (7, 14):
        m_split, p_split = _token_budget_update(loss, budget, replay_on)
        for key in ("actor/pg_loss", "actor/grad_norm", "actor/kl"):
            assert m_split[key] == pytest.approx(m_whole[key], rel=1e-5, abs=1e-7), (budget, key)
        for n in p_whole:
            assert torch.allclose(p_split[n], p_whole[n], atol=1e-6), (budget, n)


def test_token_budget_groups_short_rows_and_isolates_long_ones():
    _, batch, _, _ = _setup()
    assert [len(p) for p in batch.by_tokens(7)] == [1, 1, 1, 1]  # width 7 (4 + 3): one row each
    assert [len(p) for p in batch.by_tokens(14)] == [2, 2]
    assert [len(p) for p in batch.by_tokens(10_000)] == [4]
    parts = batch.token_micro_batches(10_000, 3)
    assert len(parts) == 3 and sorted(torch.cat([i for i, _ in parts]).tolist()) == [0, 1, 2, 3]
