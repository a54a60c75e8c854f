"""Fallback engine on ``transformers.generate``: same interface as vLLM, no extra dependency."""

from __future__ import annotations

import contextlib
import time

import torch
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

from rollout.base import Completion, Rollout, SamplingSettings, finish, left_pad
from rollout.sampling import gumbel_noise, prompt_seeds, row_generators, row_seeds


class GumbelSampler(LogitsProcessor):
    """Sampling as argmax(scores + Gumbel noise) with one generator per row.

    Equal in distribution to multinomial sampling from softmax(scores), but every row draws from
    its own seeded stream, so a sample does not depend on which other rows share the batch.
    Runs after the temperature / top-p warpers, with greedy decoding.
    """

    def __init__(self, seeds: list[int], device):
        self.gens = row_generators(seeds, device)

    def __call__(self, input_ids, scores):
        return scores.float() + gumbel_noise(self.gens, scores.shape[-1], scores.device)


class HFEngine:
    """Generates with the training model itself (weights are always in sync).

    ``synced_gpus``: keep every rank stepping until all are done, needed when ranks hold only
    shards of the weights (ZeRO-3, FSDP) and each forward pass gathers them. ``gather``: a context
    factory that makes the weights generate reads outside the wrapped forward whole (FSDP2's root).
    """

    name = "hf"
    shares_weights = True

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 64, synced_gpus: bool = False,
                 gather=None):
        self.model = model
        self.gather = gather or contextlib.nullcontext
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.synced_gpus = synced_gpus
        self.max_len = getattr(model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def _batch(self, prompts: list[list[int]], s: SamplingSettings, seeds: list[int]) -> list[list[Completion]]:
        tok = self.tokenizer
        reps = 1 if s.greedy else s.n
        rows = [p for p in prompts for _ in range(reps)]
        ids, mask = left_pad(rows, tok.pad_token_id)
        width = ids.shape[1]
        device = next(self.model.parameters()).device
        kwargs = dict(max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      return_dict_in_generate=True, output_logits=True, use_cache=True, do_sample=False)
        if not s.greedy:
            procs = [TemperatureLogitsWarper(s.temperature)]
            if s.top_p < 1.0:
                procs.append(TopPLogitsWarper(s.top_p))
            procs.append(GumbelSampler(row_seeds(seeds, s.n), device))
            kwargs["logits_processor"] = LogitsProcessorList(procs)
        if self.synced_gpus:
            kwargs["synced_gpus"] = True
        was_training = self.model.training
        self.model.eval()
        try:
            with self.gather():
                out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        finally:
            self.model.train(was_training)
        new = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, 1).float().cpu()
        if not s.greedy:
            logits = logits / s.temperature
        lp = logits.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        groups: list[list[Completion]] = [[] for _ in prompts]
        for row, (seq, row_lp) in enumerate(zip(new.tolist(), lp.tolist())):
            groups[row // reps].append(finish(seq, row_lp, tok, s.stop))
        if s.greedy and s.n > 1:
            groups = [g * s.n for g in groups]
        return groups

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[Rollout]:
        seeds = prompt_seeds(settings, len(prompts))
        per = max(1, self.batch_size // max(1, 1 if settings.greedy else settings.n))
        out: list[Rollout] = []
        for i in range(0, len(prompts), per):
            chunk = prompts[i:i + per]
            for p, comps in zip(chunk, self._batch(chunk, settings, seeds[i:i + per])):
                out.append(Rollout(prompt_ids=p, completions=comps))
        return out

    def update_weights(self, named_tensors=None) -> float:
        t = time.perf_counter()
        return time.perf_counter() - t

    def sleep(self) -> None:
        pass

    def wake_up(self, push=None) -> None:
        pass  # reads the trainer's live weights: nothing to push
