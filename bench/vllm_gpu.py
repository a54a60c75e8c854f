"""CUDA vLLM as align drives it at V2-Lite shape (random bf16): start-up, rollout at the GRPO shape, the sleep cycle.

1. Start-up: ``make_engine`` writes config + tokenizer only, starts vLLM on dummy weights and pushes every merged
   weight once (no 31 GB merged copy on disk), timed against the trainer's model build.
2. Rollout at the GRPO shape (``--prompts`` x ``--group`` samples, ``--new-tokens``, T=1): per-prompt seeded
   requests (vLLM samples them one row at a time) against one seeded stream per call, same run, same engine.
3. ``--cycles`` x (sleep(level=2) -> wake weights -> full sync -> wake KV cache), and the logprob agreement of
   engine and trainer after the last cycle (teacher-forced, since random weights give near-flat logits).

    python bench/vllm_gpu.py                 # H200, with CUDA vLLM on the path
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import load_config  # noqa: E402
from align.grpo.batch import build_batch  # noqa: E402
from align.grpo.logprobs import completion_logprobs  # noqa: E402
from align.policy import Policy, prepare_for_training  # noqa: E402
from bench.common import write  # noqa: E402
from bench.grpo_step import build_model, prompt_rows  # noqa: E402
from rollout import SamplingSettings, make_engine, render_prompts  # noqa: E402


def rollout_rate(engine, prompts, a, per_prompt: bool) -> dict:
    engine.per_prompt_seeds = per_prompt
    s = SamplingSettings(n=a.group, temperature=1.0, max_new_tokens=a.new_tokens, seed=7,
                         seeds=list(range(len(prompts))))
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = engine.generate(prompts, s)
    secs = time.perf_counter() - t
    toks = sum(len(c.token_ids) for ro in out for c in ro.completions)
    return {"seconds": secs, "tokens": toks, "tok_s": toks / secs, "per_prompt_seeds": per_prompt}


def agreement(policy, engine, prompts) -> float:
    out = engine.generate(prompts[:8], SamplingSettings(n=2, temperature=1.0, max_new_tokens=64, seed=1))
    comps = [c for ro in out for c in ro.completions]
    b = build_batch([ro.prompt_ids for ro in out for _ in ro.completions], comps, torch.zeros(len(comps)),
                    policy.tokenizer.pad_token_id, mask_truncated=False).to("cuda")
    with torch.no_grad():
        lp, _ = completion_logprobs(policy.model.eval(), b.input_ids, b.attention_mask, b.position_ids, b.prompt_width)
    m = b.completion_mask.bool()
    return float((lp.float() - b.rollout_logp)[m].abs().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="rollout.enforce_eager=true (no CUDA graphs)")
    a = ap.parse_args()
    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes" / "math_rl.yaml",
                      ["model.dtype=bfloat16", f"rollout.max_new_tokens={a.new_tokens}", "data.max_length=256",
                       f"rollout.enforce_eager={str(a.eager).lower()}"])
    t = time.perf_counter()
    model, tok = build_model("v2-lite", a.layers, torch.bfloat16, "cuda")
    policy = Policy(prepare_for_training(model, cfg.model, cfg.lora), tok, "bench")
    t_model = time.perf_counter() - t
    t = time.perf_counter()
    engine = make_engine("vllm", policy, cfg.rollout, "bfloat16", 256 + a.new_tokens)
    out = {"model_build_s": t_model, "engine_total_s": time.perf_counter() - t, "startup": engine.startup,
           "params": sum(p.numel() for p in policy.model.parameters()), "enforce_eager": a.eager}
    print(out, flush=True)
    prompts = render_prompts(tok, [r["prompt"] for r in prompt_rows(a.prompts, len(tok))])
    rollout_rate(engine, prompts[:8], a, False)  # warm-up
    out["rollout"] = [rollout_rate(engine, prompts, a, False), rollout_rate(engine, prompts, a, True)]
    out["rollout_speedup_step_seeded"] = out["rollout"][0]["tok_s"] / out["rollout"][1]["tok_s"]
    print(out["rollout"], flush=True)
    with torch.no_grad():
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    cycles = []
    for _ in range(a.cycles):
        c = {}
        t = time.perf_counter()
        engine.sleep()
        torch.cuda.synchronize()
        c["sleep_s"] = time.perf_counter() - t
        t = time.perf_counter()

        def push(full):
            c["full"] = full
            with policy.merged_weights(only_adapted=not full) as w:
                engine.update_weights(w)

        engine.wake_up(push)
        c["wake_sync_wake_s"] = time.perf_counter() - t
        c["sync_s"] = engine.last_sync["seconds"]
        cycles.append(c)
        print(c, flush=True)
    out["cycles"] = cycles
    out["mismatch_abs_logp_mean"] = agreement(policy, engine, prompts)
    write("vllm_gpu_v2-lite_cuda", out)


if __name__ == "__main__":
    main()
