"""mt: train, run and score a French→English Transformer translator."""

import os

# oneDNN, which runs torch's bf16 matrix products on the CPU, keeps a compiled kernel for each tensor shape it
# has seen, up to 1024 of them. Translation batches change shape every step, so that cache alone held over a
# gigabyte of a training run's memory; 16 kernels cost no measurable speed (BENCHMARKS.md, "Memory").
# Set here, before torch's first matrix product; a value the user exported wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from mt import Translator` without importing torch for every `import mt`.
    if name == "Translator":
        from mt.translate import Translator

        return Translator
    raise AttributeError(f"module 'mt' has no attribute {name!r}")
