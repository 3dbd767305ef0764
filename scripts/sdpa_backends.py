"""Times training and decoding under four sets of `scaled_dot_product_attention` kernels, side by side in
one process: torch's own choice (on Hopper GPUs since torch 2.9, cuDNN first), mt's (`mt.attention.fast_kernels`:
every kernel but cuDNN's on CUDA, the math kernel on the CPU), mt's with the memory-efficient kernel tried
before flash (`train.attention: efficient`; on the CPU, flash), and the math kernel alone (`math`).

cuDNN builds an execution graph for each new shape. Training batches are cut afresh every epoch, so each
round here draws new batches (the next epoch's seed), as training does; all settings see the same batches in
the same round, and alternate. `--no-decode` times training alone.

With `--profile N`, it then runs N training steps (new batches) and one greedy decoding pass under
torch.profiler for each setting, and prints where the time went: the busiest operators on the host and on the
device, and the device's busy share of the wall time (a low share: the host, not the device, sets the pace).
Without `--run`, decoding uses the model this script has trained for a few seconds, which runs every sentence
to its length limit: per-step costs, not real translation speed.

Usage: python scripts/sdpa_backends.py --config configs/multi30k-gpu.yaml [--run runs/multi30k-gpu]
           [--seconds 8] [--rounds 2] [--profile 4] [--no-decode]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from unittest import mock

import torch

from mt import corpora
from mt.attention import fast_kernels
from mt.bench import (
    Row,
    _batch_lengths,
    _default_test,
    _sync,
    _train_step,
    format_table,
    matmul_roof,
    measure_training,
    training_data,
    training_flops,
)
from mt.config import load_config
from mt.data import PairTable, make_batches, read_corpus
from mt.devices import autocast_dtype, resolve_device
from mt.model import Transformer
from mt.train import loss_fn
from mt.translate import Translator, translate_ids

SETTINGS_MT = "mt (fast_kernels)"
# name: the kernel choice that replaces mt's in training and decoding (None: mt's own). On the H100 the flash
# kernel's backward pass took 1.15 ms a call on the decoder's short causal self-attention, the memory-efficient
# kernel's 0.39 ms on the masked ones, and attention's backward 11.6 ms of a 62 ms step; the fused kernels work
# in tiles of 64 or 128 positions, and a sentence is a few dozen tokens (BENCHMARKS.md, "GPU speed"). The
# last two are `train.attention: efficient` and `math`; on the CPU, `efficient` means flash.
SETTINGS = {
    "torch's choice": lambda device: contextlib.nullcontext(),
    SETTINGS_MT: None,
    "memory-efficient first": partial(fast_kernels, first="efficient"),
    "math only": partial(fast_kernels, first="math"),
}


def kernels(choice) -> contextlib.ExitStack:
    """Replaces mt's kernel choice with `choice` in training and decoding (nothing when None)."""
    stack = contextlib.ExitStack()
    if choice is not None:
        for where in ("mt.train.fast_kernels", "mt.translate.fast_kernels"):
            stack.enter_context(mock.patch(where, lambda device, first="auto": choice(device)))
    return stack


