"""The schedule, the loss, and training runs on a slice of real data (tiny config)."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from mt import checkpoint
from mt.config import load_config
from mt.data import collate
from mt.model import Transformer
from mt.train import inverse_sqrt_schedule, loss_fn, train

TINY = ROOT / "configs" / "tiny.yaml"


def test_schedule_warms_up_then_decays_with_inverse_square_root():
    assert inverse_sqrt_schedule(1, 100) == pytest.approx(0.01)
    assert inverse_sqrt_schedule(100, 100) == 1.0
    assert inverse_sqrt_schedule(400, 100) == pytest.approx(0.5)


def test_loss_ignores_padding():
    torch.manual_seed(0)
    model = Transformer(load_config(TINY).model, 30).eval()
    alone = collate([[5, 6, 7]], [[8, 9]])
    padded = collate([[5, 6, 7], [5, 6, 7, 8, 9, 10]], [[8, 9], [4, 5, 6, 7, 8]])
    loss_alone, nll_alone = loss_fn(model, alone, 0.1)
    loss_padded, _ = loss_fn(model, padded, 0.1)
    loss_second, _ = loss_fn(model, collate([[5, 6, 7, 8, 9, 10]], [[4, 5, 6, 7, 8]]), 0.1)
    torch.testing.assert_close(loss_padded, loss_alone + loss_second, rtol=1e-4, atol=1e-4)
    assert nll_alone.item() == pytest.approx(3 * math.log(30), rel=0.3)  # near uniform at the start


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / checkpoint.METRICS).read_text().splitlines()]


def test_resume_continues_where_the_run_stopped(in_tmp):
    config = load_config(TINY, ["train.max_steps=20", "train.valid_every=10", "train.log_every=5"])
    run_dir = train(config, show_progress=False)
    first = checkpoint.load(run_dir / checkpoint.LAST)
    assert first["progress"]["step"] == 20
    longer = load_config(TINY, ["train.max_steps=30", "train.valid_every=10", "train.log_every=5"])
    train(longer, resume=True, show_progress=False)
    resumed = checkpoint.load(run_dir / checkpoint.LAST)
    assert resumed["progress"]["step"] == 30
    assert [r["step"] for r in metrics(run_dir) if "valid_bleu" in r] == [10, 20, 30]
