"""The MoE-aware policy shared by SFT and GRPO: base model + LoRA + router policy + tokenizer.

The reference policy for GRPO's KL term is the same object with the adapter disabled, so no
second copy of the weights is kept.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import PreTrainedModel

from align.config import LoraConfig, ModelConfig
from align.kernels.dense_lora import use_addmm_lora
from align.kernels.expert_lora import use_grouped_expert_lora
from align.kernels import can_compile_for_gpu, compile_decoder_layers, use_fused_kernels, use_varlen_attention
from align.kernels.cache import use_kernel_cache
from align.lora import native_v5_targets, peft_config
from align.modeling import TINY, load_base_model, load_tokenizer, resolve_base

log = logging.getLogger(__name__)
BASE_DIR = "base"


@dataclass
class Policy:
    model: torch.nn.Module
    tokenizer: object
    base_path: str

    @property
    def is_peft(self) -> bool:
        return isinstance(self.model, PeftModel)

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.model.named_parameters() if p.requires_grad]

    def num_parameters(self) -> tuple[int, int]:
        total = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return trainable, total

    @contextlib.contextmanager
    def reference(self):
        """Run the reference policy (adapter off); a no-op context for full fine-tuning."""
        if self.is_peft:
            with self.model.disable_adapter():
                yield self.model
        else:
            yield self.model

    @contextlib.contextmanager
    def merged_weights(self, only_adapted: bool = False):
        """Yield an iterator of (base-model name, merged weight): W + ΔW for every adapted weight, computed out
        of place one tensor at a time, the base weights themselves as views.

        Out of place because an in-place merge and unmerge (PEFT's) rounds W twice: in bf16 five syncs of the
        tiny model moved a quarter to a third of its "frozen" base values (a CPU test checks they now stay).
        Consume (copy) inside the ``with`` block. ``only_adapted``: just the weights an adapter can change (PEFT
        wraps exactly those, as ``base_layer`` or ``modules_to_save``) — all a rollout engine needs after it started
        from the same base.
        """
        if not self.is_peft:
            yield ((k, v.detach()) for k, v in self.model.state_dict().items())
            return
        yield _merged_items(self.model, only_adapted)

    @contextlib.contextmanager
    def merged_in_place(self):
        """The adapter folded into the base weights while inside (PEFT's merge / unmerge), for decoders that read
        the module's own weights (the ``fast`` engine). Rounds the base weights in low precision (see
        :meth:`merged_weights`)."""
        if not self.is_peft:
            yield
            return
        self.model.merge_adapter()
        try:
            yield
        finally:
            self.model.unmerge_adapter()

    def merged_state_dict(self, only_adapted: bool = False) -> dict[str, torch.Tensor]:
        """A detached copy of :meth:`merged_weights`."""
        with self.merged_weights(only_adapted) as weights:
            return {k: v.clone() for k, v in weights}

    def save(self, out_dir: str | Path, state_dict: dict | None = None) -> None:
        """Write the adapter (or full weights) and tokenizer in Hugging Face format.

        ``state_dict``: full weights gathered from sharded ranks (keys as ``self.model.state_dict()``).
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out_dir, state_dict=state_dict)
        self.save_extras(out_dir)

    def save_extras(self, out_dir: str | Path) -> None:
        """Tokenizer, and the base model an adapter names, beside weights written by someone else."""
        out_dir = Path(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        if self.is_peft:
            cfg_path = out_dir / "adapter_config.json"
            cfg = json.loads(cfg_path.read_text())
            base = Path(self.base_path)
            # Relative to the adapter (staging dirs sit at the final directory's depth): runs can be moved.
            cfg["base_model_name_or_path"] = os.path.relpath(base, out_dir.resolve()) if base.is_absolute() \
                else self.base_path
            cfg_path.write_text(json.dumps(cfg, indent=2))

    def save_merged(self, out_dir: str | Path) -> None:
        """A full model that transformers and vLLM load without PEFT."""
        out_dir = Path(out_dir)
        base = self.model.get_base_model() if self.is_peft else self.model
        base.save_pretrained(out_dir, state_dict=self.merged_state_dict())
        self.tokenizer.save_pretrained(out_dir)


def _adapted_weights(model: PeftModel) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    """data_ptr of each base weight an active LoRA adapter changes -> the (LoRA layer, adapter) pairs changing it."""
    from peft.tuners.lora import LoraLayer

    out: dict[int, list] = {}
    for module in model.modules():
        if not isinstance(module, LoraLayer) or module.disable_adapters or module.merged:
            continue
        weight = module.get_param() if hasattr(module, "get_param") else module.get_base_layer().weight
        for adapter in module.active_adapters:
            if adapter in module.lora_A:
                out.setdefault(weight.data_ptr(), []).append((module, adapter))
    return out


def _merged_items(model: PeftModel, only_adapted: bool):
    deltas = _adapted_weights(model)
    found: set[int] = set()
    for k, v in model.get_base_model().state_dict().items():
        if "lora_" in k or ".original_module." in k or (only_adapted and ".base_layer" not in k
                                                        and ".modules_to_save." not in k):
            continue
        layers = deltas.get(v.data_ptr(), ())
        if layers:
            found.add(v.data_ptr())
        yield _base_name(k), _merged(v.detach(), layers)
    if len(found) != len(deltas):  # e.g. a wrapper whose state dict copies: the engine would get unadapted weights
        raise RuntimeError(f"merged_weights: {len(deltas) - len(found)} of {len(deltas)} adapted weights are not in "
                           "the model's state dict as themselves; their merge would be lost")


def _merged(weight: torch.Tensor, layers) -> torch.Tensor:
    """W + Σ ΔW, added in the promoted dtype and rounded once to W's (what PEFT's in-place ``W += ΔW`` gives)."""
    if not layers:
        return weight
    total = weight
    for module, adapter in layers:
        delta = module.get_delta_weight(adapter)
        total = total.to(torch.promote_types(total.dtype, delta.dtype)) + delta
    return total.to(weight.dtype)


def _base_name(peft_key: str) -> str:
    return peft_key.replace(".modules_to_save.default.", ".").replace(".base_layer", "")


def recompute_only_first(model: torch.nn.Module, n: int) -> int:
    """Keep gradient checkpointing on the first ``n`` decoder layers only (``n = -1``: all); returns how many
    recompute. Recomputation costs about one extra forward per checkpointed layer, so a GPU with memory to
    spare trains faster holding some layers' activations (``bench/update.py`` measures the trade)."""
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and hasattr(m, "mlp")]
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = n < 0 or i < n
    return sum(layer.gradient_checkpointing for layer in layers)


