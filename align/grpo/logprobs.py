"""Per-token log-probs and entropy of completions without materializing full-vocabulary fp32 logits
for the whole batch: hidden states are projected through the LM head a chunk of rows at a time."""

from __future__ import annotations

import torch


def _decoder_and_head(model: torch.nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def completion_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor, prompt_width: int, temperature: float = 1.0,
                        chunk_rows: int = 16, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_t | prefix) for completion columns, [N, C]; entropy [N, C] if asked.

    Logits are divided by the sampling temperature so they describe the distribution that was sampled.
    """
    decoder, head = _decoder_and_head(model)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    h = hidden[:, prompt_width - 1:-1]
    targets = input_ids[:, prompt_width:]
    t = temperature if temperature > 0 else 1.0
    logps, ents = [], []
    for i in range(0, h.shape[0], chunk_rows):
        logits = head(h[i:i + chunk_rows]).float() / t
        lse = torch.logsumexp(logits, -1)
        logps.append(logits.gather(-1, targets[i:i + chunk_rows].unsqueeze(-1)).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                p = (logits - lse.unsqueeze(-1)).exp()
                ents.append(lse - (p * logits).sum(-1))
    return torch.cat(logps), (torch.cat(ents) if with_entropy else None)
