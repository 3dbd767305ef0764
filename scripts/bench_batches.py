"""Times the host's share of a training step, side by side in one process: fetching one epoch of a config's
training batches by row indices and padding them, three ways that must give identical batches:

1. `datasets`' row access through an index mapping, then `mt.data.collate`: how `mt train` did it before
   `PairTable` (`filter_pairs` left the `select` of the kept pairs as a mapping; here a reversed `select`
   makes one);
2. the same without the mapping (`filter_pairs` now writes the kept pairs out);
3. `mt.data.PairTable.batch`: Arrow `take` on the columns, padded from the flat values, no Python lists.

Usage: python scripts/bench_batches.py --config configs/multi30k-gpu.yaml [--rounds 3]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import torch

from mt.bench import training_data
from mt.config import load_config
from mt.data import Batch, PairTable, collate, make_batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3, help="epochs timed per way; the fastest counts")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    config = load_config(args.config, args.set)
    data = training_data(config, None)
    n = len(data.train)
    rows = data.train.with_format(None, columns=["src_ids", "tgt_ids"])
    mapped = data.train.select(range(n - 1, -1, -1)).with_format(None, columns=["src_ids", "tgt_ids"])
    table = PairTable(data.train)

    def padded(fetched) -> Batch:
        return collate(fetched["src_ids"], fetched["tgt_ids"])

    ways = {
        "mapped rows + collate": lambda idx: padded(mapped[(n - 1 - idx).tolist()]),
        "rows + collate": lambda idx: padded(rows[idx]),
        "PairTable.batch": table.batch,
    }
    best = dict.fromkeys(ways, float("inf"))
    for r in range(args.rounds):
        batches = make_batches(data.src_len, data.tgt_len, config.train.batch_tokens, config.train.seed + r)
        outputs = {}
        for name, fetch in ways.items():  # alternating, so that both see the machine in the same states
            start = time.perf_counter()
            outputs[name] = [fetch(idx) for idx in batches]
            best[name] = min(best[name], (time.perf_counter() - start) / len(batches))
        for same in zip(*outputs.values(), strict=True):
            assert all(torch.equal(getattr(a, f), getattr(b, f)) for a, b in itertools.pairwise(same)
                       for f in ("src", "tgt_in", "tgt_out", "real"))
    print(f"{config.name}: {len(data.src_len)} pairs, {len(batches)} batches of about {config.train.batch_tokens} "
          f"tokens, {torch.get_num_threads()} threads; fastest of {args.rounds} epochs; outputs identical")
    for name, seconds in best.items():
        print(f"{name:<25} {seconds * 1000:7.2f} ms per batch")
    first, *_, last = best.values()
    print(f"speed-up, PairTable ÷ mapped rows + collate: {first / last:.2f}×")


if __name__ == "__main__":
    main()
