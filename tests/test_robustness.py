"""Property-based tests: the tokenizer round trip, and translation of arbitrary text never failing."""

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mt.config import Config, DecodeConfig, ModelConfig
from mt.evaluate import loops
from mt.model import Transformer
from mt.tokenizer import Tokenizer
from mt.translate import Translator

CORPUS = [
    "Un homme fait du vélo dans la rue, près d'une église.",
    "A man rides a bike in the street, near a church.",
    "Deux enfants jouent au football sur l'herbe verte.",
    "Two children play soccer on the green grass.",
    "Une femme âgée lit un livre à la bibliothèque.",
    "An elderly woman reads a book at the library.",
] * 20
ALPHABET = sorted(set("".join(CORPUS)) - {" "})


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(CORPUS, vocab_size=70)


@pytest.fixture(scope="module")
def translator(tokenizer):
    torch.manual_seed(0)
    model_config = ModelConfig(d_model=16, heads=2, encoder_layers=1, decoder_layers=1, d_ff=32, max_positions=64)
    config = Config(model=model_config, decode=DecodeConfig(beam_size=2, max_len_b=5, max_len_a=0.5))
    return Translator(Transformer(model_config, tokenizer.vocab_size).eval(), tokenizer, config)


words = st.text(alphabet=ALPHABET, min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(words, min_size=0, max_size=8))
def test_round_trip_of_text_in_the_alphabet(tokenizer, parts):
    text = " ".join(parts)
    assert tokenizer.decode(tokenizer.encode([text])) == [text]


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200))
def test_any_text_encodes_and_decodes(text):
    tok = test_any_text_encodes_and_decodes.tokenizer
    [ids] = tok.encode([text])
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert isinstance(tok.decode([ids])[0], str)


@pytest.fixture(autouse=True, scope="module")
def _share_tokenizer(tokenizer):
    test_any_text_encodes_and_decodes.tokenizer = tokenizer


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=80), min_size=1, max_size=6))
def test_translate_returns_one_line_per_input_for_any_text(translator, texts):
    out = translator.translate(texts)
    assert len(out) == len(texts)
    assert all(isinstance(line, str) and "\n" not in line for line in out)
    assert all(line == "" for line, text in zip(out, texts, strict=True) if not text.strip())


@pytest.mark.parametrize(
    "text",
    ["", "   \t ", "x" * 10_000, "un " * 5_000, "😀🚲 vélo 🇫🇷", "a\x00b\x07c\x1bd", "Ελληνικά и русский 中文 العربية",
     "This is English input.", "\u2028\u2029\r"],
)
def test_translate_hard_inputs(translator, text):
    [line] = translator.translate([text])
    assert isinstance(line, str) and "\n" not in line


def repeats_an_ngram(tokens: list[int], n: int) -> bool:
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(grams) != len(set(grams))


@pytest.mark.parametrize("tokens, babbles", [
    ([5, 6, 7, 8], False), ([5, 5, 5, 5], True), ([5, 5, 5], False), ([1, 5, 6, 5, 6, 5, 6, 5, 6, 2], True),
    ([5, 6, 7] * 3, False), ([5, 6, 7] * 4, True), ([5, 6, 7, 8] * 4, False), ([5, 6, 5, 6, 5, 7, 5, 6], False)])
def test_an_output_loops_when_1_to_3_pieces_come_4_times_in_a_row(tokens, babbles):  # what mt eval counts
    assert loops(tokens) == babbles


@pytest.fixture(scope="module")
def long_outputs(translator):
    """The untrained model, let run to 40 tokens: it loops, as an untrained or out-of-domain model does."""
    decode = dataclasses.replace(translator.config.decode, max_len_a=0.0, max_len_b=40, no_repeat_ngram_size=0)
    return Translator(translator.model, translator.tokenizer, dataclasses.replace(translator.config, decode=decode))


def test_the_untrained_model_loops_without_the_guard(long_outputs):
    assert long_outputs.config.decode.no_repeat_ngram_size == 0
    outputs = long_outputs.translate_nbest(["Un homme fait du vélo.", "Deux enfants jouent."], beam_size=2)
    assert any(repeats_an_ngram(o[0].tokens, 3) for o in outputs)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(max_size=60), min_size=1, max_size=4), st.sampled_from([1, 2, 3]), st.sampled_from([1, 3]))
def test_with_the_guard_no_output_repeats_an_ngram(long_outputs, texts, n, beam):
    config = long_outputs.config
    guarded = Translator(long_outputs.model, long_outputs.tokenizer, dataclasses.replace(
        config, decode=dataclasses.replace(config.decode, no_repeat_ngram_size=n)))
    for options in guarded.translate_nbest(texts, beam_size=beam, nbest=beam):
        for option in options:
            assert not repeats_an_ngram(option.tokens, n), option
