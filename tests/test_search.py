"""Greedy and beam search: against recomputation, against each other, and on a model worked out by hand."""

import math
import threading
from dataclasses import replace

import pytest
import torch

from mt import translate
from mt.config import DecodeConfig, ModelConfig
from mt.model import Transformer
from mt.search import (
    CachedStepper,
    RecomputeStepper,
    Sampling,
    beam_search,
    best_extensions,
    best_tokens,
    compaction,
    encode,
    greedy_search,
    stable_slots,
)
from mt.tokenizer import BOS, EOS, PAD
from mt.translate import length_sorted_batches, translate_ids

V = 50


@pytest.fixture(scope="module")
def model_and_src():
    torch.manual_seed(3)
    config = ModelConfig(d_model=32, heads=4, encoder_layers=2, decoder_layers=2, d_ff=64)
    model = Transformer(config, V).eval()
    # Sharpen the output so hypotheses end at different lengths, some before the limit.
    with torch.no_grad():
        model.embed.weight.mul_(4.0)
    src = torch.randint(4, V, (5, 8))
    src[:, -1] = EOS
    src[1, 5:] = PAD
    src[3, 3:] = PAD
    return model, src


def lengths(src):
    return (src != PAD).sum(1) + 6


def test_greedy_with_cache_equals_recomputation(model_and_src):
    model, src = model_and_src
    cached = greedy_search(CachedStepper(model, src, 16), lengths(src), BOS, EOS)
    recomputed = greedy_search(RecomputeStepper(model, src), lengths(src), BOS, EOS)
    assert [h.tokens for h in cached] == [h.tokens for h in recomputed]
    assert len({len(h.tokens) for h in cached}) > 1


def test_beam_with_cache_equals_recomputation(model_and_src):
    model, src = model_and_src
    cached = beam_search(CachedStepper(model, src, 16), lengths(src), BOS, EOS, beam_size=4, nbest=4)
    recomputed = beam_search(RecomputeStepper(model, src), lengths(src), BOS, EOS, beam_size=4, nbest=4)
    assert [[h.tokens for h in hs] for hs in cached] == [[h.tokens for h in hs] for hs in recomputed]
    for a, b in zip(cached, recomputed, strict=True):
        assert [h.score for h in a] == pytest.approx([h.score for h in b], abs=1e-4)


def test_beam_size_one_equals_greedy(model_and_src):
    model, src = model_and_src
    greedy = greedy_search(CachedStepper(model, src, 16), lengths(src), BOS, EOS)
    beam = beam_search(CachedStepper(model, src, 16), lengths(src), BOS, EOS, beam_size=1)
    assert [h.tokens for h in greedy] == [hs[0].tokens for hs in beam]
    assert [h.log_prob for h in greedy] == pytest.approx([hs[0].log_prob for hs in beam], abs=1e-4)


def test_batched_search_equals_one_sentence_at_a_time(model_and_src):
    model, src = model_and_src
    batched = beam_search(CachedStepper(model, src, 16), lengths(src), BOS, EOS, beam_size=3)
    for i in range(len(src)):
        one = src[i : i + 1, : int((src[i] != PAD).sum())]
        alone = beam_search(CachedStepper(model, one, 16), lengths(src)[i : i + 1], BOS, EOS, beam_size=3)
        assert alone[0][0].tokens == batched[i][0].tokens


class FixedStepper:
    """A fake model over the vocabulary {BOS=2, EOS=3, A=4, B=5}: the next-token probabilities depend only
    on the last token, so every hypothesis's probability can be worked out by hand."""

    table = {
        BOS: {4: 0.5, 5: 0.4, EOS: 0.1},
        4: {EOS: 0.6, 4: 0.3, 5: 0.1},
        5: {5: 0.9, EOS: 0.1},
    }

    def step(self, history):
        out = torch.full((history.size(0), 6), float("-inf"))
        for row, last in enumerate(history[:, -1].tolist()):
            for token, p in self.table[last].items():
                out[row, token] = math.log(p)
        return out

    def reorder(self, index, sentences=None):
        pass


