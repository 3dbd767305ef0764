"""Files written whole or not at all: a kill, a full disk or a read-only folder leaves the old file as it was,
and the error names the file."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mt.errors import MtError

_UMASK = os.umask(0o022)  # read once, at import (setting and restoring it is not thread-safe)
os.umask(_UMASK)


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Calls `write` on a temporary file beside `path`, flushes it to disk, then renames it over `path`.

    Raises:
        MtError: naming the file, the reason and the free space on its disk, if it cannot be written; `path`
            is then as it was and no temporary file is left.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise MtError(f"cannot write {path}: {e.strerror}") from None
    with contextlib.suppress(OSError):  # mkstemp makes it private; give it the permissions open() gives
        os.fchmod(fd, 0o666 & ~_UMASK)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, OSError | RuntimeError):  # torch.save reports a full disk as a RuntimeError
            raise
        raise MtError(f"cannot write {path}: {_reason(e)} ({free_mib(path.parent):,.0f} MiB free on its disk); "
                      f"{path.name} is left as it was") from None


def write_bytes(path: Path, data: bytes) -> None:
    """`data` written to `path` by `write_atomically`."""
    write_atomically(path, lambda f: f.write(data))


def free_mib(folder: Path) -> float:
    return shutil.disk_usage(folder).free / 2**20


def _reason(e: OSError | RuntimeError) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if re.search(r"unexpected pos|failed writing|file write failed", str(e)):  # torch.save's words for a short write
        return "the write was cut short: is the disk full?"
    # torch's own message, less the C++ source location it starts with
    return "torch.save failed: " + re.sub(r"^\[enforce fail at [^]]*\][\s.]*", "", " ".join(str(e).split()))
