"""Batched translation with a trained model, and `Translator`, which loads a run folder.

Sentences are sorted by length and cut into batches of about `batch_tokens` source tokens (times the beam
size), so that little of each batch is padding; results come back in the input order.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from mt import checkpoint, fastpaths
from mt.config import Config, DecodeConfig, load_run_config
from mt.data import check_text, collate, normalize_text
from mt.devices import autocast, autocast_dtype, pick_device
from mt.errors import CheckpointError, ConfigError, MtError
from mt.model import Transformer
from mt.search import (
    CachedStepper,
    Hypothesis,
    RecomputeStepper,
    Sampling,
    beam_search,
    greedy_search,
    max_lengths,
)
from mt.tokenizer import BOS, EOS, PAD, Tokenizer

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


def length_sorted_batches(sources: Sequence[Sequence[int]], budget: int) -> list[list[int]]:
    """Indices of `sources`, sorted by length and cut into batches of at most `budget` tokens (EOS
    included, padding counted); a sentence longer than the budget makes a batch of its own."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    batches, start = [], 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end - start + 1) * (len(sources[order[end]]) + 1) <= budget:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


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


class Translator:
    """A trained model with its tokenizer and decoding defaults.

    >>> Translator.load("runs/multi30k").translate(["Un chien court."])  # doctest: +SKIP
    ['A dog is running.']
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, config: Config, amp: torch.dtype | None = None,
                 weights: Path | None = None):
        self.model, self.tokenizer, self.config, self.amp = model, tokenizer, config, amp
        self.weights = weights  # the checkpoint file the model was loaded from, if any

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto", weights: str | None = None) -> Translator:
        """Loads a run folder's model: `weights` names the checkpoint file in it (default `best.pt`, or
        `last.pt` when no validation has run yet).

        Raises:
            CheckpointError: if the folder lacks its config, tokenizer or checkpoint.
        """
        from mt import export

        run_dir = checkpoint.check_run(Path(run_dir))
        if (run_dir / export.EXPORT_INFO).is_file():  # a folder written by `mt export`
            if weights is not None:
                raise CheckpointError(f"{run_dir} is an exported model: it has one set of weights, and takes no "
                                      "--weights")
            return export.ExportedTranslator.load(run_dir, device)
        config = load_run_config(run_dir / checkpoint.CONFIG)
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

    def translate(self, texts: Iterable[str], beam_size: int | None = None,
                  length_penalty: float | None = None) -> list[str]:
        """Translates each text; an empty or blank text gives an empty line. Decoding settings default to
        the run's `decode` section."""
        return [options[0].text for options in self.translate_nbest(texts, beam_size, length_penalty, nbest=1)]

    def translate_nbest(
        self, texts: Iterable[str], beam_size: int | None = None, length_penalty: float | None = None,
        nbest: int = 1, progress: str | None = None, sampling: Sampling | None = None,
        prefix: str | Sequence[str] | None = None,
    ) -> list[list[Translation]]:
        """The `nbest` best translations of each text, best first. A blank text gives `nbest` empty ones.
        With `sampling`, one translation drawn at random (beam size 1). With `prefix` (one for all texts, or one
        per text), each translation starts with it.

        Raises:
            TypeError: for one string rather than a list of them (it would be translated letter by letter).
            ValueError: for a beam size or `nbest` below 1, or an `nbest` above the beam size; for sampling
                with a beam or an n-best list, or sampling settings out of range.
        """
        if isinstance(texts, str):
            raise TypeError(f"translate a list of texts: [{texts!r}], not one string")
        texts = list(texts)  # a generator is read once, here
        decode = self.config.decode
        if sampling is not None:
            if (beam_size or 1) != 1 or nbest != 1:
                raise ValueError("sampling draws one translation token by token: it takes no beam and no nbest")
            if sampling.top_k < 0 or not 0.0 < sampling.top_p <= 1.0 or not sampling.temperature > 0.0:
                raise ValueError(f"sampling needs top_k >= 0, 0 < top_p <= 1 and temperature > 0, got {sampling}")
            beam_size = 1
        if beam_size is not None:
            if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
                raise ValueError(f"beam_size must be an integer of at least 1 (1 = greedy), got {beam_size!r}")
            decode = replace(decode, beam_size=beam_size)
        if isinstance(nbest, bool) or not isinstance(nbest, int) or not 1 <= nbest <= decode.beam_size:
            raise ValueError(f"nbest must be an integer from 1 to the beam size ({decode.beam_size}), got {nbest!r}")
        if 2 * decode.beam_size > self.tokenizer.vocab_size:  # each step keeps the 2 × beam best extensions
            raise ConfigError(f"beam size {decode.beam_size} is too large for this model's vocabulary of "
                              f"{self.tokenizer.vocab_size} pieces: at most {self.tokenizer.vocab_size // 2}")
        if length_penalty is not None:
            decode = replace(decode, length_penalty=length_penalty)
        sources = self.encode(texts)
        prefixes = None
        if prefix is not None:
            prefixes = [prefix] * len(texts) if isinstance(prefix, str) else list(prefix)
            if len(prefixes) != len(texts):
                raise ValueError(f"{len(prefixes)} prefixes for {len(texts)} texts")
            for number, text in enumerate(prefixes, start=1):
                check_text(text, f"prefix {number}")
            prefixes = [ids[: self.config.model.max_positions - 2] for ids in self.tokenizer.encode(
                [self._clean(p) for p in prefixes])]
        hyps = self._search(sources, decode, nbest, progress, sampling, prefixes)
        outputs = []
        for text, options in zip(texts, hyps, strict=True):
            if not text.strip():
                outputs.append([Translation("", 0.0, []) for _ in range(nbest)])
                continue
            lines = self.tokenizer.decode([h.tokens for h in options])
            outputs.append([Translation(" ".join(line.split()), h.score, h.tokens)
                            for line, h in zip(lines, options, strict=True)])
        return outputs

    def _search(self, sources: list[list[int]], decode: DecodeConfig, nbest: int, progress: str | None,
                sampling: Sampling | None, prefixes: list[list[int]] | None) -> list[list[Hypothesis]]:
        """The search itself, on token ids: `translate_ids` (an exported model decodes with CTranslate2 here)."""
        return translate_ids(self.model, sources, decode, nbest=nbest, amp=self.amp, progress=progress,
                             sampling=sampling, prefixes=prefixes)

    def num_parameters(self) -> int:
        return self.model.num_parameters()

    @property
    def attention_layers(self) -> int:
        """The layers of `cross_attention`'s weights."""
        return self.config.model.decoder_layers

    def _clean(self, text: str) -> str:
        """`text` normalised the way the training data was."""
        return normalize_text(text) if self.config.data.normalize else " ".join(text.split())

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of input texts, normalised the way the training data was, and cut to the longest source
        the model takes (`model.max_positions`, less EOS)."""
        limit = self.config.model.max_positions - 1
        for number, text in enumerate(texts, start=1):
            check_text(text, f"input {number}")
        ids = self.tokenizer.encode([self._clean(t) for t in texts])
        if cut := sum(len(i) > limit for i in ids):
            log.warning("%d input line(s) longer than %d tokens cut to that length, the longest source the model "
                        "takes (model.max_positions): their ends are not translated", cut, limit)
        return [i[:limit] for i in ids]

    def attention_map(self, text: str, output_tokens: list[int]) -> tuple[torch.Tensor, list[str], list[str]]:
        """`cross_attention`'s weights, with the source and output pieces (EOS included) they lie between."""
        return (self.cross_attention(text, output_tokens), self.tokenizer.pieces(self.encode([text])[0] + [EOS]),
                self.tokenizer.pieces(list(output_tokens) + [EOS]))

    @torch.no_grad()
    def cross_attention(self, text: str, output_tokens: list[int]) -> torch.Tensor:
        """Cross-attention weights of every decoder layer and head while producing `output_tokens`
        from `text`: (layers, heads, output tokens + EOS, source tokens + EOS)."""
        device = next(self.model.parameters()).device
        batch = collate(self.encode([text]), [output_tokens]).to(device)
        memory, mask = self.model.encode(batch.src)
        weights = self.model.cross_attention(batch.tgt_in, memory, mask)
        return torch.stack([w[0] for w in weights]).float().cpu()


@dataclass
class Translation:
    """One translation of one input: the text, its search score and its token ids."""

    text: str
    score: float
    tokens: list[int]


def in_chunks(lines: Iterable[str], size: int = 64) -> Iterator[list[str]]:
    """`lines` in lists of `size`, each given as soon as it is full: a stream is translated as it arrives. A
    line that fails to read (a DataError) comes after the lines before it, which are given first."""
    chunk: list[str] = []
    try:
        for line in lines:
            chunk.append(line)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except MtError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk
