"""Padding-free packing: packed forwards give the padded forward's log-probs, losses, gradients and expert counts."""

import pytest
import torch
from transformers import get_scheduler

from align.config import GRPOConfig, LoraConfig, ModelConfig
from align.grpo.batch import build_batch
from align.grpo.logprobs import CompletionLogprobs, completion_logprobs
from align.grpo.packing import first_fit, pack
from align.grpo.update import fill_old_and_ref, policy_update
from align.moe import ExpertMonitor, RouterReplay
from align.policy import load_policy
from rollout.base import Completion


def _ragged(n: int = 8, seed: int = 0):
    """Rows with prompts of 2-6 and completions of 1-7 tokens (some cut at 7), two rows per prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for i in range(n):
        if i % 2 == 0:
            prompt = torch.randint(3, 60, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
        k = int(torch.randint(1, 8, (1,), generator=g))
        prompts.append(prompt)
        comps.append(Completion(torch.randint(3, 60, (k,), generator=g).tolist(), "", [-1.0] * k,
                                "length" if k == 7 else "stop"))
    return build_batch(prompts, comps, torch.randn(n, generator=g), 0, mask_truncated=False)


def _policy(seed: int = 0, checkpointing: bool = False):
    torch.manual_seed(seed)
    policy = load_policy(ModelConfig(gradient_checkpointing=checkpointing), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    return policy


def test_first_fit_fills_rows_longest_first_and_isolates_long_sequences():
    assert first_fit([5, 3, 4, 2], 7) == [[0, 3], [2, 1]]
    assert first_fit([9, 1, 1], 4) == [[0], [1, 2]]


def test_pack_lays_real_tokens_end_to_end_with_restarting_positions():
    prompts = [[7, 8, 9], [5]]
    comps = [Completion([10, 11], "", [0.0, 0.0], "stop"), Completion([12, 13, 14], "", [0.0] * 3, "stop")]
    b = build_batch(prompts, comps, torch.zeros(2), 0)
    pk = pack(b.input_ids, b.attention_mask, b.prompt_width, row_tokens=100)
    assert pk.shape == (1, 9)
    assert pk.input_ids[0].tolist() == [7, 8, 9, 10, 11, 5, 12, 13, 14]
    assert pk.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    # completion token j of row i is predicted by the packed hidden state just before it
    assert pk.source.tolist() == [2, 3, 5, 6, 7] and pk.rows.tolist() == [0, 0, 1, 1, 1]
    assert pk.cols.tolist() == [0, 1, 0, 1, 2]
    two = pack(b.input_ids, b.attention_mask, b.prompt_width, row_tokens=5)
    assert two.shape == (2, 5) and two.real.tolist() == [[True] * 5, [True, True, True, True, False]]
    assert two.position_ids[1].tolist() == [0, 1, 2, 3, 0]  # the filler restarts too


def test_packed_widths_round_up_to_the_multiple_so_shapes_repeat():
    g = torch.Generator().manual_seed(0)
    widths = set()
    for _ in range(6):
        prompts = [torch.randint(3, 50, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(12)]
        comps = [Completion([5] * int(torch.randint(1, 20, (1,), generator=g)), "", [], "stop") for _ in range(12)]
        b = build_batch(prompts, comps, torch.zeros(12), 0)
        assert pack(b.input_ids, b.attention_mask, b.prompt_width, 40).shape[1] <= 40
        pk = pack(b.input_ids, b.attention_mask, b.prompt_width, 40, multiple=16)
        widths.add(pk.shape[1])
        assert pk.shape[1] % 16 == 0 and int(pk.real.sum()) == int(b.attention_mask.sum())
    assert widths <= {32, 48}


@pytest.mark.parametrize("row_tokens", [1, 12, 10_000])
def test_packed_logprobs_equal_padded(row_tokens):
    """One row per sequence (1), a few rows (12) and one row holding everything: every real completion token's
    log-prob and entropy equal the padded forward's; padding columns are 0."""
    policy, batch = _policy(), _ragged()
    real = batch.attention_mask[:, batch.prompt_width:].bool()
    with torch.no_grad():
        ref, ref_ent = completion_logprobs(policy.model, batch.input_ids, batch.attention_mask, batch.position_ids,
                                           batch.prompt_width, 0.7, with_entropy=True)
        got, ent = completion_logprobs(policy.model, batch.input_ids, batch.attention_mask, batch.position_ids,
                                       batch.prompt_width, 0.7, with_entropy=True, pack_tokens=row_tokens)
    assert torch.allclose(got[real], ref[real], atol=1e-5) and torch.allclose(ent[real], ref_ent[real], atol=1e-5)
    assert (got[~real] == 0).all() and (~real).any()
    # the check can fail: without restarting positions (one long sequence) the log-probs move
    assert not torch.allclose(got[real], _unmasked_concat(policy, batch)[real], atol=1e-3)