def test_beam_search_on_a_model_worked_out_by_hand():
    # Beam 2. Step 1: A (0.5), B (0.4); EOS (0.1) is third, outside the first two: not finished.
    # Step 2: A EOS (0.30) finishes; B B (0.36) and A A (0.15) go on.
    # Step 3: B B B (0.324), A A EOS (0.09), A A A (0.045), B B EOS (0.036): A A EOS is among the first two
    # and finishes; B B EOS is not. Two finished: done. Scores with length penalty 1: log(0.30)/2, log(0.09)/3.
    [hyps] = beam_search(FixedStepper(), torch.tensor([10]), BOS, EOS, beam_size=2, length_penalty=1.0, nbest=2)
    assert [h.tokens for h in hyps] == [[4], [4, 4]]
    assert hyps[0].score == pytest.approx(math.log(0.5 * 0.6) / 2)
    assert hyps[1].score == pytest.approx(math.log(0.5 * 0.3 * 0.6) / 3)
    assert hyps[1].log_prob == pytest.approx(math.log(0.09))


def test_min_length_rules_out_an_empty_output():
    class EndsAtOnce(FixedStepper):  # EOS is the most likely first token
        table = {BOS: {EOS: 0.6, 4: 0.4}, 4: {EOS: 1.0}}

    for min_length, tokens in ((0, []), (1, [4])):
        [greedy] = greedy_search(EndsAtOnce(), torch.tensor([5]), BOS, EOS, min_length=min_length)
        [beam] = beam_search(EndsAtOnce(), torch.tensor([5]), BOS, EOS, beam_size=1, min_length=min_length)
        assert greedy.tokens == beam[0].tokens == tokens
    # Beam 2: without a minimum the empty output takes one of the two finished places; with 1 it cannot.
    class EndsAtOnceEverywhere(EndsAtOnce):
        table = EndsAtOnce.table | {t: {EOS: 1.0} for t in (0, 1, 5)}  # the beam's -inf rows

    for min_length, empty in ((0, True), (1, False)):
        [hyps] = beam_search(EndsAtOnceEverywhere(), torch.tensor([5]), BOS, EOS, beam_size=2, nbest=2,
                             min_length=min_length)
        assert any(not h.tokens for h in hyps) == empty


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_repetition_guard_stops_a_loop_where_it_would_repeat_an_ngram(n):
    class Stutters(FixedStepper):  # B, then B again with 0.9 for ever: a loop
        table = {BOS: {5: 1.0}, 5: {5: 0.9, EOS: 0.1}} | {t: {EOS: 1.0} for t in (0, 1, 4)}  # the beam's -inf rows

    [looping] = greedy_search(Stutters(), torch.tensor([12]), BOS, EOS)
    assert looping.tokens == [5] * 12
    [greedy] = greedy_search(Stutters(), torch.tensor([12]), BOS, EOS, no_repeat=n)
    [beam] = beam_search(Stutters(), torch.tensor([12]), BOS, EOS, beam_size=2, no_repeat=n)
    assert greedy.tokens == [5] * n  # one more B would make a second n-gram of Bs
    assert 1 <= len(beam[0].tokens) <= n and set(beam[0].tokens) == {5}  # beam 2 may stop sooner, never later


def test_beam_search_runs_its_first_step_on_one_row_per_sentence():
    class Counting(FixedStepper):
        rows: list[int] = []

        def step(self, history):
            self.rows.append(history.size(0))
            return super().step(history)

    stepper = Counting()
    beam_search(stepper, torch.tensor([10, 10, 10]), BOS, EOS, beam_size=2)
    assert stepper.rows[:2] == [3, 6]  # all beams start at BOS: one row each, then 2 per sentence


def test_length_penalty_zero_ranks_by_total_probability():
    [hyps] = beam_search(FixedStepper(), torch.tensor([10]), BOS, EOS, beam_size=2, length_penalty=0.0, nbest=2)
    assert hyps[0].score == pytest.approx(math.log(0.30))


def test_maximum_length_finishes_open_beams():
    # Limit 2 tokens: step 2 ranks B B (0.36), A EOS (0.30); both end there, B B without EOS.
    [hyps] = beam_search(FixedStepper(), torch.tensor([2]), BOS, EOS, beam_size=2, length_penalty=0.0, nbest=2)
    assert [h.tokens for h in hyps] == [[5, 5], [4]]
    assert [h.log_prob for h in hyps] == pytest.approx([math.log(0.36), math.log(0.30)])
    [greedy] = greedy_search(FixedStepper(), torch.tensor([1]), BOS, EOS)
    assert greedy.tokens == [4]


