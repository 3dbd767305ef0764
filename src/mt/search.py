"""Greedy and beam search, batched over sentences, as plain functions over a `Stepper`.

A Stepper turns the tokens produced so far into next-token logits and follows the search when it
reorders, repeats or drops rows. `CachedStepper` feeds one token per step through the KV cache;
`RecomputeStepper` re-runs the decoder over the whole prefix each step (the baseline the cache is measured
and tested against). Finished sentences leave the batch, so late steps only pay for sentences still going.

Beam scores are length-normalised: log P(y) / len(y) ** length_penalty, where len(y) counts the EOS.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from mt import fastpaths
from mt.masks import padding_mask
from mt.model import Transformer
from mt.tokenizer import PAD
from mt.translation import Hypothesis, Sampling


class Stepper(Protocol):
    def step(self, history: torch.Tensor) -> torch.Tensor:
        """(N, t) tokens so far, BOS first -> (N, V) scores of the next token (logits: the search normalises
        them into log-probabilities). The tensor is the caller's: the search may write into it."""

    def reorder(self, index: torch.Tensor, sentences: torch.Tensor | None = None) -> None:
        """New row i continues old row index[i]. When sentences finish or move, `sentences` gives the old
        position of each sentence kept, in the new order, for per-sentence state (the encoder output); it is
        None when rows only move between the beams of their own sentence. The rows of a sentence are
        consecutive."""


