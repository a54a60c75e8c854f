"""Rollout without vLLM: HF ``generate`` vs align's fast decode path (latent cache, absorbed MLA, CUDA graph).

Same random DeepSeek-V2 weights, same left-padded prompts, greedy decoding, in one process:

    python bench/decode.py --shape v2-lite          # H100: V2-Lite shape, bf16, batch 64, prompt 128
    python bench/decode.py --shape tiny             # CPU smoke run

Correctness in the same run: greedy tokens of both paths on the full model (bf16 argmax ties on random
weights can flip a token, so the fraction of identical sequences and the log-prob of HF's tokens under
the fast path are reported), and an fp32 run of the same shape (all layers by default), where the tokens must match.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DeepseekV2Config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write  # noqa: E402
from rollout.fast_decode import FastDecoder  # noqa: E402

V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
               n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None,
               qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
               norm_topk_prob=False, routed_scaling_factor=1.0, max_position_embeddings=163840,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
                                "mscale": 0.707, "mscale_all_dim": 0.707},
               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY = {**V2_LITE, "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "qk_nope_head_dim": 32, "v_head_dim": 32}


def build(shape: dict, dtype, device, layers: int | None = None):
    cfg = DeepseekV2Config(**{**shape, **({"num_hidden_layers": layers} if layers else {})})
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm" if device == "cuda" else "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def prompts(batch: int, length: int, vocab: int, device):
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(length // 2, length + 1, (batch,), generator=g)
    ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lens.tolist()):
        ids[i, length - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, length - n:] = 1
    return ids.to(device), mask.to(device)


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def hf_generate(model, ids, mask, new: int, device):
    sync(device)
    t = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                         pad_token_id=0, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    sync(device)
    secs = time.perf_counter() - t
    cache = out.past_key_values
    tensors = [t for layer in getattr(cache, "layers", [])
               for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if isinstance(t, torch.Tensor)]
    kv_bytes = sum(t.numel() * t.element_size() for t in tensors) / (ids.shape[0] * (ids.shape[1] + new - 1))
    new_tokens = out.sequences[:, ids.shape[1]:]
    logp = torch.stack(out.logits, 1).float().log_softmax(-1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
    return new_tokens, secs, kv_bytes, logp


def fast_generate(model, ids, mask, new: int, device, graph: bool):
    dec = FastDecoder(model, ids.shape[0], ids.shape[1] + new, use_graph=graph)
    dec.generate(ids, mask, min(new, 8))  # capture the graph and warm up outside the timed run
    sync(device)
    t = time.perf_counter()
    tokens, logps = dec.generate(ids, mask, new)
    sync(device)
    return tokens, time.perf_counter() - t, dec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=["tiny", "v2-lite"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--exact-layers", type=int, default=0,
                    help="layers of the fp32 greedy-equality model (0: all for tiny, 13 for V2-Lite, whose 27 "
                         "fp32 layers do not fit one H100 beside the run)")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = V2_LITE if a.shape == "v2-lite" else TINY
    res: dict = {"shape": a.shape, "batch": a.batch, "prompt": a.prompt, "new_tokens": a.new}

    # Exactness: fp32 (no bf16 ties), same shape, greedy tokens must be identical.
    small = build(shape, torch.float32, device, layers=a.exact_layers or (13 if a.shape == "v2-lite" else None))
    ids, mask = prompts(a.batch, a.prompt, shape["vocab_size"], device)
    ref, _, _, _ = hf_generate(small, ids, mask, 32, device)
    got, _, small_dec = fast_generate(small, ids, mask, 32, device, graph=False)
    res["fp32_layers"] = small.config.num_hidden_layers
    res["fp32_greedy_identical"] = bool((ref == got).all())
    res["fp32_token_agreement"] = float((ref == got).float().mean())
    del small, small_dec, ref, got  # the decoder holds the fp32 model
    if device == "cuda":
        torch.cuda.empty_cache()

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(shape, dtype, device)
    res["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 2)
    res["experts_implementation"] = model.config._experts_implementation
    hf_tokens, hf_s, hf_kv, hf_logp = hf_generate(model, ids, mask, a.new, device)
    res["hf_generate"] = {"tok_s": a.batch * a.new / hf_s, "seconds": hf_s, "kv_bytes_per_token": hf_kv}
    eager_tokens = None
    for graph in ([False, True] if device == "cuda" else [False]):
        key = "fast_graph" if graph else "fast_eager"
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()  # this decoder's peak, not HF's logits kept for the checks
        try:
            tokens, secs, dec = fast_generate(model, ids, mask, a.new, device, graph)
        except Exception as e:  # keep the other rows of a long GPU run
            res[key] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
            continue
        res[key] = {"tok_s": a.batch * a.new / secs, "seconds": secs, "ratio_vs_hf": hf_s / secs,
                    "kv_bytes_per_token": FastDecoder.kv_bytes_per_token(model.config, dtype),
                    "greedy_sequences_identical": float((tokens == hf_tokens).all(-1).float().mean()),
                    "greedy_token_agreement": float((tokens == hf_tokens).float().mean())}
        if not graph:
            eager_tokens = tokens
        elif eager_tokens is not None:
            res[key]["identical_to_fast_eager"] = bool((tokens == eager_tokens).all())
        if graph or device != "cuda":
            chosen, best = dec.teacher_forced(ids, mask, hf_tokens)
            gap = (best - chosen)
            # HF's greedy token is (within bf16 noise) also the fast path's best token at every step.
            res[key]["hf_token_logp_gap_max"] = float(gap.max())
            res[key]["hf_token_logp_gap_mean"] = float(gap.mean())
            # Both paths scoring HF's tokens: |log p_fast - log p_hf| per token.
            d = (chosen - hf_logp).abs()
            res[key]["teacher_forced_abs_dlogp_mean"] = float(d.mean())
            res[key]["teacher_forced_abs_dlogp_max"] = float(d.max())
            res[key]["first_token_agreement"] = float((tokens[:, 0] == hf_tokens[:, 0]).float().mean())
            res["hf_top_logp_mean"] = float(hf_logp.mean())
        if device == "cuda":
            res[key]["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        del dec
    res["kv_ratio_hf_over_fast"] = hf_kv / FastDecoder.kv_bytes_per_token(model.config, dtype)
    write(f"decode_{a.shape}_{device}", res)


if __name__ == "__main__":
    main()
