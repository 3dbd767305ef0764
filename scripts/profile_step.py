"""Times one training step of the default model on a synthetic batch under the CPU settings that matter, side by
side, and prints torch.profiler tables of the slowest and the fastest: where a step's time goes.

Settings compared: the SDPA kernel (PyTorch's choice, i.e. flash on the CPU, against mt's math kernel) and
dropout inside the feed-forward block (0.2 as in torch's layers, against mt's default 0.0).

Usage: python scripts/profile_step.py [--sentences 120] [--steps 8]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import replace
from unittest import mock

import torch

from mt.config import Config
from mt.data import collate
from mt.model import Transformer
from mt.train import loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=120)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    src = torch.randint(4, 8000, (args.sentences, 17)).tolist()
    tgt = torch.randint(4, 8000, (args.sentences, 15)).tolist()
    batch = collate(src, tgt)
    results = {}
    torch_choice = "torch's choice (flash)"
    for kernel in (torch_choice, "math (mt)"):
        for ff_dropout in (0.2, 0.0):
            model = Transformer(replace(Config().model, activation_dropout=ff_dropout), 8000)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            # loss_fn picks the kernel through mt.train.fast_kernels: replace it by "no preference".
            patch = (mock.patch("mt.train.fast_kernels", lambda device: contextlib.nullcontext())
                     if kernel.startswith("torch") else contextlib.nullcontext())

            def step(model=model, optimizer=optimizer):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _ = loss_fn(model, batch, 0.1)
                (loss / batch.target_tokens).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad()

            with patch:
                for _ in range(3):
                    step()
                start = time.perf_counter()
                for _ in range(args.steps):
                    step()
                seconds = (time.perf_counter() - start) / args.steps
            results[(kernel, ff_dropout)] = seconds
            print(f"SDPA kernel {kernel:<24} feed-forward dropout {ff_dropout}: {seconds * 1000:5.0f} ms/step, "
                  f"{batch.target_tokens / seconds:6.0f} target tokens/s")
    slowest, fastest = max(results.values()), min(results.values())
    print(f"fastest ÷ slowest: {slowest / fastest:.2f}×")
    from torch.profiler import ProfilerActivity, profile

    for kernel, ff_dropout in ((torch_choice, 0.2), ("math (mt)", 0.0)):
        model = Transformer(replace(Config().model, activation_dropout=ff_dropout), 8000)
        patch = (mock.patch("mt.train.fast_kernels", lambda device: contextlib.nullcontext())
                 if kernel == torch_choice else contextlib.nullcontext())
        with patch, profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _ = loss_fn(model, batch, 0.1)
                (loss / batch.target_tokens).backward()
        print(f"\nprofile of 3 forward + backward passes, SDPA kernel {kernel}, feed-forward dropout {ff_dropout}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
