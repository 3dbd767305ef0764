"""The errors `mt` raises for things the user can fix. The CLI prints them on one line and exits with 2."""

import sys


class MtError(Exception):
    """A problem with the user's input, files or environment, explained in the message."""


class ConfigError(MtError):
    """A config file or `--set` override that is malformed, misspelt or out of range."""


class DataError(MtError):
    """A corpus that cannot be found, read or aligned."""


class CheckpointError(MtError):
    """A run folder or checkpoint that is missing, incomplete or corrupt."""


class Interrupted(MtError):
    """Training stopped on SIGINT or SIGTERM, after saving a checkpoint."""


def out_of_memory(e: BaseException) -> str | None:
    """What to tell the user when `e` says that memory ran out (Python's MemoryError, torch's OutOfMemoryError
    on CUDA, or the RuntimeError of torch's CPU allocator); None for any other error."""
    torch = sys.modules.get("torch")  # not imported for a command that never loads it
    if not (isinstance(e, MemoryError) or (torch is not None and isinstance(e, torch.OutOfMemoryError))
            or "can't allocate memory" in str(e)):
        return None
    # torch's CPU message starts with its C++ source location; what follows the allocator's name says it
    what = " ".join(str(e).split()).rpartition("DefaultCPUAllocator: ")[2] or type(e).__name__
    return (f"out of memory ({what[:200]}); a smaller batch (train.batch_tokens, decode.batch_tokens) or model "
            "(model.d_model, model.d_ff, the layers) may fit")
