"""``align sft recipes/chat_sft.yaml`` end to end at V2-Lite shape, against plain TRL ``SFTTrainer`` + PEFT on the
same model directory and the same chat JSONL, in one run; then the Chat (SFT) checkpoint it wrote is loaded back
by ``align grpo`` for one step.

The model is V2-Lite-shaped with random bf16 weights and a word-level tokenizer of V2's vocabulary size, written to
disk first so both trainers go through their real loading code. align runs the recipe as a user does (``run_sft`` on
``load_config(chat_sft.yaml, overrides)``: LoRA on MLA, shared and routed experts, the expert monitor and
DeepSeek-V2's alpha1 balance loss, its kernels); TRL gets the same LoRA targets, data, packing, batch and
optimizer settings. Tokens/s is TRL's own ``num_tokens`` count over wall time after the first logging window
(compilation), the same for both; peak memory is ``torch.cuda.max_memory_allocated``.

    python bench/sft_step.py                           # H200: V2-Lite shape, 200 align steps, 100 TRL steps
    python bench/sft_step.py --shape tiny --steps 20 --trl-steps 20 --grpo-back   # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import load_config  # noqa: E402
from align.lora import native_v5_targets, peft_config  # noqa: E402
from bench.common import write  # noqa: E402
from bench.grpo_step import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def chat_rows(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Chat rows of 60-600 random words (user 20-200, assistant 40-400), like an instruction dataset's spread."""
    rng = random.Random(seed)

    def words(k: int) -> str:
        return " ".join(f"w{rng.randrange(8, vocab - 8)}" for _ in range(k))

    return [{"messages": [{"role": "user", "content": words(rng.randint(20, 200))},
                          {"role": "assistant", "content": words(rng.randint(40, 400))}],
             "question": words(rng.randint(20, 60)), "answer": str(rng.randint(0, 99))} for _ in range(n)]


def overrides(a, model_dir: Path, data: Path, out: Path) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"data.train={data}", "data.eval=", f"data.max_length={a.max_length}",
            f"train.batch_size={a.batch}", "train.grad_accum=1", f"train.max_steps={a.steps}", "train.save_steps=0",
            f"train.logging_steps={a.log_every}", f"output.dir={out}", "output.tensorboard=false",
            f"model.dtype={'bfloat16' if a.device == 'cuda' else 'float32'}",
            f"model.gradient_checkpointing={a.device == 'cuda'}", *a.set]


def rate(history: list[dict]) -> float | None:
    """Median tokens/s over the logging windows after the first."""
    r = sorted(h["throughput/tokens_per_s"] for h in history if "throughput/tokens_per_s" in h)
    return r[len(r) // 2] if r else None


def run_align(a, model_dir: Path, data: Path, out: Path) -> dict:
    from align.sft import run_sft

    cfg = load_config(ROOT / "recipes" / "chat_sft.yaml", overrides(a, model_dir, data, out))
    reset_peak(a.device)
    t = time.perf_counter()
    summary = run_sft(cfg)
    wall = time.perf_counter() - t
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_s": rate(history), "peak_gib": peak(a.device), "wall_s": wall, "steps": summary["steps"],
            "first_loss": summary["first_logged_loss"], "last_loss": summary["last_logged_loss"],
            "final": summary["final"], "moe_cv_last": next((h["moe/cv_mean"] for h in reversed(history)
                                                            if "moe/cv_mean" in h), None)}