def timed(work, device: torch.device) -> float:
    """Wall seconds of `work()`, device work included."""
    _sync(device)
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def profiled(work, device: torch.device, title: str, rows: int = 12) -> None:
    """Runs `work()` under torch.profiler and prints the busiest operators and the device's busy share."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        seconds = timed(work, device)
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CUDA) / 1e6  # kernels
    share = f", device busy {busy:.3f} s ({100 * busy / seconds:.0f} %)" if device.type == "cuda" else ""
    print(f"\n### {title}: {seconds:.3f} s wall{share}")
    keys = ("self_cpu_time_total",) + (("self_device_time_total",) if device.type == "cuda" else ())
    for key in keys:
        print(events.table(sort_by=key, row_limit=rows, max_name_column_width=60))


def decoder(args, config, device: torch.device, amp, data, trainee: Transformer):
    """`translate(beam, use_cache=True)` of the test sentences, with the run's model (else `trainee`), and
    their number."""
    if args.run is not None:
        translator = Translator.load(args.run, device=str(device))
        model, tokenizer, decode, model_amp = (translator.model, translator.tokenizer, translator.config.decode,
                                               translator.amp)
    else:
        model, tokenizer, decode, model_amp = trainee, data.tokenizer, config.decode, amp
    # The run's decoding settings with the batch size of the benchmark's config (a machine setting).
    decode = replace(decode, batch_tokens=config.decode.batch_tokens)
    files = corpora.resolve(_default_test(config), config.data.src_lang, config.data.tgt_lang)
    sources = tokenizer.encode(read_corpus(files)[0][: args.sentences])

    def translate(beam: int, use_cache: bool = True):
        return translate_ids(model, sources, replace(decode, beam_size=beam), use_cache=use_cache, amp=model_amp)

    return translate, len(sources)


def decoding_rows(translate, sentences: int, device: torch.device) -> list[Row]:
    """Decoding under each setting, twice, and the decoder that recomputes the prefix."""
    rows = []
    for beam in (1, 5):
        # Two passes each: in the first, every shape is new (as in a fresh `mt translate`); in the second,
        # cuDNN has its graphs. Then the decoder that recomputes the prefix, with mt's kernels.
        for n in (1, 2):
            for name, choice in SETTINGS.items():
                with kernels(choice):
                    seconds = timed(partial(translate, beam), device)
                rows.append(Row(f"beam {beam}, pass {n}, {name}: {sentences} sentences", seconds, "s"))
        seconds = timed(partial(translate, beam, use_cache=False), device)
        rows.append(Row(f"beam {beam}, recompute prefix, {SETTINGS_MT}: {sentences} sentences", seconds, "s"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="trained run: its tokenizer, and its model for decoding")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed training per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=1000, help="test sentences to decode")
    parser.add_argument("--profile", type=int, default=0, help="training steps to profile per setting")
    parser.add_argument("--no-decode", dest="decode", action="store_false", help="time training only")
    args = parser.parse_args()
    config = load_config(args.config, [])
    device = resolve_device(config)
    amp = autocast_dtype(config, device)
    roof, _ = matmul_roof(device, amp or torch.float32, 8192 if device.type == "cuda" else 2048)
    data = training_data(config, args.run)
    table = PairTable(data.train)
    vocab = data.tokenizer.vocab_size
    torch.manual_seed(config.train.seed)
    trainee = Transformer(config.model, vocab).to(device).train()
    optimizer = torch.optim.AdamW(trainee.parameters(), lr=1e-4, fused=True)
    step = _train_step(trainee, optimizer, lambda m, b: loss_fn(m, b, 0.1)[0], amp, device)  # as mt bench times
    rows = [Row("roof", roof / 1e12, "TFLOP/s", torch.cuda.get_device_name() if device.type == "cuda" else "CPU")]
    for r in range(args.rounds):
        index_batches = make_batches(data.src_len, data.tgt_len, config.train.batch_tokens, config.train.seed + r)
        batches = [table.batch(idx) for idx in index_batches[:400]]
        for name, choice in SETTINGS.items():
            with kernels(choice):
                elapsed, steps, done = measure_training(step, batches, args.seconds, device)
            flops = sum(training_flops(config.model, vocab, *_batch_lengths(b)) for b in done)
            rows.append(Row(f"round {r + 1}, {name}: train target tokens/s",
                            sum(b.target_tokens for b in done) / elapsed, "tok/s",
                            f"{steps} steps, MFU {100 * flops / elapsed / roof:.1f} %"))
    if args.decode:
        translate, sentences = decoder(args, config, device, amp, data, trainee)
        rows += decoding_rows(translate, sentences, device)
    print(format_table(rows))
    if args.profile:
        # The host's share of a step in `mt train`: fetching a batch's rows, padded (scripts/bench_batches.py).
        start = time.perf_counter()
        batches = [table.batch(idx) for idx in
                   make_batches(data.src_len, data.tgt_len, config.train.batch_tokens, config.train.seed + 99)]
        print(f"\nfetched one epoch, {len(batches)} padded batches, in {time.perf_counter() - start:.3f} s")
        for name, choice in SETTINGS.items():
            with kernels(choice):
                chunk = batches[: args.profile]
                batches = batches[args.profile :]
                trainee.train()  # decoding left it in eval mode
                profiled(lambda chunk=chunk: [step(b) for b in chunk], device,
                         f"{len(chunk)} training steps, new shapes, {name}")
                if args.decode:
                    profiled(partial(translate, 1), device, f"greedy decoding of {sentences} sentences, {name}")
        print(format_table(rows))  # again, after the profiles


if __name__ == "__main__":
    main()
