"""Where a training step's time goes: times one update of the config's model with mt's fast paths on and off
(mt.fastpaths), side by side in one process, then prints torch.profiler's table of the operators that took
the most time.

The batch is random token ids of typical sentence lengths, so no corpus is read. The step is `mt train`'s:
the config's precision (`train.precision`, autocast where it is bf16), label-smoothed loss, gradient
clipping and fused AdamW.

`--decode --run RUN` profiles beam-5 decoding of RUN's test set instead, in one stream: sentences/s over
`--sentences` sentences (2 rounds), one new batch of 32 sentences decoded three times (the first pays for
shapes seen for the first time), then the profile of one pass. It uses only `Translator`, `translate_ids`
and `mt.corpora.resolve`, so older commits run it too (PYTHONPATH=their src).

Usage: python scripts/profile_step.py [--config configs/multi30k.yaml] [--sentences 120] [--steps 8]
           [--rows 12]
       MT_DATA_PATH=... python scripts/profile_step.py --decode --run runs/multi30k [--sentences 500]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML config (default: the built-in one)")
    parser.add_argument("--sentences", type=int, default=120)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=12, help="operators in the profile table")
    parser.add_argument("--decode", action="store_true", help="profile beam-5 decoding of --run instead")
    parser.add_argument("--run", help="the trained run that --decode decodes with")
    args = parser.parse_args()
    if args.decode:
        if not args.run:
            parser.error("--decode needs --run RUN")
        return profile_decoding(args)
    from mt import fastpaths
    from mt.config import load_config
    from mt.data import collate
    from mt.devices import autocast, autocast_dtype, resolve_device
    from mt.model import Transformer
    from mt.train import loss_fn

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


def profile_decoding(args) -> None:
    from dataclasses import replace

    from mt.corpora import resolve
    from mt.data import read_lines
    from mt.translate import Translator, translate_ids

    try:
        from mt.cli import configure_process  # the settings the mt command runs with
    except ImportError:  # an older commit made them on import
        pass
    else:
        configure_process()
    translator = Translator.load(args.run, device="cpu")
    amp = getattr(translator, "amp", None)
    lines = read_lines(resolve(translator.config.data.test).src)
    sources = translator.encode(lines[: args.sentences])
    fresh = translator.encode(lines[args.sentences : args.sentences + 32])  # not decoded before
    decode = replace(translator.config.decode, beam_size=5, inter_threads=1)
    print(f"beam 5, one stream, {amp or 'fp32'}, {torch.get_num_threads()} threads, {args.run}")
    translate_ids(translator.model, sources[:8], decode, amp=amp)  # warm-up
    for round_ in (1, 2):
        start = time.perf_counter()
        translate_ids(translator.model, sources, decode, amp=amp)
        print(f"round {round_}: {len(sources) / (time.perf_counter() - start):.1f} sent/s ({len(sources)} sentences)")
    for time_ in (1, 2, 3):
        start = time.perf_counter()
        translate_ids(translator.model, fresh, decode, amp=amp)
        print(f"the same 32 new sentences, time {time_}: {len(fresh) / (time.perf_counter() - start):.1f} sent/s")
    with profile(activities=[ProfilerActivity.CPU]) as p:
        translate_ids(translator.model, sources, decode, amp=amp)
    print(f"\nprofile of one pass over {len(sources)} sentences:")
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
