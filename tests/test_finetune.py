"""Fine-tuning: `mt train --init-from RUN` starts from a run's weights and tokenizer, with a new optimizer."""

import shutil

import torch
from typer.testing import CliRunner

from conftest import ROOT, one_line_error
from mt import checkpoint
from mt.cli import app
from mt.config import load_run_config

TINY = str(ROOT / "configs" / "tiny.yaml")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_fine_tuned_run_starts_from_its_parents_weights_and_tokenizer(tiny_run, in_tmp):
    parent = tiny_run / "runs" / "tiny"
    result = run("train", "--config", TINY, "--init-from", parent, "--set", "name=child", "--set", "train.lr=1e-9",
                 "--set", "train.max_steps=1", "--set", "train.warmup_steps=1", "--set", "model.dropout=0.1",
                 "--set", "data.train=[multi30k:train, tatoeba:train]", "--quiet")
    assert result.exit_code == 0, result.output
    child = in_tmp / "runs" / "child"
    assert (child / checkpoint.TOKENIZER).read_bytes() == (parent / checkpoint.TOKENIZER).read_bytes()
    config = load_run_config(child / checkpoint.CONFIG)
    assert config.init_from == str(parent) and config.model.dropout == 0.1
    assert config.model.d_model == load_run_config(parent / checkpoint.CONFIG).model.d_model
    start = checkpoint.load(parent / checkpoint.BEST)["model"]
    after_one_step = checkpoint.load(child / checkpoint.LAST)
    assert after_one_step["progress"]["step"] == 1  # a schedule of its own, from step 0
    for name, weight in start.items():  # one step at lr 1e-9 from the parent's weights
        torch.testing.assert_close(after_one_step["model"][name], weight, atol=1e-6, rtol=0)
    info = run("info", child)
    assert info.exit_code == 0 and f"fine-tuned from: {parent}" in info.stdout

    again = run("train", "--config", TINY, "--init-from", parent, "--set", "name=child", "--set", "train.lr=1e-9",
                "--set", "train.max_steps=2", "--set", "train.warmup_steps=1", "--set", "model.dropout=0.1",
                "--set", "data.train=[multi30k:train, tatoeba:train]", "--resume", "--quiet")
    assert again.exit_code == 0, again.output  # a preemptible job repeats its command with --resume
    assert checkpoint.load(child / checkpoint.LAST)["progress"]["step"] == 2


def test_a_fine_tuning_config_that_changes_the_model_or_tokenizer_is_refused(tiny_run, in_tmp):
    parent = tiny_run / "runs" / "tiny"
    result = run("train", "--config", TINY, "--init-from", parent, "--set", "name=child", "--set", "model.d_model=64",
                 "--set", "tokenizer.vocab_size=800")
    one_line_error(result, r"keeps its parent's model and tokenizer.*model\.d_model: 32 → 64.*"
                           r"tokenizer\.vocab_size: 600 → 800")
    assert not (in_tmp / "runs" / "child").exists()
    one_line_error(run("train", "--config", TINY, "--init-from", in_tmp / "nowhere"), "run folder not found")
    empty = in_tmp / "empty"
    shutil.copytree(parent, empty)
    for weights in empty.glob("*.pt"):
        weights.unlink()
    one_line_error(run("train", "--config", TINY, "--init-from", empty, "--set", "name=child"),
                   "neither best.pt nor last.pt")
