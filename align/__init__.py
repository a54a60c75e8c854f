"""align: SFT then GRPO post-training for DeepSeek-V2-family MoE models."""

__version__ = "0.1.0"
