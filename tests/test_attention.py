"""Our attention against torch's: same weights, same outputs."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mt import attention
from mt.attention import KVCache, MultiHeadAttention
from mt.masks import causal_mask, padding_mask

torch.manual_seed(0)


def copied_pair(d_model=16, heads=4):
    ours = MultiHeadAttention(d_model, heads).eval()
    theirs = nn.MultiheadAttention(d_model, heads, batch_first=True).eval()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def test_self_attention_with_padding_matches_torch():
    ours, theirs = copied_pair()
    tokens = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    x = torch.randn(2, 5, 16)
    mask = padding_mask(tokens)
    out, weights = ours(x, mask=mask, need_weights=True)
    ref, ref_weights = theirs(x, x, x, key_padding_mask=~mask[:, 0, 0], average_attn_weights=False)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(weights, ref_weights)
    fused, _ = ours(x, mask=mask)  # the scaled_dot_product_attention path
    torch.testing.assert_close(fused, ref)


def test_cross_attention_matches_torch():
    ours, theirs = copied_pair()
    query, memory = torch.randn(3, 4, 16), torch.randn(3, 7, 16)
    tokens = torch.tensor([[5] * 7, [5] * 4 + [0] * 3, [5] * 1 + [0] * 6])
    mask = padding_mask(tokens)
    out, _ = ours(query, memory, mask=mask)
    ref, _ = theirs(query, memory, memory, key_padding_mask=~mask[:, 0, 0])
    torch.testing.assert_close(out, ref)


def test_causal_self_attention_matches_torch():
    ours, theirs = copied_pair()
    x = torch.randn(2, 6, 16)
    out, _ = ours(x, is_causal=True)
    ref, _ = theirs(x, x, x, attn_mask=~causal_mask(6))
    torch.testing.assert_close(out, ref)
    explicit, _ = ours(x, mask=causal_mask(6), need_weights=True)
    torch.testing.assert_close(explicit, ref)


def test_scaled_dot_product_attention_is_torchs():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 4)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., 0] = True  # every query sees a key
    out, weights = attention.scaled_dot_product_attention(q, k, v, mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 5))
    assert (weights[~mask.expand_as(weights)] == 0).all()


@pytest.mark.parametrize("autocast", [False, True])
def test_cached_cross_attention_matches_torch_with_padding(autocast):
    ours, theirs = copied_pair()
    tokens = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    query, memory = torch.randn(2, 1, 16), torch.randn(2, 5, 16)
    mask = padding_mask(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, weights = ours(query, mask=mask, cache=ours.project_memory(memory), need_weights=True)
    ref, ref_weights = theirs(query, memory, memory, key_padding_mask=~mask[:, 0, 0], average_attn_weights=False)
    tolerance = {"atol": 0.05, "rtol": 0.05} if autocast else {}
    torch.testing.assert_close(out.float(), ref, **tolerance)
    torch.testing.assert_close(weights.float(), ref_weights, **tolerance)
    assert weights[1, :, 0, 3:].abs().sum() == 0  # padding gets no attention


def test_beams_share_their_sentence_cross_attention_cache():
    # 2 sentences x 3 beams: the cache holds each sentence once; each beam's row reads its own sentence's.
    ours, theirs = copied_pair()
    tokens = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    query, memory = torch.randn(6, 1, 16), torch.randn(2, 5, 16)
    mask = padding_mask(tokens)
    out, weights = ours(query, mask=mask, cache=ours.project_memory(memory), need_weights=True)
    beams = torch.tensor([0, 0, 0, 1, 1, 1])
    ref, ref_weights = theirs(query, memory[beams], memory[beams], key_padding_mask=~mask[beams, 0, 0],
                              average_attn_weights=False)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(weights, ref_weights)


def test_growing_cache_matches_full_causal_attention():
    ours, _ = copied_pair()
    x = torch.randn(2, 10, 16)
    full, _ = ours(x, is_causal=True)
    cache = KVCache.empty(3)  # shorter than needed: it must grow
    steps = [ours(x[:, t : t + 1], cache=cache)[0] for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert cache.length == 10


def test_fixed_cache_matches_cross_attention():
    ours, _ = copied_pair()
    query, memory = torch.randn(2, 1, 16), torch.randn(2, 5, 16)
    torch.testing.assert_close(ours(query, cache=ours.project_memory(memory))[0], ours(query, memory)[0])


@pytest.mark.parametrize("index", [[2, 2, 0], [1, 0], [0, 2, 1], [0, 1, 2, 2, 1, 0]])
def test_reorder_selects_rows(index):
    keys = torch.randn(3, 2, 4, 8)
    cache = KVCache.empty(6)
    cache.append(keys, keys + 1)
    cache.reorder(torch.tensor(index))  # fewer, as many or more rows
    torch.testing.assert_close(cache.k, keys[index])
    torch.testing.assert_close(cache.v, keys[index] + 1)
    new = torch.randn(len(index), 2, 1, 8)
    k, _ = cache.append(new, new)  # and it grows on
    torch.testing.assert_close(k, torch.cat([keys[index], new], dim=2))


@pytest.mark.parametrize("heads", [1, 2, 8])
def test_heads_split_the_width(heads):
    ours, theirs = copied_pair(16, heads)
    x = torch.randn(1, 3, 16)
    torch.testing.assert_close(ours(x)[0], theirs(x, x, x)[0])
