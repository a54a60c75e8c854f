"""Loading DeepSeek-V2 models: hub id, local path, align checkpoint, or the embedded tiny model."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DeepseekV2Config, PreTrainedModel

from align.config import ModelConfig, TinyModelConfig
from align.errors import AlignError
from align.tokenizer import build_tokenizer

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY = "tiny"


def tiny_config(t: TinyModelConfig, vocab_size: int) -> DeepseekV2Config:
    """A DeepSeek-V2 config of the real architecture (MLA + DeepSeekMoE) at toy width.

    Latent sizes stay at V2's real values (kv_lora_rank 512, rope 64) because vLLM's CPU MLA
    kernel only supports a 576-wide head; the router uses one group, as vLLM's CPU path needs.
    """
    return DeepseekV2Config(
        vocab_size=-(-vocab_size // 64) * 64,
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        moe_intermediate_size=t.moe_intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_attention_heads,
        n_routed_experts=t.n_routed_experts,
        n_shared_experts=t.n_shared_experts,
        num_experts_per_tok=t.num_experts_per_tok,
        first_k_dense_replace=1,
        kv_lora_rank=t.kv_lora_rank,
        q_lora_rank=None,
        qk_nope_head_dim=t.qk_nope_head_dim,
        qk_rope_head_dim=t.qk_rope_head_dim,
        v_head_dim=t.v_head_dim,
        topk_method="greedy",
        n_group=1,
        topk_group=1,
        norm_topk_prob=False,
        routed_scaling_factor=1.0,
        max_position_embeddings=t.max_position_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )


def _experts_impl(requested: str) -> str:
    if requested != "auto":
        return requested
    return "grouped_mm" if torch.cuda.is_available() else "eager"


def resolve_base(path: str) -> tuple[str, list[str]]:
    """Follow adapter checkpoints down to a full model: ``(base path, [adapters, oldest first])``.

    A GRPO adapter names the SFT checkpoint as its base, which names the real base model; a local base is
    named relative to the adapter's directory (absolute paths and hub ids are taken as they are).
    """
    adapters: list[str] = []
    while (Path(path) / "adapter_config.json").is_file():
        cfg = Path(path) / "adapter_config.json"
        try:
            base = json.loads(cfg.read_text()).get("base_model_name_or_path")
        except json.JSONDecodeError as e:
            raise AlignError(f"{cfg}: invalid JSON ({e})") from None
        if not base:
            raise AlignError(f"{cfg}: no base_model_name_or_path")
        adapters.insert(0, path)
        local = Path(path) / base  # written relative to the adapter, so moved runs keep their chain
        path = str(local.resolve()) if not Path(base).is_absolute() and local.exists() else base
        if len(adapters) > 16:
            raise AlignError(f"{cfg}: adapter chain too deep (a cycle?)")
    return path, adapters


def check_model_path(path: str) -> None:
    """A local-looking path that does not exist is a user error, not a hub lookup."""
    if path != TINY and not Path(path).exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise AlignError(f"model.name_or_path={path!r}: no such local path (and not a hub id)")


def load_tokenizer(path: str):
    if path == TINY:
        return build_tokenizer()
    check_model_path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise AlignError(f"model.name_or_path={path!r}: cannot load tokenizer ({str(e).splitlines()[0]})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(cfg: ModelConfig, path: str, vocab_size: int) -> PreTrainedModel:
    """Load the base weights (no adapters) from ``path`` or build the tiny random model."""
    dtype = DTYPES[cfg.dtype]
    if path == TINY:
        torch.manual_seed(cfg.tiny.seed)
        config = tiny_config(cfg.tiny, vocab_size)
        config._attn_implementation = cfg.attn_implementation
        config._experts_implementation = _experts_impl(cfg.experts_implementation)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)
    check_model_path(path)
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise AlignError(f"model.name_or_path={path!r}: no config.json there (a tokenizer alone is not a model)")
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=cfg.attn_implementation,
            experts_implementation=_experts_impl(cfg.experts_implementation),
            trust_remote_code=cfg.trust_remote_code,
        )
    except OSError as e:
        raise AlignError(f"model.name_or_path={path!r}: cannot load ({str(e).splitlines()[0]})") from None


_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def fuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint's per-expert tensors (``experts.{e}.gate_proj.weight`` … as ``save_pretrained`` writes them)
    as transformers' fused in-memory parameters: ``experts.gate_up_proj`` [E, 2I, H] (gate rows first) and
    ``experts.down_proj`` [E, H, I]. Other keys pass through; the inverse of :func:`rollout.weights.to_engine_names`.
    """
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in state.items():
        m = _PER_EXPERT.match(key)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[key] = t
    for prefix, per in experts.items():
        order = sorted(per)
        if order != list(range(len(order))) or any(len(per[e]) != 3 for e in order):
            raise AlignError(f"checkpoint: incomplete routed experts under {prefix} (experts {order})")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([per[e]["gate"], per[e]["up"]]) for e in order])
        out[f"{prefix}.down_proj"] = torch.stack([per[e]["down"] for e in order])
    return out


def load_full_checkpoint(model: torch.nn.Module, directory: str | Path) -> None:
    """Load a full-weights checkpoint (single or sharded safetensors) into ``model``, every tensor or an error:
    transformers' Trainer loads non-strictly and would leave the fused experts at their initial values."""
    from safetensors.torch import load_file

    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else ["model.safetensors"])
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(directory / name, device="cpu"))
    result = model.load_state_dict(fuse_experts(state), strict=False)
    tied = model.config.tie_word_embeddings
    missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight") or not tied]
    if missing or result.unexpected_keys:
        raise AlignError(f"{directory}: checkpoint does not match the model (missing {missing[:4]}, "
                         f"unexpected {result.unexpected_keys[:4]})")
