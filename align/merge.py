"""`align merge`: fold every adapter of a checkpoint chain into a full Hugging Face model."""

from __future__ import annotations

from pathlib import Path

from align.config import LoraConfig, ModelConfig
from align.errors import AlignError
from align.policy import load_policy


def merge_checkpoint(checkpoint: str, out: str, dtype: str = "float32", overwrite: bool = False) -> str:
    if not Path(checkpoint).exists():
        raise AlignError(f"{checkpoint}: checkpoint not found")
    if Path(out).is_dir() and any(Path(out).iterdir()) and not overwrite:
        raise AlignError(f"{out}: output directory is not empty (pass --overwrite to replace its files)")
    policy = load_policy(ModelConfig(name_or_path=checkpoint, dtype=dtype), LoraConfig(enabled=False))
    policy.model.save_pretrained(out)
    policy.tokenizer.save_pretrained(out)
    return out
