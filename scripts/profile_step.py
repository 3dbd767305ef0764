"""Times one training step of the default model under torch's defaults, then adds mt's CPU levers one at a
time, side by side in one process, and prints torch.profiler tables of the first and the last: where a
step's time goes and what each lever buys.

Levers, in order: the SDPA kernel (torch's choice, flash on the CPU, against the math kernel); dropout inside
the feed-forward block (0.2 as in torch's layers, against mt's default 0.0); dropout's mask (`nn.Dropout`'s
Bernoulli draws against `mt.layers.Dropout`'s 16-bit integer ones); the loss's backward pass (autograd through
log-softmax, gather and sum, against `mt.train.SmoothedCrossEntropy`'s written-out softmax - q); AdamW
(foreach against fused).

Usage: python scripts/profile_step.py [--sentences 120] [--steps 8]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import dataclass, replace
from unittest import mock

import torch
from torch import nn

from mt import layers
from mt.config import Config
from mt.data import collate
from mt.model import Transformer
from mt.train import loss_fn


@dataclass(frozen=True)
class Setting:
    name: str
    flash: bool = True
    ff_dropout: float = 0.2
    torch_dropout: bool = True
    autograd_loss: bool = True
    fused_adamw: bool = False


SETTINGS = [
    Setting("torch's defaults"),
    Setting("+ math SDPA kernel", flash=False),
    Setting("+ no feed-forward dropout", flash=False, ff_dropout=0.0),
    Setting("+ 16-bit dropout masks", flash=False, ff_dropout=0.0, torch_dropout=False),
    Setting("+ written-out loss backward", flash=False, ff_dropout=0.0, torch_dropout=False, autograd_loss=False),
    Setting("+ fused AdamW (= mt)", flash=False, ff_dropout=0.0, torch_dropout=False, autograd_loss=False,
            fused_adamw=True),
]


def autograd_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float):
    """The loss as autograd differentiates it: log-softmax, gather, sum (mt's loss before the written-out
    backward)."""
    log_probs = logits.float().log_softmax(dim=-1)
    nll = -log_probs.gather(1, target[:, None]).sum()
    return (1.0 - smoothing) * nll - smoothing * log_probs.mean(dim=-1).sum(), nll.detach()


def build(setting: Setting) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(replace(Config().model, activation_dropout=setting.ff_dropout), 8000)
    if setting.torch_dropout:
        for module in list(model.modules()):
            for name, child in module.named_children():
                if isinstance(child, layers.Dropout):
                    setattr(module, name, nn.Dropout(child.p))
    return model


def patches(setting: Setting) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if setting.flash:  # loss_fn picks the kernel through mt.train.fast_kernels: replace it by "no preference"
        stack.enter_context(mock.patch("mt.train.fast_kernels", lambda device, first="auto": contextlib.nullcontext()))
    if setting.autograd_loss:
        stack.enter_context(mock.patch("mt.train.SmoothedCrossEntropy.apply", autograd_cross_entropy))
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=120)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    src = torch.randint(4, 8000, (args.sentences, 17)).tolist()
    tgt = torch.randint(4, 8000, (args.sentences, 15)).tolist()
    batch = collate(src, tgt)
    print(f"one training step: {args.sentences} sentences of 17 -> 15 tokens, bf16 autocast, "
          f"{torch.get_num_threads()} threads, mean of {args.steps} steps after 3 warm-up steps\n")
    first = previous = None
    for setting in SETTINGS:
        model = build(setting)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=setting.fused_adamw)

        def step(model=model, optimizer=optimizer):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = loss_fn(model, batch, 0.1)
            (loss / batch.target_tokens).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()

        with patches(setting):
            for _ in range(3):
                step()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            seconds = (time.perf_counter() - start) / args.steps
        first, gain = first or seconds, "" if previous is None else f"  {previous / seconds:.2f}× the row above"
        print(f"{setting.name:<30} {seconds * 1000:5.0f} ms/step, {batch.target_tokens / seconds:6.0f} target "
              f"tokens/s{gain}")
        previous = seconds
    print(f"mt ÷ torch's defaults: {first / previous:.2f}×")

    from torch.profiler import ProfilerActivity, profile

    for setting in (SETTINGS[0], SETTINGS[-1]):
        model = build(setting)
        with patches(setting), profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss, _ = loss_fn(model, batch, 0.1)
                (loss / batch.target_tokens).backward()
        print(f"\nprofile of 3 forward + backward passes, {setting.name}:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))


if __name__ == "__main__":
    main()
