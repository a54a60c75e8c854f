"""Attention of packed rows by their sequence boundaries (varlen flash attention): no mask, no work across sequences.

Packed rows (``[R, W]``, several sequences per row; :mod:`align.grpo.packing`) reach transformers' SDPA path with a
block-diagonal causal mask ``[R, 1, W, W]``. On the H200 at V2-Lite's MLA shape (16 heads, q/k 192, v 128, bf16;
``bench/attention_shapes.py``) cuDNN then computes every block of every row, forward + backward of 16 x 1,024
tokens in 3.4 ms, and builds a new plan for every new ``(R, W)`` (0.13-0.14 s, paid per micro-batch shape and pass);
flash attention over the flattened tokens with cumulative sequence lengths takes 1.8 ms with no per-shape cost.
In the whole GRPO update that did not show (``bench/grpo_update.py``, H200, one process each: every layer recomputed
12.8k real tok/s vs 13.2k-14.0k with the mask; none recomputed 20.4k vs 20.0k-21.4k), so it is opt-in
(``model.packed_attention=varlen``).

Installed as the attention implementation ``align_varlen``: a forward given ``cu_seq_lens_q`` / ``max_length_q``
(transformers' own keyword names for packed flash attention, which travel through every decoder layer and into
gradient checkpointing's recomputation) runs varlen flash attention on CUDA in bf16/fp16, else the same
block-diagonal causal attention through SDPA (the CPU, fp32, the reference the tests compare with); any other forward
(padded batches, generation with a cache) is transformers' SDPA path unchanged, mask included.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "align_varlen"
_PACKED: contextvars.ContextVar[bool] = contextvars.ContextVar("align_packed_rows", default=False)


@contextlib.contextmanager
def packed_rows():
    """Forwards inside build no attention mask (the sequence boundaries travel as ``cu_seq_lens_q``)."""
    token = _PACKED.set(True)
    try:
        yield
    finally:
        _PACKED.reset(token)


@functools.lru_cache(maxsize=None)
def _flash():
    """torch's varlen flash attention and its causal keyword (``window_size`` from torch 2.10, ``is_causal`` before),
    or None where torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    return varlen_attn, ({"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True})


def _flash_ok(q: torch.Tensor, dropout: float) -> bool:
    return (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
            and dropout == 0.0 and _flash() is not None)


def block_causal_mask(cu: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """[R, 1, W, W] bool, True where a token may attend: causally within its own sequence, ``cu`` [N + 1] the
    sequences' cumulative lengths over the R x W flattened tokens (sequences never cross rows). Built on ``cu``'s
    device without reading it on the host."""
    flat = torch.arange(rows * width, device=cu.device)
    seg = torch.searchsorted(cu[1:-1].long(), flat, right=True).view(rows, width)
    causal = torch.ones(width, width, dtype=torch.bool, device=cu.device).tril()
    return ((seg[:, :, None] == seg[:, None, :]) & causal)[:, None]


def _reference(q, k, v, cu: torch.Tensor, rows: int, scale: float | None, dropout: float) -> torch.Tensor:
    """Block-diagonal causal SDPA per row ([R, H, W, D]); sequences never cross rows (each row ends with filler)."""
    mask = block_causal_mask(cu, rows, q.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)


def attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              cu_seq_lens_q: torch.Tensor | None = None, max_length_q: int | None = None,
              **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query/key [B, H, S, Dqk], value [B, H, S, Dv] -> ([B, S, H, Dv], None).

    With ``cu_seq_lens_q`` [N + 1] int32 (cumulative lengths of the N sequences laid end to end over the B x S
    flattened tokens) each token attends causally within its own sequence only."""
    if cu_seq_lens_q is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, s, dqk = query.shape
    dv = value.shape[-1]
    if not _flash_ok(query, dropout):
        return _reference(query, key, value, cu_seq_lens_q, b, scaling, dropout).transpose(1, 2), None
    flash, causal = _flash()
    q = query.transpose(1, 2).reshape(b * s, h, dqk)
    k = key.transpose(1, 2).reshape(b * s, h, dqk)
    # Flash attention wants one head width: MLA's values (128) are zero-padded to the keys' (192), then cut.
    v = value.transpose(1, 2).reshape(b * s, h, dv)
    if dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    n = int(max_length_q) if max_length_q is not None else s
    out = flash(q, k, v, cu_seq_lens_q, cu_seq_lens_q, n, n, scale=scaling, **causal)
    return out[..., :dv].reshape(b, s, h, dv), None


def _mask(*args, **kwargs):
    if _PACKED.get():
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def use_varlen_attention(model: torch.nn.Module) -> bool:
    """Make ``model`` (on transformers' SDPA attention) use :func:`attention`; False if it uses another one."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    config = model.config
    if config._attn_implementation not in ("sdpa", NAME):
        return False
    ALL_ATTENTION_FUNCTIONS.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, _mask)
    config._attn_implementation = NAME
    return True
