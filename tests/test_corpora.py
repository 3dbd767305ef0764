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
    folder = workdir / "data" / "toy"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_unreachable_host_mentions_mt_data_path(workdir, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    use_sources(monkeypatch, f"http://127.0.0.1:{port}")
    with pytest.raises(DataError, match=r"cannot download toy/train\.fr from .*set MT_DATA_PATH"):
        corpora.resolve("toy:train")
    assert not (workdir / "data" / "toy" / "train.fr").exists()


def test_every_multi30k_split_has_a_source():
    for split in corpora.KNOWN["multi30k"]:
        for lang in ("fr", "en"):
            source = corpora.DOWNLOADS[f"multi30k/{split}.{lang}"]
            assert source.url.startswith("https://") and len(source.sha256) == 64


def test_checksums_match_the_real_files(data_path):
    for key, source in corpora.DOWNLOADS.items():
        assert hashlib.sha256((data_path / key).read_bytes()).hexdigest() == source.sha256, key
