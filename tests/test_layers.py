"""Our encoder and decoder layers against torch's, with copied weights and dropout off; our dropout."""

import pytest
import torch
from torch import nn

from mt.layers import DecoderLayer, EncoderLayer, SinusoidalPositions
from mt.masks import causal_mask, padding_mask

D, H, FF = 16, 4, 32


def copy_into_torch(ours: nn.Module, theirs: nn.Module) -> None:
    renamed = {
        k.replace("ff.", "").replace("cross_attn.", "multihead_attn."): v for k, v in ours.state_dict().items()
    }
    theirs.load_state_dict(renamed)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_matches_torch(norm_first, activation):
    torch.manual_seed(1)
    ours = EncoderLayer(D, H, FF, 0.0, 0.0, activation, norm_first).eval()
    theirs = nn.TransformerEncoderLayer(D, H, FF, 0.0, activation, batch_first=True, norm_first=norm_first).eval()
    copy_into_torch(ours, theirs)
    tokens = torch.tensor([[4, 5, 6, 7], [4, 5, 0, 0]])
    x = torch.randn(2, 4, D)
    mask = padding_mask(tokens)
    expected = theirs(x, src_key_padding_mask=~mask[:, 0, 0])
    got = ours(x, mask)
    real = tokens != 0  # torch's fast path may zero padded positions: compare the real ones
    torch.testing.assert_close(got[real], expected[real])


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_layer_matches_torch(norm_first):
    torch.manual_seed(2)
    ours = DecoderLayer(D, H, FF, 0.0, 0.0, "relu", norm_first).eval()
    theirs = nn.TransformerDecoderLayer(D, H, FF, 0.0, batch_first=True, norm_first=norm_first).eval()
    copy_into_torch(ours, theirs)
    x, memory = torch.randn(2, 5, D), torch.randn(2, 6, D)
    mask = padding_mask(torch.tensor([[4] * 6, [4] * 3 + [0] * 3]))
    expected = theirs(x, memory, tgt_mask=~causal_mask(5), memory_key_padding_mask=~mask[:, 0, 0])
    got, _ = ours(x, memory, mask)
    torch.testing.assert_close(got, expected)


def test_decoder_layer_returns_cross_attention_weights():
    layer = DecoderLayer(D, H, FF, 0.0, 0.0).eval()
    x, memory = torch.randn(2, 3, D), torch.randn(2, 6, D)
    mask = padding_mask(torch.tensor([[4] * 6, [4] * 2 + [0] * 4]))
    _, weights = layer(x, memory, mask, need_weights=True)
    assert weights.shape == (2, H, 3, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, H, 3))
    assert weights[1, :, :, 2:].abs().max() == 0  # no weight on padding


def test_sinusoidal_positions_follow_the_formula():
    table = SinusoidalPositions(8, 50)(50)
    pos, i = 7, 2
    angle = torch.tensor(pos / 10000 ** (2 * i / 8))
    torch.testing.assert_close(table[pos, 2 * i], torch.sin(angle))
    torch.testing.assert_close(table[pos, 2 * i + 1], torch.cos(angle))
    assert SinusoidalPositions(8, 50)(3, start=7).equal(table[7:10])
