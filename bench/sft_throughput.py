"""SFT update throughput (tokens/s) of the policy: LoRA on experts vs LoRA without experts vs full.

    python bench/sft_throughput.py                     # tiny model on this CPU
    python bench/sft_throughput.py --shape v2-lite     # V2-Lite shape, random bf16 weights (GPU)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import LoraConfig, ModelConfig, TinyModelConfig  # noqa: E402
from align.policy import load_policy  # noqa: E402
from bench.common import write  # noqa: E402

V2_LITE = dict(num_hidden_layers=27, hidden_size=2048, num_attention_heads=16, qk_nope_head_dim=128,
               qk_rope_head_dim=64, v_head_dim=128, kv_lora_rank=512, intermediate_size=10944,
               moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
               max_position_embeddings=4096)


def measure(policy, batch: int, seq: int, steps: int, device: str) -> dict:
    model = policy.model.to(device)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(10, min(vocab, 100), (batch, seq), device=device)
    times = []
    for i in range(steps + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t)
    step = sorted(times)[len(times) // 2]
    out = {"tokens_per_s": batch * seq / step, "step_s": step, "trainable_params": policy.num_parameters()[0]}
    if device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=["tiny", "v2-lite"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = TinyModelConfig(**V2_LITE) if a.shape == "v2-lite" else TinyModelConfig()
    dtype = "bfloat16" if device == "cuda" else "float32"
    results = {}
    for name, lora in [("full", LoraConfig(enabled=False)), ("lora_no_experts", LoraConfig(routed_experts=False)),
                       ("lora_with_experts", LoraConfig())]:
        if a.shape == "v2-lite" and name == "full":
            continue
        with torch.device(device):
            policy = load_policy(ModelConfig(tiny=tiny, dtype=dtype, gradient_checkpointing=a.shape == "v2-lite"), lora)
        try:
            results[name] = measure(policy, a.batch, a.seq, a.steps, device)
        except torch.OutOfMemoryError:
            results[name] = {"oom": True}
        del policy
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    base = results.get("lora_no_experts", {}).get("tokens_per_s")
    if base and "tokens_per_s" in results.get("lora_with_experts", {}):
        results["expert_lora_cost_ratio"] = results["lora_with_experts"]["tokens_per_s"] / base
    write(f"sft_throughput_{a.shape}_{device}", {"batch": a.batch, "seq": a.seq, **results})


if __name__ == "__main__":
    main()
