"""What the kernel cache saves: step 1 of a GRPO update in a fresh process, with an empty cache and then a warm one.

Each run is its own process (what a user's second ``align grpo`` is): V2-Lite's layer widths with 2 decoder
layers (one dense, one MoE: every kernel shape of the full model, compiled once per shape), LoRA as ``align grpo``
prepares it, compiled RMSNorm / rope / log-softmax and compiled decoder layers, the Triton expert and LoRA
operators; one old-policy pass and one clipped update on 16 rows, timed twice (step 1 compiles, step 2 does not).
``ALIGN_KERNEL_CACHE`` points both runs at the same new directory.

    python bench/kernel_cache.py            # GPU
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run() -> dict:
    import logging

    import torch
    from transformers import get_scheduler

    sys.path.insert(0, str(ROOT))
    from align.config import GRPOConfig, LoraConfig, ModelConfig
    from align.grpo.logprobs import CompletionLogprobs
    from align.grpo.update import fill_old_and_ref, policy_update
    from align.policy import Policy, prepare_for_training
    from bench.grpo_step import build_model
    from bench.grpo_update import rollout_like_batch

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model, tok = build_model("v2-lite" if cuda else "tiny", 2, torch.bfloat16 if cuda else torch.float32, device)
    model = prepare_for_training(model, ModelConfig(gradient_checkpointing=True, compile_layers=True,
                                                    recompute_layers=0), LoraConfig(r=16, alpha=32))
    policy = Policy(model, tok, "bench")
    from align.kernels.cache import use_kernel_cache

    line = use_kernel_cache()
    batch = rollout_like_batch(16, min(1000, model.config.vocab_size), 256 if cuda else 24).to(device)
    cfg = GRPOConfig(minibatch_size=16, micro_batch_size=4, beta=0.0)
    fwd = CompletionLogprobs(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    times = []
    for _ in range(2):
        torch.cuda.synchronize() if cuda else None
        t = time.perf_counter()
        fill_old_and_ref(policy, fwd, batch, cfg, 1.0, need_old=True)
        policy_update(policy, fwd, batch, cfg, opt, get_scheduler("constant", opt), 1.0, 256, 1.0)
        torch.cuda.synchronize() if cuda else None
        times.append(time.perf_counter() - t)
    return {"cache_line": line, "step1_s": times[0], "step2_s": times[1]}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print("RESULT " + json.dumps(one_run()), flush=True)
        return
    cache = tempfile.mkdtemp(prefix="align-kernels-")
    env = {**os.environ, "ALIGN_KERNEL_CACHE": cache}
    for k in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR"):
        env.pop(k, None)
    runs = []
    for name in ("cold", "warm"):
        t = time.perf_counter()
        res = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(res.stdout[-3000:], res.stderr[-3000:])
            raise SystemExit(f"{name} run failed")
        runs.append({"run": name, "process_s": time.perf_counter() - t, **json.loads(line[7:])})
        print(json.dumps(runs[-1]), flush=True)
    sys.path.insert(0, str(ROOT))
    import torch

    from bench.common import write

    cold, warm = runs
    write("kernel_cache_" + ("cuda" if torch.cuda.is_available() else "cpu"), {
        "runs": runs, "step1_compile_s_cold": cold["step1_s"] - cold["step2_s"],
        "step1_compile_s_warm": warm["step1_s"] - warm["step2_s"],
        "step1_ratio_cold_over_warm": cold["step1_s"] / warm["step1_s"]})


if __name__ == "__main__":
    main()
