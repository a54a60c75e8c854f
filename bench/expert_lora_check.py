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

from align.kernels.dense_lora import use_addmm_lora  # noqa: E402
from align.kernels.expert_lora import use_grouped_expert_lora  # noqa: E402
from align.kernels import compile_decoder_layers  # noqa: E402
from bench.common import write  # noqa: E402
from bench.decode import TINY, V2_LITE, build  # noqa: E402
from bench.update import Lever, grads, max_rel_diff, plain_lora  # noqa: E402


def fp32_check(model, ids, patch, before: tuple[float, dict]) -> dict:
    """Switch one more lever (``patch``) on and compare loss and gradients with ``before``."""
    lever = Lever(model, patch)
    loss, g = grads(model, ids, lever, True)
    lever(model, False)
    return {"loss_before": before[0], "loss_after": loss, "max_rel_grad_diff": max_rel_diff(g, before[1]),
            "layers": lever.result}


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = V2_LITE if device == "cuda" else TINY
    model = plain_lora(build(shape, torch.float32, device, layers=2))
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    half = None
    if device == "cuda":
        half = copy.deepcopy(model)
        for n, p in half.named_parameters():
            if "lora_" not in n:  # base weights bf16, adapters fp32 (PEFT's default)
                p.data = p.data.to(torch.bfloat16)
    grouped = Lever(model, use_grouped_expert_lora)
    ids = torch.randint(3, min(1000, model.config.vocab_size), (2, 512),
                        generator=torch.Generator().manual_seed(3)).to(device)
    ref_loss, ref = grads(model, ids, grouped, False)
    res = {"layers": 2, "tokens": ids.numel()}
    g_loss, g = grads(model, ids, grouped, True)
    res["fp32"] = {"loss_peft": ref_loss, "loss_grouped": g_loss, "max_rel_grad_diff": max_rel_diff(g, ref)}
    res["fp32_addmm_dense"] = fp32_check(model, ids, use_addmm_lora, (g_loss, g))
    if half is not None:
        res["fp32_compiled_layers"] = fp32_check(model, ids, compile_decoder_layers, (g_loss, g))
        half_grouped = Lever(half, use_grouped_expert_lora)
        for on in (False, True):
            loss, gg = grads(half, ids, half_grouped, on)
            res[f"bf16_{'grouped' if on else 'peft'}_vs_fp32"] = {
                "loss": loss, "max_rel_grad_err": max_rel_diff(gg, ref), "loss_err": abs(loss - ref_loss)}
    write(f"expert_lora_check_{device}", res)


if __name__ == "__main__":
    main()
