"""Where one V2-Lite LoRA update step spends GPU time (torch.profiler, top kernels), for choosing levers.

    python bench/profile_update.py --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import LoraConfig  # noqa: E402
from align.expert_lora import use_grouped_expert_lora  # noqa: E402
from align.lora import native_v5_targets, peft_config  # noqa: E402
from bench.decode import V2_LITE, build  # noqa: E402
from bench.update import step_fn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--no-ckpt", action="store_true")
    ap.add_argument("--out", default="bench/results/profile_update_cuda.txt")
    a = ap.parse_args()
    from peft import get_peft_model

    model = build(V2_LITE, torch.bfloat16, "cuda")
    model.config.use_cache = False
    with native_v5_targets():
        model = get_peft_model(model, peft_config(LoraConfig(r=16, alpha=32)))
    model.enable_input_require_grads()
    use_grouped_expert_lora(model)
    if not a.no_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, 1000, (a.batch, a.seq), device="cuda")
    for _ in range(2):
        step_fn(model, ids, True).backward()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]) as prof:
        step_fn(model, ids, True).backward()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    Path(a.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