def encode(model: Transformer, src: torch.Tensor, chunk_tokens: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.encode(src)` for a decoding batch, a chunk of rows at a time, each chunk cut to its own longest
    sentence. Padding is masked out, so the output at real tokens is the same; but a batch of many short
    sentences and a few long ones no longer encodes every sentence at the longest one's length. (Decoding
    batches are sorted by length, so consecutive rows have similar lengths.)
    """
    rows = max(1, chunk_tokens // src.size(1))
    if rows >= src.size(0):
        return model.encode(src)
    lengths = (src != PAD).sum(dim=1)
    chunks = [model.encode(src[start : start + rows, : int(lengths[start : start + rows].max())])[0]
              for start in range(0, src.size(0), rows)]
    memory = chunks[0].new_zeros((*src.shape, chunks[0].size(-1)))
    for start, chunk in zip(range(0, src.size(0), rows), chunks, strict=True):
        memory[start : start + rows, : chunk.size(1)] = chunk
    return memory, padding_mask(src)


class CachedStepper:
    """Feeds the newest token through the model's KV cache: each step costs one position."""

    def __init__(self, model: Transformer, src: torch.Tensor, max_len: int):
        memory, mask = encode(model, src)
        self.model, self.cache = model, model.start_cache(memory, mask, max_len)

    def step(self, history: torch.Tensor) -> torch.Tensor:
        return self.model.decode_step(history[:, -1], self.cache)[0]

    def reorder(self, index: torch.Tensor, sentences: torch.Tensor | None = None) -> None:
        self.cache.reorder(index, sentences)


class RecomputeStepper:
    """Re-runs the decoder over the whole prefix every step: no cache, for tests and benchmarks."""

    def __init__(self, model: Transformer, src: torch.Tensor):
        self.model = model
        self.memory, self.mask = encode(model, src)  # one row per hypothesis

    def step(self, history: torch.Tensor) -> torch.Tensor:
        states = self.model.decode(history, self.memory, self.mask)[:, -1]
        return self.model.logits(states)

    def reorder(self, index: torch.Tensor, sentences: torch.Tensor | None = None) -> None:
        if sentences is not None or index.numel() != self.memory.size(0):
            self.memory, self.mask = self.memory.index_select(0, index), self.mask.index_select(0, index)


def max_lengths(src_lengths: torch.Tensor, a: float, b: int, cap: int) -> torch.Tensor:
    """Longest output per sentence: a * source length + b, at most `cap` (in float64, as Python computes it, so
    that an exported model's rule is the same: docs/export.md)."""
    return (src_lengths.double() * a + b).long().clamp(max=cap)


def compaction(done: torch.Tensor) -> torch.Tensor:
    """The positions that go on, in their new order, when the True entries of `done` (G,) leave.

    Survivors keep their position where it is within the new size, and the last survivors fill the gaps, so
    that few rows of the caches move (`KVCache.reorder` copies only the rows that change).
    """
    go_on = ~done
    size = int(go_on.sum())
    keep = torch.arange(size, device=done.device)
    keep[done[:size].nonzero()[:, 0]] = go_on[size:].nonzero()[:, 0] + size
    return keep


def stable_slots(parents: torch.Tensor) -> torch.Tensor:
    """An order for each sentence's chosen extensions that keeps them in their parent beam's slot.

    Args:
        parents: (G, k), the beam (0..k-1) that each of a sentence's k chosen extensions continues.

    Returns:
        (G, k): slot s takes extension order[g, s]. The first extension of each parent takes the parent's
        slot; the others fill the slots of beams that have no extension, in order. A cache row then moves
        only when a beam branches, not when the ranking shuffles.
    """
    k = parents.size(1)
    onehot = F.one_hot(parents, k)  # (G, extension, parent)
    first = onehot.cumsum(dim=1).gather(2, parents[:, :, None])[:, :, 0] == 1
    free = torch.sort(onehot.amax(dim=1), dim=1, stable=True).indices  # slots nobody continues come first
    rank = (~first).long().cumsum(dim=1) - 1  # among the extensions that need a free slot
    slot = torch.where(first, parents, free.gather(1, rank.clamp(min=0)))
    extension = torch.arange(k, device=parents.device).expand_as(parents)
    return torch.empty_like(parents).scatter_(1, slot, extension)


def best_tokens(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits -> the log-probability of each row's most probable token, and that token, (N,) each."""
    return logits.log_softmax(dim=-1, dtype=torch.float32).max(dim=-1)


def sampled_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits -> a token drawn for each row as `sampling` says, and its log-probability under the model."""
    log_probs = logits.log_softmax(dim=-1, dtype=torch.float32)  # (N, V)
    weights = log_probs / sampling.temperature  # log-weights, each row up to a constant
    if sampling.top_k:
        kth = weights.topk(min(sampling.top_k, weights.size(-1)), dim=-1).values[:, -1:]
        weights = weights.masked_fill(weights < kth, float("-inf"))
    if sampling.top_p < 1.0:
        ranked, order = weights.sort(dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass of the more probable tokens
        ranked = ranked.masked_fill(before >= sampling.top_p, float("-inf"))  # the first to reach top_p stays
        weights = torch.full_like(weights, float("-inf")).scatter_(1, order, ranked)
    token = torch.multinomial(weights.softmax(dim=-1), 1, generator=generator)[:, 0]  # (N,)
    return log_probs.gather(1, token[:, None])[:, 0], token


def forced(logits: torch.Tensor, prefix: torch.Tensor | None, step: int, sentences: torch.Tensor) -> torch.Tensor:
    """`logits` (R, V) with the rows whose sentence has a prefix token at `step` left only that token (its
    log-probability becomes 0).

    Args:
        prefix: (N, P) token ids each output must start with, -1 after a sentence's own prefix; or None.
        sentences: (R,) the sentence of each row.
    """
    if prefix is None or step >= prefix.size(1):
        return logits
    wanted = prefix[sentences, step]  # (R,)
    rows = (wanted >= 0).nonzero()[:, 0]
    if not rows.numel():
        return logits
    logits = logits.float().index_fill(0, rows, float("-inf"))
    logits[rows, wanted[rows]] = 0.0
    return logits


def without_repeats(logits: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """`logits` (R, V) with each row's tokens ruled out that would repeat an n-gram already in its `history`
    (R, t): the repetition guard (fairseq's --no-repeat-ngram-size, CTranslate2's no_repeat_ngram_size).
    n = 0 leaves `logits` as they are."""
    if n <= 0 or history.size(1) < n:
        return logits
    windows = history.unfold(1, n, 1)  # (R, W, n): every n-gram so far
    latest = history[:, history.size(1) - n + 1 :]  # (R, n - 1): what the next token would complete
    rows, starts = (windows[:, :, :-1] == latest[:, None, :]).all(dim=-1).nonzero().unbind(1)
    if rows.numel():
        logits[rows, windows[rows, starts, -1]] = float("-inf")
    return logits


def at_least(logits: torch.Tensor, step: int, min_length: int, eos: int) -> torch.Tensor:
    """`logits` with EOS ruled out before step `min_length`, so that outputs have at least that many tokens
    (CTranslate2's `min_decoding_length`). Decoding asks for 1: an empty hypothesis would otherwise take one of
    the beam's finished places."""
    if step < min_length:
        logits[:, eos] = float("-inf")
    return logits


def best_extensions(logits: torch.Tensor, scores: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n best extensions of each sentence's beams: scores + log-probabilities, ranked over all k beams.

    Args:
        logits: (G, k, V) next-token logits of the k beams of G sentences.
        scores: (G, k) the beams' scores so far.

    Returns:
        (G, n) extension scores, best first, and their indices into the flattened (k * V) candidates.
    """
    G, k, V = logits.shape
    log_probs = logits.log_softmax(dim=-1, dtype=torch.float32)  # (G, k, V)
    candidates = log_probs.add_(scores[:, :, None]).view(G, k * V)
    return fastpaths.topk(candidates, n)


@torch.no_grad()
def greedy_search(stepper: Stepper, max_lens: torch.Tensor, bos: int, eos: int,
                  sampling: Sampling | None = None, prefix: torch.Tensor | None = None,
                  min_length: int = 0, no_repeat: int = 0) -> list[Hypothesis]:
    """The most probable next token at each step (or one drawn as `sampling` says), until EOS or the sentence's
    maximum length.

    Args:
        stepper: prepared for len(max_lens) sentences.
        max_lens: (N,) most tokens to produce per sentence, EOS included.
        sampling: draw each token at random, from a generator seeded with `sampling.seed`.
        prefix: (N, P) tokens each output starts with (-1 after a sentence's own); see `forced`.
        min_length: tokens each output has at least (`at_least`).
        no_repeat: no n-gram of this size twice in an output (`without_repeats`; 0: no guard).
    """
    generator = None
    if sampling is not None:
        generator = torch.Generator(max_lens.device).manual_seed(sampling.seed)
    n = len(max_lens)
    device = max_lens.device
    history = torch.full((n, 1), bos, dtype=torch.long, device=device)
    log_prob = torch.zeros(n, device=device)
    alive = torch.arange(n, device=device)  # the sentence of each row
    results: list[Hypothesis | None] = [None] * n
    step = 0
    while alive.numel():
        logits = at_least(without_repeats(stepper.step(history), history, no_repeat), step, min_length, eos)
        logits = forced(logits, prefix, step, alive)
        best_lp, best = best_tokens(logits) if sampling is None else sampled_tokens(logits, sampling, generator)
        log_prob += best_lp
        history = torch.cat([history, best[:, None]], dim=1)
        step += 1
        finished = (best == eos) | (step >= max_lens[alive])
        if finished.any():
            rows = finished.nonzero()[:, 0]
            for sentence, tokens, lp in zip(alive[rows].tolist(), history[rows, 1:].tolist(),
                                            log_prob[rows].tolist(), strict=True):
                if tokens[-1] == eos:
                    tokens.pop()
                results[sentence] = Hypothesis(tokens, lp, lp)
            keep = compaction(finished)
            alive, history, log_prob = alive[keep], history[keep], log_prob[keep]
            if alive.numel():
                stepper.reorder(keep, sentences=keep)
    return results  # type: ignore[return-value]


@torch.no_grad()
def beam_search(
    stepper: Stepper,
    max_lens: torch.Tensor,
    bos: int,
    eos: int,
    beam_size: int,
    length_penalty: float = 1.0,
    nbest: int = 1,
    prefix: torch.Tensor | None = None,
    min_length: int = 0,
    no_repeat: int = 0,
) -> list[list[Hypothesis]]:
    """Beam search: keeps the `beam_size` best prefixes of each sentence.

    At each step the 2 × beam_size best extensions are ranked; those among the first beam_size that end in
    EOS are finished, and the best beam_size others go on. A sentence is done when it has beam_size finished
    hypotheses or more, or at its maximum length, where its open beams are finished as they are; all its finished
    hypotheses are then ranked by score. These are CTranslate2's rules, so that an exported model searches alike
    (tests/test_export.py).

    Args:
        stepper: prepared for len(max_lens) sentences. All beams start from BOS, so the first step runs one
            row per sentence; its best extensions then fill beam_size rows per sentence.
        max_lens: (N,) most tokens to produce per sentence, EOS included.
        prefix: (N, P) tokens each output starts with (-1 after a sentence's own); see `forced`. Their
            log-probabilities count as 0 in the scores.
        min_length: tokens each output has at least (`at_least`).
        no_repeat: no n-gram of this size twice in an output (`without_repeats`; 0: no guard).

    Returns:
        For each sentence, its `nbest` hypotheses, best first.
    """
    n, k = len(max_lens), beam_size
    device = max_lens.device
    beams = 1  # rows per sentence: 1 at the first step, k after it
    history = torch.full((n, 1), bos, dtype=torch.long, device=device)
    scores = torch.zeros(n, beams, device=device)
    alive = torch.arange(n, device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(n)]
    n_finished = torch.zeros(n, dtype=torch.long, device=device)
    step = 0
    while alive.numel():
        groups = alive.numel()
        logits = without_repeats(stepper.step(history), history, no_repeat)  # (groups * beams, V)
        logits = at_least(logits, step, min_length, eos)
        if prefix is not None:
            logits = forced(logits, prefix, step, alive.repeat_interleave(beams))
        vocab = logits.size(-1)
        top_scores, top_index = best_extensions(logits.view(groups, beams, vocab), scores, 2 * k)  # best first
        top_beam, top_token = top_index // vocab, top_index % vocab
        step += 1
        at_limit = step >= max_lens[alive]  # (groups,)
        ends = top_token == eos
        ends[:, k:] = False
        ends |= at_limit[:, None] & (torch.arange(2 * k, device=device) < k)
        ends &= top_scores > float("-inf")
        if ends.any():
            g, j = ends.nonzero().unbind(1)
            normaliser = float(step) ** length_penalty
            for sentence, tokens, token, lp in zip(alive[g].tolist(), history[g * beams + top_beam[g, j], 1:].tolist(),
                                                   top_token[g, j].tolist(), top_scores[g, j].tolist(), strict=True):
                if token != eos:
                    tokens.append(token)
                finished[sentence].append(Hypothesis(tokens, lp / normaliser, lp))
            n_finished.index_add_(0, alive[g], torch.ones_like(g))
        # The best k extensions that do not end the sentence go on (there are always k among 2k), each in its
        # parent's slot where it can be.
        next_scores, pick = top_scores.masked_fill(top_token == eos, float("-inf")).topk(k, dim=1)
        order = stable_slots(top_beam.gather(1, pick))
        next_scores, pick = next_scores.gather(1, order), pick.gather(1, order)
        parent = (torch.arange(groups, device=device)[:, None] * beams + top_beam.gather(1, pick)).view(-1)
        history = torch.cat([history[parent], top_token.gather(1, pick).view(-1, 1)], dim=1)
        scores, beams = next_scores, k
        done = at_limit | (n_finished[alive] >= k)
        sentences = None
        if done.any():
            sentences = compaction(done)
            rows = (sentences[:, None] * k + torch.arange(k, device=device)).view(-1)
            alive, scores, history, parent = alive[sentences], scores[sentences], history[rows], parent[rows]
        if alive.numel():
            stepper.reorder(parent, sentences)
    return [sorted(hyps, key=lambda h: h.score, reverse=True)[:nbest] for hyps in finished]
