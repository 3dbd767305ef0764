"""SentencePiece training, round trips and the vocabulary-size error."""

import pytest

from mt.errors import DataError
from mt.tokenizer import BOS, EOS, PAD, UNK, Tokenizer

LINES = [f"Un homme numéro {i} fait du vélo dans la rue. A man number {i} rides a bike." for i in range(200)]


def test_round_trip_and_special_ids(tmp_path):
    tok = Tokenizer.train(LINES, vocab_size=50)
    assert tok.vocab_size == 50
    assert [tok.sp.id_to_piece(i) for i in (PAD, UNK, BOS, EOS)] == ["<pad>", "<unk>", "<s>", "</s>"]
    ids = tok.encode(["Un homme fait du vélo."])
    assert tok.decode(ids) == ["Un homme fait du vélo."]
    assert min(ids[0]) > EOS
    tok.save(tmp_path / "t.model")
    assert Tokenizer.load(tmp_path / "t.model").encode(["la rue"]) == tok.encode(["la rue"])


def test_vocabulary_too_large_for_the_corpus():
    with pytest.raises(DataError, match=r"tokenizer\.vocab_size=5000 is too large .*lower tokenizer\.vocab_size"):
        Tokenizer.train(LINES[:5], vocab_size=5000)


def test_empty_corpus():
    with pytest.raises(DataError, match="no text"):
        Tokenizer.train(["", "  "], vocab_size=50)


def test_vocabulary_too_small_for_the_characters():
    with pytest.raises(DataError, match=r"vocab_size=20 is too small .*raise tokenizer\.vocab_size"):
        Tokenizer.train(LINES, vocab_size=20)
