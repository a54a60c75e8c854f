"""One GRPO update at V2-Lite shape through align's own path, on completions of varying length.

The policy is prepared exactly as ``align grpo`` prepares it (``prepare_for_training``: LoRA r=16 on MLA,
shared and routed experts, grouped expert LoRA, addmm dense LoRA, compiled kernels), then each step runs
what the loop runs after rollout: old-policy log-probs recording the routing (router replay), reference
log-probs (beta > 0), and the clipped update with expert monitoring, over one minibatch of 4 prompts x 4
completions whose lengths vary as sampled completions do. Tokens/s counts real (non-padding) tokens.

Rows: align's defaults (fp32 adapters, the whole minibatch in one pass, every layer recomputed), then
bf16 adapters with micro-batches of 4 and no recomputation, the micro-batches taken in arrival order or
grouped by completion length (align's ``UpdateBatch.micro_batches``: each part then drops more padding),
and with ``--compile-layers`` the last setting with compiled decoder layers (``model.compile_layers``).

    python bench/grpo_update.py                  # H100
    python bench/grpo_update.py --shape tiny     # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import get_scheduler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import GRPOConfig, LoraConfig, ModelConfig, MonitorConfig  # noqa: E402
from align.grpo.batch import UpdateBatch, build_batch  # noqa: E402
from align.grpo.logprobs import CompletionLogprobs  # noqa: E402
from align.grpo.update import fill_old_and_ref, policy_update  # noqa: E402
from align.kernels import compile_decoder_layers  # noqa: E402
from align.moe import ExpertMonitor, RouterReplay  # noqa: E402
from align.offload import use_expandable_segments  # noqa: E402
from align.policy import Policy, prepare_for_training  # noqa: E402
from bench.common import write  # noqa: E402
from bench.decode import TINY, V2_LITE, build  # noqa: E402
from bench.update import set_checkpointing  # noqa: E402
from rollout.base import Completion  # noqa: E402


def synthetic_batch(n: int, max_prompt: int, max_completion: int, vocab: int, seed: int = 0) -> UpdateBatch:
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for i in range(n):
        if i % 4 == 0:
            prompt = torch.randint(3, vocab, (int(torch.randint(max_prompt // 4, max_prompt + 1, (1,), generator=g)),),
                                   generator=g).tolist()
        k = int(torch.randint(max_completion // 16, max_completion + 1, (1,), generator=g))
        prompts.append(prompt)
        comps.append(Completion(torch.randint(3, vocab, (k,), generator=g).tolist(), "", [-1.0] * k, "stop"))
    return build_batch(prompts, comps, torch.randn(n, generator=g), 0, mask_truncated=True)


def rollout_like_batch(n: int, vocab: int, cap: int = 256, seed: int = 0, fixed: int = 0) -> UpdateBatch:
    """``n`` rows shaped like math_rl.yaml's rollouts on the H200: prompts of 40-150 tokens, completions
    exponential with scale 174 cut at ``cap`` (mean ~134, 23% cut; measured: mean 127, 23% cut), or all of
    ``fixed`` tokens (what random weights sample in ``bench/grpo_step.py``: they never emit EOS)."""
    g = torch.Generator().manual_seed(seed)
    prompts, comps = [], []
    for i in range(n):
        if i % 16 == 0:
            prompt = torch.randint(3, vocab, (int(torch.randint(40, 151, (1,), generator=g)),), generator=g).tolist()
        k = fixed or max(1, min(cap, int(torch.empty(1).exponential_(1 / 174, generator=g))))
        prompts.append(prompt)
        comps.append(Completion(torch.randint(3, vocab, (k,), generator=g).tolist(), "", [-1.0] * k,
                                "length" if k == cap else "stop"))
    return build_batch(prompts, comps, torch.randn(n, generator=g), 0, mask_truncated=False)


def in_arrival_order(self: UpdateBatch, n: int):
    """``UpdateBatch.micro_batches`` without the length grouping (each part still trims its own padding)."""
    order = torch.arange(self.size, device=self.input_ids.device)
    return [(idx, self.rows(idx).trimmed()) for idx in order.tensor_split(n)]


def run_row(policy, batches: list[UpdateBatch], cfg: GRPOConfig, steps: int, device: str,
            empty_cache: bool = False) -> dict:
    """One warm-up iteration on ``batches[0]``, then ``steps`` timed ones on ``batches[i]`` (the last one again when
    the list is short: one batch repeats the warm-up's shapes, several bring new ones as GRPO steps do).
    ``empty_cache``: every iteration starts from an emptied allocator cache, as in a GRPO step, where the colocated
    engine's wake-up and sleep empty it."""
    fwd = CompletionLogprobs(policy.model)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    sched = get_scheduler("constant", opt)
    m = MonitorConfig()
    monitor = ExpertMonitor(policy.model, m.balance_alpha1, m.balance_alpha2, m.num_devices, m.dead_threshold)
    replay = RouterReplay(policy.model)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fills, updates, reals = [], [], []
    try:
        for i in range(steps + 1):
            batch = batches[min(i, len(batches) - 1)]
            if empty_cache and device == "cuda":
                torch.cuda.empty_cache()
            sync(device)
            t0 = time.perf_counter()
            fill_old_and_ref(policy, fwd, batch, cfg, 1.0, replay, need_old=True)
            sync(device)
            t1 = time.perf_counter()
            metrics, finite = policy_update(policy, fwd, batch, cfg, opt, sched, 1.0, batch.completion_width, 1.0,
                                            monitor, replay)
            sync(device)
            if i:
                fills.append(t1 - t0)
                updates.append(time.perf_counter() - t1)
                reals.append(float(batch.attention_mask.sum()))
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return {"oom": True}
    finally:
        monitor.remove()
        replay.remove()
    real, fill, update = sum(reals), sum(fills), sum(updates)
    # old + reference: two forward passes over every real token
    out = {"update_tok_s": real / update, "step_tok_s": real / (fill + update), "old_and_ref_s": fill / steps,
           "logprob_tok_s": 2 * real / fill,
           "update_s": update / steps, "pg_loss": metrics.get("actor/pg_loss"), "finite": finite}
    if device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="v2-lite", choices=["tiny", "v2-lite"])
    ap.add_argument("--rows", type=int, default=16, help="sequences in the minibatch (one optimizer step)")
    ap.add_argument("--micro", type=int, default=4, help="micro-batch size of the tuned rows")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--compile-layers", action="store_true", help="a last row with torch.compile'd decoder layers")
    ap.add_argument("--rollout-shape", action="store_true",
                    help="1,024 rows shaped like math_rl.yaml's rollouts, minibatches of 256 (issue 17's shape)")
    ap.add_argument("--rollout-rows", type=int, default=1024, help="rows of --rollout-shape (minibatches of a quarter)")
    ap.add_argument("--completion-len", type=int, default=0,
                    help="with --rollout-shape: every completion this long (as random weights sample them)")
    ap.add_argument("--fresh-shapes", action="store_true",
                    help="with --rollout-shape: every timed iteration on a new batch (new micro-batch shapes, as "
                         "in GRPO steps), not the warm-up's")
    ap.add_argument("--budgets", nargs="*", type=int, default=[],
                    help="extra rows with grpo.max_tokens_per_micro_batch=B (no-grad passes 4B), grouped by length")
    ap.add_argument("--pack", type=int, nargs="*", default=[],
                    help="with --budgets: each budget also packed in rows of each of these sizes (grpo.pack_tokens; "
                         "budgets then count real tokens), the first also without recomputation")
    ap.add_argument("--recompute", type=int, nargs="*", default=[],
                    help="with --pack: the first pack size again, recomputing only the first N decoder layers "
                         "(model.recompute_layers; the other layers keep their activations)")
    ap.add_argument("--packed-only", action="store_true", help="with --pack: no unpacked token-budget rows")
    ap.add_argument("--packed-attention", default=ModelConfig().packed_attention, choices=["varlen", "mask"],
                    help="model.packed_attention: varlen flash attention or transformers' block-diagonal mask")
    ap.add_argument("--compiled-only", action="store_true", help="with --compile-layers: only the compiled rows")
    ap.add_argument("--allocator-rows", action="store_true",
                    help="after the last row, the same again with the allocator's cache emptied before every "
                         "iteration (as a GRPO step's engine wake-up and sleep do), then with expandable segments "
                         "switched on (train.expandable_segments), emptied and not")
    ap.add_argument("--name", default=None)
    ap.add_argument("--skip-defaults", action="store_true", help="no rows before the budget rows except the first")
    ap.add_argument("--no-baseline", action="store_true", help="not even the first: ratios compare with the next row")
    return ap.parse_args()


