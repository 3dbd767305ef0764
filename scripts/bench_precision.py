"""Times training under bf16 autocast (fp32 weights, `train.precision: bf16`) and with bf16 weights and fp32
master weights (`bf16-weights`, `mt.devices.MasterWeights`), side by side in one process, on the config's real
length-bucketed batches: both settings see the same batches in the same round, and alternate, as `mt bench`
times them. With `--compile`, both train through torch.compile (`train.compile`).

It first counts, for one eager step of each, the operators torch dispatches (forward and backward, views
included: `TorchDispatchMode`) and the dtype conversions among them (`aten._to_copy`). On a GPU each non-view
operator is a kernel launch paid for with host time.

Usage: MT_DATA_PATH=../shared/data python scripts/bench_precision.py --config configs/multi30k.yaml
           [--seconds 20] [--rounds 3] [--compile] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mt.bench import (
    COMPILED_WARMUP,
    Row,
    _batch_lengths,
    _train_step,
    format_table,
    matmul_roof,
    measure_training,
    training_data,
    training_flops,
)
from mt.config import Config, load_config
from mt.data import PairTable, make_batches
from mt.devices import MasterWeights, resolve_device
from mt.model import Transformer
from mt.train import compiled, loss_fn

SETTINGS = ("bf16", "bf16-weights")


class CountOps(TorchDispatchMode):
    """Counts the aten operators dispatched while active."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def make_step(config: Config, precision: str, vocab: int, device: torch.device, compile_: bool):
    """A training step as `mt bench` times it, under `precision`."""
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model, vocab).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    master = MasterWeights(model) if precision == "bf16-weights" else None
    trained = master.work if master else model
    net = compiled(trained) if compile_ else trained
    return _train_step(net, optimizer, lambda m, b: loss_fn(m, b, 0.1)[0], torch.bfloat16, device, master)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="trained run whose tokenizer to use")
    parser.add_argument("--seconds", type=float, default=20.0, help="timed training per setting and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="both settings through torch.compile")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    config = load_config(args.config, args.set)
    device = resolve_device(config)
    data = training_data(config, args.run)
    vocab = data.tokenizer.vocab_size
    table = PairTable(data.train)
    index_batches = make_batches(data.src_len, data.tgt_len, config.train.batch_tokens, config.train.seed)
    batches = [table.batch(idx) for idx in index_batches[:400]]
    roof, size = matmul_roof(device, torch.bfloat16, 8192 if device.type == "cuda" else 2048)
    scale, unit = (1e12, "TFLOP/s") if device.type == "cuda" else (1e9, "GFLOP/s")
    rows = [Row(f"roof: {size}² matmul, bfloat16", roof / scale, unit,
                torch.cuda.get_device_name() if device.type == "cuda" else "CPU")]
    steps = {name: make_step(config, name, vocab, device, args.compile) for name in SETTINGS}
    warmup = COMPILED_WARMUP if args.compile else 3
    for name, step in steps.items():
        for batch in batches[:warmup]:
            step(batch)
        with CountOps() as ops:
            step(batches[warmup])
        # Eager even with --compile: torch.compile does not run under a dispatch mode.
        rows.append(Row(f"{name}: operators dispatched in one eager step", sum(ops.counts.values()), "ops",
                        f"{ops.counts['aten._to_copy']} conversions (aten._to_copy)"))
    speed = {name: [] for name in SETTINGS}
    for r in range(args.rounds):
        for name, step in steps.items():
            elapsed, n, done = measure_training(step, batches, args.seconds, device, warmup=0)
            tokens = sum(b.target_tokens for b in done) / elapsed
            flops = sum(training_flops(config.model, vocab, *_batch_lengths(b)) for b in done) / elapsed
            speed[name].append(tokens)
            rows.append(Row(f"round {r + 1}, {name}: train target tokens/s", tokens, "tok/s",
                            f"{n} steps, MFU {100 * flops / roof:.1f} %"))
    best = {name: max(values) for name, values in speed.items()}
    rows.append(Row("speed-up, bf16-weights ÷ bf16 autocast", best["bf16-weights"] / best["bf16"], "×",
                    f"fastest of {args.rounds} alternating rounds each, {config.train.batch_tokens} tokens/batch"
                    f"{', compiled' if args.compile else ''}"))
    print(format_table(rows))


if __name__ == "__main__":
    main()
