"""Expert-balance monitoring and DeepSeek-V2 balance losses, through hooks on the MoE routers.

transformers' ``DeepseekV2TopkRouter`` returns ``(router_logits, topk_weights, topk_indices)`` but
the model does not surface them, so a forward hook on every router records per-layer expert
token counts and routing entropy, and (when enabled) builds the balance losses from the logits
with their graph intact.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass, field

import torch


def _eager(hook):
    """Router hooks keep Python state (counts, replay keys): inside a compiled layer (``model.compile_layers``)
    they run eagerly instead of being traced, so their changing state never triggers recompilation."""
    return torch.compiler.disable(hook)


_TOKENS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("align_routed_tokens", default=None)


@contextlib.contextmanager
def routed_tokens(mask: torch.Tensor):
    """Forwards inside count only the tokens where ``mask`` (flat, one per token) is true: how packed rows,
    which carry no attention mask, tell the monitor and the balance losses which tokens are filler."""
    token = _TOKENS.set(mask)
    try:
        yield
    finally:
        _TOKENS.reset(token)


def _real_tokens(kwargs: dict) -> torch.Tensor | None:
    """Flat mask of the real tokens of a decoder forward: its 2D attention mask, or the packed rows' own."""
    mask = kwargs.get("attention_mask")
    return mask.reshape(-1).bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else _TOKENS.get()


