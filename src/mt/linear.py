"""Linear layers whose bf16 matrix products on the CPU come in few shapes.

On the CPU torch runs a bf16 matrix product through oneDNN, which builds a kernel (a "primitive") for each
shape of its operands, then keeps the last ONEDNN_PRIMITIVE_CACHE_CAPACITY of them (`mt/__init__.py`). Building
one costs more than the product itself on AMX: translation batches give nearly every step new row counts,
so nearly every product paid for a new kernel. `linear` pads the rows (all dimensions but the last, flattened)
up to a multiple of 1/8 of their power of two, 128 rows for 1,024-2,047 of them, so that a training run's row
counts fall into a few dozen shapes that stay cached. The padding is at most 1/8 of the rows, and it is
free of effect: each row's result depends on that row alone, and the padded rows are dropped. On an
AMX Xeon, `mt bench` trained at 3,879 target tokens/s before and 5,717 after (BENCHMARKS.md, "An AMX Xeon").

Elsewhere (CUDA, fp32 on the CPU, which runs through MKL) the product runs as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PADDED_ROWS = True  # scripts/bench_linear.py switches it off to time the plain products side by side


def padded_rows(rows: int) -> int:
    """`rows` rounded up to a multiple of 1/8 of its power of two (1 below 16 rows)."""
    step = 1 << max(0, rows.bit_length() - 4)
    return -(-rows // step) * step


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, with the rows padded as the module says where the product runs in bf16 on the CPU."""
    if not PADDED_ROWS or x.device.type != "cpu" or torch.compiler.is_compiling() or not _bf16(x):
        return F.linear(x, weight, bias)  # compiled, inductor lays out the products itself
    rows = math.prod(x.shape[:-1])
    padded = padded_rows(rows)
    if padded == rows:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.size(-1))
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        out = _PaddedLinear.apply(flat, weight, bias, padded)
    else:  # decoding: no graph to record
        out = F.linear(_padded_bf16(flat, padded), weight, bias)[:rows]
    return out.view(*x.shape[:-1], weight.size(0))


def _padded_bf16(x: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows, E) bf16: `x` (n, E) on top, in bf16, and zeros below.

    One pass: the copy also converts to bf16 (autocast would convert `x` in a pass of its own), and only the
    padding is zeroed (`F.pad` fills the whole tensor, then copies `x` over it)."""
    out = x.new_empty((rows, x.size(1)), dtype=torch.bfloat16)
    out[: x.size(0)].copy_(x)
    out[x.size(0) :].zero_()
    return out


class _PaddedLinear(torch.autograd.Function):
    """x W^T + b in bf16 on `padded` rows, the first x.size(0) of them returned, and its gradients.

    Autograd through `F.pad` and the slice did the same products, with three more passes over the rows: the
    pad's fill, the slice's backward into zeros, and a copy of the pad's gradient. Here only the padding is
    zeroed, once in each direction, and x's gradient is a view of the padded one. Training ran 1.06x faster
    side by side on an AMX Xeon (scripts/ab_train.sh; BENCHMARKS.md, "An AMX Xeon, continued").
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padded: int) -> torch.Tensor:
        x_padded = _padded_bf16(x, padded)
        weight = weight.to(torch.bfloat16)
        out = F.linear(x_padded, weight, None if bias is None else bias.to(torch.bfloat16))
        ctx.save_for_backward(x_padded, weight)
        ctx.has_bias = bias is not None
        return out[: x.size(0)]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_padded, weight = ctx.saved_tensors
        grad_padded = _padded_bf16(grad, x_padded.size(0))
        need_x, need_weight, need_bias, _ = ctx.needs_input_grad
        grad_x = (grad_padded @ weight)[: grad.size(0)] if need_x else None
        grad_weight = grad_padded.t() @ x_padded if need_weight else None
        grad_bias = grad.sum(0) if need_bias and ctx.has_bias else None
        return grad_x, grad_weight, grad_bias, None


def _bf16(x: torch.Tensor) -> bool:
    if torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu") == torch.bfloat16
    return x.dtype == torch.bfloat16


class Linear(nn.Linear):
    """`nn.Linear` (same parameters and initialisation) through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
