"""The CUDA path: run by scripts/gpu_check.sh on a machine with a GPU, skipped elsewhere."""

import pytest
import torch
from torch import nn

from mt.attention import MultiHeadAttention
from mt.config import ModelConfig
from mt.data import collate
from mt.devices import MasterWeights
from mt.masks import padding_mask
from mt.model import Transformer
from mt.search import CachedStepper, RecomputeStepper, beam_search, greedy_search
from mt.tokenizer import BOS, EOS, PAD
from mt.train import loss_fn

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)")
CUDA = torch.device("cuda")


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


@pytest.mark.parametrize("first", ["efficient", "math"])
def test_every_attention_kernel_order_computes_the_same_loss_and_gradients_on_cuda(first):
    """`train.attention`, against the default order: in fp32 (where flash cannot run, so against the
    memory-efficient kernel) the same loss and gradients; in bf16 (flash) the same loss. bf16 gradients are not
    compared: on a few tokens rounding flips ReLU units, and with them whole rows of a gradient."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, heads=4, encoder_layers=2, decoder_layers=2, d_ff=128,
                                    dropout=0.0), 100).to(CUDA)
    batch = collate([[5, 6, 7, 8, 9, 10, 11], [9, 10]], [[11, 12], [13, 14, 15, 16, 17]]).to(CUDA)
    for amp in (False, True):
        results = []
        for order in ("auto", first):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                loss, _ = loss_fn(model, batch, 0.1, order)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
            model.zero_grad(set_to_none=True)
        (loss_a, grads_a), (loss_b, grads_b) = results
        torch.testing.assert_close(loss_b, loss_a, rtol=1e-3 if amp else 1e-5, atol=0)
        if not amp:
            for a, b in zip(grads_a, grads_b, strict=True):
                torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
    with torch.profiler.profile() as prof, torch.autocast("cuda", dtype=torch.bfloat16):
        loss_fn(model, batch, 0.1, first)
    ran = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    assert ran and all(first in name for name in ran), ran  # the kernel named: ..._efficient_attention, ..._math


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


def test_bf16_weights_training_step_on_cuda_learns_and_never_waits_for_the_gpu():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, heads=4, encoder_layers=2, decoder_layers=2, d_ff=128), 100).to(CUDA)
    master = MasterWeights(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    batch = collate([[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]]).to(CUDA)

    def step():  # as mt.train.Trainer.step with train.precision: bf16-weights
        loss, _ = loss_fn(master.work, batch, 0.0)
        (loss / batch.target_tokens).backward()
        master.grads_to_master()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.found_inf = (~torch.isfinite(norm)).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        master.weights_to_work()
        return loss.detach()

    losses = [step()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any operation that waits for the device raises
    try:
        losses += [step() for _ in range(19)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    losses = torch.stack(losses).tolist()
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0] / 2
    for p, w in zip(model.parameters(), master.work.parameters(), strict=True):
        assert p.dtype == torch.float32 and w.dtype == torch.bfloat16 and torch.equal(w, p.detach().bfloat16())


def test_bf16_model_gradients_on_cuda_match_the_fp32_models():
    """As tests/test_train.py checks on the CPU: CUDA's LayerNorm and embedding kernels sum in fp32."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=64, heads=4, encoder_layers=2, decoder_layers=2, d_ff=128), 40).to(CUDA)
    master = MasterWeights(model)
    lengths = torch.randint(5, 21, (2, 200)).tolist()
    batch = collate([torch.randint(4, 40, (n,)).tolist() for n in lengths[0]],
                    [torch.randint(4, 40, (n,)).tolist() for n in lengths[1]]).to(CUDA)
    model.eval()  # no dropout: both passes compute the same function
    master.work.eval()
    loss_fn(model, batch, 0.1)[0].backward()
    loss_fn(master.work, batch, 0.1)[0].backward()
    for (name, p), w in zip(model.named_parameters(), master.work.parameters(), strict=True):
        assert (w.grad.float() - p.grad).norm() <= 0.05 * p.grad.norm(), name


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