def _unmasked_concat(policy, batch):
    """The same packed row but with positions that do not restart: sequences see each other."""
    pk = pack(batch.input_ids, batch.attention_mask, batch.prompt_width, 10_000)
    with torch.no_grad():
        hidden = policy.model.get_base_model().model(input_ids=pk.input_ids, use_cache=False).last_hidden_state
        logits = policy.model.get_base_model().lm_head(hidden.reshape(-1, hidden.shape[-1])[pk.source]).float() / 0.7
    out = torch.zeros(batch.size, batch.completion_width)
    out[pk.rows, pk.cols] = logits.log_softmax(-1).gather(-1, batch.input_ids[:, batch.prompt_width:][
        pk.rows, pk.cols][:, None])[:, 0]
    return out


def _step(loss: str, pack_tokens: int, replay_on: bool, budget: int = 0, checkpointing: bool = False,
          alpha1: float = 0.01):
    policy, batch = _policy(checkpointing=checkpointing), _ragged()
    batch.rollout_logp = torch.randn(batch.rollout_logp.shape, generator=torch.Generator().manual_seed(1)) * 0.1 - 1
    opt = torch.optim.SGD([p for p in policy.model.parameters() if p.requires_grad], lr=1.0)
    cfg = GRPOConfig(minibatch_size=8, beta=0.1, loss=loss, mu=2, tis_cap=2.0, pack_tokens=pack_tokens,
                     max_tokens_per_micro_batch=budget, logprob_tokens_per_micro_batch=2 * budget)
    fwd = CompletionLogprobs(policy.model)
    replay = RouterReplay(policy.model) if replay_on else None
    monitor = ExpertMonitor(policy.model, alpha1=alpha1)
    fill_old_and_ref(policy, fwd, batch, cfg, 1.0, replay, need_old=True)
    metrics, finite = policy_update(policy, fwd, batch, cfg, opt, get_scheduler("constant", opt), 1.0, 7, 1.0,
                                    monitor, replay)
    assert finite
    counts = {k: v.clone() for k, v in monitor.counts.items()}
    monitor.remove()
    params = {n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad}
    return metrics, params, counts, (replay.total if replay else 0)


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
@pytest.mark.parametrize("replay_on", [False, True])
def test_packed_step_gives_the_padded_step(loss, replay_on):
    """mu=2 passes with the reference, TIS, a balance loss and the expert monitor: the micro-batch packed in rows
    of 16 tokens gives the padded step's loss, KL, balance loss, parameters and expert counts."""
    m_pad, p_pad, c_pad, t_pad = _step(loss, 0, replay_on)
    m, p, c, t = _step(loss, 16, replay_on)
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/kl", "moe/balance_loss"):
        assert m[key] == pytest.approx(m_pad[key], rel=1e-4, abs=1e-7), key
    for n in p_pad:
        assert torch.allclose(p[n], p_pad[n], atol=1e-5), n
    assert all(torch.equal(c[k], c_pad[k]) for k in c_pad), "filler tokens must not be counted"
    assert t == t_pad


