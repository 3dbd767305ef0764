"""Data-parallel training: 2 CPU processes under torchrun (Gloo) against 1 process accumulating 2 batches."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mt import checkpoint

pytestmark = pytest.mark.slow

TINY = str(ROOT / "configs" / "tiny.yaml")
STEPS = ["train.max_steps=8", "train.log_every=2", "train.valid_every=4", "train.valid_sentences=10",
         "train.batch_tokens=600", "data.max_pairs=600"]


def mt_train(folder, launcher, *overrides, resume=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(folder)}  # torchrun's own temporary folders too
    args = [*launcher, "train", "--config", TINY, "--quiet", "--resume" if resume else "--overwrite"]
    for override in (*STEPS, *overrides):
        args += ["--set", override]
    result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and "exitcode  : -6" in result.stderr:
        # Known, not yet understood: twice in about 20 torchrun launches (both times the first launch in a
        # fresh environment, on a loaded machine) rank 0 died with "terminate called without an active
        # exception" (SIGABRT). One more launch; a wrong result still fails below.
        result = subprocess.run(args, cwd=folder, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("run saved in") == 1  # rank 0 speaks for the run
    return folder / "runs" / "tiny"


def losses(run_dir):
    return [r["train_loss"] for r in map(json.loads, (run_dir / checkpoint.METRICS).read_text().splitlines())
            if "train_loss" in r]


needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, data_path):
    """A run of one process accumulating 2 batches per update, which 2 ranks of one batch each must equal."""
    folder = tmp_path_factory.mktemp("one")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MT_DATA_PATH", str(data_path))
        return mt_train(folder, [sys.executable, "-m", "mt"], "train.accumulate=2")


def a_copy(run_dir, tmp_path):
    """A folder holding a copy of `run_dir` as runs/tiny, for a test that changes it."""
    shutil.copytree(run_dir, tmp_path / "runs" / "tiny")
    return tmp_path


def assert_same_training(one, two):
    assert losses(one) == pytest.approx(losses(two), rel=1e-4)
    a, b = (checkpoint.load(run / "last.pt") for run in (one, two))
    assert a["progress"]["step"] == b["progress"]["step"] == 8
    for name in a["model"]:
        torch.testing.assert_close(a["model"][name], b["model"][name], rtol=1e-3, atol=1e-4)


@needs_distributed
def test_two_ranks_equal_one_rank_accumulating_two_batches(one_rank, tmp_path, data_path, monkeypatch):
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    two = mt_train(tmp_path, [*TORCHRUN, "-m", "mt"], "train.accumulate=1")
    assert_same_training(one_rank, two)
    assert "distributed: 2 ranks × 1 accumulated batches" in (two / "train.log").read_text()


@needs_distributed
def test_resuming_on_more_processes_with_compiled_layers(one_rank, tmp_path, data_path, monkeypatch):
    """A resume under torchrun says what an update becomes; with train.compile, DDP wraps the compiled layers
    (`mt.fastpaths.compiled`, whose graphs tests/test_fastpaths.py checks against the eager layers)."""
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    folder = a_copy(one_rank, tmp_path)
    run_dir = mt_train(folder, [*TORCHRUN, str(ROOT / "tests" / "eager_compile_mt.py")], "train.max_steps=10",
                       "train.accumulate=2", "train.compile=true", resume=True)
    # Each rank traced one encoder layer graph and one decoder layer graph.
    assert [(folder / f"graphs.{rank}").read_text() for rank in (0, 1)] == ["2\n", "2\n"]
    assert checkpoint.load(run_dir / "last.pt")["progress"]["ranks"] == 2
    assert [r["step"] for r in map(json.loads, (run_dir / checkpoint.METRICS).read_text().splitlines())
            if "train_loss" in r][-1] == 10
    assert ("the run trained on 1 process(es) and goes on with 2: an update now takes 4 batches of 600 tokens "
            "instead of 2") in (run_dir / "train.log").read_text()


@needs_distributed
def test_a_start_refused_under_torchrun_ends_every_rank_cleanly(one_rank, tmp_path, data_path):
    folder = a_copy(one_rank, tmp_path)
    result = subprocess.run([*TORCHRUN, "-m", "mt", "train", "--config", TINY, "--quiet"], cwd=folder,  # it exists
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(folder),
                                 "MT_DATA_PATH": str(data_path)},
                            capture_output=True, text=True, timeout=300)
    assert result.stderr.count("error: run folder") == 2, result.stderr[-3000:]  # each rank's one line
    assert "terminate called" not in result.stderr  # a rank left in the process group aborted at exit
    assert "exitcode  : 2" in result.stderr


def test_accumulation_equals_one_big_batch(in_tmp):
    """Accumulating batches A and B gives the update that one batch of A and B together gives."""
    from mt.config import load_config
    from mt.data import collate
    from mt.model import Transformer
    from mt.train import loss_fn

    config = load_config(TINY)
    torch.manual_seed(0)
    model = Transformer(config.model, 50)
    twin = Transformer(config.model, 50)
    twin.load_state_dict(model.state_dict())
    a = collate([[5, 6, 7], [8, 9]], [[10, 11], [12]])
    b = collate([[13, 14, 15, 16]], [[17, 18, 19]])
    both = collate([[5, 6, 7], [8, 9], [13, 14, 15, 16]], [[10, 11], [12], [17, 18, 19]])
    tokens = a.target_tokens + b.target_tokens
    for batch in (a, b):
        (loss_fn(model, batch, 0.1)[0] / tokens).backward()
    (loss_fn(twin, both, 0.1)[0] / both.target_tokens).backward()
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