def test_encoding_in_chunks_cut_to_their_length_equals_encoding_the_batch(model_and_src):
    model, src = model_and_src
    src = src[(src != PAD).sum(1).argsort()]  # decoding batches are sorted by length
    whole, mask = model.encode(src)
    chunked, chunked_mask = encode(model, src, chunk_tokens=2 * src.size(1))  # 2 rows per chunk
    assert torch.equal(mask, chunked_mask)
    real = mask[:, 0, 0]
    torch.testing.assert_close(chunked[real], whole[real])


def test_extensions_are_ranked_over_every_beam_of_a_sentence():
    torch.manual_seed(1)
    logits, scores = torch.randn(37 * 5, V), torch.randn(37, 5)
    top_scores, top_index = best_extensions(logits.view(37, 5, V), scores, 10)
    candidates = (logits.log_softmax(dim=-1).view(37, 5, V) + scores[:, :, None]).view(37, 5 * V)
    expected = candidates.topk(10, dim=1)
    torch.testing.assert_close(top_scores, expected.values)
    assert torch.equal(top_index, expected.indices)
    log_prob, token = best_tokens(logits)
    expected = logits.log_softmax(dim=-1).max(dim=-1)
    torch.testing.assert_close(log_prob, expected.values)
    assert torch.equal(token, expected.indices)


def test_compaction_moves_only_rows_past_the_new_size():
    done = torch.tensor([False, True, False, True, False, False, True, False])
    keep = compaction(done)
    assert sorted(keep.tolist()) == (~done).nonzero()[:, 0].tolist()  # every survivor, once
    assert keep.tolist() == [0, 5, 2, 7, 4]  # survivors within the new size stay; the last ones fill the gaps


def test_stable_slots_keep_one_extension_in_each_parents_slot():
    torch.manual_seed(0)
    parents = torch.randint(0, 5, (200, 5))
    order = stable_slots(parents)
    assert (order.sort(dim=1).values == torch.arange(5)).all()  # a permutation of the extensions
    placed = parents.gather(1, order)  # the parent of the extension in each slot
    for row, slots in zip(parents.tolist(), placed.tolist(), strict=True):
        stay = sum(p == s for s, p in enumerate(slots))
        assert stay == len(set(row))  # as many stay as there are distinct parents: the most possible


