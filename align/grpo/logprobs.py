"""Per-token log-probs and entropy of completions without materializing full-vocabulary fp32 logits:
hidden states go through the LM head a chunk of tokens at a time, and each chunk is recomputed in
the backward pass instead of keeping its logits alive."""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from align.grpo.packing import pack
from align.kernels import fused_logp_from_logits, runs_compiled
from align.kernels.varlen import NAME as VARLEN
from align.kernels.varlen import packed_rows
from align.moe import routed_tokens

# Packed rows' widths are multiples of this (at most 1/8 of a 1,024-token row as filler, and at most 8 shapes per
# row size): shapes repeat from one micro-batch and step to the next.
PACK_MULTIPLE = 128


def _decoder_and_head(model: torch.nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def _chunk_logp(h: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module, temperature: float) -> torch.Tensor:
    return fused_logp_from_logits(head(h), targets, temperature)


@torch.no_grad()
def _chunk_entropy(h: torch.Tensor, head: torch.nn.Module, temperature: float) -> torch.Tensor:
    logits = head(h).float() / temperature
    lse = torch.logsumexp(logits, -1)
    return lse - (logits.softmax(-1) * logits).sum(-1)


def token_logprobs(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor, temperature: float = 1.0,
                   chunk_tokens: int = 4096, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden) / T)[targets] for hidden [N, T, H], targets [N, T] -> [N, T] (+ entropy [N, T]).

    Peak extra memory is one chunk of ``chunk_tokens x vocab`` fp32 logits, forward and backward.
    The head is called as a module (not through its weight), so ZeRO-3 / FSDP gather it as usual.
    """
    n, t, d = hidden.shape
    head_grad = any(p.requires_grad for p in head.parameters())
    temp = temperature if temperature > 0 else 1.0
    h, y = hidden.reshape(-1, d), targets.reshape(-1)
    logps, ents = [], []
    for i in range(0, h.shape[0], chunk_tokens):
        hc, yc = h[i:i + chunk_tokens], y[i:i + chunk_tokens]
        if torch.is_grad_enabled() and (hc.requires_grad or head_grad):
            logps.append(checkpoint(_chunk_logp, hc, yc, head, temp, use_reentrant=False))
        else:
            logps.append(_chunk_logp(hc, yc, head, temp))
        if with_entropy:
            ents.append(_chunk_entropy(hc.detach(), head, temp))
    logp = torch.cat(logps).view(n, t)
    return logp, (torch.cat(ents).view(n, t) if with_entropy else None)


def completion_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor, prompt_width: int, temperature: float = 1.0,
                        chunk_tokens: int = 4096, with_entropy: bool = False,
                        pack_tokens: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log pi(token_t | prefix) for completion columns, [N, C]; entropy [N, C] if asked.

    Logits are divided by the sampling temperature so they describe the distribution that was sampled.
    ``pack_tokens`` > 0: the forward runs on the real tokens only, packed into rows of about that many
    (:mod:`align.grpo.packing`); completion columns that are padding are then 0.
    """
    decoder, head = _decoder_and_head(model)
    head = getattr(head, "modules_to_save", {}).get("default", head) if hasattr(head, "modules_to_save") else head
    if pack_tokens > 0:
        return _packed_logprobs(decoder, head, input_ids, attention_mask, prompt_width, temperature, chunk_tokens,
                                with_entropy, pack_tokens)
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state
    return token_logprobs(hidden[:, prompt_width - 1:-1], head, input_ids[:, prompt_width:], temperature,
                          chunk_tokens, with_entropy)


def _packed_mask(decoder, pk) -> dict:
    """The packed rows' attention mask for SDPA and eager (align_varlen attends within the sequences that
    cu_seq_lens delimit and ignores it; flash_attention_2 takes none). Given ready-made, it spares transformers'
    mask builder a host read of the positions (a wait for the GPU at every forward)."""
    impl = decoder.config._attn_implementation
    if impl in ("sdpa", VARLEN):
        return {"attention_mask": pk.causal_mask()}
    if impl == "eager":
        return {"attention_mask": pk.causal_mask(decoder.embed_tokens.weight.dtype)}
    return {}


def _packed_logprobs(decoder, head, input_ids, attention_mask, prompt_width, temperature, chunk_tokens,
                     with_entropy, pack_tokens):
    # Compiled layers never see a lone row: it would compile them again (see ``pack``).
    pk = pack(input_ids, attention_mask, prompt_width, pack_tokens, multiple=min(PACK_MULTIPLE, pack_tokens),
              min_rows=2 if runs_compiled(decoder.layers) else 1)
    with routed_tokens(pk.real.reshape(-1)), packed_rows():
        hidden = decoder(input_ids=pk.input_ids, position_ids=pk.position_ids, use_cache=False,
                         **_packed_mask(decoder, pk), **pk.attention_kwargs).last_hidden_state
    h = hidden.reshape(-1, hidden.shape[-1])[pk.source]
    targets = input_ids[:, prompt_width:][pk.rows, pk.cols]
    logp, ent = token_logprobs(h[None], head, targets[None], temperature, chunk_tokens, with_entropy)
    shape = (input_ids.shape[0], input_ids.shape[1] - prompt_width)
    out = logp.new_zeros(shape).index_put((pk.rows, pk.cols), logp[0])
    return out, (ent.new_zeros(shape).index_put((pk.rows, pk.cols), ent[0]) if with_entropy else None)


class CompletionLogprobs(torch.nn.Module):
    """The policy as one module whose forward returns completion log-probs (and entropy).

    This is what ``accelerate.prepare`` wraps (DDP, DeepSpeed, FSDP2): every training and scoring
    forward then goes through the wrapper's hooks, although the log-prob path calls the decoder
    and the LM head separately.
    """

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, prompt_width: int, temperature: float = 1.0,
                with_entropy: bool = False, pack_tokens: int = 0):
        return completion_logprobs(self.model, input_ids, attention_mask, position_ids, prompt_width, temperature,
                                   with_entropy=with_entropy, pack_tokens=pack_tokens)
