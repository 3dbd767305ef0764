"""Scaled dot-product attention, multi-head attention and the KV cache (Vaswani et al., 2017, section 3.2).

Notation: B batch, H heads, T query length, S key length, D head dim, E = H * D model width.
Masks follow `mt.masks`: boolean, True where attention is allowed.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mt.errors import ConfigError
from mt.linear import Linear, linear
from mt.masks import causal_mask

MIN_KEYS = 7
"""On the CPU a growing cache hands out at least this many keys (see `KVCache.append`)."""


class KVCache:
    """Keys and values of one attention layer, each (B, H, L, D).

    Self-attention caches are preallocated for `max_len` steps and grow by `append` one step at a time. On the
    CPU they are stored step by step, (L, B, H, D) in memory (`_by_step`), so that the steps filled so far are
    one contiguous block, which attention reads at every step.
    Cross-attention caches are filled once from the encoder output (`KVCache.fixed`) and never grow; they hold
    one row per sentence, which all of that sentence's beams read (see `cached_attention`).
    Beam search and batch pruning call `reorder` with the row each new row comes from.
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, length: int, growing: bool):
        self.k, self.v, self.length, self.growing = k, v, length, growing

    @classmethod
    def empty(cls, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> KVCache:
        shape = (batch, heads, max(max_len, MIN_KEYS), head_dim)
        cache = cls(_by_step(shape, dtype, device), _by_step(shape, dtype, device), 0, growing=True)
        cache._zero_unfilled()
        return cache

    @classmethod
    def fixed(cls, k: torch.Tensor, v: torch.Tensor) -> KVCache:
        """A cache of the given keys and values; it owns them (`reorder` changes them in place)."""
        return cls(k, v, k.size(2), growing=False)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Stores (B, H, t, D) new keys/values; returns all keys/values so far, (B, H, L, D), and None, or
        a mask (1, 1, 1, L) that is False at padding.

        On the CPU, fewer than `MIN_KEYS` keys come padded to `MIN_KEYS` with zeros, with the mask: torch's
        CPU batched product runs a plain loop when keys x head dim < 400 multiply-adds a query, which with
        6 keys took about 2x (q k^T) and 4x (weights x values) as long as with 7 (scripts/bench_kernels.py).
        """
        assert self.growing, "a cross-attention cache does not grow"
        end = self.length + k.size(2)
        if end > self.k.size(2):  # past the preallocated length: double it
            rows, filled, length = self.k.size(0), slice(0, self.length), 2 * self.k.size(2)
            grown_k, grown_v = self._new_buffer(rows, length), self._new_buffer(rows, length)
            grown_k[:, :, filled], grown_v[:, :, filled] = self.k[:, :, filled], self.v[:, :, filled]
            self.k, self.v = grown_k, grown_v
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        if end >= MIN_KEYS or self.k.device.type != "cpu":
            return self.k[:, :, :end], self.v[:, :, :end], None
        mask = torch.arange(MIN_KEYS, device=self.k.device) < end
        return self.k[:, :, :MIN_KEYS], self.v[:, :, :MIN_KEYS], mask.view(1, 1, 1, MIN_KEYS)

    def reorder(self, index: torch.Tensor, moved: torch.Tensor | None = None) -> None:
        """Row i of the cache becomes old row index[i] (rows may be repeated or dropped).

        Only the rows that change are copied, and only their filled steps: the search keeps a beam in its
        parent's row where it can and fills the rows of finished sentences with the last ones, so most rows
        stay where they are (`mt.search`). `moved` is `moved_rows(index)`, when the caller has it already
        (one reorder of every layer's cache).
        """
        rows, filled = index.numel(), slice(0, self.length)
        if rows > self.k.size(0):  # more rows than before (beams branching out): copy into a new buffer
            k, v = self._new_buffer(rows, self.k.size(2)), self._new_buffer(rows, self.k.size(2))
            k[:, :, filled], v[:, :, filled] = self.k[:, :, filled][index], self.v[:, :, filled][index]
            self.k, self.v = k, v
            self._zero_unfilled()
            return
        if moved is None:
            moved = moved_rows(index)
        if moved.numel():
            source = index[moved]
            for x in (self.k[:, :, filled], self.v[:, :, filled]):
                x.index_copy_(0, moved, x.index_select(0, source))
        self.k, self.v = self.k[:rows], self.v[:rows]

    def _new_buffer(self, rows: int, length: int) -> torch.Tensor:
        """Uninitialised (rows, H, length, D) keys or values, laid out as this cache's."""
        shape = (rows, self.k.size(1), length, self.k.size(3))
        if self.growing:
            return _by_step(shape, self.k.dtype, self.k.device)
        return self.k.new_empty(shape)

    def _zero_unfilled(self) -> None:
        """Zeroes the unfilled steps below `MIN_KEYS`, which `append` may hand out as padding. (Only zeros
        are ever there: `append` writes filled steps, and `reorder` copies only those.)"""
        if self.growing and self.length < MIN_KEYS and self.k.device.type == "cpu":
            self.k[:, :, self.length : MIN_KEYS] = 0
            self.v[:, :, self.length : MIN_KEYS] = 0


def _by_step(shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised (B, H, L, D) tensor, stored step by step on the CPU: (L, B, H, D) in memory.

    The first t steps of a growing cache are then one block of memory, rather than B * H pieces of t steps
    spread over the preallocated L. On the 2-core EPYC, a step's attention of 1,000 rows to a cache read from
    memory took 3.3x, 1.8x and 1.7x less time so at 7, 15 and 25 of 40 steps; with all 40 filled it took 1.4x
    more, but a cache is preallocated for the longest output a batch may reach, which few steps come near
    (scripts/bench_kernels.py). End to end, beam search ran 1.17x faster (scripts/decode_levers.py).
    Elsewhere the fused attention kernels read the usual (B, H, L, D) layout, which is kept.
    """
    if torch.device(device).type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    B, H, L, D = shape
    return torch.empty((L, B, H, D), dtype=dtype, device=device).permute(1, 2, 0, 3)


def moved_rows(index: torch.Tensor) -> torch.Tensor:
    """The rows i that a reorder by `index` changes: those with index[i] != i."""
    return (index != torch.arange(index.numel(), device=index.device)).nonzero()[:, 0]


KERNEL_ORDER = {  # `train.attention`: the kernel tried first, then the others where it cannot run
    "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
    "math": [SDPBackend.MATH],
}


def fast_kernels(device: torch.device, first: str = "auto") -> contextlib.AbstractContextManager:
    """The `scaled_dot_product_attention` kernels to use on `device`, `first` tried first (`train.attention`);
    `auto` picks the fastest measured for translation-length sequences (on the CPU; on CUDA, flash first).

    On the CPU, the plain (math) kernel beats the flash kernel on sentences of a few dozen tokens: in
    training its backward pass is a few batched matrix products (a step 1.26x faster, scripts/profile_step.py).
    (A decoding step's attention to the cache does not go through this kernel: see `cached_attention`.)
    The CPU has no memory-efficient kernel: `efficient` means flash, else math, there.

    On CUDA, flash first (it takes no padding mask: masked attention falls to the memory-efficient kernel),
    and never cuDNN. Since torch 2.9 cuDNN comes first on Hopper GPUs, and it builds an execution graph for
    each new shape of its inputs, while length-bucketed batches and decoding steps bring new shapes all the
    time: on an H100, 5.7 ms of host time per attention call, and training 13.7x slower than with these
    kernels (scripts/sdpa_backends.py, BENCHMARKS.md "GPU speed").
    """
    if device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    if first == "auto":
        first = "math" if device.type == "cpu" else "flash"
    if first != "efficient":  # flash before memory-efficient is torch's own order
        return sdpa_kernel(KERNEL_ORDER[first])
    check_kernel_order(first)
    return sdpa_kernel(KERNEL_ORDER[first], set_priority=True)


def check_kernel_order(first: str) -> None:
    """Raises a ConfigError if this torch cannot try `first` (`train.attention`) first."""
    if first == "efficient" and not _sdpa_kernel_orders():
        raise ConfigError(f"train.attention: efficient needs a newer torch than {torch.__version__}, whose "
                          "sdpa_kernel can set the kernels' order (set_priority); use flash or math")


@functools.cache
def _sdpa_kernel_orders() -> bool:
    """Whether this torch's sdpa_kernel can set the kernels' order (asked once, not at every training step)."""
    return "set_priority" in inspect.signature(sdpa_kernel).parameters


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    dropout: float = 0.0,
    need_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(q k^T / sqrt(D)) v on (B, H, T, D) queries and (B, H, S, D) keys/values.

    The fused kernel (`F.scaled_dot_product_attention`) is used unless the weights are asked for, in which
    case the same formula is written out so the (B, H, T, S) weights can be returned.
    """
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        return out, None
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, T, S)
    if is_causal:
        causal = causal_mask(q.size(2), q.device)
        mask = causal if mask is None else mask & causal
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = softmax(scores)
    return (F.dropout(weights, dropout) if dropout else weights) @ v, weights


def softmax(scores: torch.Tensor) -> torch.Tensor:
    """`scores.softmax(dim=-1)`, written out on the CPU for rows of fewer than 16 entries.

    torch's CPU softmax takes its vectorised path only from 16 entries a row: on 4,000 rows of 15 it ran 12x
    slower than on rows of 16, and 4x slower than these passes (scripts/bench_kernels.py). Decoding meets
    such rows in a sentence's first 15 steps, and at every step for a source shorter than 16 tokens.
    """
    if scores.device.type != "cpu" or scores.size(-1) >= 16:
        return scores.softmax(dim=-1)
    x = scores.float()  # as torch's kernel, which computes bf16 rows in fp32
    exp = (x - x.amax(dim=-1, keepdim=True)).exp()
    return (exp / exp.sum(dim=-1, keepdim=True)).to(scores.dtype)


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, need_weights: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention of the newest position(s) to a KV cache in a decoding step: (B, H, T, D) queries, which see
    every cached key (no causal mask), and (N, H, S, D) keys/values.

    N may divide B: a cross-attention cache holds each sentence once, and the B = N * G rows are its G beams,
    consecutive. Each sentence's queries then attend together, so the encoder keys are read once per sentence
    rather than once per beam.

    On the CPU the formula is written out in fp32: torch's CPU math kernel converts bf16 keys and values to
    fp32 at every call, which for a KV cache costs as much as the attention itself, so the decoder's caches
    are kept in fp32 instead (`Transformer.start_cache`) and read as they are. (bf16 batched products of a
    few queries were no faster here.)
    """
    B, H, T, D = q.shape
    N, dtype = k.size(0), q.dtype
    if N != B:  # (N * G, H, T, D) -> (N, H, G, T, D)
        q = q.view(N, B // N, H, T, D).transpose(1, 2)
    if _write_out(q.device):  # one copy: to fp32 and into (N, H, G * T, D) order
        q = q.to(torch.float32, memory_format=torch.contiguous_format).reshape(N, H, B // N * T, D)
        with torch.autocast("cpu", enabled=False):
            out, weights = scaled_dot_product_attention(q, k.float(), v.float(), mask, need_weights=True)
    else:
        q = q.reshape(N, H, B // N * T, D)
        out, weights = scaled_dot_product_attention(q, k, v, mask, need_weights=need_weights)
    if N != B:  # back to one row per beam, (N, G, H, T, D)
        out = out.view(N, H, B // N, T, D).transpose(1, 2)
        if need_weights:
            weights = weights.view(N, H, B // N, T, -1).transpose(1, 2).reshape(B, H, T, -1)
    # One copy: back to the input dtype and into (B, H, T, D) order.
    out = out.to(dtype, memory_format=torch.contiguous_format).reshape(B, H, T, D)
    return out, weights if need_weights else None


def _write_out(device: torch.device) -> bool:
    """Whether `cached_attention` writes the formula out (the CPU) or calls the fused kernel (elsewhere)."""
    return device.type == "cpu"


class MultiHeadAttention(nn.Module):
    """Multi-head attention with the parameter layout of `torch.nn.MultiheadAttention`.

    `in_proj_weight` stacks the query, key and value projections (3E, E), so self-attention projects with
    one matrix product, and weights copy one-to-one from `nn.MultiheadAttention` in tests.
    """

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert d_model % heads == 0, "heads must divide d_model"
        self.d_model, self.heads, self.head_dim, self.dropout = d_model, heads, d_model // heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = Linear(d_model, d_model)
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
        """Attends from `query` (B, T, E) to itself (`memory` None) or to `memory` (B, S, E).

        Args:
            mask: boolean, broadcastable to (B, H, T, S), True where attention is allowed.
            is_causal: position t attends only to positions <= t (self-attention over a whole sequence).
            cache: self-attention: the new keys/values are appended and the query attends to all of them.
                Cross-attention: a `KVCache.fixed` from `project_memory`, used instead of `memory`; it may
                hold one row per G consecutive query rows (the beams of a sentence).
            need_weights: also return the attention weights, (B, H, T, S).

        Returns:
            The output (B, T, E) and the weights or None.
        """
        E = self.d_model
        if memory is None and (cache is None or cache.growing):
            q, k, v = linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
            k, v = self._split_heads(k), self._split_heads(v)
            if cache is not None:  # the newest positions see every cached key: a mask only hides padding
                assert mask is None, "attention to a growing cache takes no mask"
                k, v, mask = cache.append(k, v)
        else:
            q = linear(query, self.in_proj_weight[:E], self.in_proj_bias[:E])
            k, v = (cache.k, cache.v) if cache is not None else self.project_memory(memory)
        q = self._split_heads(q)
        if cache is not None:
            out, weights = cached_attention(q, k, v, mask, need_weights)
        else:
            dropout = self.dropout if self.training else 0.0
            out, weights = scaled_dot_product_attention(q, k, v, mask, is_causal, dropout, need_weights)
        B, H, T, D = out.shape
        out = out.transpose(1, 2).reshape(B, T, H * D)  # (B, H, T, D) -> (B, T, E)
        return self.out_proj(out), weights

    def project_memory(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the encoder output (B, S, E), each (B, H, S, D): computed once per sentence."""
        E = self.d_model
        k, v = linear(memory, self.in_proj_weight[E:], self.in_proj_bias[E:]).chunk(2, dim=-1)
        # Contiguous, so the matrix products of every decoding step read them as they are, without a copy.
        return self._split_heads(k).contiguous(), self._split_heads(v).contiguous()

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, T, E) -> (B, H, T, D)
