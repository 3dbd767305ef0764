"""Decoding with the KV cache against recomputing the prefix, as `mt bench` times it, for several decoding batch
sizes and numbers of batches decoded at once (decode.inter_threads) side by side; the ratio the two would reach
if they ran their matrix products equally fast (their multiply-adds, counted step by step); then a
torch.profiler table of our (cached) beam search.

Usage: MT_DATA_PATH=../shared/data python scripts/profile_decode.py --run runs/multi30k
           [--test multi30k:test_2016_flickr] [--batch-tokens 8000 16000 24000] [--inter-threads 1 2] [--beam 5]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from unittest import mock

from torch.profiler import ProfilerActivity, profile

from mt import corpora, search
from mt.config import DecodeConfig
from mt.data import read_corpus
from mt.tokenizer import PAD
from mt.translate import Translator, translate_ids


def multiply_adds(model, sources, decode, amp) -> dict[str, float]:
    """Multiply-adds of one cached decoding of `sources`, step by step, and what recomputing the prefix would
    do instead at the same steps (the two searches take the same steps: their outputs agree).

    Per hypothesis and step, with t tokens so far and S source positions, each decoder layer costs with the
    cache 6d² + 2·d·d_ff for the new position's projections and feed-forward plus 2·t·d + 2·S·d for attention;
    recomputing costs t times the projections and feed-forward, t²·d for causal self-attention, 2·t·S·d for
    cross-attention, and 2·S·d² to project the encoder output into keys and values again. Both pay the
    output projection (d·V) and the encoder; only the cache projects the encoder output once per sentence.
    """
    c = model.config
    d, f, layers, vocab = c.d_model, c.d_ff, c.decoder_layers, model.embed.weight.size(0)
    count = {"cached": 0.0, "recomputed": 0.0, "shared": 0.0}
    step, encode = search.CachedStepper.step, search.encode

    def counting_step(self, history):
        rows, t = history.shape
        S = self.cache.memory_mask.size(-1)
        count["cached"] += rows * layers * (6 * d * d + 2 * d * f + 2 * t * d + 2 * S * d)
        count["recomputed"] += rows * layers * (t * (6 * d * d + 2 * d * f) + t * t * d + 2 * t * S * d + 2 * S * d * d)
        count["shared"] += rows * d * vocab
        return step(self, history)

    def counting_encode(model, src, *args, **kwargs):
        real = int((src != PAD).sum())
        count["shared"] += real * c.encoder_layers * (4 * d * d + 2 * d * f)
        count["cached"] += real * layers * 2 * d * d
        return encode(model, src, *args, **kwargs)

    with mock.patch.object(search.CachedStepper, "step", counting_step), mock.patch.object(search, "encode",
                                                                                         counting_encode):
        translate_ids(model, sources, decode, amp=amp)
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/multi30k")
    parser.add_argument("--test", default="multi30k:test_2016_flickr")
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[8000, 16000, 24000])
    parser.add_argument("--inter-threads", type=int, nargs="+", default=[1, 2],
                        help="decode.inter_threads: batches decoded at once")
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
            for inter_threads in args.inter_threads:
                decode = replace(config.decode, beam_size=beam, batch_tokens=batch_tokens, inter_threads=inter_threads)
                speed = {}
                for use_cache in (True, False):
                    translate_ids(model, sources[:8], decode, use_cache=use_cache, amp=amp)  # warm-up
                    start = time.perf_counter()
                    translate_ids(model, sources, decode, use_cache=use_cache, amp=amp)
                    speed[use_cache] = len(sources) / (time.perf_counter() - start)
                print(f"beam {beam}, decode.batch_tokens {batch_tokens:>6}, inter_threads {inter_threads}: "
                      f"cache {speed[True]:5.0f} sent/s, recompute {speed[False]:4.0f} sent/s, "
                      f"cache ÷ recompute {speed[True] / speed[False]:.2f}×")
    for beam in sorted({1, args.beam}):
        # One batch at a time: the counters below are plain Python sums, not shared safely between threads.
        decode = replace(config.decode, beam_size=beam, batch_tokens=DecodeConfig().batch_tokens, inter_threads=1)
        count = multiply_adds(model, sources, decode, amp)
        cached, recomputed = count["cached"] + count["shared"], count["recomputed"] + count["shared"]
        print(f"beam {beam}: {cached / 1e9:.0f} G multiply-adds with the cache, {recomputed / 1e9:.0f} G recomputing "
              f"({count['shared'] / 1e9:.0f} G of them shared): ratio at equal speed {recomputed / cached:.2f}×")
    # One batch at a time, in this thread: torch.profiler records the operators of the thread that started it.
    decode = replace(config.decode, beam_size=args.beam, batch_tokens=DecodeConfig().batch_tokens,
                     inter_threads=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        translate_ids(model, sources, decode, amp=amp)
    print(f"\nprofile of beam {args.beam} with the KV cache, decode.batch_tokens {decode.batch_tokens}, "
          "one batch at a time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
