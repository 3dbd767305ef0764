"""Our encoder and decoder layers against torch's, with copied weights and dropout off; our dropout."""

import pytest
import torch
from torch import nn

from mt.layers import DecoderLayer, Dropout, EncoderLayer, LayerNorm, SinusoidalPositions
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


def test_dropout_zeroes_a_share_p_and_keeps_the_mean():
    torch.manual_seed(0)
    dropout = Dropout(0.2)
    x = torch.ones(1000, 256, requires_grad=True)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.2) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01
    drop = round(0.2 * Dropout.LEVELS) / Dropout.LEVELS  # p as 16-bit draws give it: 0.199997
    torch.testing.assert_close(y.unique(), torch.tensor([0.0, 1 / (1 - drop)]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # the gradient goes through the kept units only, scaled
    assert dropout.eval()(x) is x
    assert Dropout(0.0)(x) is x


def test_dropout_keeps_bf16_and_follows_the_seed():
    x = torch.randn(64, 32).bfloat16()
    torch.manual_seed(1)
    a = Dropout(0.3)(x)
    torch.manual_seed(1)
    b = Dropout(0.3)(x)
    assert a.dtype == torch.bfloat16
    torch.testing.assert_close(a, b)


def test_bf16_layer_norm_sums_its_gradients_in_fp32():
    """With bf16 weights, torch's CPU LayerNorm summed the bias gradient of 8,192 rows in bf16 (4,077 came out
    as 512); mt's LayerNorm computes in fp32 there."""
    torch.manual_seed(0)
    x, grad = torch.randn(8192, 64), torch.rand(8192, 64)
    norms = {dtype: LayerNorm(64).to(dtype) for dtype in (torch.float32, torch.bfloat16)}
    for dtype, norm in norms.items():
        out = norm(x.to(dtype))
        assert out.dtype == dtype
        out.backward(grad.to(dtype))
    fp32, bf16 = norms[torch.float32], norms[torch.bfloat16]
    torch.testing.assert_close(bf16.bias.grad.float(), fp32.bias.grad, rtol=0.01, atol=0.0)
    torch.testing.assert_close(bf16.weight.grad.float(), fp32.weight.grad, rtol=0.02, atol=0.5)


def test_bf16_embedding_sums_a_tokens_gradients_in_fp32():
    """With bf16 weights, torch's CPU embedding backward summed a token's 4,096 gradients in bf16 (6.16 came
    out as 1.0); `Transformer.embed_tokens` looks up in fp32 there."""
    from mt.config import ModelConfig
    from mt.model import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=16, heads=2, encoder_layers=1, decoder_layers=1, d_ff=32, dropout=0.0),
                        10)
    tokens = torch.full((4, 1024), 7)  # 4,096 look-ups of one token
    grad = torch.rand(4, 1024, 16) * 0.003
    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype).zero_grad()
        model.embed_tokens(tokens).backward(grad.to(dtype))
        sums = model.embed.weight.grad[7].float()
        if dtype == torch.float32:
            expected = sums.clone()
    assert expected.min() > 5  # a sum far past where bf16 additions of 0.0015 stop growing
    torch.testing.assert_close(sums, expected, rtol=0.01, atol=0.0)
