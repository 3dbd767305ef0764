"""Each fast path computes what its plain path computes (mt.fastpaths)."""

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from mt import fastpaths
from mt.config import load_config
from mt.data import collate
from mt.model import Transformer
from mt.train import label_smoothed_loss, loss_fn

TINY = ROOT / "configs" / "tiny.yaml"


def test_attention_kernels_leave_out_cudnn_on_cuda_and_restore_the_settings():
    cuda = torch.backends.cuda
    before = (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled())
    with fastpaths.attention_kernels(torch.device("cuda")):
        assert not cuda.cudnn_sdp_enabled()
        assert cuda.flash_sdp_enabled() and cuda.mem_efficient_sdp_enabled() and cuda.math_sdp_enabled()
    with fastpaths.attention_kernels(torch.device("cpu")):
        assert cuda.math_sdp_enabled() and not cuda.flash_sdp_enabled()
    assert (cuda.cudnn_sdp_enabled(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled()) == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_smoothed_cross_entropy_equals_the_plain_loss_and_torchs(dtype):
    torch.manual_seed(0)
    logits = (3 * torch.randn(7, 30)).to(dtype).requires_grad_()
    target = torch.randint(0, 30, (7,))
    loss, nll = fastpaths.SmoothedCrossEntropy.apply(logits, target, 0.1)
    (2.5 * loss).backward()
    plain = logits.detach().clone().requires_grad_()
    plain_loss, plain_nll = label_smoothed_loss(plain, target, 0.1)
    (2.5 * plain_loss).backward()
    torch.testing.assert_close(loss, plain_loss)
    torch.testing.assert_close(nll, plain_nll)
    assert logits.grad.dtype == dtype and not nll.requires_grad
    torch.testing.assert_close(logits.grad, plain.grad)
    reference = logits.detach().float().requires_grad_()
    torch.testing.assert_close(loss, F.cross_entropy(reference, target, label_smoothing=0.1, reduction="sum"))


def test_a_training_step_is_the_same_with_the_fast_paths_off(monkeypatch):
    torch.manual_seed(0)
    model = Transformer(load_config(TINY).model, 30).eval()  # eval: no dropout draws
    batch = collate([[5, 6, 7], [5, 6, 7, 8, 9, 10]], [[8, 9], [4, 5, 6, 7, 8]])
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(fastpaths, "ENABLED", enabled)
        model.zero_grad()
        loss, nll = loss_fn(model, batch, 0.1)
        loss.backward()
        results.append((loss.detach(), nll, [p.grad.clone() for p in model.parameters()]))
    (fast_loss, fast_nll, fast_grads), (plain_loss, plain_nll, plain_grads) = results
    torch.testing.assert_close(fast_loss, plain_loss)
    torch.testing.assert_close(fast_nll, plain_nll)
    for fast, plain in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(fast, plain)


def test_a_bf16_training_step_is_the_same_with_padded_rows(monkeypatch):  # model.eval(): no dropout
    import contextlib

    torch.manual_seed(0)
    model = Transformer(load_config(TINY).model, 30).eval()
    batch = collate([[5, 6, 7], [5, 6, 7, 8, 9, 10], [4] * 9], [[8, 9], [4, 5, 6, 7, 8], [7] * 11])  # 29 rows
    padded = []  # the products that went through padded_linear
    monkeypatch.setattr(fastpaths, "padded_linear", lambda *a: padded.append(a) or F.linear(*a))
    results = []
    for cpu_kernels in (fastpaths.cpu_kernels, lambda device: contextlib.nullcontext()):
        monkeypatch.setattr(fastpaths, "cpu_kernels", cpu_kernels)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = loss_fn(model, batch, 0.1)
        loss.backward()
        results.append((loss.detach().float(), [p.grad.clone() for p in model.parameters()]))
    (fast_loss, fast_grads), (plain_loss, plain_grads) = results
    assert len(padded) == 2 * 4 + 2 * 7 + 1  # every F.linear of the tiny model: 2 encoder, 2 decoder layers, output
    torch.testing.assert_close(fast_loss, plain_loss)
    for fast, plain in zip(fast_grads, plain_grads, strict=True):  # equal up to bf16's rounding
        assert (fast - plain).norm() <= 1e-2 * plain.norm() + 1e-6


def test_padded_linear_equals_f_linear_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(3, 13, 16, dtype=torch.bfloat16, requires_grad=True)  # 39 rows, padded to 40
    weight = torch.randn(24, 16, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(24, dtype=torch.bfloat16, requires_grad=True)
    out = fastpaths.padded_linear(x, weight, bias)
    grads = torch.autograd.grad(out.float().square().sum(), (x, weight, bias))
    plain = F.linear(x, weight, bias)
    plain_grads = torch.autograd.grad(plain.float().square().sum(), (x, weight, bias))
    assert out.shape == plain.shape == (3, 13, 24)
    torch.testing.assert_close(out, plain)
    for fast, slow in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-1)


def test_padded_row_counts_add_at_most_an_eighth_and_come_in_few_sizes():
    counts = [fastpaths.padded_row_count(rows) for rows in range(1, 8193)]
    assert all(rows <= padded <= rows * 9 / 8 for rows, padded in zip(range(1, 8193), counts, strict=True))
    assert len(set(counts)) <= 16 + 8 * 9  # 1..16 as they are, then 8 sizes per power of two


def test_dropout16_drops_p_of_the_units_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.rand(400, 500) + 0.5
    for p in (0.1, 0.3):
        with fastpaths.cpu_kernels(torch.device("cpu")):
            out = torch.nn.Dropout(p)(x)  # nn.Dropout, sent to dropout16
        dropped = (out == 0).float().mean().item()
        assert abs(dropped - p) < 0.005
        kept = out != 0
        torch.testing.assert_close(out[kept], x[kept] / (1 - round(p * 65536) / 65536))
        assert abs(out.mean().item() / x.mean().item() - 1) < 0.01
    assert fastpaths.dropout16(x, 0.2, training=False) is x
    assert fastpaths.dropout16(x, 0.0) is x
    y = x.clone()
    assert fastpaths.dropout16(y, 0.5, inplace=True) is y and (y == 0).any()
    leaf = x.clone().requires_grad_()
    out = fastpaths.dropout16(leaf, 0.25)
    out.sum().backward()
    torch.testing.assert_close(leaf.grad, out.detach() / leaf.detach())  # the gradient is the mask's scale


@pytest.mark.parametrize("width", [8000 * 5, 8000 * 5 + 37, 2000])  # chunks fill the row or not; too narrow
def test_topk_from_chunk_maxima_equals_torchs(width):
    torch.manual_seed(0)
    x = torch.randn(16, width)  # distinct values: no ties to break
    x[3] = float("-inf")  # a row of beams that have not started but one entry
    x[3, width - 1] = 0.0
    x[5, : width // 2] = float("-inf")
    values, index = fastpaths.topk(x, 10)
    expected = x.topk(10, dim=1)
    assert torch.equal(values, expected.values)
    finite = values.isfinite()
    assert torch.equal(index[finite], expected.indices[finite])  # -inf entries tie: any index of one will do
    assert index.max() < width


@pytest.mark.slow
def test_training_forward_compiles_one_graph_per_kind_of_layer_for_every_batch_shape():
    torch.manual_seed(0)
    layers = ["model.encoder_layers=3", "model.decoder_layers=3"]
    model = Transformer(load_config(TINY, layers).model, 30).eval()  # eval: no dropout, so both passes match
    # backend "eager": dynamo's tracing without inductor's code generation, which takes a minute on a CPU.
    # fullgraph: a graph break would fail here rather than silently split a compiled layer.
    net = fastpaths.compiled(model, backend="eager", fullgraph=True)
    torch._dynamo.reset()
    counts = torch._dynamo.utils.counters
    counts.clear()
    # The first batch's source and target are equally long (4 positions each, BOS and EOS included): the
    # graph traced from it must not take that for a rule of every batch.
    for src, tgt in (([[5, 6, 7], [8, 9]], [[4, 5, 6], [6, 7]]), ([[5, 6, 7], [8, 9]], [[4, 5], [6, 7, 8, 9]]),
                     ([[5, 6, 7, 8, 9, 10]] * 3, [[4, 5, 6]] * 3), ([[5, 6]] * 5, [[7, 8, 9, 10, 11]] * 5)):
        batch = collate(src, tgt)
        torch.testing.assert_close(loss_fn(net, batch, 0.1), loss_fn(model, batch, 0.1))
    # One graph for the 3 encoder layers and one for the 3 decoder layers, and no recompilation per shape.
    assert counts["stats"]["unique_graphs"] == 2
    # The model itself stays eager: validation and decoding run it.
    assert not any(isinstance(m, torch._dynamo.eval_frame.OptimizedModule) for m in model.modules())
    assert [p.data_ptr() for p in net.parameters()] == [p.data_ptr() for p in model.parameters()]


def test_decoding_is_the_same_with_the_fast_paths_off(monkeypatch):
    from mt.config import ModelConfig
    from mt.search import CachedStepper, beam_search
    from mt.tokenizer import BOS, EOS, PAD

    torch.manual_seed(3)
    model = Transformer(ModelConfig(d_model=32, heads=4, encoder_layers=2, decoder_layers=2, d_ff=64), 50).eval()
    with torch.no_grad():
        model.embed.weight.mul_(4.0)  # sharper: hypotheses end at different lengths
    src = torch.randint(4, 50, (5, 8))
    src[:, -1] = EOS
    src[1, 5:] = PAD
    lens = (src != PAD).sum(1) + 20  # past the preallocated length: the step-major cache grows
    results = []
    for enabled in (True, False):
        monkeypatch.setattr(fastpaths, "ENABLED", enabled)
        hyps = beam_search(CachedStepper(model, src, 4), lens, BOS, EOS, beam_size=3, nbest=3)
        results.append([[(h.tokens, round(h.score, 5)) for h in sentence] for sentence in hyps])
    assert results[0] == results[1]
