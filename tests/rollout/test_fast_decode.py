"""The fast decode path (latent cache, absorbed MLA) against transformers on the tiny model, in fp32."""

import torch

from align.config import load_config
from align.policy import load_policy
from rollout import SamplingSettings
from rollout.factory import make_engine
from rollout.fast_decode import FastDecoder
from rollout.hf import HFEngine

PROMPTS = ["1+2=", "13+14=", "7+8=", "21+9=", "3+30="]


def _policy(lora: bool):
    cfg = load_config(None, [f"lora.enabled={str(lora).lower()}"])
    policy = load_policy(cfg.model, cfg.lora)
    if lora:
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return policy, cfg


def _padded(tok, texts):
    rows = [tok.encode(t) for t in texts]
    w = max(map(len, rows))
    ids = torch.full((len(rows), w), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, w - len(r):] = torch.tensor(r)
        mask[i, w - len(r):] = 1
    return ids, mask


def test_greedy_tokens_and_logprobs_equal_transformers():
    policy, _ = _policy(lora=False)
    model, tok = policy.model.eval(), policy.tokenizer
    ids, mask = _padded(tok, PROMPTS)
    hf = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                        pad_token_id=tok.pad_token_id, eos_token_id=None, output_logits=True,
                        return_dict_in_generate=True)
    new, logp = FastDecoder(model, len(PROMPTS), 64).generate(ids, mask, 24)
    ref = hf.sequences[:, ids.shape[1]:]
    assert torch.equal(new, ref)
    hf_logp = torch.stack(hf.logits, 1).float().log_softmax(-1).gather(-1, ref.unsqueeze(-1)).squeeze(-1)
    assert (logp - hf_logp).abs().max() < 1e-4


def test_reported_kv_bytes_are_what_the_decoder_allocates_per_token():
    policy, _ = _policy(lora=False)
    dec = FastDecoder(policy.model, batch_size=2, max_len=16)
    allocated = sum(t.element_size() * t.numel() for t in (dec.ckv, dec.kpe)) // (2 * 16)
    assert allocated == FastDecoder.kv_bytes_per_token(policy.model.config, torch.float32)
    assert dec.ckv.shape[-1] + dec.kpe.shape[-1] == 576, "only the latent and the rope key are cached"


def test_engine_with_lora_matches_hf_engine_and_leaves_weights_unmerged():
    policy, cfg = _policy(lora=True)
    fast = make_engine("fast", policy, cfg.rollout, max_model_len=64)
    assert fast.name == "fast"
    before = {n: p.clone() for n, p in policy.model.named_parameters() if "kv_b_proj" in n}
    prompts = [policy.tokenizer.encode(t) for t in PROMPTS]
    greedy = SamplingSettings(n=2, temperature=0.0, max_new_tokens=12)
    a = fast.generate(prompts, greedy)
    b = HFEngine(policy.model, policy.tokenizer).generate(prompts, greedy)
    assert [c.token_ids for r in a for c in r.completions] == [c.token_ids for r in b for c in r.completions]
    for n, p in policy.model.named_parameters():
        if n in before:
            assert torch.allclose(p, before[n], atol=1e-6), n  # merge + unmerge round-trips
    sampled = fast.generate(prompts, SamplingSettings(n=3, temperature=1.0, max_new_tokens=8, seed=3))
    assert [len(r.completions) for r in sampled] == [3] * len(PROMPTS)
    assert all(len(c.logprobs) == len(c.token_ids) and all(lp <= 0 for lp in c.logprobs)
               for r in sampled for c in r.completions)


def test_samples_equal_the_hf_engine_with_the_same_seeds():
    """Both engines draw Gumbel noise from the same per-row seeds, so equal logits give equal samples
    (fp32) — and a prompt's samples do not depend on the other prompts in the batch."""
    policy, cfg = _policy(lora=False)
    fast = make_engine("fast", policy, cfg.rollout, max_model_len=64)
    prompts = [policy.tokenizer.encode(t) for t in PROMPTS]
    s = SamplingSettings(n=3, temperature=0.9, top_p=0.95, max_new_tokens=10, seeds=[11, 12, 13, 14, 15])
    a = fast.generate(prompts, s)
    b = HFEngine(policy.model, policy.tokenizer).generate(prompts, s)
    assert [c.token_ids for r in a for c in r.completions] == [c.token_ids for r in b for c in r.completions]
    alone = fast.generate(prompts[2:3], SamplingSettings(n=3, temperature=0.9, top_p=0.95, max_new_tokens=10,
                                                         seeds=[13]))
    assert [c.token_ids for c in alone[0].completions] == [c.token_ids for c in a[2].completions]


def test_decoder_is_reusable_and_teacher_forcing_matches_its_own_decoding():
    """One decoder serves many calls (its step inputs stay at fixed addresses, as a CUDA graph
    needs); feeding back its own greedy tokens scores each as that step's best token."""
    policy, _ = _policy(lora=False)
    model, tok = policy.model.eval(), policy.tokenizer
    dec = FastDecoder(model, 3, 48)
    ids_a, mask_a = _padded(tok, PROMPTS[:3])
    ids_b, mask_b = _padded(tok, PROMPTS[2:])
    first, _ = dec.generate(ids_a, mask_a, 12)
    statics = (dec.s_ids.data_ptr(), dec.s_pos.data_ptr(), dec.s_slot.data_ptr())
    dec.generate(ids_b, mask_b, 12)
    again, logp = dec.generate(ids_a, mask_a, 12)
    assert torch.equal(first, again)
    assert (dec.s_ids.data_ptr(), dec.s_pos.data_ptr(), dec.s_slot.data_ptr()) == statics
    chosen, best = dec.teacher_forced(ids_a, mask_a, again)
    assert torch.allclose(chosen, logp, atol=1e-6) and torch.allclose(chosen, best, atol=1e-6)