def _freeze_router(model: torch.nn.Module, train: bool) -> None:
    for name, p in model.named_parameters():
        if name.endswith("mlp.gate.weight"):
            p.requires_grad_(train)


def prepare_for_training(model: PreTrainedModel, model_cfg: ModelConfig, lora_cfg: LoraConfig) -> torch.nn.Module:
    """Recomputation, compiled kernels, a fresh LoRA with align's faster forwards, the router frozen or not:
    everything between a loaded base model and the policy that SFT and GRPO train."""
    if torch.cuda.is_available():
        use_kernel_cache()  # before anything compiles (the Triton operators too, with model.fused_kernels off)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        recompute_only_first(model, model_cfg.recompute_layers)
    if model_cfg.fused_kernels:
        use_fused_kernels()
    if model_cfg.packed_attention == "varlen":
        use_varlen_attention(model)
    if lora_cfg.enabled:
        with native_v5_targets():
            model = get_peft_model(model, peft_config(lora_cfg))
        if lora_cfg.grouped_experts and lora_cfg.routed_experts:
            log.info("grouped routed-expert LoRA on %d layers", use_grouped_expert_lora(model))
        if lora_cfg.addmm_dense:
            use_addmm_lora(model)
        if lora_cfg.adapter_dtype == "bfloat16":
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data = p.data.to(torch.bfloat16)
    _freeze_router(model, lora_cfg.train_router)
    if model_cfg.gradient_checkpointing and lora_cfg.enabled:
        model.enable_input_require_grads()
    if model_cfg.compile_layers and can_compile_for_gpu():
        n = compile_decoder_layers(model)
        log.log(logging.INFO if n else logging.WARNING, "model.compile_layers: %d decoder layers compiled for "
                "training%s", n, "" if n else " (every layer is recomputed: lower model.recompute_layers)")
    return model


def load_policy(model_cfg: ModelConfig, lora_cfg: LoraConfig, base_dir: str | Path | None = None) -> Policy:
    """Load base (+ an earlier stage's adapter, merged) and attach a fresh LoRA when enabled.

    ``base_dir``: where to persist the tiny random base so that adapters saved later can name it.
    """
    base_path, adapters = resolve_base(model_cfg.name_or_path)
    tokenizer = load_tokenizer(adapters[-1] if adapters else base_path)
    model: PreTrainedModel = load_base_model(model_cfg, base_path, len(tokenizer))
    for adapter in adapters:
        log.info("merging earlier-stage adapter %s", adapter)
        with native_v5_targets():
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    if base_path == TINY and base_dir is not None and lora_cfg.enabled:
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        base_path = str(Path(base_dir).resolve())
    elif adapters:
        base_path = str(Path(adapters[-1]).resolve())
    elif Path(base_path).exists():
        base_path = str(Path(base_path).resolve())
    model = prepare_for_training(model, model_cfg, lora_cfg)
    return Policy(model=model, tokenizer=tokenizer, base_path=base_path)
