"""Policy-update throughput at V2-Lite shape: the issue's baseline and align's levers, in one process.

LoRA r=16 on MLA, shared experts and routed experts (align's default targets), random bf16 weights,
vocab 102,400. Each row is forward + backward + AdamW step on ``batch x seq`` tokens; the baseline is
transformers + PEFT with full-vocabulary logits (``labels=``) and gradient checkpointing.

    python bench/update.py                 # H100
    python bench/update.py --shape tiny --frontier 2:1 2:0   # CPU smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import LoraConfig, ModelConfig  # noqa: E402
from align.kernels.expert_lora import use_grouped_expert_lora  # noqa: E402
from align.grpo.logprobs import completion_logprobs  # noqa: E402
from align.policy import prepare_for_training, recompute_only_first  # noqa: E402
from bench.common import write  # noqa: E402
from bench.decode import TINY, V2_LITE, build  # noqa: E402


def plain_lora(model):
    """align's LoRA (r=16 on MLA, shared and routed experts) with PEFT's own forwards, no compiled kernels:
    the baseline each lever is then switched onto."""
    return prepare_for_training(model, ModelConfig(fused_kernels=False),
                                LoraConfig(r=16, alpha=32, grouped_experts=False, addmm_dense=False))


def step_fn(model, ids, chunked: bool, mask: bool = False):
    """Mean loss of ``ids``. Nothing is padded, so like the baseline's ``model(input_ids, labels)`` no attention
    mask is passed; ``mask=True`` passes one of ones, which costs a host sync per forward (transformers checks
    it for padding): with the CPU barely ahead of the GPU, one compiled 4x2048 micro-batch took 359 instead of
    304 ms in one ``bench/profile_update.py`` run on the H100."""
    if chunked:
        mask = torch.ones_like(ids) if mask else None
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        logp, _ = completion_logprobs(model, ids, mask, pos, 1)
        return -logp.mean()
    return model(input_ids=ids, labels=ids).loss


def measure(model, params, batch: int, seq: int, chunked: bool, steps: int, device: str, micro: int = 0) -> dict:
    """Median step of forward + backward + AdamW on ``batch x seq`` tokens; ``micro`` > 0 accumulates
    gradients over micro-batches of that many sequences (one optimizer step either way)."""
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(3, min(1000, model.config.vocab_size), (batch, seq),
                        generator=torch.Generator().manual_seed(batch * seq)).to(device)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, loss = [], None
    try:
        for i in range(steps + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            loss = 0.0
            for chunk in ids.split(micro or batch):
                part = step_fn(model, chunk, chunked) * (chunk.shape[0] / batch)
                part.backward()
                loss = loss + part.detach()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - t)
    except torch.OutOfMemoryError:
        opt.zero_grad(set_to_none=True)
        return {"oom": True}
    s = sorted(times)[len(times) // 2]
    out = {"tok_s": batch * seq / s, "step_s": s, "loss": float(loss)}
    if device == "cuda":
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def grads(model, ids, toggle, on: bool) -> tuple[float, dict]:
    """Loss and every parameter gradient (fp32) of one chunked-log-prob step with a lever on or off."""
    toggle(model, on)
    model.zero_grad(set_to_none=True)
    loss = step_fn(model, ids, True)
    loss.backward()
    return float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def max_rel_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)) for k in b)


def grad_check(model, device, toggle) -> dict:
    """Same tokens through the plain path and align's (``toggle``: a :class:`Lever`): loss and LoRA
    gradients must agree."""
    ids = torch.randint(3, min(1000, model.config.vocab_size), (2, 256),
                        generator=torch.Generator().manual_seed(7)).to(device)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    (loss_peft, g_peft), (loss_align, g_align) = grads(model, ids, toggle, False), grads(model, ids, toggle, True)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.zero_()
    return {"loss_peft": loss_peft, "loss_align": loss_align, "max_rel_grad_diff": max_rel_diff(g_align, g_peft)}


class Lever:
    """A patch of some modules' forwards (align's faster path) that can be switched off and on again.

    ``patch(model)`` runs once; the modules whose forward it replaced are remembered, so ``lever(model,
    False)`` restores the plain (PEFT / eager) forwards and ``lever(model, True)`` align's.
    """

    def __init__(self, model, patch):
        before = {m: m.__dict__.get("forward") for m in model.modules()}
        self.result = patch(model)
        self.swaps = [(m, before[m], m.__dict__["forward"]) for m in model.modules()
                      if m in before and m.__dict__.get("forward") is not before[m]]

    def __call__(self, model, on: bool) -> None:
        for m, plain, fast in self.swaps:
            if on:
                m.forward = fast
            elif plain is None:
                del m.forward
            else:
                m.forward = plain


def apply_lever(model, params, action, device):
    if action == "bf16":
        for p in params:
            p.data = p.data.to(torch.bfloat16 if device == "cuda" else p.dtype)
        return True
    if action == "fused":
        from align.kernels import use_fused_kernels

        return use_fused_kernels()
    if action == "addmm":
        from align.kernels.dense_lora import use_addmm_lora

        lever = Lever(model, use_addmm_lora)
        return {"layers": lever.result, "check_addmm_vs_peft_bf16": grad_check(model, device, lever)}
    if action == "compile":
        from align.kernels import compile_decoder_layers

        set_checkpointing(model, False)
        lever = Lever(model, compile_decoder_layers)
        return {"layers": lever.result, "check_compiled_vs_eager_bf16": grad_check(model, device, lever)}
    return None


def stage_rows(action, largest: bool, plan: list, frontier: list, quick: bool) -> list:
    """Rows measured after ``action``: every plan row at first; the chunked rows after each lever; the
    frontier (micro-batches x recomputed layers) at the largest shape after the last lever; compiled layers
    only without recomputation. ``quick``: the baseline and the frontier's rows only."""
    if action is None:
        return plan[:1] if quick else plan
    no_recompute = [r for r in frontier if r[3] is False]
    if action == "compile":
        return no_recompute if largest else plan[3:4]
    rows = [] if quick else plan[2:4]
    if action == "addmm" and largest:
        rows = rows + (no_recompute if quick else frontier)
    return rows


