"""Times decoding with the KV cache with each of mt's CPU decoding levers switched off in turn, side by side in
one process: what each lever buys. The recomputing decoder runs with all levers and with none, for the cache ÷
recompute ratio that `mt bench` reports (the search's top-k and the streams serve both decoders).

Levers: two batches decoded at once (`decode.inter_threads` 2 against 1); top-k from chunk maxima
(`search.top_n` against `Tensor.topk`); softmax of short rows written out (`attention.softmax` against
`Tensor.softmax`); at least 7 keys per cached product (`attention.MIN_KEYS` 7 against none); self-attention
caches stored step by step (`attention._by_step` against head by head, (B, H, L, D) in memory); bf16 products
with their rows padded to few shapes (`mt.linear.PADDED_ROWS` against the rows as they are). The settings
alternate round by round, and each one's fastest round counts.

Usage: MT_DATA_PATH=../shared/data python scripts/decode_levers.py --run runs/multi30k
           [--test multi30k:test_2016_flickr] [--rounds 3] [--inter-threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import replace
from unittest import mock

import torch

from mt import attention, corpora, linear, search
from mt.data import read_corpus
from mt.translate import Translator, length_sorted_batches, translate_ids

LEVERS = {
    "streams": lambda: contextlib.nullcontext(),  # applied through decode.inter_threads below
    "top_n": lambda: mock.patch.object(search, "top_n", lambda x, n: x.topk(n, dim=1)),
    "short-row softmax": lambda: mock.patch.object(attention, "softmax", lambda s: s.softmax(dim=-1)),
    "7 keys": lambda: mock.patch.object(attention, "MIN_KEYS", 0),
    "step-major caches": lambda: mock.patch.object(
        attention, "_by_step", lambda shape, dtype, device: torch.empty(shape, dtype=dtype, device=device)),
    "padded rows": lambda: mock.patch.object(linear, "PADDED_ROWS", False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/multi30k")
    parser.add_argument("--test", default="multi30k:test_2016_flickr")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--inter-threads", type=int, default=2, help="streams when the streams lever is on")
    args = parser.parse_args()
    translator = Translator.load(args.run, device="cpu")
    config = translator.config
    files = corpora.resolve(args.test, config.data.src_lang, config.data.tgt_lang)
    sources = translator.tokenizer.encode(read_corpus(files)[0])
    print(f"{len(sources)} sentences of {args.test}, {torch.get_num_threads()} threads, "
          f"decode.batch_tokens {config.decode.batch_tokens}")
    settings = ["all levers"] + [f"without {lever}" for lever in LEVERS] + ["without any"]
    runs = [(setting, True) for setting in settings] + [("all levers", False), ("without any", False)]
    for beam in (1, 5):
        best: dict[tuple[str, bool], float] = {}
        for round_ in range(args.rounds):
            for setting, use_cache in runs:
                off = (list(LEVERS) if setting == "without any"
                       else [setting.removeprefix("without ")] if setting.startswith("without") else [])
                decode = replace(config.decode, beam_size=beam,
                                 inter_threads=1 if "streams" in off else args.inter_threads)
                with contextlib.ExitStack() as stack:
                    for lever in off:
                        stack.enter_context(LEVERS[lever]())
                    if round_ == 0:
                        translate_ids(translator.model, sources[:8], decode, use_cache=use_cache, amp=translator.amp)
                    start = time.perf_counter()
                    translate_ids(translator.model, sources, decode, use_cache=use_cache, amp=translator.amp)
                    key = (setting, use_cache)
                    best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)
        batches = length_sorted_batches(sources, config.decode.batch_tokens // beam)
        print(f"\n{'greedy' if beam == 1 else f'beam {beam}'}, fastest of {args.rounds} rounds "
              f"(batches of {', '.join(str(len(b)) for b in batches)} sentences):")
        for setting in settings:
            line = f"  {setting:<27} cache {len(sources) / best[setting, True]:5.0f} sent/s"
            if (setting, False) in best:
                line += (f", recompute {len(sources) / best[setting, False]:4.0f} sent/s, "
                         f"cache ÷ recompute {best[setting, False] / best[setting, True]:.2f}×")
            print(line)


if __name__ == "__main__":
    main()
