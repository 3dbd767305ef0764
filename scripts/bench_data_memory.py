"""Peak memory of data preparation on a large synthetic corpus (issue: corpora larger than memory).

Builds N pairs by repeating the real Multi30k training pairs (each made unique with its number, so that
de-duplication keeps them), then runs `mt`'s data preparation (streaming read into Arrow, cleaning,
tokenizer training on a sample, tokenization, filtering, lengths) in a child process, and prints that
process's peak RSS and the time taken.

Usage: MT_DATA_PATH=../shared/data python scripts/bench_data_memory.py [--pairs 5000000] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mt import corpora
from mt.data import read_pairs

CHILD = """
import json, resource, sys, threading, time
from pathlib import Path
from mt.config import load_config
from mt.train import prepare_data

peak_anon = 0
def sample():  # RssAnon: memory of the process's own, not pages of memory-mapped files the OS can drop
    global peak_anon
    while True:
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon = max(peak_anon, int(line.split()[1]))
        time.sleep(0.1)
threading.Thread(target=sample, daemon=True).start()
config = load_config(None, sys.argv[2:])
start = time.perf_counter()
data = prepare_data(config, Path(sys.argv[1]))
print(json.dumps({"pairs": len(data.train), "seconds": time.perf_counter() - start,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_anon_mib": peak_anon / 1024}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5_000_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokenizer-sample", type=int, default=200_000,
                        help="sentences the tokenizer trains on (tokenizer.sample_sentences)")
    parser.add_argument("--keep", help="write the corpus here and keep it (default: a temporary folder)")
    args = parser.parse_args()
    src, tgt = read_pairs(corpora.resolve("multi30k:train"))
    folder = Path(args.keep or tempfile.mkdtemp(prefix="mt-big-"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(folder / "big.fr", "w", encoding="utf-8") as f_src, \
            open(folder / "big.en", "w", encoding="utf-8") as f_tgt:
        for i in range(args.pairs):
            j = i % len(src)
            f_src.write(f"{src[j]} ({i})\n")
            f_tgt.write(f"{tgt[j]} ({i})\n")
    size = sum((folder / n).stat().st_size for n in ("big.fr", "big.en")) / 2**20
    print(f"wrote {args.pairs:,} pairs ({size:,.0f} MiB) in {time.perf_counter() - started:.0f} s to {folder}")
    run_dir = folder / "run"
    run_dir.mkdir(exist_ok=True)
    overrides = [f"data.train={{src: {folder / 'big.fr'}, tgt: {folder / 'big.en'}}}", f"data.workers={args.workers}",
                 f"tokenizer.sample_sentences={args.tokenizer_sample}"]
    # The corpus's Arrow copy (GBs) goes to a datasets cache in the folder, removed with it unless --keep.
    env = {**os.environ, "HF_DATASETS_CACHE": str(folder / "hf-cache")}
    try:
        result = subprocess.run([sys.executable, "-c", CHILD, str(run_dir), *overrides], capture_output=True,
                                text=True, env=env)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if result.returncode != 0:
        print(result.stderr[-3000:])
        return 1
    report = json.loads(result.stdout.strip().splitlines()[-1])
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"data preparation of {report['pairs']:,} pairs: {report['seconds']:.0f} s; peak RSS "
          f"{report['peak_rss_mib']:,.0f} MiB, of which memory of its own (RssAnon, sampled every 0.1 s) at most "
          f"{report['peak_anon_mib']:,.0f} MiB, the rest pages of memory-mapped Arrow files; largest child "
          f"process, tokenizing workers included: {children:,.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
