"""Decoding with the KV cache against recomputing the prefix, as `mt bench` times it, for several decoding batch
sizes side by side; then a torch.profiler table of our (cached) beam search: where its time goes.

Usage: MT_DATA_PATH=../shared/data python scripts/profile_decode.py --run runs/multi30k
           [--test multi30k:test_2016_flickr] [--batch-tokens 8000 16000 32000] [--beam 5]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from torch.profiler import ProfilerActivity, profile

from mt import corpora
from mt.data import read_corpus
from mt.translate import Translator, translate_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/multi30k")
    parser.add_argument("--test", default="multi30k:test_2016_flickr")
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[8000, 16000, 24000])
    parser.add_argument("--beam", type=int, default=5)
    args = parser.parse_args()
    translator = Translator.load(args.run, device="cpu")
    config = translator.config
    files = corpora.resolve(args.test, config.data.src_lang, config.data.tgt_lang)
    sources = translator.tokenizer.encode(read_corpus(files)[0])
    model, amp = translator.model, translator.amp
    print(f"{len(sources)} sentences of {args.test}, {'bf16 autocast' if amp else 'fp32'}")
    for beam in sorted({1, args.beam}):
        for batch_tokens in args.batch_tokens:
            decode = replace(config.decode, beam_size=beam, batch_tokens=batch_tokens)
            speed = {}
            for use_cache in (True, False):
                translate_ids(model, sources[:8], decode, use_cache=use_cache, amp=amp)  # warm-up
                start = time.perf_counter()
                translate_ids(model, sources, decode, use_cache=use_cache, amp=amp)
                speed[use_cache] = len(sources) / (time.perf_counter() - start)
            print(f"beam {beam}, decode.batch_tokens {batch_tokens:>6}: cache {speed[True]:5.0f} sent/s, "
                  f"recompute {speed[False]:4.0f} sent/s, cache ÷ recompute {speed[True] / speed[False]:.2f}×")
    decode = replace(config.decode, beam_size=args.beam)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        translate_ids(model, sources, decode, amp=amp)
    print(f"\nprofile of beam {args.beam} with the KV cache, decode.batch_tokens {decode.batch_tokens}:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