def _mask_for(mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """``mask`` when it describes a router call over ``tokens`` tokens (a forward of the decoder that set it)."""
    return mask if mask is not None and mask.numel() == tokens else None


def find_routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(layer index, router) for every MoE router, in layer order."""
    routers = []
    for name, mod in model.named_modules():
        if type(mod).__name__.endswith("TopkRouter") and ".layers." in f".{name}":
            layer = int(name.split("layers.")[1].split(".")[0])
            routers.append((layer, mod))
    return routers


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module that runs the decoder layers: every forward path (LM head or not) passes through it."""
    for mod in model.modules():
        if hasattr(mod, "layers") and hasattr(mod, "embed_tokens"):
            return mod
    return model


def _routing_stats(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                   weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(f [E], P [E]) of DeepSeek-V2's balance losses over the tokens of weight 1 (``weights`` [T] of 0/1, e.g.
    padding or packed filler 0; all tokens when None). Weighted sums, not a boolean index, which on CUDA waits for
    the GPU to size its result (so does ``torch.bincount``)."""
    t, k = topk_idx.shape
    w = probs.new_ones(t) if weights is None else weights.to(probs.dtype)
    n = w.sum().clamp_min(1)
    counts = probs.new_zeros(num_experts).scatter_add_(0, topk_idx.reshape(-1), w[:, None].expand(t, k).reshape(-1))
    return counts * num_experts / (k * n), (probs * w[:, None]).sum(0) / n


def expert_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V2 expert-level balance loss term  sum_i f_i P_i  for one layer (before alpha1).

    probs: [T, E] router softmax scores s_{i,t}; topk_idx: [T, K] chosen experts; weights: [T] 0/1, the tokens that
    count (T below is their number). f_i = E / (K T) * #tokens routed to i;  P_i = mean_t s_{i,t}.
    (DeepSeek-V2, arXiv:2405.04434, eq. 12-14)
    """
    f, p = _routing_stats(probs, topk_idx, num_experts, weights)
    return (f * p).sum()


def device_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int, devices: int,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V2 device-level balance loss term  sum_d f'_d P'_d  for one layer (before alpha2).

    Experts are split into ``devices`` equal contiguous groups E_d; f'_d = mean_{j in E_d} f_j,
    P'_d = sum_{j in E_d} P_j.  (DeepSeek-V2, eq. 15-17); ``weights`` as in :func:`expert_balance_loss`.
    """
    f, p = _routing_stats(probs, topk_idx, num_experts, weights)
    return (f.view(devices, -1).mean(1) * p.view(devices, -1).sum(1)).sum()


def balance_stats(counts: torch.Tensor, dead_threshold: float = 0.0) -> dict[str, float]:
    """Load statistics of one layer's per-expert token counts [E]."""
    c = counts.double()
    mean = c.mean()
    share = c / c.sum().clamp_min(1)
    nz = share[share > 0]
    return {
        "cv": float(c.std(unbiased=False) / mean) if mean > 0 else 0.0,
        "maxvio": float(c.max() / mean - 1) if mean > 0 else 0.0,
        "load_entropy": float(-(nz * nz.log()).sum() / math.log(len(c))),
        "dead": int((share <= dead_threshold).sum()),
    }


@dataclass
class ExpertMonitor:
    """Counts routed tokens per layer and expert during training-mode forward passes.

    Padding is excluded: a pre-hook on the decoder reads ``attention_mask`` (packed rows: :func:`routed_tokens`).
    Each decoder forward is one pass; a router firing again in the same pass (gradient-checkpoint
    recomputation) is not counted.
    """

    model: torch.nn.Module
    alpha1: float = 0.0
    alpha2: float = 0.0
    num_devices: int = 1
    dead_threshold: float = 0.0
    active: bool = True
    history: list = field(default_factory=list)
    _counts: dict = field(default_factory=dict)
    _entropy: dict = field(default_factory=dict)
    _tokens: dict = field(default_factory=dict)
    _acc: dict = field(default_factory=dict)
    """Per layer, on the router's device: [E] weighted expert counts, entropy sum, tokens (float64). Hooks only add
    to it (no host sync per layer and forward); :meth:`_flush` moves it to the host when metrics are read."""
    _aux: list = field(default_factory=list)
    _mask: torch.Tensor | None = None
    _pass: int = 0
    _seen: dict = field(default_factory=dict)
    _handles: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.routers = find_routers(self.model)
        if not self.routers:
            return
        self.num_experts = self.routers[0][1].num_experts
        self.top_k = self.routers[0][1].top_k
        if self.num_experts % self.num_devices:
            raise ValueError(f"monitor.num_devices={self.num_devices} must divide {self.num_experts} experts")
        self._handles.append(_decoder(self.model).register_forward_pre_hook(self._on_model, with_kwargs=True))
        for layer, router in self.routers:
            self._handles.append(router.register_forward_hook(_eager(self._hook(layer))))
        self.reset()

    def _on_model(self, module, args, kwargs):
        self._pass += 1
        self._mask = _real_tokens(kwargs)

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            if not (self.active and module.training):
                return
            # A second call in the same pass is gradient-checkpoint recomputation: it must build the
            # same autograd graph (or checkpointing fails) but must not count tokens again.
            first = self._seen.get(layer) != self._pass
            self._seen[layer] = self._pass
            logits, _, idx = output
            mask = _mask_for(self._mask, idx.shape[0])
            if torch.is_grad_enabled() and (self.alpha1 or self.alpha2):
                probs = logits.float().softmax(-1)
                loss = self.alpha1 * expert_balance_loss(probs, idx, self.num_experts, mask) if self.alpha1 else 0.0
                if self.alpha2:
                    loss = loss + self.alpha2 * device_balance_loss(probs, idx, self.num_experts, self.num_devices,
                                                                    mask)
                if first:
                    self._aux.append(loss)
            if first:
                self._count(layer, logits, idx, mask)
        return hook

    @torch.no_grad()
    def _count(self, layer: int, logits: torch.Tensor, idx: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Add one forward's routing to the device accumulator; padding weighs 0 (no boolean indexing: it syncs)."""
        w = mask.to(torch.float64) if mask is not None else idx.new_ones(idx.shape[0], dtype=torch.float64)
        p = logits.float().softmax(-1)
        ent = -(p * p.clamp_min(1e-20).log()).sum(-1)
        acc = self._acc.get(layer)
        if acc is None or acc.device != idx.device:
            acc = self._acc[layer] = torch.zeros(self.num_experts + 2, dtype=torch.float64, device=idx.device)
        acc[: self.num_experts].scatter_add_(0, idx.reshape(-1), w[:, None].expand(idx.shape).reshape(-1))
        acc[-2] += (ent.double() * w).sum()
        acc[-1] += w.sum()

    def _flush(self) -> None:
        """Move the device accumulators into the host totals: one transfer for all layers."""
        if not self._acc:
            return
        layers = list(self._acc)
        flat = torch.stack([self._acc[l] for l in layers]).cpu()
        for i, l in enumerate(layers):
            self._counts[l] += flat[i, : self.num_experts].round().long()
            self._entropy[l] += float(flat[i, -2])
            self._tokens[l] += int(round(float(flat[i, -1])))
        self._acc.clear()

    @property
    def counts(self) -> dict[int, torch.Tensor]:
        """Per layer: tokens routed to each expert (top-k counted k times), [E] int64."""
        self._flush()
        return self._counts

    @property
    def entropy_sum(self) -> dict[int, float]:
        self._flush()
        return self._entropy

    @property
    def tokens(self) -> dict[int, int]:
        self._flush()
        return self._tokens

    def pop_aux_loss(self) -> torch.Tensor | None:
        """Sum of the balance losses built since the last call (to add to the training loss)."""
        if not self._aux:
            return None
        total = torch.stack([torch.as_tensor(a) for a in self._aux]).sum()
        self._aux.clear()
        return total

    def reset(self) -> None:
        self._acc.clear()
        for layer, _ in self.routers:
            self._counts[layer] = torch.zeros(self.num_experts, dtype=torch.long)
            self._entropy[layer] = 0.0
            self._tokens[layer] = 0

    def merge_ranks(self, all_reduce_sum) -> None:
        """Sum the counts of every rank (``all_reduce_sum``: float64 tensor -> summed tensor) so each
        rank's summary describes the global batch; call on every rank."""
        layers = [layer for layer, _ in self.routers]
        self._flush()
        flat = torch.cat([torch.cat([self._counts[l].double(), torch.tensor([self._entropy[l], self._tokens[l]],
                                                                             dtype=torch.float64)]) for l in layers])
        flat = all_reduce_sum(flat).cpu().view(len(layers), self.num_experts + 2)
        for i, l in enumerate(layers):
            self._counts[l] = flat[i, : self.num_experts].round().long()
            self._entropy[l] = float(flat[i, -2])
            self._tokens[l] = int(flat[i, -1])

    def summary(self, reset: bool = True) -> dict[str, float]:
        """Flat metrics ``moe/layer{L}/{cv,maxvio,entropy,load_entropy,dead}`` plus means over layers."""
        out: dict[str, float] = {}
        if not self.routers or not any(self.tokens.values()):
            return out
        per_layer = []
        for layer, _ in self.routers:
            if not self.tokens[layer]:
                continue
            stats = balance_stats(self.counts[layer], self.dead_threshold)
            stats["entropy"] = self.entropy_sum[layer] / self.tokens[layer]
            per_layer.append(stats)
            out.update({f"moe/layer{layer}/{k}": v for k, v in stats.items()})
        for key in ("cv", "maxvio", "entropy", "dead"):
            out[f"moe/{key}_mean"] = sum(s[key] for s in per_layer) / len(per_layer)
        out["moe/maxvio_max"] = max(s["maxvio"] for s in per_layer)
        self.history.append({l: self.counts[l].tolist() for l, _ in self.routers})
        if reset:
            self.reset()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


class RouterReplay:
    """Record the experts each router chose in one pass and force the same choice in a later pass.

    GRPO's ratio pi/pi_old should compare the same computation; a token whose top-k routing flips
    between the old-policy pass and the update pass changes the ratio for reasons unrelated to the
    policy update. Recording is keyed (e.g. by minibatch) because passes must see identical rows.
    Gate weights are recomputed from the current router logits at the replayed experts, so the
    router still receives gradients.
    """

    def __init__(self, model: torch.nn.Module):
        self.routers = find_routers(model)
        self.mode: str | None = None
        self.key = None
        self.store: dict = {}
        self._flips: list[torch.Tensor] = []  # per replayed layer: [flipped, tokens] on the device, summed when read
        self._counted: set = set()
        self._mask: torch.Tensor | None = None
        self._handles = [r.register_forward_hook(_eager(self._hook(layer))) for layer, r in self.routers]
        if self.routers:
            self._handles.append(_decoder(model).register_forward_pre_hook(self._on_model, with_kwargs=True))

    def _on_model(self, module, args, kwargs):
        self._mask = _real_tokens(kwargs)

    def _hook(self, layer: int):
        def hook(module, inputs, output):
            logits, weights, idx = output
            slot = (self.key, layer)
            if self.mode == "record":
                self.store[slot] = idx.detach().clone()
            elif self.mode == "replay" and slot in self.store:
                rec = self.store[slot]
                if rec.shape != idx.shape:
                    return None
                if slot not in self._counted:  # not again in a gradient-checkpoint recomputation
                    self._counted.add(slot)
                    flipped = (idx.sort(-1).values != rec.sort(-1).values).any(-1)
                    real = _mask_for(self._mask, flipped.numel())  # not padding or packed rows' filler
                    real = torch.ones_like(flipped) if real is None else real
                    self._flips.append(torch.stack([(flipped & real).sum(), real.sum()]))
                probs = logits.float().softmax(-1)
                new_w = probs.gather(-1, rec) * module.routed_scaling_factor
                return logits, new_w.to(weights.dtype), rec
            return None
        return hook

    def __call__(self, mode: str | None, key=None) -> "RouterReplay":
        """Enter ``mode`` for ``key``; keep a replay open through the backward pass when layers are
        recomputed, so the recomputed routers take the replayed experts too."""
        self.mode, self.key = mode, key
        self._counted = set()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.mode = None

    def _sums(self) -> tuple[int, int]:
        if len(self._flips) > 1:
            self._flips = [torch.stack(self._flips).sum(0)]
        return tuple(int(v) for v in self._flips[0].tolist()) if self._flips else (0, 0)

    @property
    def flips(self) -> int:
        """Replayed real tokens whose own top-k differed from the recorded one."""
        return self._sums()[0]

    @property
    def total(self) -> int:
        return self._sums()[1]

    def flip_rate(self, reset: bool = True) -> float:
        flips, total = self._sums()
        if reset:
            self._flips = []
        return flips / total if total else 0.0

    def clear(self) -> None:
        self.store.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
