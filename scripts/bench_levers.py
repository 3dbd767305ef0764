"""Times training of the config's model under several settings, one after the other in one process, on the same
data and the same length-bucketed batches, as `mt bench` times ours: target tokens/s, the real share of the
tokens, MFU against one roof measured at the start, peak memory, and each setting's ratio to the first one
measured.

A setting is a name and config overrides, "NAME: KEY=VALUE KEY=VALUE" ("NAME:" alone: the config as it is);
only `train.` and `model.` keys, since all settings share one tokenizer. Once `--budget` seconds are spent, no
new setting starts; the first setting then runs again, whatever the budget: its two runs show how much the
machine drifted in between. Each setting traces afresh (`torch._dynamo.reset()`): none reuses another's
graphs, which also hold the attention kernels chosen when they were traced (inductor's cache of compiled
kernels on disk may still spare a later setting some compilation time). A setting that fails (out of
memory, say) gets a row that says why, and the others go on.

`--best FILE` writes the overrides of the setting with the highest MFU so far to FILE, one KEY=VALUE per line,
after each setting, for the next command (scripts/gpu_check.sh runs `mt bench` with them).

Usage: MT_DATA_PATH=../shared/data python scripts/bench_levers.py --config configs/multi30k-gpu.yaml
           --setting "eager:" --setting "math: train.attention=math" [--seconds 6] [--budget 240] [--run RUN]
           [--best FILE]
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
from pathlib import Path

import torch

from mt.bench import Row, _device_name, _free, format_table, matmul_roof, train_ours, training_data
from mt.config import Config, apply_override, load_config
from mt.data import PairTable, make_batches
from mt.devices import autocast_dtype, resolve_device, training_precision
from mt.errors import MtError


def parse_setting(text: str, config: Config) -> tuple[str, list[str], Config]:
    """("NAME", overrides, config with them) from "NAME: KEY=VALUE ..."."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise ValueError(f"expected 'NAME: KEY=VALUE ...', got {text!r}")
    overrides = rest.split()
    for override in overrides:
        if not override.startswith(("train.", "model.")):
            raise ValueError(f"{text!r}: only train. and model. keys can differ between settings, got {override}")
        config = apply_override(config, override)
    return name.strip(), overrides, config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="trained run whose tokenizer to use (else one is trained)")
    parser.add_argument("--setting", action="append", required=True, help="'NAME: KEY=VALUE ...' (repeatable)")
    parser.add_argument("--seconds", type=float, default=6.0, help="timed training per setting")
    parser.add_argument("--best", type=Path, help="write the overrides of the setting with the highest MFU here")
    parser.add_argument("--budget", type=float, default=math.inf,
                        help="seconds after which no new setting starts (the first one's rerun still runs)")
    args = parser.parse_args()
    start = time.perf_counter()
    base = load_config(args.config)
    try:
        settings = [parse_setting(text, base) for text in args.setting]
    except (ValueError, MtError) as e:
        parser.error(str(e))
    device = resolve_device(base)
    amp = autocast_dtype(base, device)
    if any(autocast_dtype(config, device) != amp for _, _, config in settings):
        parser.error("all settings must train in the dtype of the roof (train.precision fp32 against bf16 is not "
                     "a lever this script compares)")
    roof, size = matmul_roof(device, amp or torch.float32, 8192 if device.type == "cuda" else 2048)
    scale, unit = (1e12, "TFLOP/s") if device.type == "cuda" else (1e9, "GFLOP/s")
    rows = [Row(f"roof: {size}² matmul, {str(amp or torch.float32).removeprefix('torch.')}", roof / scale, unit,
                _device_name(device))]
    data = training_data(base, args.run)
    vocab = data.tokenizer.vocab_size
    table = PairTable(data.train)
    batches: dict[tuple[int, int], list] = {}  # (batch_tokens, seed): the first 400 batches, as mt bench cuts them
    mfu: dict[str, float] = {}  # of the settings measured, in order
    best: tuple[float, str, list[str]] | None = None
    runs = [(*setting, False) for setting in settings] + [(f"{settings[0][0]}, again", *settings[0][1:], True)]
    for name, overrides, config, rerun in runs:
        if time.perf_counter() - start > args.budget and not rerun:
            rows.append(Row(f"{name}: MFU", math.nan, "", f"skipped: {args.budget:.0f} s spent"))
            continue
        tc = config.train
        if (tc.batch_tokens, tc.seed) not in batches:
            index = make_batches(data.src_len, data.tgt_len, tc.batch_tokens, seed=tc.seed)
            batches[tc.batch_tokens, tc.seed] = [table.batch(idx) for idx in index[:400]]
        torch._dynamo.reset()
        try:
            ours = train_ours(config, vocab, batches[tc.batch_tokens, tc.seed], args.seconds, device)
        except Exception as e:  # a lever that breaks is a result too; the other settings still run
            traceback.print_exc()
            rows.append(Row(f"{name}: MFU", math.nan, "", f"failed: {type(e).__name__}: {str(e)[:200]}"))
            failed = True
        else:
            failed = False
        if failed:  # out of the except block: the exception no longer holds the step's tensors
            _free(device)
            continue
        mfu[name] = 100 * ours.flops / roof
        baseline = next(iter(mfu))  # the first setting measured
        rows += [
            Row(f"{name}: target tokens/s", ours.tokens, "tok/s",
                f"{ours.steps} steps, {tc.batch_tokens} tokens/batch, {training_precision(config, amp)}, "
                f"attention {tc.attention}{f', compiled ({ours.warmup} warm-up steps)' if tc.compile else ''}; "
                f"{' '.join(overrides) or 'the config as it is'}"),
            Row(f"{name}: MFU", mfu[name], "%", f"{ours.real_share:.1%} real tokens, "
                f"peak {ours.peak / 2**30:.2f} GiB {'allocated' if device.type == 'cuda' else 'RSS so far'}"),
            Row(f"{name}: MFU ÷ {baseline}'s", mfu[name] / mfu[baseline], "×"),
        ]
        print(format_table(rows[-3:]), flush=True)  # as it goes: a time limit may stop the script
        if not rerun and (best is None or mfu[name] > best[0]):
            best = (mfu[name], name, overrides)
            if args.best:  # so far: also after a time limit
                args.best.write_text("".join(f"{o}\n" for o in overrides))
    print(f"\n{format_table(rows)}")
    if best is not None:
        print(f"highest MFU: {best[1]}, {best[0]:.2f} %: {' '.join(best[2]) or 'the config as it is'}")


if __name__ == "__main__":
    main()
