"""The masks, and the one convention they follow: a boolean mask is True where attention is allowed.

This is the convention of `torch.nn.functional.scaled_dot_product_attention`. Beware that
`torch.nn.MultiheadAttention` reads boolean masks the opposite way (True = may NOT attend), so its
`key_padding_mask` is `~padding_mask(...)` squeezed to (B, S).
"""

import torch

from mt.tokenizer import PAD


def padding_mask(tokens: torch.Tensor) -> torch.Tensor:
    """(B, S) token ids -> (B, 1, 1, S) mask, True at real tokens: broadcasts over heads and queries."""
    return (tokens != PAD)[:, None, None, :]


def causal_mask(size: int, device: torch.device | None = None) -> torch.Tensor:
    """(T, T) mask, True on and below the diagonal: position t may attend to positions 0..t."""
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()
