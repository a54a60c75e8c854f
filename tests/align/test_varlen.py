"""align_varlen attention (align/kernels/varlen.py): packed rows attend within their sequences only."""

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from align.config import LoraConfig, ModelConfig
from align.grpo.batch import build_batch
from align.grpo.logprobs import completion_logprobs
from align.grpo.packing import pack
from align.kernels.varlen import NAME, attention
from align.policy import load_policy
from rollout.base import Completion


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 1
    training = False


def _qkv(rows: int, width: int, dqk: int = 8, dv: int = 6, heads: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    make = lambda d: torch.randn(rows, heads, width, d, generator=g, dtype=torch.float64,  # noqa: E731
                                 requires_grad=True)
    return make(dqk), make(dqk), make(dv)


def test_each_sequence_attends_causally_to_itself_only():
    """Against SDPA run on every sequence alone (outputs and gradients), rows of 7 holding [3, 4] and [2, 5]."""
    lens = [3, 4, 2, 5]
    q, k, v = _qkv(2, 7)
    cu = torch.tensor([0, 3, 7, 9, 14], dtype=torch.int32)
    out, _ = attention(_Attn(), q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=5)
    assert out.shape == (2, 7, 2, 6)  # [B, S, H, Dv], transformers' layout after attention
    flat = lambda t: t.transpose(1, 2).reshape(14, 2, -1)  # noqa: E731  [B*S, H, D]
    ref, start = [], 0
    for n in lens:
        sl = lambda t: flat(t)[start:start + n].transpose(0, 1)[None]  # noqa: E731
        ref.append(F.scaled_dot_product_attention(sl(q), sl(k), sl(v), is_causal=True, scale=0.3)[0].transpose(0, 1))
        start += n
    ref = torch.cat(ref).view(2, 7, 2, 6)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, ref_grads))
    # the check can fail: the whole row as one causal sequence differs
    whole, _ = attention(_Attn(), q, k, v, None, scaling=0.3, cu_seq_lens_q=torch.tensor([0, 7, 14]), max_length_q=7)
    assert not torch.allclose(whole, ref, atol=1e-3)


def test_without_sequence_lengths_it_is_transformers_sdpa():
    q, k, v = _qkv(2, 5)
    mask = torch.ones(5, 5, dtype=torch.bool).tril().expand(2, 1, 5, 5).clone()
    mask[1, :, :, 0] = False  # a padded first column in row 1
    mask[1, :, 0, 0] = True
    got, _ = attention(_Attn(), q, k, v, mask, scaling=0.5)
    ref, _ = sdpa_attention_forward(_Attn(), q, k, v, mask, scaling=0.5)
    assert torch.equal(got, ref)


def test_pack_gives_cumulative_lengths_fillers_included():
    prompts = [[7, 8, 9], [5]]
    comps = [Completion([10, 11], "", [0.0, 0.0], "stop"), Completion([12, 13, 14], "", [0.0] * 3, "stop")]
    b = build_batch(prompts, comps, torch.zeros(2), 0)
    one = pack(b.input_ids, b.attention_mask, b.prompt_width, row_tokens=100)
    assert one.cu_seqlens.tolist() == [0, 5, 9] and one.cu_seqlens.dtype == torch.int32 and one.max_len == 5
    two = pack(b.input_ids, b.attention_mask, b.prompt_width, row_tokens=5, multiple=4)
    assert two.shape == (2, 8)  # rows of 5 and 4 tokens widened to 8: fillers of 3 and 4
    assert two.cu_seqlens.tolist() == [0, 5, 8, 12, 16] and two.max_len == 8
    assert two.attention_kwargs["cu_seq_lens_k"] is two.cu_seqlens and two.attention_kwargs["max_length_k"] == 8


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_logprobs_and_gradients_equal_the_mask_path(checkpointing):
    """The policy installs align_varlen (model.packed_attention=varlen); packed log-probs and LoRA gradients equal
    transformers' block-diagonal mask path, also when checkpointing recomputes the layers in the backward."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 60, (int(torch.randint(2, 7, (1,), generator=g)),), generator=g).tolist()
               for _ in range(6)]
    comps = [Completion(torch.randint(3, 60, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist(),
                        "", [], "stop") for _ in range(6)]
    b = build_batch(prompts, comps, torch.zeros(6), 0)
    results = []
    for mode in ("varlen", "mask"):
        torch.manual_seed(0)
        policy = load_policy(ModelConfig(packed_attention=mode, gradient_checkpointing=checkpointing),
                             LoraConfig(r=4, alpha=8))
        assert (policy.model.config._attn_implementation == NAME) == (mode == "varlen")
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
        policy.model.train()
        logp, _ = completion_logprobs(policy.model, b.input_ids, b.attention_mask, b.position_ids, b.prompt_width,
                                      pack_tokens=12)
        logp.sum().backward()
        grads = {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}
        results.append((logp.detach(), grads))
    (a, ga), (m, gm) = results
    assert torch.allclose(a, m, atol=1e-5) and ga.keys() == gm.keys() and len(ga) > 0
    assert all(torch.allclose(ga[n], gm[n], atol=1e-5) for n in ga)


def test_generation_with_a_cache_is_unchanged():
    """align_varlen without sequence lengths is transformers' SDPA path: greedy tokens of a left-padded batch equal
    those of the same policy on plain SDPA (the HF engine and the fast decoder generate through it)."""
    outs = []
    for mode in ("varlen", "mask"):
        torch.manual_seed(0)
        policy = load_policy(ModelConfig(packed_attention=mode), LoraConfig(r=4, alpha=8))
        ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
        mask = (ids != 0).long()
        with torch.no_grad():
            outs.append(policy.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                              pad_token_id=0))
    assert torch.equal(outs[0], outs[1]) and outs[0].shape == (2, 11)
