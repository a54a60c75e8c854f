"""A decode path for DeepSeek-V2 without vLLM: latent KV cache, absorbed MLA, static shapes, CUDA graphs.

``transformers.generate`` re-dispatches ~30 kernels per layer per token from Python and (in older
versions) caches per-head K/V. Here, as in DeepSeek-V2 (arXiv:2405.04434, section 2.1.3):

- the cache holds only the 512-wide compressed latent ``c_kv`` and the 64-wide rotated ``k_pe`` per
  token and layer (576 values instead of heads x (192 + 128));
- ``kv_b_proj`` is absorbed: queries move into the latent space (``q_nope @ W_UK``) and attention
  output leaves it through ``W_UV``, so keys and values are never expanded;
- every decode step has the same shapes (a static cache of ``max_len`` slots, masked), so one step is
  captured once as a CUDA graph and replayed; MoE layers run transformers' own ``grouped_mm`` experts,
  which avoid host syncs and are capturable.

The model is used as loaded (weights shared, nothing copied except the absorbed ``kv_b_proj`` views).
"""

from __future__ import annotations

import contextlib
import math

import torch

from rollout.base import Completion, Rollout, SamplingSettings, finish, left_pad
from rollout.sampling import gumbel_noise, prompt_seeds, row_generators, row_seeds


def _apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V2's interleaved rope: x [B, T, n, 64] (pairs of adjacent dims), freqs [B, T, 32] complex."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.unsqueeze(2)).flatten(-2).type_as(x)


