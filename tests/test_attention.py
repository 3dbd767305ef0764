"""Our attention against torch's: same weights, same outputs."""

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend

from conftest import ROOT
from mt import attention
from mt.attention import KVCache, MultiHeadAttention
from mt.config import load_config
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


@pytest.mark.parametrize("autocast", [False, True])
def test_cached_cross_attention_matches_torch_with_padding(autocast):
    # A decoding step on the CPU takes mt's written-out fp32 path over the cache; torch's module checks it.
    ours, theirs = copied_pair()
    tokens = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    query, memory = torch.randn(2, 1, 16), torch.randn(2, 5, 16)
    mask = padding_mask(tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, weights = ours(query, mask=mask, cache=KVCache.fixed(*ours.project_memory(memory)), need_weights=True)
    ref, ref_weights = theirs(query, memory, memory, key_padding_mask=~mask[:, 0, 0], average_attn_weights=False)
    tolerance = {"atol": 0.05, "rtol": 0.05} if autocast else {}
    torch.testing.assert_close(out.float(), ref, **tolerance)
    torch.testing.assert_close(weights.float(), ref_weights, **tolerance)
    assert weights[1, :, 0, 3:].abs().sum() == 0  # padding gets no attention


@pytest.mark.parametrize("fused", [False, True])
def test_beams_share_their_sentence_cross_attention_cache(fused, monkeypatch):
    # 2 sentences x 3 beams: the cache holds each sentence once; each beam's row reads its own sentence's.
    # fused: the path a GPU takes (scaled_dot_product_attention over the grouped queries), here on the CPU.
    monkeypatch.setattr(attention, "_write_out", lambda device: not fused)
    ours, theirs = copied_pair()
    tokens = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 0, 0]])
    query, memory = torch.randn(6, 1, 16), torch.randn(2, 5, 16)
    mask = padding_mask(tokens)
    out, weights = ours(query, mask=mask, cache=KVCache.fixed(*ours.project_memory(memory)), need_weights=True)
    beams = torch.tensor([0, 0, 0, 1, 1, 1])
    ref, ref_weights = theirs(query, memory[beams], memory[beams], key_padding_mask=~mask[beams, 0, 0],
                              average_attn_weights=False)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(weights, ref_weights)


def test_growing_cache_matches_full_causal_attention():
    ours, _ = copied_pair()
    x = torch.randn(2, 10, 16)
    full, _ = ours(x, is_causal=True)
    cache = KVCache.empty(2, 4, 3, 4, x.dtype, x.device)  # shorter than needed: it must grow
    cache.k.fill_(float("nan")), cache.v.fill_(float("nan"))  # what torch.empty may hold, past the padding
    cache._zero_unfilled()
    steps = [ours(x[:, t : t + 1], cache=cache)[0] for t in range(10)]  # padded to MIN_KEYS (7) at first
    torch.testing.assert_close(torch.cat(steps, dim=1), full)
    assert cache.length == 10


def test_growing_cache_keeps_its_filled_steps_in_one_block():
    cache = KVCache.empty(3, 2, 4, 8, torch.float32, torch.device("cpu"))
    keys = torch.randn(3, 2, 9, 8)
    for t in range(9):  # past the preallocated 7 steps: the cache doubles
        cache.append(keys[:, :, t : t + 1], keys[:, :, t : t + 1] + 1)
    index = torch.tensor([0, 0, 1, 1, 2, 2])
    cache.reorder(index)  # more rows: a new buffer
    for x, expected in ((cache.k, keys[index]), (cache.v, keys[index] + 1)):
        torch.testing.assert_close(x[:, :, :9], expected)
        assert x[:, :, :9].permute(2, 0, 1, 3).is_contiguous()  # (steps, B, H, D) in memory


