"""Speed-ups that are not written in the tutorial's plain style, each beside the plain path it replaces.

Every function here computes what its plain counterpart computes (tests/test_fastpaths.py checks each one),
only faster on some machine. They are switched on and off in one place, `ENABLED`: `mt bench --plain` and
the tests run the plain paths. A speed-up stays here only while it wins at least 5 % end to end on a machine
class in BENCHMARKS.md; the figures are there, not here.

- `attention_kernels`: which of torch's fused attention kernels run (math on the CPU; never cuDNN on CUDA).
- `cpu_kernels`: on the CPU, bf16 linear layers on padded row counts (so that oneDNN reuses its kernels), and
  dropout masks from 16 random bits.
- `SmoothedCrossEntropy`: the label-smoothed loss with its gradient written out in one pass.
- `cache_buffer`: a decoding cache stored position by position on the CPU.
- `topk`: top-k of a wide row on the CPU from the maxima of chunks of it.
- `compiled`: each encoder and decoder layer compiled by torch.compile (`train.compile`; GPU only).
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn.functional as F
from torch.fx.experimental import _config as shapes_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

ENABLED = True
"""Whether the fast paths run; False runs the plain path of each (`mt bench --plain`, tests)."""


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """The kernels `F.scaled_dot_product_attention` may use while training or translating on `device`.

    On the CPU the math kernel, whose backward pass is a few batched matrix products, beats the flash kernel
    on sentences of a few dozen tokens. On CUDA flash first, then memory-efficient, never cuDNN: cuDNN builds
    an execution graph for every new shape of its inputs, and length-bucketed batches and decoding steps bring
    new shapes all the time.
    """
    if not ENABLED or device.type not in ("cpu", "cuda"):
        return contextlib.nullcontext()
    if device.type == "cpu":
        return sdpa_kernel([SDPBackend.MATH])
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def cpu_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """Within it, on the CPU, every nn.Linear in bf16 runs `padded_linear` and every nn.Dropout `dropout16`.
    Training runs within it; decoding does not, where the mode's own cost per operation outweighed the padding.

    `padded_linear`: torch runs a bf16 matrix product on the CPU through oneDNN, which builds a kernel for each
    shape of its operands and keeps the last ONEDNN_PRIMITIVE_CACHE_CAPACITY of them (1,024 by default).
    Building one costs more than the product itself on AMX, and training batches bring new row counts at nearly
    every step; padded, a run's row counts fall into a few dozen shapes that stay cached. fp32 products (MKL)
    run as they are.

    `dropout16`: `F.dropout` draws a Bernoulli sample per unit, which costs more than the rest of dropout.
    """
    if not ENABLED or device.type != "cpu":
        return contextlib.nullcontext()
    return _CpuKernels()


class _CpuKernels(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and _in_bf16(args[0]):
            return padded_linear(*args, **kwargs)
        if func is F.dropout:
            return dropout16(*args, **kwargs)
        return func(*args, **kwargs)


def _in_bf16(x: torch.Tensor) -> bool:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16


def padded_row_count(rows: int) -> int:
    """`rows` rounded up to a multiple of 1/8 of its power of two (as is below 16): at most 1/8 more."""
    step = 1 << max(0, rows.bit_length() - 4)
    return -(-rows // step) * step


def padded_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` computed on `padded_row_count` rows of `x` (all its dimensions but the last):
    zeros below the real rows, dropped from the result. Each row's result depends on that row alone, and
    autograd carries the padding through the backward pass."""
    rows = x.numel() // x.size(-1)
    padded = padded_row_count(rows)
    if padded == rows:
        return F.linear(x, weight, bias)
    flat = F.pad(x.reshape(rows, x.size(-1)), (0, 0, 0, padded - rows))  # (padded, E)
    return F.linear(flat, weight, bias)[:rows].view(*x.shape[:-1], weight.size(0))


def dropout16(x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """`F.dropout` with its mask drawn from 16 random bits per unit: 64-bit random integers read as four 16-bit
    ones. The drop probability is p rounded to a multiple of 1/65,536 (0.2 -> 0.199997), and kept units are
    scaled by 1 / (1 - that), so the mean stays exact."""
    if not training or p == 0.0:
        return x
    levels = 1 << 16
    drop = round(p * levels)  # of the 65,536 values a 16-bit draw takes, those that drop a unit
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)  # all 64 bits
    keep = words.view(torch.int16)[:n].view(x.shape) >= drop - levels // 2
    scale = keep.to(x.dtype).mul_(levels / (levels - drop))  # 0 or 1 / (1 - p)
    return x.mul_(scale) if inplace else x * scale


