"""Beam search on a test set in fp32 and under bf16 autocast, side by side: sentences/s and BLEU.

Usage: MT_DATA_PATH=../shared/data python scripts/decode_precision.py --run runs/multi30k [--test NAME:SPLIT]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch

from mt import corpora
from mt.data import read_corpus
from mt.evaluate import bleu
from mt.translate import Translator, translate_ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--test", default="multi30k:test_2016_flickr")
    parser.add_argument("--beam", type=int, default=5)
    args = parser.parse_args()
    translator = Translator.load(args.run, device="cpu")
    sources, references = read_corpus(corpora.resolve(args.test))
    ids = translator.encode(sources)
    decode = replace(translator.config.decode, beam_size=args.beam, length_penalty=1.0)
    for name, amp in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        translate_ids(translator.model, ids[:16], decode, amp=amp)  # warm-up
        start = time.perf_counter()
        hyps = translate_ids(translator.model, ids, decode, amp=amp)
        seconds = time.perf_counter() - start
        score = bleu(translator.tokenizer.decode([h[0].tokens for h in hyps]), references)
        print(f"{name:<14} beam {args.beam}: {len(ids) / seconds:6.1f} sentences/s, BLEU {score:.2f} ({args.test})")


if __name__ == "__main__":
    main()
