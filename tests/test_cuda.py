"""The CUDA path: run by scripts/gpu_check.sh on a machine with a GPU, skipped elsewhere."""

import pytest
import torch
from torch import nn

from mt.attention import MultiHeadAttention
from mt.config import ModelConfig
from mt.data import collate
from mt.masks import padding_mask
from mt.model import Transformer
from mt.search import CachedStepper, RecomputeStepper, beam_search, greedy_search
from mt.tokenizer import BOS, EOS, PAD
from mt.train import loss_fn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")
CUDA = torch.device("cuda")


def test_fast_paths_equal_the_plain_paths_on_cuda(monkeypatch):
    from mt import fastpaths

    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, heads=4, encoder_layers=2, decoder_layers=2, d_ff=128,
                                    dropout=0.0), 100).to(CUDA)
    batch = collate([[5, 6, 7, 8, 9, 10, 11], [9, 10]], [[11, 12], [13, 14, 15, 16, 17]]).to(CUDA)
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(fastpaths, "ENABLED", enabled)
        loss, _ = loss_fn(model, batch, 0.1)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        model.zero_grad(set_to_none=True)
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=0)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_attention_matches_torch_on_cuda():
    torch.manual_seed(0)
    ours = MultiHeadAttention(64, 8).to(CUDA).eval()
    theirs = nn.MultiheadAttention(64, 8, batch_first=True).to(CUDA).eval()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 9, 64, device=CUDA)
    tokens = torch.randint(4, 50, (4, 9), device=CUDA)
    tokens[1, 5:] = PAD
    mask = padding_mask(tokens)
    torch.testing.assert_close(ours(x, mask=mask)[0], theirs(x, x, x, key_padding_mask=~mask[:, 0, 0])[0],
                               atol=1e-4, rtol=1e-4)


def test_bf16_training_step_on_cuda():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, heads=4, encoder_layers=2, decoder_layers=2, d_ff=128), 100).to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = collate([[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]]).to(CUDA)
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_fn(model, batch, 0.0)
        (loss / batch.target_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] / 2


def test_training_step_never_waits_for_the_gpu():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, heads=4, encoder_layers=2, decoder_layers=2, d_ff=128), 100).to(CUDA)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = collate([[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]]).to(CUDA)

    def step():  # as mt.train.Trainer.step
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss, _ = loss_fn(model, batch, 0.1)
        (loss / batch.target_tokens).backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.found_inf = (~torch.isfinite(norm)).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first step may set things up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any operation that waits for the device raises
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cached_decoding_equals_recomputation_on_cuda():
    torch.manual_seed(3)
    model = Transformer(ModelConfig(d_model=32, heads=4, encoder_layers=2, decoder_layers=2, d_ff=64), 50)
    model = model.to(CUDA).eval()
    with torch.no_grad():
        model.embed.weight.mul_(4.0)
    src = torch.randint(4, 50, (6, 8), device=CUDA)
    src[:, -1] = EOS
    lens = torch.full((6,), 12, device=CUDA)
    a = greedy_search(CachedStepper(model, src, 12), lens, BOS, EOS)
    b = greedy_search(RecomputeStepper(model, src), lens, BOS, EOS)
    assert [h.tokens for h in a] == [h.tokens for h in b]
    a = beam_search(CachedStepper(model, src, 12), lens, BOS, EOS, beam_size=4)
    b = beam_search(RecomputeStepper(model, src), lens, BOS, EOS, beam_size=4)
    assert [h[0].tokens for h in a] == [h[0].tokens for h in b]


def test_bf16_cached_decoding_on_cuda_keeps_bf16_caches_and_matches_full_decode():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=32, heads=4, encoder_layers=2, decoder_layers=2, d_ff=64), 50)
    model = model.to(CUDA).eval()
    src = torch.cat([torch.randint(4, 50, (3, 6)), torch.full((3, 1), EOS)], 1).to(CUDA)
    tgt = torch.cat([torch.full((3, 1), BOS), torch.randint(4, 50, (3, 5))], 1).to(CUDA)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        memory, mask = model.encode(src)
        full = model.logits(model.decode(tgt, memory, mask))
        cache = model.start_cache(memory, mask, max_len=8)
        steps = [model.decode_step(tgt[:, t], cache)[0] for t in range(tgt.size(1))]
    assert {c.k.dtype for c in cache.self_attn + cache.cross_attn} == {torch.bfloat16}
    torch.testing.assert_close(torch.stack(steps, 1).float(), full.float(), atol=0.1, rtol=0.05)
