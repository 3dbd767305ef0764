"""Where and in what precision `mt` computes: the device, and bf16 autocast where it is faster.

bf16 autocast is used on CUDA and on CPUs that multiply bf16 natively (AVX512-BF16 or AMX): measured on a
2-core AMD EPYC with AVX512-BF16, a training step is about 1.45x faster and beam search 1.49x faster with the
same BLEU (scripts/decode_precision.py: 52.30 vs 52.31 on test_2016_flickr; see BENCHMARKS.md). Weights stay
fp32; autocast computes matrix products in bf16.

`train.precision: bf16-weights` trains a bf16 copy of the model instead (`MasterWeights`).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import re
from pathlib import Path

import torch
from torch import nn

from mt.config import Config
from mt.errors import ConfigError


def resolve_device(config: Config) -> torch.device:
    """The device `train.device` asks for (`auto`: CUDA when present)."""
    return pick_device(config.train.device, "train.device")


def pick_device(wanted: str, key: str) -> torch.device:
    """The device `wanted` names: `auto` (CUDA when present), `cpu`, `cuda` or `cuda:N`.

    Raises:
        ConfigError: naming `key`, for another name or a CUDA device this machine does not have.
    """
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", wanted):
        raise ConfigError(f"{key} must be auto, cpu, cuda or cuda:N, got {wanted!r}")
    device = torch.device(wanted)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key} is {wanted!r} but no CUDA device is available; use 'auto' or 'cpu'")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{key} is {wanted!r} but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast trains faster."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_vector_set() -> str:
    """The widest vector instructions this CPU has, in words ("AMX", "AVX512-BF16", "AVX-512", "AVX2", ...)."""
    flags = cpu_flags()
    names = {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16", "avx512f": "AVX-512", "avx2": "AVX2"}
    return next((name for flag, name in names.items() if flag in flags), "no AVX2")


@functools.cache
def cpu_info() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ("model name", "flags", ...); empty where there is none."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in itertools.takewhile(str.strip, lines):
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of /proc/cpuinfo; empty where there is none."""
    return frozenset(cpu_info().get("flags", "").split())


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    return cpu_info().get("model name", "CPU")


def bf16_without_instructions(config: Config, device: torch.device) -> bool:
    """Whether `train.precision` asks for bf16 on a CPU that has no bf16 instructions: there its bf16 matrix
    products run in plain loops, hundreds of times slower than fp32 (`mt.bench.matmul_roof`)."""
    return device.type == "cpu" and config.train.precision in ("bf16", "bf16-weights") and not cpu_has_bf16()


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32. With `bf16-weights`, validation and decoding use bf16
    autocast on the fp32 weights, while training runs on the bf16 copy without autocast (`MasterWeights`)."""
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"
    return torch.bfloat16 if precision in ("bf16", "bf16-weights") else None


def training_precision(config: Config, amp: torch.dtype | None) -> str:
    """How training computes, in words, for the log and `mt bench`."""
    if config.train.precision == "bf16-weights":
        return "bf16 weights, fp32 master weights"
    return "bf16 autocast" if amp else "fp32"


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `dtype` is given, else nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class MasterWeights:
    """Training on a bf16 copy of the model, with the fp32 model as the optimizer's master weights
    (`train.precision: bf16-weights`; fairseq's `--bf16`, Micikevicius et al., 2018).

    Under autocast the weights stay fp32, and every step converts them, the activations entering each matrix
    product and their gradients between fp32 and bf16: counted on the CPU, a training step of the GPU config
    dispatches 3,400 operators, 564 of them conversions, each a kernel launch on a GPU; with bf16 weights,
    3,034 and 196 before the CPU-only fp32 paths of `mt.layers.LayerNorm` and `Transformer.embed_tokens` were
    added (scripts/bench_precision.py, BENCHMARKS.md).

    Here the forward and backward passes run on `work`, whose weights and activations are bf16 (layer norm
    and softmax compute in fp32 inside their kernels); the optimizer updates the fp32 model given, which
    checkpoints, validation and decoding use as before. A step costs two multi-tensor copies: the gradients to
    the master (`grads_to_master`), and the updated weights back (`weights_to_work`). Gradients are summed in
    bf16 where batches add up: over the batches of an update (`train.accumulate`), and over the ranks of
    data-parallel training (DDP's all-reduce).
    """

    def __init__(self, model: nn.Module):
        self.work = copy.deepcopy(model).to(torch.bfloat16)
        self._master = list(model.parameters())
        self._work = list(self.work.parameters())
        self._grads = [torch.zeros_like(p) for p in self._master]

    def grads_to_master(self) -> None:
        """Sets the master weights' gradients (fp32) to the working copy's, and clears the latter. A weight
        without a gradient gets none, as the optimizer expects of an unused weight."""
        have = [i for i, w in enumerate(self._work) if w.grad is not None]
        torch._foreach_copy_([self._grads[i] for i in have], [self._work[i].grad for i in have])
        for master, grad, work in zip(self._master, self._grads, self._work, strict=True):
            master.grad, work.grad = (grad if work.grad is not None else None), None

    @torch.no_grad()
    def weights_to_work(self) -> None:
        """Copies the master weights into the working copy: after each update, and after loading a checkpoint."""
        torch._foreach_copy_(self._work, self._master)
