"""Where and in what precision `mt` computes: the device, and bf16 autocast where it is faster.

bf16 autocast is used on CUDA and on CPUs that multiply bf16 natively (AVX512-BF16 or AMX): measured on a
2-core AMD EPYC with AVX512-BF16, a training step is about 1.45x faster and beam search 1.49x faster with the
same BLEU (scripts/decode_precision.py: 52.30 vs 52.31 on test_2016_flickr; see BENCHMARKS.md). Weights stay
fp32; autocast computes matrix products in bf16.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from mt.config import Config
from mt.errors import ConfigError


def resolve_device(config: Config) -> torch.device:
    """The device `train.device` asks for (`auto`: CUDA when present)."""
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast trains faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `dtype` is given, else nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