def test_batches_decoded_in_parallel_streams_equal_one_at_a_time(model_and_src, monkeypatch):
    model, _ = model_and_src
    torch.manual_seed(4)
    sources = [torch.randint(4, V, (int(n),)).tolist() for n in torch.randint(1, 12, (40,))]
    decode = DecodeConfig(beam_size=3, batch_tokens=60)  # batches of at most 20 source tokens
    assert len(length_sorted_batches(sources, 60 // 3)) > 4
    ran_in = []
    monkeypatch.setattr(translate, "beam_search", lambda *args, **kwargs: ran_in.append(
        threading.current_thread().name) or beam_search(*args, **kwargs))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # streams share the threads: 2 are needed, even on 1 core
    try:
        one = translate_ids(model, sources, replace(decode, inter_threads=1))
        assert set(ran_in) == {threading.main_thread().name}
        ran_in.clear()
        two = translate_ids(model, sources, decode)
        assert all(name.startswith("mt-decode") for name in ran_in)
        assert torch.get_num_threads() == 2  # given back to the caller
    finally:
        torch.set_num_threads(threads)
    assert [[h.tokens for h in hyps] for hyps in two] == [[h.tokens for h in hyps] for hyps in one]


def test_an_error_in_a_decoding_stream_reaches_the_caller(model_and_src, monkeypatch):
    model, _ = model_and_src
    sources = [[5, 6, 7]] * 12

    def fail(*args, **kwargs):
        raise ValueError("out of memory, say")

    monkeypatch.setattr(translate, "beam_search", fail)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="out of memory"):
            translate_ids(model, sources, DecodeConfig(beam_size=2, batch_tokens=16))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


# Sampling and forced prefixes


class Unigram:
    """A stepper whose next-token distribution is the same at every step: EOS 0.1, A 0.2, B 0.3, C 0.4."""

    PROBS = {EOS: 0.1, 4: 0.2, 5: 0.3, 6: 0.4}

    def step(self, history):
        logits = torch.full((history.size(0), 8), float("-inf"))
        for token, p in self.PROBS.items():
            logits[:, token] = math.log(p)
        return logits

    def reorder(self, index, sentences=None):
        pass


@pytest.mark.parametrize(("sampling", "expected"), [
    (Sampling(), {EOS: 0.1, 4: 0.2, 5: 0.3, 6: 0.4}),
    (Sampling(top_k=2), {5: 3 / 7, 6: 4 / 7}),
    (Sampling(top_p=0.5), {5: 3 / 7, 6: 4 / 7}),  # C (0.4) alone falls short of 0.5; C and B reach it
    (Sampling(temperature=0.5), {EOS: 0.01 / 0.30, 4: 0.04 / 0.30, 5: 0.09 / 0.30, 6: 0.16 / 0.30}),
])
def test_sampled_tokens_and_bigrams_follow_the_distribution(sampling, expected):
    n = 6000
    hyps = greedy_search(Unigram(), torch.full((n,), 3), BOS, EOS, replace(sampling, seed=1))
    first = [h.tokens[0] if h.tokens else EOS for h in hyps]
    for token, p in expected.items():  # 4 standard deviations of a count of n draws
        assert abs(first.count(token) / n - p) < 4 * math.sqrt(p * (1 - p) / n)
    assert set(first) <= set(expected)
    pairs = [tuple(h.tokens[:2]) for h in hyps if len(h.tokens) >= 2]
    top = max(expected, key=expected.get)
    share = pairs.count((top, top)) / n  # each step draws afresh: P(C C) = P(C)²
    assert abs(share - expected[top] ** 2) < 4 * math.sqrt(expected[top] ** 2 / n)
    for h in hyps:  # a hypothesis's log-probability is the model's, whatever the sampling
        assert h.log_prob == pytest.approx(sum(math.log(Unigram.PROBS[t]) for t in h.tokens + [EOS])
                                           if len(h.tokens) < 3 else sum(math.log(Unigram.PROBS[t]) for t in h.tokens))


def test_sampling_from_the_top_token_is_greedy_and_a_seed_repeats(model_and_src):
    model, src = model_and_src
    greedy = greedy_search(CachedStepper(model, src, 16), lengths(src), BOS, EOS)
    top1 = greedy_search(CachedStepper(model, src, 16), lengths(src), BOS, EOS, Sampling(top_k=1, seed=5))
    assert [h.tokens for h in top1] == [h.tokens for h in greedy]
    draws = [[h.tokens for h in greedy_search(CachedStepper(model, src, 16), lengths(src), BOS, EOS,
                                              Sampling(temperature=2.0, seed=seed))] for seed in (7, 7, 8)]
    assert draws[0] == draws[1] and draws[0] != draws[2]


@pytest.mark.parametrize("beam", [1, 3])
def test_a_prefix_starts_every_output_and_its_continuation_is_the_searchs(model_and_src, beam):
    model, src = model_and_src

    def search(prefix=None):
        stepper = CachedStepper(model, src, 16)
        if beam == 1:
            return [h.tokens for h in greedy_search(stepper, lengths(src), BOS, EOS, prefix=prefix)]
        return [h[0].tokens for h in beam_search(stepper, lengths(src), BOS, EOS, beam_size=beam, prefix=prefix)]

    free = search()
    forced_tokens = [[7, 8], [9], [], [10, 11, 12], [13]]
    prefix = torch.tensor([p + [-1] * (3 - len(p)) for p in forced_tokens])
    outputs = search(prefix)
    for tokens, wanted in zip(outputs, forced_tokens, strict=True):
        assert tokens[: len(wanted)] == wanted
    assert outputs[2] == free[2]  # no prefix: the search as it was
    if beam == 1:  # the search's own first token as the prefix: the same output
        own = torch.tensor([[t[0]] if t else [-1] for t in free])
        assert search(own) == free