@pytest.mark.parametrize("loss", ["grpo", "dr_grpo", "dapo", "gspo"])
@pytest.mark.parametrize("replay_on", [False, True])
def test_packed_token_budget_micro_batches_give_the_unsplit_padded_step(loss, replay_on):
    """Budgets of 20 real tokens (several packed micro-batches; the no-grad passes 40) accumulate to the padded
    whole-minibatch step. No balance loss here: it is not additive over parts (any micro-batching changes it)."""
    m_pad, p_pad, c_pad, _ = _step(loss, 0, replay_on, alpha1=0.0)
    m, p, c, _ = _step(loss, 10_000, replay_on, budget=20, alpha1=0.0)
    for key in ("actor/pg_loss", "actor/grad_norm", "actor/kl"):
        assert m[key] == pytest.approx(m_pad[key], rel=1e-4, abs=1e-7), key
    for n in p_pad:
        assert torch.allclose(p[n], p_pad[n], atol=1e-5), n
    assert all(torch.equal(c[k], c_pad[k]) for k in c_pad)


def test_packed_step_under_gradient_checkpointing_and_replay_equals_without():
    _, p_ckpt, c_ckpt, _ = _step("grpo", 12, True, 20, checkpointing=True)
    _, p_plain, c_plain, _ = _step("grpo", 12, True, 20)
    for n in p_plain:
        assert torch.allclose(p_ckpt[n], p_plain[n], atol=1e-5), n
    assert all(torch.equal(c_ckpt[k], c_plain[k]) for k in c_plain)


def test_real_token_budget_groups_by_own_length():
    batch = _ragged()
    own = batch.attention_mask.sum(-1)
    parts = batch.by_tokens(20, real=True)
    assert sorted(torch.cat(parts).tolist()) == list(range(batch.size))
    assert all(int(own[p].sum()) <= 20 or len(p) == 1 for p in parts)
    # own lengths 10 8 6 6 10 11 11 7; completions 4 2 3 3 4 5 7 3 (prompt width 6), longest completion first
    assert [q.tolist() for q in parts] == [[6], [5], [0, 4], [2, 3, 7], [1]]  # 11 | 11 | 20 | 19 | 8
    assert [q.tolist() for q in batch.by_tokens(20)] == [[6], [5], [0, 4], [2, 3], [7, 1]]  # 2 x (6 + 4) ...


def test_min_rows_adds_filler_rows_that_change_no_logprob():
    policy, batch = _policy(), _ragged()
    one = pack(batch.input_ids, batch.attention_mask, batch.prompt_width, 10_000)
    two = pack(batch.input_ids, batch.attention_mask, batch.prompt_width, 10_000, min_rows=2)
    assert one.shape[0] == 1 and two.shape == (2, one.shape[1]) and not two.real[1].any()
    assert two.cu_seqlens[-1] == two.input_ids.numel() and two.position_ids[1].tolist() == list(range(one.shape[1]))
    assert torch.equal(two.source, one.source)
    decoder = policy.model.get_base_model().model
    with torch.no_grad():
        h1, h2 = (decoder(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False,
                          **pk.attention_kwargs).last_hidden_state.flatten(0, 1)[pk.source] for pk in (one, two))
    torch.testing.assert_close(h2, h1)


def test_compiled_layers_do_not_compile_again_for_a_lone_packed_row():
    """Training passes through compiled layers: a micro-batch packed into one row is given a filler row, so the
    graphs compiled for it serve later row counts (without it, dynamo's 0/1 specialisation compiles again)."""
    from align.kernels.patches import compile_decoder_layers

    policy, batch = _policy(), _ragged()
    compiles = []

    def backend(gm, inputs):
        compiles.append(1)
        return gm.forward

    assert compile_decoder_layers(policy.model, backend=backend) > 0
    policy.model.train()
    small, large = batch, _ragged(40, seed=1)  # all in one row of 128 / rows of 128 at pack_tokens=128
    counts, rows = [], []
    for b in (large, small, large):
        rows.append(pack(b.input_ids, b.attention_mask, b.prompt_width, 128, multiple=128).shape)
        logp, _ = completion_logprobs(policy.model, b.input_ids, b.attention_mask, b.position_ids, b.prompt_width,
                                      pack_tokens=128)
        logp.sum().backward()
        counts.append(len(compiles))
    assert rows[1] == (1, 128) and rows[0][0] > 2 and rows[0][1] == 128
    assert counts[0] > 0 and counts[1] == counts[2] == counts[0], counts
    torch._dynamo.reset()
