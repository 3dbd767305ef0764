"""Scaled dot-product attention, multi-head attention and the KV cache (Vaswani et al., 2017, section 3.2).

Notation: B batch, H heads, T query length, S key length, D head dim, E = H * D model width.
Masks follow `mt.masks`: boolean, True where attention is allowed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mt import fastpaths
from mt.masks import causal_mask


def scaled_dot_product_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None, dropout: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(D)) v, for (B, H, T, D) queries and (B, H, S, D) keys and values.

    Each query's scores against every key are scaled by 1/sqrt(D), so that they do not grow with the head
    width and make the softmax peaky; the softmax turns them into weights that sum to 1 over the keys, and
    the output is the weighted sum of the values. Masked keys get a score of -inf, hence a weight of 0.

    Returns:
        The output (B, H, T, D) and the attention weights (B, H, T, S).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    return weights @ v, weights


class MultiHeadAttention(nn.Module):
    """Multi-head attention: project, split into heads, attend in each head, concatenate, project.

    The parameters are laid out as `torch.nn.MultiheadAttention`'s: `in_proj_weight` stacks the query, key
    and value projections (3E, E), so that self-attention projects with one matrix product, and tests copy
    weights one-to-one from torch's module.
    """

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"heads ({heads}) must divide d_model ({d_model})")
        self.d_model, self.heads, self.head_dim, self.dropout = d_model, heads, d_model // heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        query: torch.Tensor,
        memory: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
        cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attends from `query` (B, T, E) to itself (self-attention) or to `memory` (B, S, E) (cross-attention).

        Args:
            mask: boolean, broadcastable to (B, H, T, S), True where attention is allowed.
            is_causal: position t attends only to positions <= t (masked self-attention in the decoder).
            cache: for decoding one position at a time. Self-attention: the new keys and values are appended
                to it and the query attends to all of them. Cross-attention: the encoder's keys and values,
                computed once (`project_memory`), used instead of `memory`; it may hold one row per sentence
                for the G consecutive query rows of that sentence's beams.
            need_weights: also return the attention weights, (B, H, T, S).

        Returns:
            The output (B, T, E), and the weights or None.
        """
        E = self.d_model
        if memory is None and (cache is None or cache.growing):  # self-attention: one product for q, k and v
            q, k, v = (self._split_heads(x) for x in F.linear(query, self.in_proj_weight, self.in_proj_bias)
                       .chunk(3, dim=-1))  # each (B, H, T, D)
            if cache is not None:
                k, v = cache.append(k, v)  # the newest position attends to every cached one
        else:  # cross-attention: keys and values from the encoder output, or computed once into the cache
            q = self._split_heads(F.linear(query, self.in_proj_weight[:E], self.in_proj_bias[:E]))
            encoder = cache if cache is not None else self.project_memory(memory)
            k, v = encoder.k, encoder.v  # each (B, H, S, D)
        B, N = q.size(0), k.size(0)
        if N != B:  # beam search: the G = B / N beams of a sentence attend to its one encoder output together
            q = q.view(N, B // N, *q.shape[1:]).transpose(1, 2).flatten(2, 3)  # (N * G, H, T, D) -> (N, H, G * T, D)
        dropout = self.dropout if self.training else 0.0
        if need_weights or cache is not None:  # decoding one position: the formula beats the fused kernel's overhead
            if is_causal:
                mask = causal_mask(q.size(2), q.device)
            out, weights = scaled_dot_product_attention(q, k, v, mask, dropout)
        else:  # torch's fused kernel computes the same, without keeping the (B, H, T, S) weights
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
            weights = None
        if N != B:  # back to one row per beam: (N, H, G * T, ...) -> (N * G, H, T, ...)
            out, weights = (None if x is None else x.view(N, self.heads, B // N, -1, x.size(-1)).transpose(1, 2)
                            .reshape(B, self.heads, -1, x.size(-1)) for x in (out, weights))
        return self.out_proj(self._merge_heads(out)), weights if need_weights else None

    def project_memory(self, memory: torch.Tensor) -> KVCache:
        """The cross-attention keys and values of the encoder output (B, S, E), computed once per sentence
        for decoding."""
        E = self.d_model
        k, v = F.linear(memory, self.in_proj_weight[E:], self.in_proj_bias[E:]).chunk(2, dim=-1)
        return KVCache.fixed(self._split_heads(k), self._split_heads(v))

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, T, E) -> (B, H, T, D)

    def _merge_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, H, T, D = x.shape
        return x.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, E): the heads concatenated


