"""Reading, checking, filtering and batching parallel text."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import write_pair
from mt import corpora
from mt.corpora import CorpusFiles
from mt.data import (
    Layout,
    ListColumn,
    PairTable,
    _cut,
    batch_layout,
    collate,
    filter_pairs,
    load_corpus,
    make_batches,
    pad,
    read_lines,
    read_pairs,
    tokenize,
)
from mt.errors import DataError
from mt.tokenizer import BOS, EOS, PAD, Tokenizer


def test_read_lines_plain_and_gz(tmp_path):
    plain = tmp_path / "a.fr"
    plain.write_text("un\ndeux\u2028trois\r\n", encoding="utf-8")
    packed = tmp_path / "a.fr.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    assert read_lines(plain) == read_lines(packed) == ["un", "deux\u2028trois"]


def test_a_damaged_gz_file_and_a_byte_order_mark(tmp_path):
    packed = bytearray(gzip.compress("".join(f"phrase numéro {i}\n" for i in range(2000)).encode()))
    packed[200:260] = bytes(b ^ 0xFF for b in packed[200:260])  # damage inside the compressed stream
    (tmp_path / "bad.fr.gz").write_bytes(bytes(packed))
    with pytest.raises(DataError, match=r"cannot read .*bad\.fr\.gz: .*invalid"):  # zlib's error, not a traceback
        read_lines(tmp_path / "bad.fr.gz")
    (tmp_path / "bom.en").write_bytes(b"\xef\xbb\xbfA cat.\n\xef\xbb\xbfA dog.\n")
    assert read_lines(tmp_path / "bom.en") == ["A cat.", "\ufeffA dog."]  # the mark that opens a file only


def test_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.fr"
    path.write_bytes(b"ok\nalso ok\nbad \xff here\n")
    with pytest.raises(DataError, match=r"bad\.fr, line 3: not valid UTF-8"):
        read_lines(path)


def test_misaligned_pair_names_both_files(tmp_path):
    src, tgt = write_pair(tmp_path, "train", ["a", "b", "c"], ["x", "y"])
    with pytest.raises(DataError, match=r"train\.fr has 3 lines but .*train\.en has 2"):
        read_pairs(CorpusFiles("pair", src, tgt))


def test_named_corpus_found_in_data_then_mt_data_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    write_pair(elsewhere / "toy", "train", ["a"], ["b"])
    monkeypatch.setenv("MT_DATA_PATH", str(elsewhere))
    assert corpora.resolve("toy:train").src == elsewhere / "toy" / "train.fr"
    write_pair(tmp_path / "data" / "toy", "train", ["a"], ["b"])
    assert corpora.resolve("toy:train").src.parent.parent.name == "data"


def test_missing_corpus_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MT_DATA_PATH", str(tmp_path / "nope"))
    with pytest.raises(DataError, match=r"corpus multi30k:tset not found .*MT_DATA_PATH.*known splits of multi30k"):
        corpora.resolve("multi30k:tset")


@pytest.fixture(scope="module")
def toy_tokenizer():
    words = ["le", "la", "un", "une", "chat", "chien", "maison", "rouge", "bleu",
             "the", "a", "cat", "dog", "house", "red", "blue", "is", "est"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(3 + i % 5)) for i in range(300)]
    return Tokenizer.train(lines, vocab_size=35)


def test_filters_report_what_they_removed(tmp_path, toy_tokenizer):
    src = ["le chat", "", "le chien rouge " * 30, "la maison", "un"]
    tgt = ["the cat", "the dog", "the red dog", "the house is red and blue and the cat is red " * 2, "a"]
    files = CorpusFiles("toy", *write_pair(tmp_path, "toy", src, tgt))
    ds, report = filter_pairs(tokenize(load_corpus(files), toy_tokenizer), max_tokens=40, max_ratio=3.0)
    assert (report.total, report.empty, report.too_long, report.bad_ratio, report.kept) == (5, 1, 1, 1, 2)
    assert list(ds["src"]) == ["le chat", "un"]
    assert "1 with an empty side" in report.describe()


def test_pair_table_batches_equal_collated_rows_after_filtering(tmp_path, toy_tokenizer):
    rng = np.random.default_rng(0)
    words = ["le", "chat", "chien", "rouge", "la", "maison", "un", "the", "cat", "dog", "red", "house"]
    src = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(60)] + ["", "un"]
    tgt = [" ".join(rng.choice(words, rng.integers(1, 9))) for _ in range(60)] + ["the dog", "a " * 30]
    files = CorpusFiles("toy", *write_pair(tmp_path, "toy", src, tgt))
    ds, report = filter_pairs(tokenize(load_corpus(files), toy_tokenizer), max_tokens=40, max_ratio=3.0)
    assert report.kept < report.total  # the kept pairs are a selection, not the whole table
    assert ds._indices is None  # written out, not an index mapping that every batch would go through
    table = PairTable(ds)
    assert len(table) == len(ds) == report.kept
    for idx in (np.arange(len(ds)), rng.permutation(len(ds))[:17], np.array([len(ds) - 1])):
        batch, expected = table.batch(idx), collate(ds[idx]["src_ids"], ds[idx]["tgt_ids"])
        for field in ("src", "tgt_in", "tgt_out", "real"):
            assert torch.equal(getattr(batch, field), getattr(expected, field)), field


@pytest.mark.parametrize("value_type", [pa.int32(), pa.int64()])
def test_list_column_reads_rows_across_sliced_chunks(value_type):
    rng = np.random.default_rng(0)
    rows = [rng.integers(4, 99, rng.integers(0, 7)).tolist() for _ in range(90)]
    arrays = [pa.array(rows[a:b], type=pa.list_(value_type)) for a, b in ((0, 40), (40, 41), (41, 90))]
    # Sliced chunks, as a zero-copy slice of a table leaves them: their offsets do not start at zero.
    column = pa.chunked_array([arrays[0].slice(5), arrays[1], arrays[2].slice(0, 30)])
    expected_rows = rows[5:40] + rows[40:41] + rows[41:71]
    for part in (pa.chunked_array([arrays[0]]), column):  # one chunk, and several
        ground = part.to_pylist()
        col = ListColumn(part)
        assert len(col) == len(ground)
        for idx in (rng.permutation(len(ground)), np.array([len(ground) - 1, 0, 0]), np.array([], dtype=np.int64)):
            flat, lengths = col.take(idx)
            assert flat.dtype == np.int64 and lengths.tolist() == [len(ground[i]) for i in idx]
            assert flat.tolist() == [t for i in idx for t in ground[i]]
    assert column.to_pylist() == expected_rows


def test_batches_cover_every_pair_once_within_budget():
    rng = np.random.default_rng(0)
    src_len = rng.integers(1, 40, 1000)
    tgt_len = np.maximum(1, src_len + rng.integers(-4, 5, 1000))  # lengths of translations correlate
    batches = make_batches(src_len, tgt_len, batch_tokens=500, seed=3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    for b in batches:
        assert len(b) == 1 or len(b) * (src_len[b].max() + tgt_len[b].max() + 2) <= 500
    real = sum(int(src_len[b].sum() + tgt_len[b].sum()) for b in batches)
    padded = sum(len(b) * int(src_len[b].max() + tgt_len[b].max()) for b in batches)
    assert real / padded > 0.9  # length bucketing keeps padding small
    again = make_batches(src_len, tgt_len, batch_tokens=500, seed=3)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))


def test_large_batches_pad_less_than_sorting_by_target_length_buckets():
    rng = np.random.default_rng(1)  # lengths as in a small corpus: many pairs per target length
    tgt_len = np.clip(rng.normal(14, 5, 5000).round(), 2, 60).astype(int)
    src_len = np.clip((tgt_len * rng.normal(1.15, 0.2, 5000)).round(), 1, 80).astype(int)
    batches = make_batches(src_len, tgt_len, batch_tokens=20_000, seed=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(5000))
    padded = sum(len(b) * int(src_len[b].max() + tgt_len[b].max() + 2) for b in batches)
    _, exact = _cut(np.lexsort((src_len, tgt_len)), src_len, tgt_len, 20_000)
    buckets = min(_cut(np.lexsort((src_len, tgt_len // w)), src_len, tgt_len, 20_000)[1] for w in (1, 2, 3, 4, 6))
    assert padded < 0.95 * exact and padded < 0.98 * buckets  # 0.969 of the best bucket width
    layout = batch_layout(src_len, tgt_len, 20_000, seed=0)
    assert layout == Layout("longer", 1)  # each batch is a sixth of the corpus: many lengths
    again = make_batches(src_len, tgt_len, batch_tokens=20_000, seed=0, layout=layout)
    assert all((a == b).all() for a, b in zip(batches, again, strict=True))


def test_collate_adds_bos_eos_and_pads():
    batch = collate([[5, 6, 7], [8]], [[9], [10, 11]])
    assert batch.src.tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert batch.tgt_in.tolist() == [[BOS, 9, PAD], [BOS, 10, 11]]
    assert batch.tgt_out.tolist() == [[9, EOS, PAD], [10, 11, EOS]]
    assert batch.target_tokens == 5
    assert batch.real.tolist() == [0, 1, 3, 4, 5]  # flat positions of the real target tokens
    assert batch.to(torch.device("cpu")).real.tolist() == [0, 1, 3, 4, 5]


def test_pad_equals_padding_row_by_row():
    rng = np.random.default_rng(0)
    for _ in range(200):
        seqs = [rng.integers(4, 99, rng.integers(0, 8)).tolist() for _ in range(rng.integers(0, 6))]
        for start, end in ((None, None), (BOS, None), (None, EOS)):
            rows = [([start] if start else []) + s + ([end] if end else []) for s in seqs]
            expected = torch.full((len(rows), max(map(len, rows), default=0)), PAD, dtype=torch.long)
            for i, row in enumerate(rows):
                expected[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            assert torch.equal(pad(seqs, start=start, end=end), expected)


def test_cleaning_normalises_and_removes_duplicates(tmp_path):
    from mt.data import clean_pairs, normalize_text

    text = "  L\u2019homme  dit\u00a0: \u00ab\u202fBonjour\u202f\u00bb "
    assert normalize_text(text) == "L'homme dit : \" Bonjour \""
    assert normalize_text("e\u0301te\u0301") == "été"  # NFC
    src = ["Un chat.", "Un  chat.", "Un chien.", "Un chat."]
    tgt = ["A cat.", "A cat.", "A dog.", "A cat!"]
    files = CorpusFiles("toy", *write_pair(tmp_path, "toy", src, tgt))
    ds, report = clean_pairs(load_corpus(files))
    assert (report.total, report.normalized, report.duplicates) == (4, 1, 1)
    assert list(zip(ds["src"], ds["tgt"], strict=True)) == [("Un chat.", "A cat."), ("Un chien.", "A dog."),
                                                           ("Un chat.", "A cat!")]
    files = CorpusFiles("tabs", *write_pair(tmp_path, "tabs", ["a\tb", "a"], ["c", "b\tc"]))
    assert clean_pairs(load_corpus(files), normalize=False)[1].duplicates == 0  # two pairs, though tab-joined alike


def test_corpus_lists_with_repeats():
    from mt.corpora import parse_corpus_list

    assert parse_corpus_list(["multi30k:train*3", {"src": "a", "tgt": "b", "repeat": 2}, "tatoeba:train"]) == [
        ("multi30k:train", 3), ({"src": "a", "tgt": "b"}, 2), ("tatoeba:train", 1)]
    with pytest.raises(ValueError, match="repeat count"):
        parse_corpus_list("multi30k:train*x")


def test_mixture_is_cleaned_per_corpus_then_repeated(tmp_path, monkeypatch):
    from mt.config import load_config
    from mt.data import prepare_data

    monkeypatch.chdir(tmp_path)
    lines = [f"phrase numéro {i} ici" for i in range(40)]
    write_pair(tmp_path / "data" / "one", "train", lines + lines[:5], [s.upper() for s in lines + lines[:5]])
    write_pair(tmp_path / "data" / "two", "train", lines[:10], lines[:10])
    write_pair(tmp_path / "data" / "one", "valid", lines[:3], lines[:3])
    config = load_config(None, ["data.train=[one:train, two:train*3]", "data.valid=one:valid",
                                "tokenizer.vocab_size=45", "data.max_ratio=10"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = prepare_data(config, run_dir)
    assert len(data.train) == 40 + 3 * 10
    stats = json.loads((run_dir / "data.json").read_text())
    assert stats["train"] == ["one:train", "two:train*3"]
    assert [c["duplicates"] for c in stats["cleaning"]] == [5, 0]


@pytest.mark.parametrize(("src", "tgt", "counts"), [(["a", "b", "c"], ["x"], (3, 1)), (["a"], ["x", "y"], (1, 2))])
def test_streamed_misalignment_counts_both_sides(tmp_path, src, tgt, counts):
    files = CorpusFiles("pair", *write_pair(tmp_path, "p", src, tgt))
    with pytest.raises(DataError, match=rf"has {counts[0]} lines but .* has {counts[1]};"):
        load_corpus(files)
