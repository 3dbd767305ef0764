"""Times the torch CPU kernels that mt works around, beside the work-around, at decoding's and training's shapes.

1. softmax over rows of fewer than 16 entries (attention to a short prefix or source) against rows of 16,
   and against `mt.attention.softmax`, which writes those rows out;
2. top-k of a sentence's beams x vocabulary candidates: `Tensor.topk` against `mt.search.top_n`;
3. batched one-query products (attention to the cache of each row) with few keys, where torch takes a plain
   loop instead of BLAS (key length x head dim < 400 multiply-adds), against 7 or more keys;
4. one decoding step's attention to a growing KV cache (`mt.attention.cached_attention`) with the cache stored
   head by head, (B, H, L, D) in memory, or step by step, (L, B, H, D) (`KVCache`), on one thread as each
   decoding stream runs. Every call reads another cache, as each layer does, so the keys come from memory,
   not from the CPU's caches;
5. dropout of 4,096 x 256 units (a training batch's sublayer output), forward and backward, fp32 and bf16:
   a mask of uniform floats compared to p (mt's dropout before `3201054`) against `mt.layers.Dropout`'s
   16-bit random integers.

Each figure is the fastest of 5 rounds. Usage: python scripts/bench_kernels.py
"""

from __future__ import annotations

import itertools
import time

import torch

from mt import attention, layers, search


def best_time(fn, calls: int = 50) -> float:
    """Seconds per call: the fastest of 5 rounds of `calls` calls, after a warm-up."""
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("\n1. softmax of 1,000 rows x 4 heads, by row length (us)")
    print(f"{'length':>6}  {'Tensor.softmax':>14}  {'mt softmax':>10}")
    for length in (5, 8, 12, 15, 16, 24):
        scores = torch.randn(1000, 4, 1, length)
        torch_us = best_time(lambda s=scores: s.softmax(dim=-1)) * 1e6
        ours_us = best_time(lambda s=scores: attention.softmax(s)) * 1e6
        print(f"{length:>6}  {torch_us:>14.0f}  {ours_us:>10.0f}")

    print("\n2. best 10 of each sentence's 5 x 8,000 candidates, 16 sentences (us)")
    candidates = torch.randn(16, 5 * 8000)
    topk_us = best_time(lambda: candidates.topk(10, dim=1)) * 1e6
    top_n_us = best_time(lambda: search.top_n(candidates, 10)) * 1e6
    print(f"Tensor.topk {topk_us:.0f}, mt top_n {top_n_us:.0f}: {topk_us / top_n_us:.2f}x")

    print("\n3. one query per row against its cache: 4,000 rows x head dim 64, by key length (us)")
    print(f"{'keys':>4}  {'q @ k^T':>8}  {'w @ v':>8}")
    q = torch.randn(4000, 1, 64)
    for keys in (2, 4, 6, 7, 8, 12):
        k, w = torch.randn(4000, keys, 64), torch.randn(4000, 1, keys)
        qk_us = best_time(lambda k=k: q @ k.transpose(1, 2)) * 1e6
        wv_us = best_time(lambda w=w, k=k: w @ k) * 1e6
        print(f"{keys:>4}  {qk_us:>8.0f}  {wv_us:>8.0f}")

    rows, heads, steps, dim, caches = 1000, 4, 40, 64, 6
    print(f"\n4. attention of {rows:,} rows x {heads} heads to t of {steps} preallocated steps, by layout, "
          "1 thread (us)")
    print(f"{'t':>4}  {'(B, H, L, D)':>12}  {'(L, B, H, D)':>12}  {'ratio':>5}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    q = torch.randn(rows, heads, 1, dim)
    layouts = {"head": lambda: torch.randn(rows, heads, steps, dim),
               "step": lambda: torch.randn(steps, rows, heads, dim).permute(1, 2, 0, 3)}
    kv = {name: [(new(), new()) for _ in range(caches)] for name, new in layouts.items()}
    for t in (7, 15, 25, 40):
        us = {}
        for name, pairs in kv.items():

            def attend(turns=itertools.cycle(pairs), t=t):
                k, v = next(turns)
                return attention.cached_attention(q, k[:, :, :t], v[:, :, :t], None, need_weights=False)

            us[name] = best_time(attend, calls=2 * caches) * 1e6
        print(f"{t:>4}  {us['head']:>12.0f}  {us['step']:>12.0f}  {us['head'] / us['step']:>4.2f}x")
    torch.set_num_threads(threads)

    print("\n5. dropout 0.2 of 4,096 x 256 units, forward and backward (us)")
    dropout = layers.Dropout(0.2)

    def uniform_dropout(x, p=0.2):
        return x * torch.rand(x.shape).ge_(p).mul_(1.0 / (1.0 - p)).to(x.dtype)

    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4096, 256, dtype=dtype, requires_grad=True)
        grad = torch.ones_like(x)
        us = {name: best_time(lambda f=f, x=x, grad=grad: f(x).backward(grad), calls=20) * 1e6
              for name, f in (("uniform", uniform_dropout), ("16-bit", dropout))}
        print(f"{str(dtype).removeprefix('torch.'):>8}: uniform floats {us['uniform']:.0f}, 16-bit integers "
              f"{us['16-bit']:.0f}: {us['uniform'] / us['16-bit']:.2f}x")


if __name__ == "__main__":
    main()
