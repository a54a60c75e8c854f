"""The engine protocol and the objects it returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class EngineError(Exception):
    """The requested engine cannot run here (not installed, a model shape it rejects): the CLI shows one line."""


@dataclass
class SamplingSettings:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    seeds: list[int] | None = None
    """One seed per prompt: a prompt's samples then depend only on its seed, not on the batch it
    shares or the rank that generates it (what makes runs equal across world sizes)."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    logprobs: list[float]
    """Sampling logprob of each generated token (log-softmax of logits / temperature)."""
    finish_reason: str
    """'stop' (EOS or a stop string) or 'length' (cut at max_new_tokens)."""

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass
class Rollout:
    """One prompt and its group of ``n`` completions."""

    prompt_ids: list[int]
    completions: list[Completion]


class Engine(Protocol):
    name: str
    shares_weights: bool
    """Generates from the trainer's live weights (the HF and fast engines): nothing to sync."""

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[Rollout]:
        """Per prompt (token ids), ``settings.n`` completions, in prompt order."""

    def update_weights(self, named_tensors) -> float:
        """Load new policy weights (name -> tensor, base-model names); returns seconds taken."""

    def sleep(self) -> None:
        """Free accelerator memory while the trainer runs (no-op where unsupported)."""

    def wake_up(self, push=None) -> None:
        """Undo :meth:`sleep`; ``push(full: bool)``, when given, syncs the trainer's weights into the engine at
        the point its lifecycle allows (``full``: every weight, e.g. after a sleep that dropped them)."""


def render_prompts(tokenizer, messages: list[list[dict]]) -> list[list[int]]:
    """Chat messages -> prompt token ids with the generation prompt appended."""
    out = []
    for m in messages:
        ids = tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


def cut_at_stop(text: str, token_ids: list[int], stop: list[str], tokenizer) -> tuple[str, list[int], bool]:
    """Truncate a completion at the first stop string; returns (text, ids, stopped)."""
    hits = [text.find(s) for s in stop if s and s in text]
    if not hits:
        return text, token_ids, False
    cut = min(hits)
    kept: list[int] = []
    for tid in token_ids:
        kept.append(tid)
        if len(tokenizer.decode(kept, skip_special_tokens=True)) >= cut:
            break
    return text[:cut], kept, True


def left_pad(rows: list[list[int]], pad_id: int):
    """Token rows -> left-padded ids and attention mask, both [len(rows), longest] (CPU, long)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


def finish(token_ids: list[int], logprobs: list[float], tokenizer, stop: list[str]) -> Completion:
    """A generated row (no padding removed yet) cut at EOS, then at the first stop string."""
    eos = tokenizer.eos_token_id
    toks = token_ids[: token_ids.index(eos) + 1] if eos in token_ids else list(token_ids)
    text, toks, stopped = cut_at_stop(tokenizer.decode(toks, skip_special_tokens=True), toks, stop, tokenizer)
    reason = "stop" if stopped or eos in toks else "length"
    return Completion(toks, text, list(logprobs[: len(toks)]), reason)