class FastDecoder:
    """Greedy / sampled decoding of a ``DeepseekV2ForCausalLM`` for a fixed batch size and length."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_len: int, use_graph: bool | None = None):
        self.model = model.eval()
        cfg = model.config
        self.cfg, self.batch_size, self.max_len = cfg, batch_size, max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        # Graphs need host-sync-free experts: grouped_mm in bf16/fp16 (the eager experts loop syncs per
        # expert, and grouped_mm copies offsets to the host for fp32 weights).
        capturable = (self.device.type == "cuda" and self.dtype in (torch.bfloat16, torch.float16)
                      and getattr(cfg, "_experts_implementation", None) == "grouped_mm")
        self.use_graph = capturable if use_graph is None else use_graph and capturable
        self.layers = list(model.model.layers)
        n_layers, r, d_rope = len(self.layers), cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self.ckv = torch.zeros(n_layers, batch_size, max_len, r, dtype=self.dtype, device=self.device)
        self.kpe = torch.zeros(n_layers, batch_size, max_len, d_rope, dtype=self.dtype, device=self.device)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=self.device)
        h, nope, v = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
        self.w_uk, self.w_uv = [], []
        for layer in self.layers:
            w = layer.self_attn.kv_b_proj.weight.view(h, nope + v, r)
            self.w_uk.append(w[:, :nope])   # [H, nope, r]
            self.w_uv.append(w[:, nope:])   # [H, v, r]
        # The decode step's inputs live at fixed addresses: a captured graph reads exactly these tensors.
        self.s_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.s_pos = torch.zeros(batch_size, 1, dtype=torch.long, device=self.device)
        self.s_slot = torch.zeros(1, dtype=torch.long, device=self.device)
        self._graph = None

    @staticmethod
    def kv_bytes_per_token(cfg, dtype: torch.dtype = torch.bfloat16) -> int:
        """Cache bytes per token over all layers: (kv_lora_rank + rope dim) values per layer."""
        return cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * torch.finfo(dtype).bits // 8

    def _attention(self, i: int, attn, x: torch.Tensor, freqs: torch.Tensor, slots: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] at cache ``slots`` [T]; mask [B, T, S] additive -> attention output [B, T, D]."""
        b, t, _ = x.shape
        cfg = self.cfg
        h, nope, rope = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        q = attn.q_proj(x) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
        q = q.view(b, t, h, nope + rope)
        q_nope, q_pe = q[..., :nope], _apply_rope(q[..., nope:], freqs)
        ckv, kpe = attn.kv_a_proj_with_mqa(x).split([cfg.kv_lora_rank, rope], dim=-1)
        self.ckv[i].index_copy_(1, slots, attn.kv_a_layernorm(ckv))
        self.kpe[i].index_copy_(1, slots, _apply_rope(kpe.unsqueeze(2), freqs).squeeze(2))
        q_lat = torch.einsum("bthn,hnr->bhtr", q_nope, self.w_uk[i])
        scores = torch.einsum("bhtr,bsr->bhts", q_lat, self.ckv[i]).float()
        scores = scores + torch.einsum("bthd,bsd->bhts", q_pe, self.kpe[i]).float()
        probs = torch.softmax(scores * attn.scaling + mask.unsqueeze(1), dim=-1).to(x.dtype)
        out_lat = torch.einsum("bhts,bsr->bthr", probs, self.ckv[i])
        out = torch.einsum("bthr,hvr->bthv", out_lat, self.w_uv[i]).reshape(b, t, -1)
        return attn.o_proj(out)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """ids/positions [B, T] written at cache ``slots`` [T] -> last-position logits [B, V] (fp32)."""
        m = self.model.model
        x = m.embed_tokens(ids)
        freqs = m.rotary_emb(x, positions)
        causal = slots.view(-1, 1) >= torch.arange(self.max_len, device=self.device).view(1, -1)  # [T, S]
        own = slots.view(-1, 1) == torch.arange(self.max_len, device=self.device).view(1, -1)
        # A padding query may see no valid key; letting it see itself keeps its row finite (a NaN
        # row would reach the cache and, through 0 * NaN, every row attending over it).
        allowed = (causal.unsqueeze(0) & self.key_valid.unsqueeze(1)) | own.unsqueeze(0)
        mask = torch.zeros(allowed.shape, dtype=torch.float32, device=self.device).masked_fill(~allowed, -math.inf)
        for i, layer in enumerate(self.layers):
            x = x + self._attention(i, layer.self_attn, layer.input_layernorm(x), freqs, slots, mask)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.model.lm_head(m.norm(x[:, -1])).float()

    def prefill(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Left-padded prompts [B, P] into slots 0..P-1 -> logits of the next token [B, V]."""
        p = ids.shape[1]
        self.ckv.zero_()
        self.kpe.zero_()
        self.key_valid.zero_()
        self.key_valid[:, :p] = attention_mask.bool()
        positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        self.pos = positions[:, -1:].clone()
        return self._forward(ids, positions, torch.arange(p, device=self.device))

    def _step_eager(self) -> torch.Tensor:
        self.key_valid.index_fill_(1, self.s_slot, True)
        return self._forward(self.s_ids, self.s_pos, self.s_slot)

    def _ensure_graph(self) -> None:
        if self._graph is not None:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm up allocator and lazy inits outside the capture
                self._step_eager()
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self.s_logits = self._step_eager()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
                 gens: list[torch.Generator] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns new tokens [B, N] and the logits each was drawn from, log-softmaxed at ``temperature``:
        per-token log-probs [B, N] (fp32). Rows past EOS keep decoding (static shapes) and are cut by the caller."""
        b, p = ids.shape
        self._check(b, p + max_new_tokens)
        logits = self.prefill(ids, attention_mask)
        tokens, logps = [], []
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        for k in range(max_new_tokens):
            tok, lp = _pick(logits, temperature, top_p, gens)
            tokens.append(tok)
            logps.append(lp)
            if eos_token_id is not None:
                done |= tok == eos_token_id
                if k % 16 == 15 and bool(done.all()):
                    break
            if k == max_new_tokens - 1:
                break
            logits = self._step(tok, p + k)
        return torch.stack(tokens, 1), torch.stack(logps, 1)

    def _check(self, batch: int, length: int) -> None:
        if batch != self.batch_size or length > self.max_len:
            raise ValueError(f"batch {batch} / length {length} exceed the decoder's {self.batch_size} / {self.max_len}")

    def _step(self, tok: torch.Tensor, slot: int) -> torch.Tensor:
        """Feed tokens [B] at cache ``slot`` (one past the last) -> next logits [B, V]; graph when enabled."""
        self.s_ids.copy_(tok.view(-1, 1))
        self.pos += 1
        self.s_pos.copy_(self.pos)
        self.s_slot.fill_(slot)
        if not self.use_graph:
            return self._step_eager()
        # Captured on the first step with its inputs in place: the warm-up runs rewrite the current
        # slot with the same values, so the cache stays exact.
        self._ensure_graph()
        self._graph.replay()
        return self.s_logits

    @torch.no_grad()
    def teacher_forced(self, ids: torch.Tensor, attention_mask: torch.Tensor,
                       tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed given continuations [B, N] through the same decode steps: log-probs of those tokens
        and of each step's best token, both [B, N] (how another engine's output scores here)."""
        p = ids.shape[1]
        self._check(ids.shape[0], p + tokens.shape[1])
        logits = self.prefill(ids, attention_mask)
        chosen, best = [], []
        for k in range(tokens.shape[1]):
            lp = logits.log_softmax(-1)
            chosen.append(lp.gather(-1, tokens[:, k:k + 1]).squeeze(-1))
            best.append(lp.max(-1).values)
            if k < tokens.shape[1] - 1:
                logits = self._step(tokens[:, k], p + k)
        return torch.stack(chosen, 1), torch.stack(best, 1)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gens) -> tuple[torch.Tensor, torch.Tensor]:
    """Next token and its log-prob at ``temperature`` from logits [B, V]; sampling is Gumbel-argmax with
    one generator per row (``gens``), so a row's sample does not depend on its batch."""
    if temperature <= 0:
        lp = logits.log_softmax(-1)
        tok = lp.argmax(-1)
        return tok, lp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    lp = (logits / temperature).log_softmax(-1)
    scores = lp
    if top_p < 1.0:
        sorted_p, order = lp.exp().sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        scores = lp.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)
    tok = (scores + gumbel_noise(gens, logits.shape[-1], logits.device)).argmax(-1)
    return tok, lp.gather(-1, tok.unsqueeze(-1)).squeeze(-1)


