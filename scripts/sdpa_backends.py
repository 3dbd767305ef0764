"""Times training and decoding under two sets of `scaled_dot_product_attention` kernels, side by side in one
process: torch's own choice (on Hopper GPUs since torch 2.9, cuDNN first) against mt's
(`mt.attention.fast_kernels`: every kernel but cuDNN's on CUDA, the math kernel on the CPU).

cuDNN builds an execution graph for each new shape. Training batches are cut afresh every epoch, so each
round here draws new batches (the next epoch's seed), as training does; both settings see the same batches in
the same round, and alternate.

Usage: python scripts/sdpa_backends.py --config configs/multi30k-gpu.yaml [--run runs/multi30k-gpu]
           [--seconds 8] [--rounds 2]
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
from mt.data import collate, make_batches, read_corpus
from mt.devices import autocast_dtype, resolve_device
from mt.model import Transformer
from mt.train import loss_fn
from mt.translate import Translator, translate_ids

SETTINGS = {"torch's choice": True, "mt (fast_kernels)": False}  # name: whether torch chooses


def torch_chooses() -> contextlib.ExitStack:
    """Replaces mt's kernel choice with torch's own in training and decoding."""
    stack = contextlib.ExitStack()
    for where in ("mt.train.fast_kernels", "mt.translate.fast_kernels"):
        stack.enter_context(mock.patch(where, lambda device: contextlib.nullcontext()))
    return stack


def timed(work, device: torch.device) -> float:
    """Wall seconds of `work()`, device work included."""
    _sync(device)
    start = time.perf_counter()
    work()
    _sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="trained run: its tokenizer, and its model for decoding")
    parser.add_argument("--seconds", type=float, default=8.0, help="timed training per setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sentences", type=int, default=1000, help="test sentences to decode")
    args = parser.parse_args()
    config = load_config(args.config, [])
    device = resolve_device(config)
    amp = autocast_dtype(config, device)
    roof = matmul_roof(device, amp or torch.float32, 8192 if device.type == "cuda" else 2048)
    data = training_data(config, args.run)
    rows_data = data.train.with_format(None, columns=["src_ids", "tgt_ids"])
    vocab = data.tokenizer.vocab_size
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model, vocab).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    step = _train_step(model, optimizer, lambda m, b: loss_fn(m, b, 0.1)[0], amp, device)  # as mt bench times
    rows = [Row("roof", roof / 1e12, "TFLOP/s", torch.cuda.get_device_name() if device.type == "cuda" else "CPU")]
    for r in range(args.rounds):
        index_batches = make_batches(data.src_len, data.tgt_len, config.train.batch_tokens, config.train.seed + r)
        batches = [collate(rows_data[idx]["src_ids"], rows_data[idx]["tgt_ids"]) for idx in index_batches[:400]]
        for name, torch_choice in SETTINGS.items():
            with torch_chooses() if torch_choice else contextlib.nullcontext():
                elapsed, steps, done = measure_training(step, batches, args.seconds, device)
            flops = sum(training_flops(config.model, vocab, *_batch_lengths(b)) for b in done)
            rows.append(Row(f"round {r + 1}, {name}: train target tokens/s",
                            sum(b.target_tokens for b in done) / elapsed, "tok/s",
                            f"{steps} steps, MFU {100 * flops / elapsed / roof:.1f} %"))
    if args.run is not None:
        translator = Translator.load(args.run, device=str(device))
        files = corpora.resolve(_default_test(config), config.data.src_lang, config.data.tgt_lang)
        sources = translator.tokenizer.encode(read_corpus(files)[0][: args.sentences])
        for beam in (1, 5):
            decode = replace(translator.config.decode, beam_size=beam)
            # Two passes each: in the first, every shape is new (as in a fresh `mt translate`); in the second,
            # cuDNN has its graphs.
            for n in (1, 2):
                for name, torch_choice in SETTINGS.items():
                    with torch_chooses() if torch_choice else contextlib.nullcontext():
                        seconds = timed(partial(translate_ids, translator.model, sources, decode,
                                                amp=translator.amp), device)
                    rows.append(Row(f"beam {beam}, pass {n}, {name}: {len(sources)} sentences", seconds, "s"))
    print(format_table(rows))


if __name__ == "__main__":
    main()
