"""Rollout engines: prompts in, groups of completions with sampling logprobs out."""

from rollout.base import Completion, Engine, EngineError, Rollout, SamplingSettings, render_prompts
from rollout.factory import make_engine

__all__ = ["Completion", "Engine", "EngineError", "Rollout", "SamplingSettings", "make_engine", "render_prompts"]
