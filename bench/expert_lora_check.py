"""align's faster training forwards vs the plain ones at V2-Lite width, in fp32: same loss and LoRA gradients.

Two layers (one dense, one MoE with 64 experts top-6) of the V2-Lite shape. In fp32: grouped expert LoRA vs
PEFT's W + ΔW path, addmm dense LoRA vs PEFT's, and (on a GPU) inductor-compiled decoder layers vs eager.
Then both expert paths run again in bf16 on the same weights and their errors against fp32 are compared.

    python bench/expert_lora_check.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import LoraConfig  # noqa: E402
from align.expert_lora import use_grouped_expert_lora  # noqa: E402
from align.lora import native_v5_targets, peft_config  # noqa: E402
from bench.common import write  # noqa: E402
from bench.decode import TINY, V2_LITE, build  # noqa: E402
from bench.update import grads, max_rel_diff, set_addmm, set_compiled, set_grouped  # noqa: E402


def fp32_check(model, ids, lever: str, before: tuple[float, dict]) -> dict:
    """Turn ``lever`` on (addmm dense LoRA or compiled decoder layers) and compare with ``before``."""
    from align.dense_lora import use_addmm_lora
    from align.kernels import compile_decoder_layers

    n = use_addmm_lora(model) if lever == "addmm" else compile_decoder_layers(model)
    for m in model.modules():
        if hasattr(m, "_peft_forward") and not hasattr(m, "_grouped_forward") and lever == "addmm":
            m._addmm_forward = m.forward
        if hasattr(m, "_compiled_forward"):
            m._dispatch_forward = m.forward
    toggle = set_addmm if lever == "addmm" else set_compiled
    loss, g = grads(model, ids, toggle, True)
    toggle(model, False)
    return {"loss_before": before[0], "loss_after": loss, "max_rel_grad_diff": max_rel_diff(g, before[1]), "layers": n}


def main() -> None:
    from peft import get_peft_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = V2_LITE if device == "cuda" else TINY
    base = build(shape, torch.float32, device, layers=2)
    with native_v5_targets():
        model = get_peft_model(base, peft_config(LoraConfig(r=16, alpha=32)))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    use_grouped_expert_lora(model)
    for m in model.modules():
        if hasattr(m, "_peft_forward"):
            m._grouped_forward = m.forward
    ids = torch.randint(3, min(1000, base.config.vocab_size), (2, 512), generator=torch.Generator().manual_seed(3)).to(device)
    ref_loss, ref = grads(model, ids, set_grouped, False)
    res = {"layers": 2, "tokens": ids.numel()}
    g_loss, g = grads(model, ids, set_grouped, True)
    res["fp32"] = {"loss_peft": ref_loss, "loss_grouped": g_loss, "max_rel_grad_diff": max_rel_diff(g, ref)}
    res["fp32_addmm_dense"] = fp32_check(model, ids, "addmm", (g_loss, g))
    if device == "cuda":
        res["fp32_compiled_layers"] = fp32_check(model, ids, "compile", (g_loss, g))
    if device == "cuda":
        half = copy.deepcopy(model)
        for n, p in half.named_parameters():
            if "lora_" not in n:  # base weights bf16, adapters fp32 (PEFT's default)
                p.data = p.data.to(torch.bfloat16)
        for m in half.modules():
            if hasattr(m, "_peft_forward"):
                m._grouped_forward = m.forward
        for m in half.modules():
            if hasattr(m, "_dispatch_forward"):
                m.forward = m._eager_forward
        for grouped in (False, True):
            loss, gg = grads(half, ids, set_grouped, grouped)
            res[f"bf16_{'grouped' if grouped else 'peft'}_vs_fp32"] = {"loss": loss, "max_rel_grad_err": max_rel_diff(gg, ref),
                                                                        "loss_err": abs(loss - ref_loss)}
    write(f"expert_lora_check_{device}", res)


if __name__ == "__main__":
    main()