def run_trl(a, model_dir: Path, data: Path) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from align.sft import Throughput

    cfg = load_config(ROOT / "recipes" / "chat_sft.yaml", overrides(a, model_dir, data, Path(tempfile.mkdtemp())))
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    history: list[dict] = []

    class Rate(TrainerCallback):
        def __init__(self):
            self.meter = Throughput()

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "num_tokens" in logs:
                history.append({**logs, **self.meter.update(logs["num_tokens"])})

    reset_peak(a.device)
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, device_map=a.device,
                                                 attn_implementation="sdpa")
    rows = [{"messages": r["messages"]} for r in map(json.loads, data.read_text().splitlines())]
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="trl-sft-"), learning_rate=cfg.train.learning_rate,
                     lr_scheduler_type=cfg.train.lr_scheduler, warmup_steps=cfg.train.warmup_ratio,
                     per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, max_steps=a.trl_steps,
                     logging_steps=a.log_every, max_length=a.max_length, packing=True, assistant_only_loss=True,
                     gradient_checkpointing=cfg.model.gradient_checkpointing, bf16=a.device == "cuda",
                     use_cpu=a.device != "cuda", report_to=[], save_strategy="no", disable_tqdm=True, seed=42)
    with native_v5_targets():
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                             peft_config=peft_config(cfg.lora), callbacks=[Rate()])
    trainer.train()
    losses = [h["loss"] for h in history if "loss" in h]
    out = {"tokens_per_s": rate(history), "peak_gib": peak(a.device), "wall_s": time.perf_counter() - t,
           "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
           "last_loss": losses[-1] if losses else None, "path": "SFTTrainer + peft_config, packing, sdpa"}
    del trainer, model
    return out


def run_grpo_back(a, final: str, data: Path, out: Path) -> dict:
    """One ``align grpo`` step from the Chat (SFT) checkpoint (rollouts by align's own decoder: no vLLM needed)."""
    from align.grpo.loop import run_grpo

    cfg = load_config(ROOT / "recipes" / "math_rl.yaml", [
        f"model.name_or_path={final}", f"data.train={data}", "data.eval=", "rollout.engine=fast",
        "grpo.steps=1", "grpo.prompts_per_step=4", "rollout.num_generations=4", "rollout.max_new_tokens=32",
        "grpo.minibatch_size=16", "grpo.mask_truncated=false", "train.save_steps=0", f"output.dir={out}",
        f"model.dtype={'bfloat16' if a.device == 'cuda' else 'float32'}", "eval.num_samples=0",
        f"model.gradient_checkpointing={a.device == 'cuda'}"])
    t = time.perf_counter()
    summary = run_grpo(cfg)
    return {"wall_s": time.perf_counter() - t, "final": str(out / "final"),
            "final_files": sorted(p.name for p in (out / "final").iterdir()),
            "steps": summary.get("steps"), "loaded_adapter_from": final}


def reset_peak(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="v2-lite", choices=["v2-lite", "tiny"])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=200, help="align's optimizer steps")
    ap.add_argument("--trl-steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--grpo-back", action="store_true", help="then one align grpo step from the SFT checkpoint")
    ap.add_argument("--work", default=None, help="where the model, data and runs go (default: a temp dir)")
    ap.add_argument("--set", nargs="*", default=[], help="extra key.sub=value overrides for align")
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    a.device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(a.work or tempfile.mkdtemp(prefix="sft-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    model, tok = build_model(a.shape, a.layers, torch.bfloat16 if a.device == "cuda" else torch.float32, a.device)
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    del model
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(a.rows, len(tok))))
    res = {"shape": a.shape, "layers": a.layers, "batch": a.batch, "max_length": a.max_length, "packing": True,
           "model_write_s": time.perf_counter() - t, "overrides": overrides(a, work / "model", data, work / "align")}
    res["align"] = run_align(a, work / "model", data, work / "align")
    print(json.dumps({"align": res["align"]}), flush=True)
    reset_peak(a.device)
    if not a.no_trl:
        res["trl"] = run_trl(a, work / "model", data)
        print(json.dumps({"trl": res["trl"]}), flush=True)
        if res["align"]["tokens_per_s"] and res["trl"]["tokens_per_s"]:
            res["tokens_per_s_ratio_vs_trl"] = res["align"]["tokens_per_s"] / res["trl"]["tokens_per_s"]
        reset_peak(a.device)
    write(a.name or f"sft_step_{a.shape}_{a.device}", res)
    if a.grpo_back:
        res["grpo_back"] = run_grpo_back(a, res["align"]["final"], data, work / "grpo")
        write(a.name or f"sft_step_{a.shape}_{a.device}", res)


if __name__ == "__main__":
    main()