def test_fixed_cache_matches_cross_attention():
    ours, _ = copied_pair()
    query, memory = torch.randn(2, 1, 16), torch.randn(2, 5, 16)
    cache = KVCache.fixed(*ours.project_memory(memory))
    torch.testing.assert_close(ours(query, cache=cache)[0], ours(query, memory)[0])


def test_reorder_selects_rows():
    x = torch.randn(3, 2, 4, 8)
    cache = KVCache.fixed(x.clone(), x + 1)  # the cache owns its tensors: reorder changes them in place
    cache.reorder(torch.tensor([2, 2, 0]))
    torch.testing.assert_close(cache.k, x[[2, 2, 0]])
    torch.testing.assert_close(cache.v, x[[2, 2, 0]] + 1)
    cache.reorder(torch.tensor([1, 0]))  # fewer rows
    torch.testing.assert_close(cache.k, x[[2, 2]])


@pytest.mark.parametrize("heads", [1, 2, 8])
def test_heads_split_the_width(heads):
    ours, theirs = copied_pair(16, heads)
    x = torch.randn(1, 3, 16)
    torch.testing.assert_close(ours(x)[0], theirs(x, x, x)[0])


@pytest.mark.parametrize("length", [1, 7, 15, 16, 40])  # written out below 16 entries a row, torch's from 16
def test_softmax_equals_torch_and_passes_gradients(length):
    scores = torch.randn(6, 4, 3, length)
    masked = torch.arange(length) >= max(1, length - 3)  # the last 3 entries of a row, as padding would be
    grads, grad = [], torch.randn_like(scores)
    for softmax in (attention.softmax, lambda x: x.softmax(dim=-1)):
        x = scores.clone().requires_grad_()
        out = softmax(x.masked_fill(masked, float("-inf")))
        (out * grad).sum().backward()
        grads.append((out.detach(), x.grad))
    torch.testing.assert_close(*(g[0] for g in grads))
    torch.testing.assert_close(*(g[1] for g in grads))
    half = scores.bfloat16()  # computed in fp32 and rounded once, as torch's kernel does
    torch.testing.assert_close(attention.softmax(half), half.softmax(dim=-1), atol=0, rtol=0.008)


def test_fast_kernels_leave_out_cudnn_on_cuda_and_restore_the_settings():
    cuda = torch.backends.cuda
    before = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
              torch._C._get_sdp_priority_order())
    with attention.fast_kernels(torch.device("cuda")):
        assert not cuda.cudnn_sdp_enabled()
        assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()
    with attention.fast_kernels(torch.device("cuda"), "efficient"):
        assert not cuda.cudnn_sdp_enabled() and cuda.flash_sdp_enabled()
        assert torch._C._get_sdp_priority_order()[0] == int(SDPBackend.EFFICIENT_ATTENTION)
    for device, first in (("cpu", "auto"), ("cuda", "math")):
        with attention.fast_kernels(torch.device(device), first):
            assert cuda.math_sdp_enabled() and not cuda.flash_sdp_enabled() and not cuda.mem_efficient_sdp_enabled()
    assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            torch._C._get_sdp_priority_order()) == before


@pytest.mark.parametrize(("first", "kernel"), [("auto", "math"), ("math", "math"), ("flash", "flash"),
                                               ("efficient", "flash")])
def test_train_attention_runs_the_kernel_it_names_on_the_cpu(first, kernel):
    """`train.attention` reaches the kernel; the CPU has no memory-efficient kernel, so
    flash comes next."""
    from mt.data import collate
    from mt.model import Transformer
    from mt.train import loss_fn

    model = Transformer(load_config(ROOT / "configs" / "tiny.yaml").model, 30)
    batch = collate([[5, 6, 7], [5, 6, 7, 8, 9, 10]], [[8, 9], [4, 5, 6, 7, 8]])
    with torch.profiler.profile() as prof:
        loss_fn(model, batch, 0.1, first)[0].backward()
    ran = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    assert ran and all(kernel in name for name in ran), ran
