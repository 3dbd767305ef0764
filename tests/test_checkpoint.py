"""Atomic checkpoints, corrupt files, and finding the latest run."""

import os
import time

import pytest
import torch

from mt import checkpoint, files
from mt.errors import CheckpointError, MtError


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(2)}}, path)

    def full_disk(fd, mode):  # every write fails with ENOSPC, as on a full disk
        os.close(fd)
        return open("/dev/full", mode)

    monkeypatch.setattr(files.os, "fdopen", full_disk)
    with pytest.raises(MtError, match=r"cannot write .*last\.pt: No space left on device \(.* MiB free on its disk\); "
                                      r"last\.pt is left as it was"):
        checkpoint.save({"model": {"w": torch.zeros(1000)}}, path)
    assert checkpoint.load(path)["model"]["w"].tolist() == [1.0, 1.0]  # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_saved_files_get_the_permissions_open_gives(tmp_path):
    checkpoint.save({"model": {}}, tmp_path / "last.pt")
    (tmp_path / "plain").write_bytes(b"")
    assert (tmp_path / "last.pt").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_full_disk_reported_by_torch_names_the_file(tmp_path, monkeypatch):
    def torch_on_a_full_disk(state, f):  # what torch.save raised when a tmpfs filled up under `mt train`
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 358400 vs 358288")

    monkeypatch.setattr(torch, "save", torch_on_a_full_disk)
    with pytest.raises(MtError, match=r"^cannot write .*best\.pt: the write was cut short: is the disk full\? "
                                      r"\(.* MiB free on its disk\); best\.pt is left as it was$"):
        checkpoint.save({"model": {}}, tmp_path / "best.pt")
    assert list(tmp_path.iterdir()) == []


def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(1000)}}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"last\.pt is corrupt or truncated"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match=r"checkpoint not found: .*best\.pt"):
        checkpoint.load(tmp_path / "best.pt")


def test_latest_run_is_the_most_recently_trained(tmp_path):
    for name, age in (("old", 100), ("new", 0)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / checkpoint.CONFIG).write_text("name: x\n")
        checkpoint.save({"model": {}}, folder / checkpoint.BEST)
        stamp = time.time() - age
        os.utime(folder / checkpoint.BEST, (stamp, stamp))
    (tmp_path / "empty").mkdir()
    assert checkpoint.latest_run(tmp_path).name == "new"
    with pytest.raises(CheckpointError, match="no trained run found"):
        checkpoint.latest_run(tmp_path / "empty")
