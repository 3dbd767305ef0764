"""The Transformer's layers: sinusoidal positions, feed-forward, encoder layer and decoder layer.

Each layer follows the tutorial's drawing: sublayer, then Add & Norm (`norm="post"`, Vaswani et al., 2017),
or Norm first and Add after (`norm="pre"`, Xiong et al., 2020). Parameter names match
`nn.TransformerEncoderLayer` / `nn.TransformerDecoderLayer` where they can, so tests copy weights across.
The layers' `activation_dropout` (dropout inside the feed-forward block) defaults to `dropout`, as in torch's
layers; the model passes `model.activation_dropout`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mt.attention import KVCache, MultiHeadAttention


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position encodings (Vaswani et al., 2017, section 3.5), added to the embeddings."""

    def __init__(self, d_model: int, max_positions: int):
        super().__init__()
        position = torch.arange(max_positions).unsqueeze(1)
        frequency = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_positions, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency[: d_model // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, length: int, start: int = 0) -> torch.Tensor:
        """Encodings of positions start .. start+length-1, (length, E)."""
        if start + length > self.table.size(0):
            raise ValueError(f"sequence of {start + length} tokens is longer than model.max_positions")
        return self.table[start : start + length]


class FeedForward(nn.Module):
    """Position-wise linear -> activation -> dropout -> linear (fairseq's `activation_dropout`)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str):
        super().__init__()
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = F.gelu if activation == "gelu" else F.relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention, Add & Norm, feed-forward, Add & Norm."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float, attention_dropout: float,
                 activation: str = "relu", norm_first: bool = False, activation_dropout: float | None = None):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.ff = FeedForward(d_model, d_ff, dropout if activation_dropout is None else activation_dropout,
                              activation)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, S, E), mask (B, 1, 1, S) -> (B, S, E)."""
        if self.norm_first:
            x = x + self._self_attention_block(self.norm1(x), mask)
            x = x + self._feed_forward_block(self.norm2(x))
        else:
            x = self.norm1(x + self._self_attention_block(x, mask))
            x = self.norm2(x + self._feed_forward_block(x))
        return x

    def _self_attention_block(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.self_attn(x, mask=mask)[0])

    def _feed_forward_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.ff(x))


class DecoderLayer(nn.Module):
    """Masked self-attention, Add & Norm, cross-attention to the encoder output, Add & Norm, feed-forward,
    Add & Norm."""

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float, attention_dropout: float,
                 activation: str = "relu", norm_first: bool = False, activation_dropout: float | None = None):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.cross_attn = MultiHeadAttention(d_model, heads, attention_dropout)
        self.ff = FeedForward(d_model, d_ff, dropout if activation_dropout is None else activation_dropout,
                              activation)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(
        self,
        x: torch.Tensor,
        memory: torch.Tensor | None,
        memory_mask: torch.Tensor,
        self_cache: KVCache | None = None,
        cross_cache: KVCache | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, E), memory (B, S, E), memory_mask (B, 1, 1, S) -> (B, T, E) and the cross-attention
        weights (B, H, T, S) if asked for.

        Without caches, position t sees target positions <= t (causal). With caches, x holds only the
        newest position, which sees every cached one; `memory` may then be None.
        """
        if self.norm_first:
            x = x + self._self_attention_block(self.norm1(x), self_cache)
            attended, weights = self._cross_attention_block(self.norm2(x), memory, memory_mask, cross_cache,
                                                            need_weights)
            x = x + attended
            x = x + self._feed_forward_block(self.norm3(x))
        else:
            x = self.norm1(x + self._self_attention_block(x, self_cache))
            attended, weights = self._cross_attention_block(x, memory, memory_mask, cross_cache, need_weights)
            x = self.norm2(x + attended)
            x = self.norm3(x + self._feed_forward_block(x))
        return x, weights

    def _self_attention_block(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        # With a cache the queries are the newest positions and may see every cached key: no causal mask.
        return self.dropout(self.self_attn(x, is_causal=cache is None, cache=cache)[0])

    def _cross_attention_block(self, x, memory, memory_mask, cache, need_weights):
        out, weights = self.cross_attn(x, memory, mask=memory_mask, cache=cache, need_weights=need_weights)
        return self.dropout(out), weights

    def _feed_forward_block(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.ff(x))
