"""Fallback engine on ``transformers.generate``: same interface as vLLM, no extra dependency."""

from __future__ import annotations

import time

import torch

from rollout.base import Completion, Rollout, SamplingSettings, cut_at_stop


class HFEngine:
    """Generates with the training model itself (weights are always in sync)."""

    name = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_len = getattr(model.config, "max_position_embeddings", None)

    @torch.no_grad()
    def _batch(self, prompts: list[list[int]], s: SamplingSettings) -> list[list[Completion]]:
        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        device = next(self.model.parameters()).device
        kwargs = dict(max_new_tokens=s.max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      return_dict_in_generate=True, output_logits=True, use_cache=True)
        if s.greedy:
            kwargs.update(do_sample=False, num_return_sequences=1)
        else:
            kwargs.update(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0, num_return_sequences=s.n)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        finally:
            self.model.train(was_training)
        new = out.sequences[:, width:].cpu()
        logits = torch.stack(out.logits, 1).float().cpu()
        if not s.greedy:
            logits = logits / s.temperature
        lp = logits.log_softmax(-1).gather(-1, new.unsqueeze(-1)).squeeze(-1)
        reps = 1 if s.greedy else s.n
        groups: list[list[Completion]] = [[] for _ in prompts]
        for row in range(new.shape[0]):
            seq = new[row].tolist()
            eos = tok.eos_token_id
            end = seq.index(eos) + 1 if eos in seq else len(seq)
            toks = seq[:end]
            reason = "stop" if eos in toks else "length"
            text = tok.decode(toks, skip_special_tokens=True)
            text, toks, stopped = cut_at_stop(text, toks, s.stop, tok)
            reason = "stop" if stopped else reason
            groups[row // reps].append(Completion(toks, text, lp[row, : len(toks)].tolist(), reason))
        if s.greedy and s.n > 1:
            groups = [g * s.n for g in groups]
        return groups

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[Rollout]:
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        per = max(1, self.batch_size // max(1, 1 if settings.greedy else settings.n))
        out: list[Rollout] = []
        for i in range(0, len(prompts), per):
            chunk = prompts[i:i + per]
            for p, comps in zip(chunk, self._batch(chunk, settings)):
                out.append(Rollout(prompt_ids=p, completions=comps))
        return out

    def update_weights(self, named_tensors=None) -> float:
        t = time.perf_counter()
        return time.perf_counter() - t

    def sleep(self) -> None:
        pass

    def wake_up(self) -> None:
        pass
