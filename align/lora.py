"""Which DeepSeek-V2 weights LoRA reaches, as PEFT targets.

Routed experts are fused 3-D parameters in transformers (``experts.gate_up_proj``,
``experts.down_proj``), so they are reached through PEFT's ``target_parameters`` rather than
``target_modules``. The router (``mlp.gate``) is never a LoRA target: it is either frozen or
trained in full through ``modules_to_save``.
"""

from __future__ import annotations

import contextlib
from unittest import mock

from peft import LoraConfig as PeftLoraConfig
from peft.utils import transformers_weight_conversion as _twc

from align.config import LoraConfig

ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ROUTED = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
ROUTER = "gate"


def target_regex(cfg: LoraConfig) -> str | None:
    """A full-match regex over module names for the enabled linear-layer groups."""
    parts = []
    if cfg.attention:
        parts.append(rf"self_attn\.({'|'.join(ATTENTION)})")
    if cfg.dense_mlp:
        parts.append(rf"mlp\.({'|'.join(MLP)})")
    if cfg.shared_experts:
        parts.append(rf"mlp\.shared_experts\.({'|'.join(MLP)})")
    if not parts:
        return None
    return rf".*layers\.\d+\.({'|'.join(parts)})"


def peft_config(cfg: LoraConfig) -> PeftLoraConfig:
    modules = list(cfg.modules_to_save) + ([ROUTER] if cfg.train_router else [])
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=target_regex(cfg) or [],
        target_parameters=list(ROUTED) if cfg.routed_experts else None,
        modules_to_save=modules or None,
        task_type="CAUSAL_LM",
    )


@contextlib.contextmanager
def native_v5_targets():
    """Suspend PEFT's v4->v5 MoE target conversion while creating or loading our adapters.

    PEFT 0.21 maps every ``gate_proj``/``up_proj``/``down_proj`` target of a DeepSeek-V2 model onto
    the fused routed experts (to load adapters trained on transformers v4), which silently drops
    LoRA on the dense and shared-expert MLPs. Our adapters are written against v5 names already.
    """
    with mock.patch.object(_twc, "convert_peft_config_for_transformers", lambda *a, **k: None):
        yield
