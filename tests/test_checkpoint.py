"""Atomic checkpoints, corrupt files, and finding the latest run."""

import os
import time

import pytest
import torch

from mt import checkpoint
from mt.errors import CheckpointError


def test_save_is_atomic_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save({"model": {"w": torch.ones(2)}}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save({"model": {"w": torch.zeros(2)}}, path)
    assert checkpoint.load(path)["model"]["w"].tolist() == [1.0, 1.0]  # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


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