def plan_rows(a) -> list[tuple]:
    """(name, micro: rows per part or -token budget, recompute every layer, how to split) per row; the first row is
    the baseline every ratio compares with."""
    tuned = f"bf16 adapters, micro-batches of {a.micro}"
    plan = [("align defaults: fp32 adapters, whole minibatch, every layer recomputed", 0, True, None),
            (f"{tuned} in arrival order, no recomputation", a.micro, False, in_arrival_order),
            (f"{tuned} grouped by length, no recomputation", a.micro, False, None)]
    if a.rollout_shape:  # issue 17's baseline: math_rl.yaml's passes before token budgets
        plan = [(f"math_rl.yaml: fp32 adapters, micro-batches of {a.micro} rows, every layer recomputed",
                 a.micro, True, "fp32")] + ([] if a.skip_defaults else plan[1:])
    elif a.skip_defaults:
        plan = plan[:1]
    for b in a.budgets:
        if not a.packed_only:
            name = f"bf16 adapters, token budget {b} (no-grad passes {4 * b}), every layer recomputed"
            plan.append((name, -b, True, None))
        packed = f"bf16 adapters, token budget {b} real tokens (no-grad passes {4 * b}), packed in rows of"
        for rows in a.pack:
            plan.append((f"{packed} {rows}, every layer recomputed", -b, True, ("pack", rows)))
        if a.pack:
            plan.append((f"{packed} {a.pack[0]}, no recomputation", -b, False, ("pack", a.pack[0])))
            for n in a.recompute:
                plan.append((f"{packed} {a.pack[0]}, first {n} layers recomputed", -b, n, ("pack", a.pack[0])))
    if a.compile_layers and a.pack:  # last: compiling is for good (every later row would run compiled layers)
        for b in a.budgets:
            name = (f"bf16 adapters, token budget {b} real tokens (no-grad passes {4 * b}), packed in rows of "
                    f"{a.pack[0]}, no recomputation, compiled decoder layers")
            plan.append((name, -b, False, ("compile", a.pack[0])))
    elif a.compile_layers:
        name = f"{tuned} grouped by length, no recomputation, compiled decoder layers"
        plan.append((name, a.micro, False, "compile"))
    if a.compiled_only:
        plan = [row for row in plan if row[0].endswith("compiled decoder layers")]
    return plan[1:] if a.no_baseline and len(plan) > 1 else plan


