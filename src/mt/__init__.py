"""mt: train, run and score a French→English Transformer translator."""

import os

# oneDNN, which runs torch's bf16 matrix products on the CPU, keeps a compiled kernel for each tensor shape it
# has seen, up to 1024 of them. Translation batches change shape every step, so that cache alone held over a
# gigabyte of a training run's memory; 16 kernels cost no measurable speed (BENCHMARKS.md, "Memory").
# Set here, before torch's first matrix product; a value the user exported wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")


def _keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed blocks of up to 64 MB instead of handing them back to the OS.

    By default a block above 32 MB is mapped fresh on every allocation, and freed memory at the top of the heap
    is returned, so a tensor of a few megabytes made at every decoding step (the (rows, vocabulary) scores)
    page-faults its memory in again each time: beam search spent about 7% of its time there
    (scripts/profile_decode.py, BENCHMARKS.md). Keeping up to 256 MB free costs at most that much memory.
    Nothing is changed where the C library is not glibc, or where the user set MALLOC_* variables.
    """
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        glibc = None
    if not glibc or any(name.startswith("MALLOC_") for name in os.environ):
        return
    import ctypes

    mallopt = ctypes.CDLL(None).mallopt
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 256 << 20)


_keep_freed_memory()

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from mt import Translator` without importing torch for every `import mt`.
    if name == "Translator":
        from mt.translate import Translator

        return Translator
    raise AttributeError(f"module 'mt' has no attribute {name!r}")
