"""Where and in what precision `mt` computes: the device, and bf16 autocast where it is faster.

bf16 autocast is used on CUDA and on CPUs that multiply bf16 natively (AVX512-BF16 or AMX), where it trains
and decodes faster with the same BLEU (BENCHMARKS.md). Weights stay fp32; autocast computes matrix products
in bf16. Elsewhere a CPU has no bf16 instructions, and fp32 is much faster.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import re
from pathlib import Path

import torch

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
    return device.type == "cpu" and config.train.precision == "bf16" and not cpu_has_bf16()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype that `precision` (`train.precision`, `decode.precision`) asks for on `device`, or
    None for plain fp32; `auto` is bf16 on CUDA and on CPUs with bf16 instructions."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def training_precision(config: Config, amp: torch.dtype | None) -> str:
    """How training computes, in words, for the log and `mt bench`."""
    return "bf16 autocast" if amp else "fp32"


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device` when `dtype` is given, else nothing."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
