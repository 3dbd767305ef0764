"""What every translator does with text, whatever runs its search: `BaseTranslator` checks, normalises and
tokenizes the input, and turns the search's token ids back into text. `mt.translate.Translator` searches with
the PyTorch model of a run folder, `mt.export.ExportedTranslator` with CTranslate2. `load` picks one for a
folder. No torch here, so that an exported model translates without importing it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mt.config import Config, DecodeConfig
from mt.errors import ConfigError
from mt.text import check_text, normalize_text
from mt.tokenizer import EOS, Tokenizer

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EXPORT_INFO = "export.json"  # what marks a folder written by `mt export`


def load(run_dir: str | Path, device: str = "auto", weights: str | None = None,
         precision: str | None = None) -> BaseTranslator:
    """The translator of a run folder, or of a folder written by `mt export` (which needs no torch);
    `precision` replaces a run's `decode.precision`."""
    from mt import checkpoint

    run_dir = checkpoint.check_run(Path(run_dir))
    if (run_dir / EXPORT_INFO).is_file():
        from mt.export import ExportedTranslator

        return ExportedTranslator.load(run_dir, device, weights, precision=precision)
    from mt.translate import Translator

    return Translator.load(run_dir, device, weights, precision)


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


@dataclass
class Hypothesis:
    """An output: token ids (no BOS/EOS), its search score and its total log-probability."""

    tokens: list[int]
    score: float
    log_prob: float


@dataclass(frozen=True)
class Sampling:
    """Random sampling of each next token instead of the most probable one (`mt translate --sample`): from the
    `top_k` most probable tokens (0: all of them), or from the fewest whose probabilities add up to `top_p`
    (nucleus sampling), after dividing the log-probabilities by `temperature` (below 1: sharper)."""

    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    seed: int = 0


@dataclass
class Translation:
    """One translation of one input: the text, its search score and its token ids."""

    text: str
    score: float
    tokens: list[int]


class BaseTranslator:
    """A tokenizer and a run's config, around a search that subclasses give (`_search`)."""

    attends_to_source_eos = True  # whether `cross_attention` has a column for the source's EOS

    def __init__(self, tokenizer: Tokenizer, config: Config, weights: Path | None = None):
        self.tokenizer, self.config = tokenizer, config
        self.weights = weights  # the file the model was loaded from, if any

    def _search(self, sources: list[list[int]], decode: DecodeConfig, nbest: int, progress: str | None,
                sampling: Sampling | None, prefixes: list[list[int]] | None) -> list[list[Hypothesis]]:
        """The search itself, on token ids: for each source, its `nbest` hypotheses, best first."""
        raise NotImplementedError

    def num_parameters(self) -> int:
        raise NotImplementedError

    def cross_attention(self, text: str, output_tokens: list[int]) -> torch.Tensor:
        """Cross-attention weights while producing `output_tokens` from `text`: (layers, heads, outputs, sources)."""
        raise NotImplementedError

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
        source = self.encode([text])[0] + [EOS] * self.attends_to_source_eos
        return (self.cross_attention(text, output_tokens), self.tokenizer.pieces(source),
                self.tokenizer.pieces(list(output_tokens) + [EOS]))
