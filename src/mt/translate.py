"""Batched translation with a trained model, and `Translator`, which loads a run folder's PyTorch model.

Sentences are sorted by length and cut into batches of about `batch_tokens` source tokens (times the beam
size), so that little of each batch is padding; results come back in the input order.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from mt import checkpoint, fastpaths
from mt.config import PRECISIONS, Config, DecodeConfig, load_run_config
from mt.data import collate
from mt.devices import autocast, autocast_dtype, pick_device
from mt.errors import CheckpointError, ConfigError
from mt.model import Transformer
from mt.search import (
    CachedStepper,
    RecomputeStepper,
    beam_search,
    greedy_search,
    max_lengths,
)
from mt.tokenizer import BOS, EOS, PAD, Tokenizer
from mt.translation import (  # noqa: F401
    EXPORT_INFO,
    BaseTranslator,
    Hypothesis,
    Sampling,
    Translation,
    length_sorted_batches,
)

log = logging.getLogger(__name__)


@torch.no_grad()
def translate_ids(
    model: Transformer,
    sources: Sequence[Sequence[int]],
    decode: DecodeConfig,
    nbest: int = 1,
    use_cache: bool = True,
    amp: torch.dtype | None = None,
    progress: str | None = None,
    sampling: Sampling | None = None,
    prefixes: Sequence[Sequence[int]] | None = None,
) -> list[list[Hypothesis]]:
    """Translates token-id sentences (no EOS) with greedy (beam_size 1) or beam search, under autocast to
    `amp` when given. `progress` names a progress bar (shown on a terminal only). With `sampling` (beam size
    1) each token is drawn at random; each batch seeds its own generator from `sampling.seed` and its first
    sentence, so that the outputs do not depend on which stream decodes it. `prefixes` gives the target tokens
    each output starts with.

    Returns:
        For each source, in order, its `nbest` hypotheses (1 for greedy), best first.
    """
    model.eval()
    device = next(model.parameters()).device
    bar = tqdm(total=len(sources), unit="sent", desc=progress, disable=None if progress else True, leave=False)
    with fastpaths.attention_kernels(device), autocast(device, amp), bar:
        return _translate_ids(model, sources, decode, nbest, use_cache, device, amp, bar, sampling, prefixes)


def _translate_ids(model, sources, decode, nbest, use_cache, device, amp, bar, sampling=None,
                   prefixes=None) -> list[list[Hypothesis]]:
    limit = model.config.max_positions - 1
    sources = [list(s[:limit]) for s in sources]
    results: list[list[Hypothesis]] = [[] for _ in sources]

    def translate_batch(batch: list[int]) -> None:
        src = collate([sources[i] for i in batch]).src.to(device)
        max_lens = max_lengths((src != PAD).sum(1), decode.max_len_a, decode.max_len_b, limit)
        stepper = CachedStepper(model, src, int(max_lens.max())) if use_cache else RecomputeStepper(model, src)
        prefix = None
        if prefixes is not None and any(prefixes[i] for i in batch):
            width = max(len(prefixes[i]) for i in batch)
            prefix = torch.tensor([list(prefixes[i]) + [-1] * (width - len(prefixes[i])) for i in batch],
                                  device=device)  # (B, P), -1 after each sentence's own prefix
        if decode.beam_size == 1:
            batch_sampling = None if sampling is None else replace(sampling, seed=sampling.seed * 1_000_003 + batch[0])
            hyps = [[h] for h in greedy_search(stepper, max_lens, BOS, EOS, batch_sampling, prefix, min_length=1,
                                               no_repeat=decode.no_repeat_ngram_size)]
        else:
            hyps = beam_search(stepper, max_lens, BOS, EOS, decode.beam_size, decode.length_penalty, nbest, prefix,
                               min_length=1, no_repeat=decode.no_repeat_ngram_size)
        for i, h in zip(batch, hyps, strict=True):
            results[i] = h
        bar.update(len(batch))

    batches = length_sorted_batches(sources, max(1, decode.batch_tokens // decode.beam_size))
    streams = min(decode.inter_threads, torch.get_num_threads(), len(batches)) if device.type == "cpu" else 1
    if streams == 1:
        for batch in batches:
            translate_batch(batch)
    else:
        _in_streams(translate_batch, batches, streams, device, amp)
    return results


def _in_streams(work, batches: list[list[int]], streams: int, device: torch.device, amp) -> None:
    """Runs `work(batch)` for every batch, `streams` batches at a time, each in a thread of its own with an
    equal share of torch's CPU threads (CTranslate2's inter_threads and intra_threads).

    A decoding step is many small operations: one batch on 2 threads leaves a core idle through the ones
    torch runs on one thread. Two batches on one thread each keep both busy (BENCHMARKS.md). Each batch runs
    whole in one thread, so its translations do not depend on which stream takes it, or when.
    """
    if not batches:
        return
    threads = torch.get_num_threads()

    def start() -> None:  # in each worker thread
        torch.set_num_threads(max(1, threads // streams))

    def run(batch: list[int]) -> None:
        with torch.no_grad(), autocast(device, amp):  # thread-local settings: set them in the worker
            work(batch)

    pool = ThreadPoolExecutor(streams, thread_name_prefix="mt-decode", initializer=start)
    try:
        for future in [pool.submit(run, batch) for batch in batches]:
            future.result()
    finally:
        pool.shutdown(cancel_futures=True)
        torch.set_num_threads(threads)


class Translator(BaseTranslator):
    """A trained model with its tokenizer and decoding defaults.

    >>> Translator.load("runs/multi30k").translate(["Un chien court."])  # doctest: +SKIP
    ['A dog is running.']
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: Config, amp: torch.dtype | None = None,
                 weights: Path | None = None):
        super().__init__(tokenizer, config, weights)  # weights: the checkpoint file the model came from, if any
        self.model, self.amp = model, amp

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", weights: str | None = None,
             precision: str | None = None) -> Translator:
        """Loads a run folder's model: `weights` names the checkpoint file in it (default `best.pt`, or
        `last.pt` when no validation has run yet); `precision` (auto, fp32 or bf16) replaces the run's
        `decode.precision`.

        Raises:
            CheckpointError: if the folder lacks its config, tokenizer or checkpoint.
        """
        run_dir = checkpoint.check_run(Path(run_dir))
        if (run_dir / EXPORT_INFO).is_file():  # a folder written by `mt export`
            from mt.export import ExportedTranslator

            return ExportedTranslator.load(run_dir, device, weights, precision=precision)
        config = load_run_config(run_dir / checkpoint.CONFIG)
        if precision is not None:
            if precision not in PRECISIONS:
                raise ConfigError(f"--precision {precision}: it is one of {', '.join(PRECISIONS)}")
            config = replace(config, decode=replace(config.decode, precision=precision))
        tokenizer = Tokenizer.load(run_dir / checkpoint.TOKENIZER)
        path = run_dir / (weights or checkpoint.BEST)
        if weights is None and not path.is_file():
            path = run_dir / checkpoint.LAST
            if not path.is_file():
                others = sorted(p.name for p in run_dir.glob("*.pt"))
                raise CheckpointError(f"{run_dir} has neither {checkpoint.BEST} nor {checkpoint.LAST}: " + (
                    f"pick one of {', '.join(others[:5])} with --weights" if others
                    else "no checkpoint at all (a run that stopped before its first save?)"))
        state = checkpoint.load(path)
        embed = state["model"].get("embed.weight")
        if embed is not None and embed.shape[0] != tokenizer.vocab_size:
            raise CheckpointError(f"{path} was trained with a vocabulary of {embed.shape[0]} pieces, but "
                                  f"{run_dir / checkpoint.TOKENIZER} has {tokenizer.vocab_size}: the tokenizer is "
                                  "not the run's own")
        model = Transformer(config.model, tokenizer.vocab_size)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:  # torch's message: a header line, then one line per kind of mismatch
            detail = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
            raise CheckpointError(f"{path} does not match the model that {run_dir / checkpoint.CONFIG} describes "
                                  f"(was its model section edited?): {detail[:300]}") from None
        # The one place where translation's device and precision are chosen.
        device = pick_device(device, "--device")
        return cls(model.to(device).eval(), tokenizer, config, autocast_dtype(config.decode.precision, device),
                   weights=path)

    def _search(self, sources: list[list[int]], decode: DecodeConfig, nbest: int, progress: str | None,
                sampling: Sampling | None, prefixes: list[list[int]] | None) -> list[list[Hypothesis]]:
        """`translate_ids` with the run's model."""
        return translate_ids(self.model, sources, decode, nbest=nbest, amp=self.amp, progress=progress,
                             sampling=sampling, prefixes=prefixes)

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    @torch.no_grad()
    def cross_attention(self, text: str, output_tokens: list[int]) -> torch.Tensor:
        """Cross-attention weights of every decoder layer and head while producing `output_tokens`
        from `text`: (layers, heads, output tokens + EOS, source tokens + EOS)."""
        device = next(self.model.parameters()).device
        batch = collate(self.encode([text]), [output_tokens]).to(device)
        memory, mask = self.model.encode(batch.src)
        weights = self.model.cross_attention(batch.tgt_in, memory, mask)
        return torch.stack([w[0] for w in weights]).float().cpu()