def allocator_rows(rows: dict, policy, batches, cfg: GRPOConfig, steps: int, device: str, last: str) -> None:
    """``--allocator-rows``: the last row's settings under the allocator states of a GRPO step, ratios to that row."""
    for label, empty, expandable in (("cache emptied every iteration", True, False),
                                     ("expandable segments, cache emptied every iteration", True, True),
                                     ("expandable segments", False, True)):
        if expandable:
            use_expandable_segments(True)
        row = run_row(policy, batches, cfg, steps, device, empty_cache=empty)
        if "update_tok_s" in row and "update_tok_s" in rows[last]:
            row["update_ratio_vs_warm_fixed_segments"] = row["update_tok_s"] / rows[last]["update_tok_s"]
        rows[f"{last}, {label}"] = row
        print(f"{last}, {label}: {row}", flush=True)


def add_ratios(rows: dict, base: dict) -> None:
    for row in rows.values():
        if "step_tok_s" in row and "step_tok_s" in base:
            row["step_ratio_vs_defaults"] = row["step_tok_s"] / base["step_tok_s"]
        for key in ("update_tok_s", "logprob_tok_s"):
            if key in row and key in base:
                row[key.replace("_tok_s", "_ratio_vs_first_row")] = row[key] / base[key]


def main() -> None:
    a = parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    v2 = a.shape == "v2-lite"
    model = build(V2_LITE if v2 else TINY, torch.bfloat16 if device == "cuda" else torch.float32, device)
    model.config.use_cache = False
    model = prepare_for_training(model, ModelConfig(gradient_checkpointing=True, packed_attention=a.packed_attention),
                                 LoraConfig(r=16, alpha=32, adapter_dtype="float32"))
    policy = Policy(model=model, tokenizer=None, base_path="random")
    vocab = min(1000, model.config.vocab_size)
    if a.rollout_shape:
        batches = [rollout_like_batch(a.rollout_rows if v2 else 64, vocab, 256 if v2 else 24, seed=seed,
                                      fixed=a.completion_len).to(device)
                   for seed in range(a.steps + 1 if a.fresh_shapes else 1)]
    else:
        batches = [synthetic_batch(a.rows, 256 if v2 else 16, 1792 if v2 else 48, vocab).to(device)]
    batch = batches[0]
    cfg = GRPOConfig(minibatch_size=batch.size // 4 if a.rollout_shape else a.rows, beta=0.04, mu=1)
    res = {"shape": a.shape, "packed_attention": a.packed_attention, "rows_per_minibatch": cfg.minibatch_size,
           "micro_batch_size": a.micro,
           "real_tokens": int(batch.attention_mask.sum()), "padded_tokens": batch.attention_mask.numel(), "rows": {}}
    plan = plan_rows(a)
    original = UpdateBatch.micro_batches
    for name, micro, ckpt, split in plan:
        if micro and split != "fp32":
            for n, p in model.named_parameters():
                if "lora_" in n and device == "cuda":
                    p.data = p.data.to(torch.bfloat16)
        set_checkpointing(model, ckpt)
        if split == "compile" or (isinstance(split, tuple) and split[0] == "compile"):
            res["compiled_layers"] = res.get("compiled_layers") or compile_decoder_layers(model)
            split = None if split == "compile" else ("pack", split[1])
        extra = ({"max_tokens_per_micro_batch": -micro, "logprob_tokens_per_micro_batch": -4 * micro}
                 if micro < 0 else {"micro_batch_size": micro})
        if isinstance(split, tuple):
            extra["pack_tokens"] = split[1]
            split = None
        UpdateBatch.micro_batches = original if split == "fp32" else split or original
        row_cfg = GRPOConfig(**{**cfg.__dict__, **extra})
        row = run_row(policy, batches, row_cfg, a.steps, device)
        UpdateBatch.micro_batches = original
        res["rows"][name] = row
        print(f"{name}: {row}", flush=True)
    if a.allocator_rows:
        allocator_rows(res["rows"], policy, batches, row_cfg, a.steps, device, name)  # the last row's settings
    add_ratios(res["rows"], res["rows"][plan[0][0]])
    write(a.name or f"grpo_update_{a.shape}_{device}", res)


if __name__ == "__main__":
    main()