class KVCache:
    """The keys and values of one attention layer while decoding, each (B, H, L, D).

    A self-attention cache grows by one position per decoding step (`append`) into a buffer preallocated
    for `max_len` steps, so that a step writes one position instead of copying all of them. A
    cross-attention cache holds the encoder's keys and values, computed once (`fixed`). Beam search and
    finished sentences reorder the rows (`reorder`).
    """

    def __init__(self, k: torch.Tensor | None, v: torch.Tensor | None, length: int, max_len: int = 0):
        self.k_buffer, self.v_buffer, self.length, self.max_len = k, v, length, max_len
        self.growing = max_len > 0

    @classmethod
    def empty(cls, max_len: int) -> KVCache:
        """A self-attention cache for up to `max_len` positions (it doubles if more come)."""
        return cls(None, None, 0, max_len)

    @classmethod
    def fixed(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cross-attention cache of the given (B, H, S, D) keys and values."""
        return cls(k, v, k.size(2))

    @property
    def k(self) -> torch.Tensor:
        return self.k_buffer[:, :, : self.length]

    @property
    def v(self) -> torch.Tensor:
        return self.v_buffer[:, :, : self.length]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stores (B, H, t, D) new keys and values; returns all of them so far, (B, H, L, D) each."""
        end = self.length + k.size(2)
        if self.k_buffer is None:
            B, H, _, D = k.shape
            self.k_buffer, self.v_buffer = (fastpaths.cache_buffer(k, B, max(self.max_len, end)) for _ in range(2))
        elif end > self.k_buffer.size(2):  # longer than preallocated: double the buffer
            self.k_buffer, self.v_buffer = (self._grown(x, x.size(0), 2 * x.size(2)) for x in (self.k_buffer,
                                                                                                 self.v_buffer))
        self.k_buffer[:, :, self.length : end] = k
        self.v_buffer[:, :, self.length : end] = v
        self.length = end
        return self.k, self.v

    def _grown(self, x: torch.Tensor, rows: int, length: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """A new buffer of `rows` rows and `length` positions holding x's filled positions (of rows `index`)."""
        out = fastpaths.cache_buffer(x, rows, length) if self.growing else x.new_empty(rows, *x.shape[1:])
        filled = x[:, :, : self.length]
        out[:, :, : self.length] = filled if index is None else filled[index]
        return out

    def reorder(self, index: torch.Tensor, moved: torch.Tensor | None = None) -> None:
        """Row i becomes old row index[i]; rows may be repeated or dropped.

        Beam search keeps most beams in their parent's row (`mt.search.stable_slots`), so only the rows
        that change are copied, and only their filled positions. `moved` is `moved_rows(index)`, where the
        caller has it already (one reorder of every layer's cache).
        """
        if self.k_buffer is None:
            return
        if index.numel() > self.k_buffer.size(0):  # more rows than before: a new buffer
            self.k_buffer, self.v_buffer = (self._grown(x, index.numel(), x.size(2), index) for x in (self.k_buffer,
                                                                                                       self.v_buffer))
            return
        moved = moved_rows(index) if moved is None else moved
        if moved.numel():
            for filled in (self.k, self.v):
                filled.index_copy_(0, moved, filled.index_select(0, index[moved]))
        self.k_buffer, self.v_buffer = self.k_buffer[: index.numel()], self.v_buffer[: index.numel()]


def moved_rows(index: torch.Tensor) -> torch.Tensor:
    """The rows i that a reorder by `index` changes: those with index[i] != i."""
    return (index != torch.arange(index.numel(), device=index.device)).nonzero()[:, 0]
