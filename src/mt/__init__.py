"""mt: train, run and score a French→English Transformer translator."""

import os

# oneDNN, which runs torch's bf16 matrix products on the CPU, keeps a compiled kernel for each tensor shape it
# has seen, up to 1024 of them. Translation batches changed shape every step, so that cache held over a
# gigabyte of a training run's memory, and it was capped at 16 kernels. Since `mt.linear` pads the rows of
# those products to a few dozen shapes, 256 kernels hold them: training about 1.13x faster than with 16, for
# about 340 MB more at 4 minutes (scripts/rss_watch.sh, BENCHMARKS.md "An AMX Xeon").
# Set here, before torch's first matrix product; a value the user exported wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")


def _keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed blocks of up to 64 MB instead of handing them back to the OS.

    By default glibc maps a large block fresh at each allocation and returns freed memory at the top of the
    heap, so tensors of a few megabytes made at every training step page-fault their memory in again each
    time. Side by side (`mt bench --seconds 30`, BENCHMARKS.md "Memory"): 6,692 and 6,908 target tokens/s
    with this against 6,593 and 6,250 without, at the same peak RSS. Keeping up to 256 MB free costs at
    most that much memory. Nothing is changed where the C library is not glibc, or where any MALLOC_*
    variable is set (MALLOC_CHECK_=0, which changes nothing by itself, gives glibc's defaults).
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
