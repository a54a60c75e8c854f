"""Run TRL's own GRPOTrainer._compute_loss on given tensors (no model, no data): the reference loss."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import torch
from trl import GRPOTrainer


class _Acc:
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(loss_type: str, logp, old_logp, advantages, mask, *, ref_logp=None, beta=0.0, eps_low=0.2,
             eps_high=0.2, level="token", max_completion_length=None) -> torch.Tensor:
    t = GRPOTrainer.__new__(GRPOTrainer)
    n, c = logp.shape
    t.__dict__.update(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=level, beta=beta, epsilon_low=eps_low, epsilon_high=eps_high, loss_type=loss_type,
        use_vllm=False, vllm_importance_sampling_correction=False, model=SimpleNamespace(training=False),
        max_completion_length=max_completion_length or c, _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, accelerator=_Acc(),
        current_gradient_accumulation_steps=1,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1, entropy_coef=0.0),
    )
    inputs = {
        "prompt_ids": torch.zeros(n, 1, dtype=torch.long), "prompt_mask": torch.ones(n, 1, dtype=torch.long),
        "completion_ids": torch.zeros(n, c, dtype=torch.long), "completion_mask": mask,
        "advantages": advantages, "old_per_token_logps": old_logp, "ref_per_token_logps": ref_logp,
        "num_items_in_batch": mask.sum(),
    }
    return t._compute_loss(None, inputs)