def cache_buffer(like: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """An uninitialised (rows, H, length, D) buffer for a growing KV cache, of `like`'s (.., H, .., D) dtype and device.

    On the CPU it is stored position by position, (length, rows, H, D) in memory, so that the positions filled so
    far are one block of memory, which attention reads at every decoding step; the plain layout spreads them
    over rows * H pieces of the preallocated length.
    """
    H, D = like.size(1), like.size(3)
    if not ENABLED or like.device.type != "cpu":
        return like.new_empty(rows, H, length, D)
    return like.new_empty(length, rows, H, D).permute(1, 2, 0, 3)


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross-entropy of (N, V) logits against (N,) targets, and the summed NLL.

    The plain path is `mt.train.label_smoothed_loss`; this one runs `SmoothedCrossEntropy` when enabled.
    """
    if not ENABLED:
        from mt.train import label_smoothed_loss as plain

        return plain(logits, target, smoothing)
    return SmoothedCrossEntropy.apply(logits, target, smoothing)


class SmoothedCrossEntropy(torch.autograd.Function):
    """`mt.train.label_smoothed_loss` with its backward pass written out.

    The gradient of label-smoothed cross-entropy is simply softmax(logits) - q, where q is the smoothed
    target distribution: one pass over the (N, V) scores, where autograd's chain (log-softmax, gather, sum,
    conversion) takes five.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, smoothing: float):
        log_probs = logits.log_softmax(dim=-1, dtype=torch.float32)
        nll = -log_probs.gather(1, target[:, None]).sum()
        loss = (1.0 - smoothing) * nll - (smoothing / log_probs.size(-1)) * log_probs.sum()
        ctx.save_for_backward(log_probs, target)
        ctx.smoothing, ctx.logits_dtype = smoothing, logits.dtype
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        log_probs, target = ctx.saved_tensors
        grad = log_probs.exp_()  # softmax, in place: the saved log-probabilities are not needed again
        grad.sub_(ctx.smoothing / grad.size(-1))
        grad[torch.arange(grad.size(0), device=grad.device), target] -= 1.0 - ctx.smoothing
        return grad.mul_(grad_loss).to(ctx.logits_dtype), None, None


def topk(x: torch.Tensor, n: int, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """`x.topk(n, dim=1)` of a wide (R, W) tensor: beam search's n best of beams × vocabulary candidates.

    On the CPU it works from the maxima of chunks of each row: the n largest entries lie in the n chunks
    with the largest maxima, so top-k runs over the chunk maxima, then over those n chunks. torch's CPU
    top-k pairs every entry with its index before it selects; a chunk maximum is one vectorised pass. Ties
    may be broken differently from `topk`.
    """
    rows, width = x.shape
    if not ENABLED or x.device.type != "cpu" or width < 4 * n * chunk:
        return x.topk(n, dim=1)
    maxima = x.unfold(1, chunk, chunk).amax(dim=2)  # (R, W // chunk): the full chunks
    if width % chunk:  # the last, shorter chunk
        maxima = torch.cat([maxima, x[:, width - width % chunk :].amax(dim=1, keepdim=True)], dim=1)
    chunks = maxima.topk(n, dim=1).indices  # (R, n)
    columns = (chunks[:, :, None] * chunk + torch.arange(chunk, device=x.device)).view(rows, -1)  # (R, n * chunk)
    values = x.gather(1, columns.clamp(max=width - 1))
    if width % chunk:
        values.masked_fill_(columns >= width, float("-inf"))  # past the row's end
    values, picked = values.topk(n, dim=1)
    return values, columns.gather(1, picked).clamp_(max=width - 1)


def compiled(model: torch.nn.Module, **options) -> torch.nn.Module:
    """`model` with each encoder and decoder layer compiled by torch.compile, for training (`train.compile`).

    It returns a view of `model`: the same parameters, buffers and modules, with layers that run compiled;
    validation and decoding use `model` itself. The layers of a stack run the same code, and torch.compile
    guards on a layer's class and settings, not on which layer it is, so one graph serves every layer of a
    stack. Shapes are dynamic, since length-bucketed batches change size at every step, and duck sizing is
    off, so that two sizes that happen to be equal in the first batch do not share one symbol in the graph.
    """
    view = copy.copy(model)
    view._modules = dict(model._modules)  # its own children, so that replacing the layers leaves `model`'s
    for stack in ("encoder_layers", "decoder_layers"):
        layers = (_WithoutDuckSizing(torch.compile(layer, dynamic=True, **options)) for layer in getattr(model, stack))
        setattr(view, stack, torch.nn.ModuleList(layers))
    return view


class _WithoutDuckSizing(torch.nn.Module):
    """Calls a compiled module with duck sizing off (see `compiled`)."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        with _no_duck_sizing():
            return self.net(*args, **kwargs)


_no_duck_sizing = (functools.partial(shapes_config.patch, use_duck_shape=False)
                   if hasattr(shapes_config, "use_duck_shape") else contextlib.nullcontext)

