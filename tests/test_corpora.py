"""Downloading named corpora, against a local HTTP server on loopback serving a fixture."""

import gzip
import hashlib
import http.server
import socket
import threading
from functools import partial

import pytest

from mt import corpora
from mt.corpora import Download
from mt.errors import DataError

FR = b"Un chat. \nDeux chiens.\n"
EN = b"A cat.\n Two dogs.\n"


def stored_sha(data: bytes) -> str:
    return hashlib.sha256(b"".join(line.strip() + b"\n" for line in data.splitlines())).hexdigest()


@pytest.fixture
def server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "train.fr.gz").write_bytes(gzip.compress(FR))
    (root / "train.en.gz").write_bytes(gzip.compress(EN))
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MT_DATA_PATH", str(tmp_path / "empty"))
    return tmp_path


def use_sources(monkeypatch, url, fr_sha=None, en_sha=None):
    monkeypatch.setattr(corpora, "DOWNLOADS", {
        "toy/train.fr": Download(f"{url}/train.fr.gz", fr_sha or stored_sha(FR)),
        "toy/train.en": Download(f"{url}/train.en.gz", en_sha or stored_sha(EN)),
    })


def test_download_checks_and_stores_the_files(server, workdir, monkeypatch):
    use_sources(monkeypatch, server)
    files = corpora.resolve("toy:train")
    assert files.src == corpora.Path("data/toy/train.fr")
    assert files.src.read_bytes() == b"Un chat.\nDeux chiens.\n"
    assert files.tgt.read_bytes() == b"A cat.\nTwo dogs.\n"
    assert sorted(p.name for p in (workdir / "data" / "toy").iterdir()) == ["train.en", "train.fr"]
    monkeypatch.setattr(corpora, "DOWNLOADS", {})  # found locally from now on: no second download
    assert corpora.resolve("toy:train").src == files.src


def test_checksum_mismatch_writes_nothing(server, workdir, monkeypatch):
    use_sources(monkeypatch, server, fr_sha="0" * 64)
    with pytest.raises(DataError, match=r"checksum mismatch for toy/train\.fr .*expected sha256 0{64}, got"):
        corpora.resolve("toy:train")
    assert not (workdir / "data").exists()


def test_a_damaged_download_is_one_error(server, workdir, monkeypatch):
    packed = bytearray(gzip.compress("".join(f"phrase numéro {i}\n" for i in range(2000)).encode()))
    packed[200:260] = bytes(b ^ 0xFF for b in packed[200:260])
    (workdir / "www" / "train.fr.gz").write_bytes(bytes(packed))  # the server's folder (`server`)
    use_sources(monkeypatch, server)
    with pytest.raises(DataError, match=r"download of toy/train\.fr from .* is not a valid gzip file"):
        corpora.resolve("toy:train")
    assert not (workdir / "data").exists()


def test_unreachable_host_mentions_mt_data_path(workdir, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    use_sources(monkeypatch, f"http://127.0.0.1:{port}")
    with pytest.raises(DataError, match=r"cannot download toy/train\.fr from .*set MT_DATA_PATH"):
        corpora.resolve("toy:train")
    assert not (workdir / "data").exists()  # no empty folder either


def test_every_multi30k_split_has_a_source():
    for split in corpora.KNOWN["multi30k"]:
        for lang in ("fr", "en"):
            source = corpora.DOWNLOADS[f"multi30k/{split}.{lang}"]
            assert source.url.startswith("https://") and len(source.sha256) == 64


def test_checksums_match_the_real_files(data_path):
    for key, source in corpora.DOWNLOADS.items():
        assert hashlib.sha256((data_path / key).read_bytes()).hexdigest() == source.sha256, key


def test_dataset_saved_to_disk_is_a_corpus(tmp_path, monkeypatch):
    import datasets

    from mt.config import load_config
    from mt.data import prepare_data, read_corpus

    monkeypatch.chdir(tmp_path)
    pairs = [{"fr": f"Le chat numéro {i} dort.", "en": f"Cat number {i} sleeps."} for i in range(60)]
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"id": list(range(60)), "translation": pairs}),
        "validation": datasets.Dataset.from_dict({"id": [0, 1], "translation": pairs[:2]}),
    }).save_to_disk(str(tmp_path / "books"))
    spec = f"{{disk: {tmp_path / 'books'}, split: %s, src_field: translation.fr, tgt_field: translation.en}}"
    config = load_config(None, [f"data.train={spec % 'train'}", f"data.valid={spec % 'validation'}",
                                "tokenizer.vocab_size=40"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = prepare_data(config, run_dir)
    assert len(data.train) == 60 and data.train[3]["src"] == "Le chat numéro 3 dort."
    src, tgt = read_corpus(corpora.resolve(config.data.valid))
    assert (src, tgt) == (["Le chat numéro 0 dort.", "Le chat numéro 1 dort."], ["Cat number 0 sleeps.",
                                                                               "Cat number 1 sleeps."])
    wrong = corpora.resolve({"disk": str(tmp_path / "books"), "split": "train", "src_field": "translation.de",
                             "tgt_field": "translation.en"})
    with pytest.raises(DataError, match=r"field translation\.de not found"):
        read_corpus(wrong)
    with pytest.raises(DataError, match=r"no split 'test'; it has train, validation"):
        read_corpus(corpora.resolve({"disk": str(tmp_path / "books"), "split": "test", "src_field": "a",
                                     "tgt_field": "b"}))


def test_dataset_spec_is_checked():
    with pytest.raises(ValueError, match="exactly one of hub"):
        corpora.parse_corpus({"hub": "wmt14", "disk": "x", "src_field": "a", "tgt_field": "b"})
    with pytest.raises(ValueError, match="needs src_field"):
        corpora.parse_corpus({"hub": "wmt14"})
    with pytest.raises(ValueError, match=r"config is a name, got 2016 \(quote it: config: '2016'\)"):
        corpora.parse_corpus({"hub": "x", "config": 2016, "src_field": "a", "tgt_field": "b"})  # as YAML reads it
    with pytest.raises(ValueError, match=r"hub is a name, got \['x'\]"):
        corpora.parse_corpus({"hub": ["x"], "src_field": "a", "tgt_field": "b"})
    spec = corpora.parse_corpus({"hub": "wmt14", "config": "fr-en", "split": "train",
                                 "src_field": "translation.fr", "tgt_field": "translation.en"})
    assert spec.name == "wmt14/fr-en:train"
