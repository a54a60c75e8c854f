"""Padding-free packing: the real tokens of a padded batch laid end to end in a few rows.

A GRPO batch is mostly padding at real completion lengths (prompts left-padded to the longest prompt,
completions right-padded to the longest in the part). Packing drops every padding token from the forward:
each sequence keeps its own positions (restarting at 0) and attention never crosses sequences (a block-diagonal
causal mask, :meth:`Packed.causal_mask`, or varlen attention over ``cu_seqlens``), so a packed forward computes
exactly what the padded one computes for every real token.
Rows are capped at ``row_tokens`` so attention's quadratic work stays that of short rows, not of one
row holding the whole micro-batch; the ragged ends of rows are filled with a dummy sequence that no
completion reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.grpo.batch import to_device
from align.kernels.varlen import block_causal_mask


@dataclass
class Packed:
    input_ids: torch.Tensor     # [R, L]
    position_ids: torch.Tensor  # [R, L] restarting at 0 for every sequence
    real: torch.Tensor          # [R, L] bool: a token of some sequence (False on the rows' filler)
    source: torch.Tensor        # [M] flat index into [R * L] of the hidden state that predicts each completion token
    rows: torch.Tensor          # [M] row of that token in the padded batch
    cols: torch.Tensor          # [M] its completion column
    cu_seqlens: torch.Tensor    # [S + 1] int32: where each of the S sequences (fillers included) starts in [R * L]
    max_len: int                # an upper bound on their lengths (a multiple of ``multiple``)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def causal_mask(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[R, 1, L, L] block-diagonal causal mask, True where a token may attend (``dtype``: eager attention's
        additive form, 0 or the dtype's minimum). Built from the known boundaries on the device: transformers would
        find them from the positions with a host read, a wait for the GPU at every forward."""
        mask = block_causal_mask(self.cu_seqlens, *self.shape)
        if dtype is None:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)

    @property
    def attention_kwargs(self) -> dict:
        """The sequence boundaries under transformers' names for packed flash attention (``align_varlen`` reads
        them too, :mod:`align.kernels.varlen`; SDPA and eager ignore them and build a mask from the positions)."""
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_len, "max_length_k": self.max_len}


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sequence indices, longest first, each summing to at most ``capacity`` (a longer sequence gets a
    bin of its own).

    >>> first_fit([5, 3, 4, 2], 7)
    [[0, 3], [2, 1]]
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        k = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if k is None:
            bins.append([i])
            room.append(capacity - lengths[i])
        else:
            bins[k].append(i)
            room[k] -= lengths[i]
    return bins


def pack(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_width: int, row_tokens: int,
         pad_id: int = 0, multiple: int = 1, min_rows: int = 1) -> Packed:
    """Pack a left-padded-prompt / right-padded-completion batch ([N, P + C], see ``UpdateBatch``).

    The rows' width is rounded up to ``multiple`` (filler): micro-batches then share a few shapes, so
    shape-keyed work on the GPU (cuDNN attention plans, kernel specialisations) is not redone for every one.
    Fewer than ``min_rows`` rows get rows of filler only: compiled layers specialise a row count of 1 (dynamo's 0/1
    specialisation), so a lone row would compile every layer again (the H200's step 2: 40 s more update).

    Row i's real tokens are the contiguous span ``[P - prompt_len_i, P + completion_len_i)``; its completion
    token j is predicted by the hidden state one place before it in the packed row.
    """
    mask = attention_mask.cpu()  # a host mask (the update keeps it there): lengths without waiting for the GPU
    lens_p = mask[:, :prompt_width].sum(-1).tolist()
    lens_c = mask[:, prompt_width:].sum(-1).tolist()
    lengths = [p + c for p, c in zip(lens_p, lens_c)]
    bins = first_fit(lengths, max(row_tokens, max(lengths, default=1)))
    bins += [[] for _ in range(min_rows - len(bins))]
    width = _round_up(max(sum(lengths[i] for i in b) for b in bins), multiple)
    n_cols = input_ids.shape[1]
    take = torch.full((len(bins), width), -1, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    source, rows, cols, seqs = [], [], [], []
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            start = prompt_width - lens_p[i]
            take[r, at:at + lengths[i]] = torch.arange(i * n_cols + start, i * n_cols + start + lengths[i])
            pos[r, at:at + lengths[i]] = torch.arange(lengths[i])
            first = r * width + at + lens_p[i] - 1
            source.append(torch.arange(first, first + lens_c[i]))
            rows.append(torch.full((lens_c[i],), i, dtype=torch.long))
            cols.append(torch.arange(lens_c[i]))
            at += lengths[i]
            seqs.append(lengths[i])
        pos[r, at:] = torch.arange(width - at)  # the filler is one more sequence, never read
        if at < width:
            seqs.append(width - at)
    device = input_ids.device
    real = to_device(take >= 0, device)
    ids = torch.where(real, input_ids.reshape(-1)[to_device(take.clamp_min(0), device)], pad_id)
    cu = to_device(torch.tensor([0] + seqs, dtype=torch.int32).cumsum(0, dtype=torch.int32), device)
    longest = min(_round_up(max(seqs), multiple), width)  # rounded: flash attention's grid, few distinct values
    return Packed(ids, to_device(pos, device), real, to_device(torch.cat(source), device),
                  to_device(torch.cat(rows), device), to_device(torch.cat(cols), device), cu, longest)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
