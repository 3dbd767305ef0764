"""How long torch.compile takes to compile the training step, the whole model against each layer alone.

`train.compile` compiles each encoder and decoder layer (`mt.train.compiled`): one graph per kind of layer
serves every layer of its stack. Compiling the whole model instead traces all its layers into one graph. For
each way, a fresh process with inductor's caches off times the first training update (compilation included),
then the next ones, on random batches of the config's model (a few sentence lengths and batch sizes, so that
dynamic shapes are used as in training), and counts the graphs that dynamo traced.

Usage: python scripts/compile_time.py [--config configs/multi30k-gpu.yaml] [--device auto] [--steps 6]
           [--batch-tokens 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

from mt.bench import _device_name, _sync, _train_step
from mt.config import load_config
from mt.data import collate
from mt.devices import MasterWeights, autocast_dtype, pick_device
from mt.model import Transformer
from mt.train import _WithoutDuckSizing, compiled, loss_fn

WAYS = {
    "whole model": lambda net: _WithoutDuckSizing(torch.compile(net, dynamic=True)),
    "each layer": compiled,
}


def batches(vocab: int, tokens: int, steps: int, seed: int = 0):
    """Random padded batches of about `tokens` target tokens, lengths 8-40, a new shape each step."""
    rng = random.Random(seed)
    for _ in range(steps):
        src_len, tgt_len = rng.randint(8, 40), rng.randint(8, 40)
        rows = max(2, tokens // tgt_len)
        yield collate([[rng.randrange(4, vocab) for _ in range(src_len)] for _ in range(rows)],
                      [[rng.randrange(4, vocab) for _ in range(tgt_len)] for _ in range(rows)])


def measure(args) -> dict:
    """Times the updates of one way of compiling, in this process."""
    config = load_config(args.config)
    device = pick_device(args.device, "--device")
    vocab = config.tokenizer.vocab_size
    torch.manual_seed(0)
    model = Transformer(config.model, vocab).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    master = MasterWeights(model) if config.train.precision == "bf16-weights" else None
    net = WAYS[args.only](master.work if master else model)
    step = _train_step(net, optimizer, lambda m, b: loss_fn(m, b, 0.1, config.train.attention)[0],
                       autocast_dtype(config, device), device, master)
    seconds = []
    for batch in batches(vocab, args.batch_tokens, args.steps):
        start = time.perf_counter()
        step(batch)
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return {"way": args.only, "seconds": seconds,
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"], "device": _device_name(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("configs/multi30k-gpu.yaml"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=6, help="updates per way, the first one compiling")
    parser.add_argument("--batch-tokens", type=int, default=2000, help="target tokens per batch")
    parser.add_argument("--only", choices=WAYS, help=argparse.SUPPRESS)  # the child process's way
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args)), flush=True)
        return
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}  # a cold compilation each time
    print(f"{args.config}, {args.steps} updates of about {args.batch_tokens} target tokens per way")
    print(f"{'compiled':<12} {'graphs':>6}  seconds per update, the first compiling")
    for way in WAYS:
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", way], env=env,
                               capture_output=True, text=True)
        if child.returncode != 0:
            print(f"{way:<12} failed: {child.stderr.strip().splitlines()[-1:]}", flush=True)
            continue
        row = json.loads(child.stdout.splitlines()[-1])
        seconds = " ".join(f"{s:.1f}" for s in row["seconds"])
        print(f"{way:<12} {row['graphs']:>6}  {seconds}  ({row['device']})", flush=True)


if __name__ == "__main__":
    main()
