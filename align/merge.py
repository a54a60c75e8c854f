"""`align merge`: fold every adapter of a checkpoint chain into a full Hugging Face model."""

from __future__ import annotations

from pathlib import Path

from align.config import LoraConfig, ModelConfig
from align.errors import AlignError
from align.policy import load_policy


def merge_checkpoint(checkpoint: str, out: str, dtype: str = "float32") -> str:
    if not Path(checkpoint).exists():
        raise AlignError(f"{checkpoint}: checkpoint not found")
    policy = load_policy(ModelConfig(name_or_path=checkpoint, dtype=dtype), LoraConfig(enabled=False))
    policy.model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
    return out
