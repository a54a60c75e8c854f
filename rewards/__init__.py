"""Rule-based verifiers shared by GRPO and evaluation."""

from rewards.registry import Combined, configure, get_reward, list_rewards, register_reward

__all__ = ["Combined", "configure", "get_reward", "list_rewards", "register_reward"]
