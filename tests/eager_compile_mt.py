"""`python -m mt` with torch.compile's backend set to "eager" (dynamo's tracing, without inductor's code
generation, which takes a minute on a CPU), for tests that train compiled in another process (torchrun).
At exit it writes the number of graphs dynamo traced to `graphs.RANK` in the working folder."""

import atexit
import functools
import os
from pathlib import Path

import torch

from mt.cli import main


@atexit.register
def _count_graphs() -> None:
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    Path(f"graphs.{os.environ.get('RANK', '0')}").write_text(f"{graphs}\n")


torch.compile = functools.partial(torch.compile, backend="eager")  # looked up by mt.fastpaths when it compiles
main()
