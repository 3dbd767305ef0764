"""Times training with the rows of bf16 matrix products padded to few shapes (`mt.linear`) against the rows as
they are, side by side in one process, on the config's real length-bucketed batches.

The two settings alternate round by round; each round both train, each its own copy of one fresh model, on
the same batches, which no earlier round has used: a padded shape seen before is oneDNN's cached kernel, as
in a training run, while a batch seen before would flatter the plain products too. It prints target tokens/s
and model FLOP/s for each round, the total, and the ratio padded ÷ plain, then the peak RSS of the process.

Usage: MT_DATA_PATH=../shared/data python scripts/bench_linear.py --config configs/multi30k.yaml
           [--run runs/multi30k] [--rounds 4] [--batches 30]
"""

from __future__ import annotations

import argparse
import copy
import resource
import time
from pathlib import Path

import torch

from mt import linear
from mt.bench import _batch_lengths, _train_step, training_data, training_flops
from mt.config import load_config
from mt.data import PairTable, make_batches
from mt.devices import autocast_dtype
from mt.model import Transformer
from mt.train import loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="trained run whose tokenizer to use (else one is trained)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", type=int, default=30, help="batches per setting and round")
    args = parser.parse_args()
    config = load_config(args.config)
    device = torch.device("cpu")
    data = training_data(config, args.run)
    vocab = data.tokenizer.vocab_size
    table = PairTable(data.train)
    index_batches = make_batches(data.src_len, data.tgt_len, config.train.batch_tokens, seed=config.train.seed)
    needed = 3 + args.rounds * args.batches
    if len(index_batches) < needed:
        parser.error(f"{len(index_batches)} batches, and {needed} are needed: fewer --rounds or --batches")
    batches = [table.batch(idx) for idx in index_batches[:needed]]
    amp = autocast_dtype(config, device)
    print(f"{args.config}: {args.batches} fresh batches per round, {torch.get_num_threads()} threads, "
          f"autocast {amp}")

    torch.manual_seed(config.train.seed)
    first = Transformer(config.model, vocab).train()
    steps = {}
    for padded in (True, False):
        model = copy.deepcopy(first)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        steps[padded] = _train_step(model, optimizer, lambda m, b: loss_fn(m, b, 0.1, config.train.attention)[0],
                                    amp, device)
    totals = {True: [0.0, 0, 0.0], False: [0.0, 0, 0.0]}  # seconds, target tokens, FLOPs
    for padded in (True, False):  # warm-up: the first steps allocate the optimiser's state
        linear.PADDED_ROWS = padded
        for batch in batches[:3]:
            steps[padded](batch)
    for round_ in range(args.rounds):
        chunk = batches[3 + round_ * args.batches : 3 + (round_ + 1) * args.batches]
        tokens = sum(b.target_tokens for b in chunk)
        flops = sum(training_flops(config.model, vocab, *_batch_lengths(b)) for b in chunk)
        line = []
        for padded in (True, False) if round_ % 2 == 0 else (False, True):
            linear.PADDED_ROWS = padded
            start = time.perf_counter()
            for batch in chunk:
                steps[padded](batch)
            seconds = time.perf_counter() - start
            total = totals[padded]
            total[0], total[1], total[2] = total[0] + seconds, total[1] + tokens, total[2] + flops
            line.append(f"{'padded' if padded else 'plain'} {tokens / seconds:6,.0f} tok/s")
        print(f"round {round_ + 1}: {', '.join(line)}")
    for padded in (True, False):
        seconds, tokens, flops = totals[padded]
        print(f"{'padded rows' if padded else 'plain rows':<12} {tokens / seconds:6,.0f} target tokens/s, "
              f"{flops / seconds / 1e9:4.0f} model GFLOP/s")
    ratio = (totals[True][1] / totals[True][0]) / (totals[False][1] / totals[False][0])
    print(f"padded ÷ plain: {ratio:.2f}×; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} "
          f"GiB (both models)")


if __name__ == "__main__":
    main()