class FastEngine:
    """The rollout-engine interface over :class:`FastDecoder` (one decoder per batch shape, reused)."""

    name = "fast"
    shares_weights = True

    def __init__(self, model: torch.nn.Module, tokenizer, batch_size: int = 64, max_len: int | None = None,
                 merged=None):
        """``model``: the ``DeepseekV2ForCausalLM`` (the base model under a PEFT adapter); ``merged``: a
        context factory that folds the adapter into those weights in place while generating (the
        absorbed ``kv_b_proj`` reads the weight, not the LoRA forward)."""
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_len = max_len or model.config.max_position_embeddings
        self.merged = merged or contextlib.nullcontext
        self._decoders: dict[int, FastDecoder] = {}

    def _decoder(self, b: int) -> FastDecoder:
        if b not in self._decoders:
            self._decoders[b] = FastDecoder(self.model, b, self.max_len)
        return self._decoders[b]

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> list[Rollout]:
        reps = 1 if settings.greedy else settings.n
        rows = [p for p in prompts for _ in range(reps)]
        seeds = row_seeds(prompt_seeds(settings, len(prompts)), reps)
        dev = next(self.model.parameters()).device
        out: list[Rollout] = []
        per = max(reps, self.batch_size // reps * reps)
        for i in range(0, len(rows), per):
            chunk = rows[i:i + per]
            comps = self._batch(chunk, settings, row_generators(seeds[i:i + per], dev))
            for j in range(0, len(chunk), reps):
                group = comps[j:j + reps]
                out.append(Rollout(prompt_ids=chunk[j], completions=group * (settings.n if settings.greedy else 1)))
        return out

    def _batch(self, rows: list[list[int]], s: SamplingSettings, gens) -> list[Completion]:
        tok = self.tokenizer
        ids, mask = left_pad(rows, tok.pad_token_id)
        dev = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with self.merged():
                new, lps = self._decoder(len(rows)).generate(ids.to(dev), mask.to(dev), s.max_new_tokens,
                                                              s.temperature, s.top_p, tok.eos_token_id, gens)
        finally:
            self.model.train(was_training)
        return [finish(row, lp, tok, s.stop) for row, lp in zip(new.cpu().tolist(), lps.cpu().tolist())]

    def update_weights(self, named_tensors=None) -> float:
        return 0.0  # the decoder reads the live model's weights

    def sleep(self) -> None:
        pass

    def wake_up(self, push=None) -> None:
        pass  # reads the trainer's live weights: nothing to push
