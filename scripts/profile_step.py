"""Where a training step's time goes: times one update of the config's model with mt's fast paths on and off
(mt.fastpaths), side by side in one process, then prints torch.profiler's table of the operators that took
the most time.

The batch is random token ids of typical sentence lengths, so no corpus is read. The step is `mt train`'s:
the config's precision (`train.precision`, autocast where it is bf16), label-smoothed loss, gradient
clipping and fused AdamW.

Usage: python scripts/profile_step.py [--config configs/multi30k.yaml] [--sentences 120] [--steps 8]
           [--rows 12]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from mt import fastpaths
from mt.config import load_config
from mt.data import collate
from mt.devices import autocast, autocast_dtype, resolve_device
from mt.model import Transformer
from mt.train import loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in one)")
    parser.add_argument("--sentences", type=int, default=120)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=12, help="operators in the profile table")
    args = parser.parse_args()
    config = load_config(args.config)
    device = resolve_device(config)
    amp = autocast_dtype(config.train.precision, device)
    vocab = config.tokenizer.vocab_size
    torch.manual_seed(0)
    src = torch.randint(4, vocab, (args.sentences, 17)).tolist()
    tgt = torch.randint(4, vocab, (args.sentences, 15)).tolist()
    batch = collate(src, tgt).to(device)
    model = Transformer(config.model, vocab).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        with autocast(device, amp):
            loss, _ = loss_fn(model, batch, config.train.label_smoothing)
        (loss / batch.target_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(f"one update: {args.sentences} sentences of 17 -> 15 tokens, {'bf16 autocast' if amp else 'fp32'}, "
          f"{device}, {torch.get_num_threads()} threads; best of 3 rounds of {args.steps} steps each")
    best = {True: float("inf"), False: float("inf")}
    for _ in range(3):  # the two settings alternate, so that both see the machine in the same states
        for enabled in (True, False):
            fastpaths.ENABLED = enabled
            step()  # warm-up
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            best[enabled] = min(best[enabled], (time.perf_counter() - start) / args.steps)
    for enabled in (True, False):
        print(f"fast paths {'on ' if enabled else 'off'}: {best[enabled] * 1000:6.1f} ms/step, "
              f"{batch.target_tokens / best[enabled]:7.0f} target tokens/s")
    print(f"on ÷ off: {best[False] / best[True]:.3f}×")
    fastpaths.ENABLED = True
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if device.type == "cuda" else [])]) as p:
        for _ in range(3):
            step()
    print("\nprofile of 3 updates, fast paths on:")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