def set_checkpointing(model, ckpt) -> None:
    """``ckpt``: True (every layer), False (none) or N (the first N decoder layers)."""
    if ckpt is False:
        model.gradient_checkpointing_disable()
        return
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    recompute_only_first(model, -1 if ckpt is True else ckpt)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="v2-lite", choices=["tiny", "v2-lite"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--compile-layers", action="store_true", help="a last stage with torch.compile'd decoder layers")
    ap.add_argument("--quick", action="store_true", help="only the baseline and the frontier's no-recompute rows")
    ap.add_argument("--frontier", nargs="*", default=["8:20", "8:16", "8:14", "4:10", "4:4", "4:2", "4:0", "2:0"],
                    help="rows after every lever at the largest shape, MICRO:N = micro-batches of MICRO "
                         "sequences recomputing the first N decoder layers (0: no recomputation)")
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = V2_LITE if a.shape == "v2-lite" else TINY
    model = build(shape, torch.bfloat16 if device == "cuda" else torch.float32, device)
    model.config.use_cache = False
    model = plain_lora(model)
    model.enable_input_require_grads()
    grouped = Lever(model, use_grouped_expert_lora)
    params = [p for p in model.parameters() if p.requires_grad]
    res = {"shape": a.shape, "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
           "lora_params": sum(p.numel() for p in params), "patched_expert_modules": grouped.result, "rows": {}}
    res["check_grouped_vs_peft"] = grad_check(model, device, grouped)
    print("check:", res["check_grouped_vs_peft"], flush=True)
    shapes = ([] if a.quick else [(4, 1024)]) + [(8, 2048)] if a.shape == "v2-lite" else [(4, 64)]
    plan = [("baseline: PEFT experts, full logits, grad ckpt", False, False, True),
            ("grouped expert LoRA, full logits, grad ckpt", True, False, True),
            ("grouped expert LoRA, chunked log-probs, grad ckpt", True, True, True),
            ("grouped expert LoRA, chunked log-probs, no grad ckpt", True, True, False),
            ("baseline without grad ckpt", False, False, False)]
    layers = model.config.num_hidden_layers
    frontier = []
    for item in a.frontier:
        micro, n = (int(v) for v in item.split(":"))
        name = f"grouped expert LoRA, chunked log-probs, micro-batch {micro}, recompute {n} of {layers} layers"
        frontier.append((name, True, True, n if 0 < n < layers else n >= layers, micro))
    # Irreversible levers last, cumulative: bf16 adapters (no fp32 casts around every LoRA matmul),
    # compiled RMSNorm / rope / SwiGLU, dense LoRA as one addmm; then fewer recomputed layers.
    stages = [("", None), (" + bf16 adapters", "bf16"), (" + bf16 adapters + fused kernels", "fused"),
              (" + bf16 adapters + fused kernels + addmm dense LoRA", "addmm")]
    if a.compile_layers:  # whole decoder layers through inductor; only without recomputation
        stages.append((" + bf16 adapters + addmm dense LoRA + compiled decoder layers", "compile"))
    for suffix, action in stages:
        res.setdefault("levers", {})[action or "none"] = apply_lever(model, params, action, device)
        for b, s in shapes:
            for name, on, chunked, ckpt, *micro in stage_rows(action, (b, s) == shapes[-1], plan, frontier, a.quick):
                grouped(model, on)
                set_checkpointing(model, ckpt)
                model.train()
                row = measure(model, params, b, s, chunked, a.steps, device, *micro)
                res["rows"][f"{b}x{s} | {name}{suffix}"] = row
                print(f"{b}x{s} | {name}{suffix}: {row}", flush=True)
    for b, s in shapes:
        base = res["rows"][f"{b}x{s} | {plan[0][0]}"]
        for key, row in res["rows"].items():
            if key.startswith(f"{b}x{s} |") and "tok_s" in row and "tok_s" in base:
                row["ratio_vs_baseline"] = row["tok_s"] / base["tok_s"]
    write(f"update_{a.shape}_{device}" + ("_quick" if a.quick else "") + ("_compiled" if a.compile_layers else ""), res)


if __name__ == "__main__":
    main()
