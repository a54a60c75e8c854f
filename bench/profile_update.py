"""Where one V2-Lite LoRA update step spends GPU time (torch.profiler, top kernels), for choosing levers.

    python bench/profile_update.py --batch 8 --seq 2048      # align's levers: bf16 adapters, fused kernels, addmm
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import LoraConfig, ModelConfig  # noqa: E402
from align.policy import prepare_for_training  # noqa: E402
from bench.decode import V2_LITE, build  # noqa: E402
from bench.update import step_fn  # noqa: E402


def launch_gaps(step, reps: int = 3) -> str:
    """Wall time of ``step`` vs its GPU time alone: the GPU first sleeps long enough for the CPU to queue the
    whole step, so the queued kernels then run back to back. The difference is time the GPU waited for the
    CPU to launch work (what CUDA graphs would recover). When the CPU queues for longer than the GPU sleeps (a
    host sync inside the step, as with ``--mask``, or, presumably, a launch queue full of a step's thousands of
    kernels) the rest of the step is launched live: flagged, as the GPU figure then is not CPU-free."""
    wall, gpu, queue, slept = [], [], [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - t)
        before, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        before.record()
        torch.cuda._sleep(int(4e9))  # clock cycles, about two seconds
        start.record()
        t = time.perf_counter()
        step()
        queue.append(time.perf_counter() - t)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / 1000)
        slept.append(before.elapsed_time(start) / 1000)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    synced = " (queueing outlasted the sleep: GPU figure not CPU-free)" if med(queue) >= med(slept) else ""
    return f"wall {med(wall) * 1000:.1f} ms, GPU alone {med(gpu) * 1000:.1f} ms, CPU queueing " \
           f"{med(queue) * 1000:.1f} ms behind a {med(slept) * 1000:.0f} ms GPU sleep{synced}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--no-ckpt", action="store_true")
    ap.add_argument("--fp32-adapters", action="store_true",
                    help="keep LoRA adapters in fp32 (the default before bf16 adapters)")
    ap.add_argument("--unfused", action="store_true", help="do not compile RMSNorm / rope / SwiGLU")
    ap.add_argument("--peft-dense", action="store_true", help="PEFT's dense LoRA forward instead of one addmm")
    ap.add_argument("--recompute", type=int, default=-1, help="recompute only the first N decoder layers (-1: all)")
    ap.add_argument("--compile-layers", action="store_true", help="torch.compile the decoder layers (needs --no-ckpt)")
    ap.add_argument("--mask", action="store_true", help="pass an attention mask of ones (a host sync per forward)")
    ap.add_argument("--out", default="bench/results/profile_update_cuda.txt")
    a = ap.parse_args()
    model = build(V2_LITE, torch.bfloat16, "cuda")
    model.config.use_cache = False
    model = prepare_for_training(
        model, ModelConfig(gradient_checkpointing=not a.no_ckpt, recompute_layers=a.recompute,
                           fused_kernels=not a.unfused, compile_layers=a.compile_layers),
        LoraConfig(r=16, alpha=32, addmm_dense=not a.peft_dense,
                   adapter_dtype="float32" if a.fp32_adapters else "bfloat16"))
    model.train()
    ids = torch.randint(3, 1000, (a.batch, a.seq), device="cuda")
    for _ in range(2):
        step_fn(model, ids, True, a.mask).backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    gaps = launch_gaps(lambda: step_fn(model, ids, True, a.mask).backward())
    kinds = [torch.profiler.ProfilerActivity.CUDA, torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=kinds) as prof:
        step_fn(model, ids, True, a.mask).backward()
        torch.cuda.synchronize()
    avg = prof.key_averages()
    table = avg.table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70) + "\nBy self CUDA time:\n" + \
        avg.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=90)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    table = f"batch {a.batch} x seq {a.seq}, grad ckpt {not a.no_ckpt} (recompute {a.recompute}), bf16 adapters " \
            f"{not a.fp32_adapters}, fused kernels {not a.unfused}, addmm dense LoRA {not a.peft_dense}; " \
            f"compiled layers {a.compile_layers}; attention mask {a.mask}; peak {peak:.1f} GiB\n{gaps}\n" + table
    Path(a.out).write_text(table)
    print(table)


if __name__ == "__main__":
    main()
