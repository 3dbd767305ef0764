"""The encoder-decoder Transformer (Vaswani et al., 2017) built from `mt.layers`.

One embedding table serves the source, the target and the output projection (a joint vocabulary).
`encode` and `decode` are separate so that search encodes once; `decode_step` extends a KV cache by one
position per call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mt.attention import KVCache, moved_rows
from mt.config import ModelConfig
from mt.layers import DecoderLayer, EncoderLayer, SinusoidalPositions
from mt.masks import padding_mask
from mt.tokenizer import PAD


@dataclass
class DecoderCache:
    """Per decoder layer: the growing self-attention cache (one row per hypothesis) and the fixed
    cross-attention cache (one row per sentence, which all of the sentence's beams read)."""

    self_attn: list[KVCache]
    cross_attn: list[KVCache]
    memory_mask: torch.Tensor  # (sentences, 1, 1, S)

    @property
    def length(self) -> int:
        return self.self_attn[0].length

    def reorder(self, index: torch.Tensor, sentences: torch.Tensor | None = None) -> None:
        """Row i continues old row index[i]. When sentences leave or move, `sentences` gives the old position of
        each sentence kept, in the new order; the rows of a sentence stay consecutive."""
        moved = moved_rows(index)  # the same for every layer: found once
        for cache in self.self_attn:
            cache.reorder(index, moved)
        if sentences is not None:
            moved = moved_rows(sentences)
            for cache in self.cross_attn:
                cache.reorder(sentences, moved)
            self.memory_mask = self.memory_mask.index_select(0, sentences)


class Transformer(nn.Module):
    """Encoder and decoder stacks over one shared embedding table, sized by `model.*` (see the module docstring)."""

    def __init__(self, config: ModelConfig, vocab_size: int):
        super().__init__()
        self.config = config
        d, norm_first = config.d_model, config.norm == "pre"
        layer_args = (d, config.heads, config.d_ff, config.dropout, config.attention_dropout,
                      config.activation, norm_first, config.activation_dropout)
        self.embed = nn.Embedding(vocab_size, d, padding_idx=PAD)
        self.positions = SinusoidalPositions(d, config.max_positions)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(config.encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(config.decoder_layers))
        # Pre-norm stacks end with a LayerNorm; post-norm layers already end with one.
        self.encoder_norm = nn.LayerNorm(d) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d) if norm_first else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for name, p in self.named_parameters():
            if p.dim() > 1 and name != "embed.weight":
                nn.init.xavier_uniform_(p)
        nn.init.normal_(self.embed.weight, std=self.config.d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[PAD].zero_()

    def embed_tokens(self, tokens: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(B, T) ids -> (B, T, E): embeddings scaled by sqrt(E), plus the positions start..start+T-1."""
        x = self.embed(tokens) * math.sqrt(self.config.d_model)
        return self.dropout(x + self.positions(tokens.size(1), start))

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) source ids -> encoder output (B, S, E) and the source padding mask (B, 1, 1, S)."""
        mask = padding_mask(src)
        x = self.embed_tokens(src)
        for layer in self.encoder_layers:
            x = layer(x, mask)
        return self.encoder_norm(x), mask

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) target ids (BOS first) -> decoder states (B, T, E); position t sees targets <= t only."""
        return self._decode(tgt, memory, memory_mask, need_weights=False)[0]

    def cross_attention(self, tgt: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> list[torch.Tensor]:
        """Each decoder layer's cross-attention weights, (B, H, T, S), when reading `tgt` (BOS first)."""
        return self._decode(tgt, memory, memory_mask, need_weights=True)[1]

    def _decode(self, tgt, memory, memory_mask, need_weights: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.embed_tokens(tgt)
        weights = []
        for layer in self.decoder_layers:
            x, w = layer(x, memory, memory_mask, need_weights=need_weights)
            weights.append(w)
        return self.decoder_norm(x), weights

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """(..., E) decoder states -> (..., V) scores, through the shared embedding matrix."""
        return F.linear(states, self.embed.weight)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) source and (B, T) target-input ids -> (B, T, V) logits, or (N, V) logits at the N flat
        positions `where` (indices into B × T; training scores only real target tokens: `Batch.real`)."""
        memory, mask = self.encode(src)
        states = self.decode(tgt, memory, mask)
        return self.logits(states if where is None else states.flatten(0, 1).index_select(0, where))

    def start_cache(self, memory: torch.Tensor, memory_mask: torch.Tensor, max_len: int) -> DecoderCache:
        """A cache for `max_len` decoding steps; the cross-attention keys and values are computed here, once."""
        return DecoderCache([KVCache.empty(max_len) for _ in self.decoder_layers],
                            [layer.cross_attn.project_memory(memory) for layer in self.decoder_layers], memory_mask)

    def decode_step(
        self, tokens: torch.Tensor, cache: DecoderCache, need_weights: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Feeds the newest token of each row, (B,), and returns the next-token logits (B, V).

        Also returns each layer's cross-attention weights (B, H, S) when `need_weights`.
        """
        x = self.embed_tokens(tokens[:, None], start=cache.length)  # (B, 1, E)
        weights = []
        for layer, self_cache, cross_cache in zip(self.decoder_layers, cache.self_attn, cache.cross_attn, strict=True):
            x, w = layer(x, None, cache.memory_mask, self_cache, cross_cache, need_weights)
            if need_weights:
                weights.append(w[:, :, 0])
        return self.logits(self.decoder_norm(x[:, 0])), weights

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
