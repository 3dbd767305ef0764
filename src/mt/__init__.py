"""mt: train, run and score a French→English Transformer translator.

Importing mt changes nothing in the process: the settings a command needs (threads, the allocator) are made
by the command line's entry point, `mt.cli.main`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from mt import Translator` without importing torch for every `import mt`.
    if name == "Translator":
        from mt.translate import Translator

        return Translator
    raise AttributeError(f"module 'mt' has no attribute {name!r}")
