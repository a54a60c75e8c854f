"""UpdateBatch: rollouts laid out as tensors for the log-prob and update passes.

Prompts are left-padded to a common width P and completions right-padded to width C, so every
row's completion occupies columns P..P+C-1 and a single slice selects all completion logits.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` on ``device``; a host tensor reaches a GPU through pinned memory without blocking: a plain copy from
    pageable memory waits for everything queued on the GPU, which would stall the host between micro-batches."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass
class UpdateBatch:
    input_ids: torch.Tensor        # [N, P + C]
    attention_mask: torch.Tensor   # [N, P + C]
    position_ids: torch.Tensor     # [N, P + C]
    completion_mask: torch.Tensor  # [N, C] 1 on completion tokens that enter the loss
    rollout_logp: torch.Tensor     # [N, C] sampling log-probs reported by the engine
    advantages: torch.Tensor       # [N]
    prompt_width: int
    truncated: torch.Tensor        # [N] bool
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn) -> "UpdateBatch":
        """A batch with ``fn(name, tensor)`` applied to every tensor field (``None`` fields stay ``None``)."""
        return replace(self, **{f.name: fn(f.name, getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device, host_mask: bool = False) -> "UpdateBatch":
        """This batch on ``device`` (:func:`to_device`: no wait for the GPU); ``host_mask`` keeps the attention mask
        on the host, where packed forwards read their sequences' lengths from it."""
        return self._map(lambda name, t: t if host_mask and name == "attention_mask" else to_device(t, device))

    def rows(self, idx: torch.Tensor | slice) -> "UpdateBatch":
        return self._map(lambda _, t: t[idx])

    @property
    def completion_width(self) -> int:
        return self.completion_mask.shape[1]

    def trimmed(self) -> "UpdateBatch":
        """The same rows without the completion columns that are padding in every row (exact: attention is
        causal and completions are right-padded, so earlier tokens never see those columns)."""
        used = self.attention_mask[:, self.prompt_width:].any(0).nonzero()
        keep = int(used.max()) + 1 if used.numel() else 1
        if keep == self.completion_width:
            return self
        cut = {"input_ids": self.prompt_width + keep, "attention_mask": self.prompt_width + keep,
               "position_ids": self.prompt_width + keep, "completion_mask": keep, "rollout_logp": keep,
               "old_logp": keep, "ref_logp": keep}
        return self._map(lambda name, t: t[:, :cut[name]] if name in cut else t)

    def by_tokens(self, max_tokens: int, real: bool = False) -> list[torch.Tensor]:
        """Row sets, longest completions first, each at most ``max_tokens`` tokens and never empty (verl's
        dynamic batch size): many short rows share a forward, a few long ones get their own. Tokens are padded
        ones (rows x (P + longest completion in the set)), or with ``real`` (packed rows) the rows' own."""
        lens = self.attention_mask[:, self.prompt_width:].sum(-1)
        own = self.attention_mask.sum(-1).tolist() if real else None
        order = lens.argsort(descending=True, stable=True).tolist()
        parts: list[list[int]] = []
        used = 0  # tokens of the last part, with row i added
        for i in order:
            if real:
                used = used + own[i] if parts else own[i]
            elif parts:  # every row of a part padded to its first (longest) completion
                used = (len(parts[-1]) + 1) * (self.prompt_width + int(lens[parts[-1][0]]))
            if parts and used <= max_tokens:
                parts[-1].append(i)
            else:
                parts.append([i])
                used = own[i] if real else 0
        return [torch.tensor(p) for p in parts]

    def micro_batches(self, n: int) -> list[tuple[torch.Tensor, "UpdateBatch"]]:
        """``n`` parts of these rows as (row indices, part), rows ordered by completion length so that each
        part drops the padding columns none of its rows use."""
        if n <= 1:
            return [(torch.arange(self.size), self.trimmed())]
        order = self.attention_mask[:, self.prompt_width:].sum(-1).argsort(stable=True)
        return [(idx, self.rows(idx).trimmed()) for idx in order.tensor_split(n)]

    def token_micro_batches(self, max_tokens: int, n: int,
                            real: bool = False) -> list[tuple[torch.Tensor, "UpdateBatch"]]:
        """:meth:`by_tokens` parts, the largest split in halves until there are ``n`` (ranks must agree on a count)."""
        parts = self.by_tokens(max_tokens, real)
        while len(parts) < n:
            big = max(range(len(parts)), key=lambda j: len(parts[j]))
            if len(parts[big]) < 2:
                break
            parts[big:big + 1] = list(parts[big].tensor_split(2))
        return [(idx.to(self.input_ids.device), self.rows(idx.to(self.input_ids.device)).trimmed()) for idx in parts]


def build_batch(prompt_ids: list[list[int]], completions: list, advantages: torch.Tensor, pad_id: int,
                mask_truncated: bool = True) -> UpdateBatch:
    """``prompt_ids[i]`` is the prompt of ``completions[i]`` (a :class:`rollout.Completion`)."""
    n = len(completions)
    p_w = max(len(p) for p in prompt_ids)
    c_w = max(1, max(len(c.token_ids) for c in completions))
    ids = torch.full((n, p_w + c_w), pad_id, dtype=torch.long)
    attn = torch.zeros((n, p_w + c_w), dtype=torch.long)
    cmask = torch.zeros((n, c_w), dtype=torch.float32)
    rlogp = torch.zeros((n, c_w), dtype=torch.float32)
    truncated = torch.zeros(n, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completions)):
        ids[i, p_w - len(p):p_w] = torch.tensor(p)
        attn[i, p_w - len(p):p_w] = 1
        k = len(c.token_ids)
        if k:
            ids[i, p_w:p_w + k] = torch.tensor(c.token_ids)
            attn[i, p_w:p_w + k] = 1
            cmask[i, :k] = 1
            rlogp[i, :len(c.logprobs[:k])] = torch.tensor(c.logprobs[:k], dtype=torch.float32)
        truncated[i] = c.truncated
        if mask_truncated and c.truncated:
            cmask[i] = 0
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return UpdateBatch(ids, attn, pos, cmask, rlogp, advantages.float(), p_w, truncated)


def minibatches(n: int, size: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Row index sets of at most ``size`` rows covering 0..n-1 (shuffled when a generator is given)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + size] for i in range(0, n, max(1, size))]
