"""Rollout tokens/s, vLLM(-CPU) vs the HF fallback, and weight-sync seconds vs parameter count.

    python bench/rollout.py                     # tiny, wide and V2-Lite-width (2 layers) shapes, one process each
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from align.config import LoraConfig, ModelConfig, RolloutConfig, TinyModelConfig  # noqa: E402
from align.policy import load_policy  # noqa: E402
from bench.common import write  # noqa: E402
from rollout import SamplingSettings, make_engine, render_prompts  # noqa: E402
from rollout.hf import HFEngine  # noqa: E402

SHAPES = {"tiny": TinyModelConfig(),
          "wide": TinyModelConfig(hidden_size=512, num_attention_heads=8, intermediate_size=1024,
                                  moe_intermediate_size=256, n_routed_experts=16, num_hidden_layers=4)}
# V2-Lite's layer widths (MLA, 64 routed + 2 shared experts of 1408, dense layer 0 of 10944) with the tiny vocab and
# 2 layers (one dense, one MoE): what fits this machine three times over (policy, saved checkpoint, engine) in fp32.
V2_LITE_LAYERS = dict(hidden_size=2048, num_attention_heads=16, qk_nope_head_dim=128, v_head_dim=128,
                      intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
                      num_experts_per_tok=6)
SHAPES["v2-lite-width-2"] = TinyModelConfig(num_hidden_layers=2, **V2_LITE_LAYERS)


def tokens_per_s(engine, prompts, settings, repeats=3) -> float:
    engine.generate(prompts[:4], settings)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        out = engine.generate(prompts, settings)
        secs = time.perf_counter() - t
        best = max(best, sum(len(c.token_ids) for ro in out for c in ro.completions) / secs)
    return best


def measure_shape(shape: str) -> dict:
    results = {}
    for shape, tiny in [(shape, SHAPES[shape])]:
        policy = load_policy(ModelConfig(tiny=tiny), LoraConfig(r=16))
        # The engine starts on dummy weights and takes every merged weight in one sync.
        engine = make_engine("vllm", policy, RolloutConfig(), "float32", 256)
        questions = [[{"role": "user", "content": f"What is {i}+{i % 7}?"}] for i in range(64)]
        prompts = render_prompts(policy.tokenizer, questions)
        settings = SamplingSettings(n=8, temperature=1.0, max_new_tokens=32, seed=0)
        entry = {"params": policy.num_parameters()[1]}
        if shape == "tiny":
            entry["vllm_tok_s"] = tokens_per_s(engine, prompts, settings)
            entry["hf_tok_s"] = tokens_per_s(HFEngine(policy.model, policy.tokenizer), prompts, settings, repeats=1)
            entry["vllm_over_hf"] = entry["vllm_tok_s"] / entry["hf_tok_s"]
        with torch.no_grad():
            for n, p in policy.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        t = time.perf_counter()
        sd = policy.merged_state_dict(only_adapted=True)
        entry["merge_s"] = time.perf_counter() - t
        entry["sync_s"] = engine.update_weights(sd)
        entry["synced_params"] = engine.last_sync["params"]
        results[shape] = entry
    return results[shape]


def main() -> None:
    """Each shape in its own process: a second in-process vLLM engine cannot get KV memory back."""
    import json
    import subprocess

    if len(sys.argv) > 1:
        print("RESULT " + json.dumps(measure_shape(sys.argv[1])))
        return
    results = {}
    for shape in SHAPES:
        out = subprocess.run([sys.executable, __file__, shape], capture_output=True, text=True, check=True).stdout
        results[shape] = json.loads(next(l for l in out.splitlines() if l.startswith("RESULT "))[7:])
    write("rollout_cpu", results)


if __name__ == "__main__":
    main()
