"""Properties of the whole encoder-decoder: causality, padding invariance, cache equivalence."""

import pytest
import torch

from mt.config import ModelConfig
from mt.model import Transformer
from mt.tokenizer import BOS, EOS, PAD

V = 40


def make_model(norm="post", seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(d_model=32, heads=4, encoder_layers=2, decoder_layers=2, d_ff=64, norm=norm)
    return Transformer(config, V).eval()


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_later_target_tokens_never_change_earlier_positions(norm):
    model = make_model(norm)
    src = torch.randint(4, V, (2, 7))
    tgt = torch.randint(4, V, (2, 6))
    changed = tgt.clone()
    changed[:, 4:] = torch.randint(4, V, (2, 2))
    before, after = model(src, tgt), model(src, changed)
    torch.testing.assert_close(before[:, :4], after[:, :4])
    assert not torch.allclose(before[:, 4:], after[:, 4:])


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_padding_never_changes_a_sentence(norm):
    model = make_model(norm)
    short_src, long_src = torch.randint(4, V, (1, 4)), torch.randint(4, V, (1, 9))
    short_tgt, long_tgt = torch.randint(4, V, (1, 3)), torch.randint(4, V, (1, 8))
    alone = model(short_src, short_tgt)
    src = torch.cat([torch.cat([short_src, torch.full((1, 5), PAD)], 1), long_src])
    tgt = torch.cat([torch.cat([short_tgt, torch.full((1, 5), PAD)], 1), long_tgt])
    batched = model(src, tgt)
    torch.testing.assert_close(batched[0, :3], alone[0])


def test_decode_step_with_cache_matches_full_decode():
    model = make_model()
    src = torch.cat([torch.randint(4, V, (3, 6)), torch.full((3, 1), EOS)], 1)
    src[2, 3:] = PAD
    tgt = torch.cat([torch.full((3, 1), BOS), torch.randint(4, V, (3, 5))], 1)
    memory, mask = model.encode(src)
    full = model.logits(model.decode(tgt, memory, mask))
    cache = model.start_cache(memory, mask, max_len=2)  # grows past its preallocation
    steps = [model.decode_step(tgt[:, t], cache)[0] for t in range(tgt.size(1))]
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-4)


def test_cache_under_bf16_autocast_matches_full_decode():
    model = make_model()
    src = torch.cat([torch.randint(4, V, (3, 6)), torch.full((3, 1), EOS)], 1)
    tgt = torch.cat([torch.full((3, 1), BOS), torch.randint(4, V, (3, 5))], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        memory, mask = model.encode(src)
        full = model.logits(model.decode(tgt, memory, mask))
        cache = model.start_cache(memory, mask, max_len=8)
        steps = [model.decode_step(tgt[:, t], cache)[0] for t in range(tgt.size(1))]
    assert memory.dtype == torch.float32  # LayerNorm output under autocast
    torch.testing.assert_close(torch.stack(steps, 1).float(), full.float(), atol=0.1, rtol=0.05)


def test_shared_embedding_is_the_output_projection():
    model = make_model()
    states = torch.randn(2, 32)
    torch.testing.assert_close(model.logits(states), states @ model.embed.weight.t())
    assert model.embed.weight[PAD].abs().sum() == 0
