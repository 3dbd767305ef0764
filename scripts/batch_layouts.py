"""The share of real (non-padding) tokens in training batches, for each batch layout that `make_batches`
chooses from (`mt.data.LAYOUTS`) and for the layouts it chose from before (target-length buckets of widths
1 to 6, sources sorted upwards in every bucket), at several batch sizes, on the config's training data.
Real share = (source + target tokens, each with its EOS) ÷ the batch's padded size; it does not depend on the
machine, so a GPU's step can be planned here.

Usage: MT_DATA_PATH=../shared/data python scripts/batch_layouts.py --config configs/multi30k-gpu.yaml
           [--run RUN] [--batch-tokens 4096 16000 64000 128000]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mt.bench import training_data
from mt.config import load_config
from mt.data import LAYOUTS, _cut, _sorted, batch_layout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--run", type=Path, help="trained run whose tokenizer to use (else one is trained)")
    parser.add_argument("--batch-tokens", type=int, nargs="+", default=[4096, 16000, 64000, 128000])
    args = parser.parse_args()
    config = load_config(args.config)
    data = training_data(config, args.run)
    src, tgt = data.src_len, data.tgt_len
    real = int(src.sum() + tgt.sum() + 2 * len(src))
    noise = np.random.default_rng(config.train.seed).permutation(len(src))
    print(f"{len(src):,} pairs of {config.data.train}; real share of the padded tokens, seed {config.train.seed}")
    print("| batch tokens | batches | before: best target-bucket width | now: chosen layout | now ÷ before |")
    print("| ---: | ---: | --- | --- | ---: |")
    for tokens in args.batch_tokens:
        before = min((_cut(np.lexsort((noise, src, tgt // w)), src, tgt, tokens)[1], w) for w in (1, 2, 3, 4, 6))
        layout = batch_layout(src, tgt, tokens, config.train.seed)
        batches, now = _cut(_sorted(src, tgt, layout, noise), src, tgt, tokens)
        print(f"| {tokens:,} | {len(batches)} | {real / before[0]:.2%} (width {before[1]}) | {real / now:.2%} "
              f"({layout.order}, width {layout.width}) | {before[0] / now:.3f} |")
    shares = {layout: real / _cut(_sorted(src, tgt, layout, noise), src, tgt, args.batch_tokens[-1])[1]
              for layout in LAYOUTS}
    print(f"\nevery layout at {args.batch_tokens[-1]:,} tokens: "
          + ", ".join(f"{k.order} {k.width}: {v:.2%}" for k, v in shares.items()))


if __name__ == "__main__":
    main()
