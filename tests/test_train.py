"""The schedule, the loss, and training runs on a slice of real data (tiny config)."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from mt import checkpoint
from mt.config import load_config
from mt.data import LAYOUTS, Layout, collate
from mt.model import Transformer
from mt.train import Trainer, inverse_sqrt_schedule, loss_fn, train

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


def test_logged_loss_covers_every_step_since_the_last_log_also_across_a_validation(in_tmp, monkeypatch):
    real_step = Trainer.step

    def step(self, batch_indices):  # the step number as the loss, one target token
        _, _, lr = real_step(self, batch_indices)
        return torch.tensor(float(self.progress.step)), 1, lr

    monkeypatch.setattr(Trainer, "step", step)
    run_dir = train(load_config(TINY, [*short("window", 6), "train.log_every=3", "train.valid_every=2"]),
                    show_progress=False)
    assert [(r["step"], r["train_loss"]) for r in metrics(run_dir) if "train_loss" in r] == [(3, 2.0), (6, 5.0)]


def test_resume_keeps_a_best_checkpoint_newer_than_the_one_it_resumes_from(in_tmp, caplog):
    run_dir = train(load_config(TINY, short("newer_best", 10)), show_progress=False)
    best = checkpoint.load(run_dir / checkpoint.BEST)
    checkpoint.save({**best, "valid_bleu": 99.0}, run_dir / checkpoint.BEST)  # better than any later validation
    last = checkpoint.load(run_dir / checkpoint.LAST)
    last["progress"]["best_bleu"] = -1.0  # saved before best.pt: as after a kill between the two writes
    checkpoint.save(last, run_dir / checkpoint.LAST)
    train(load_config(TINY, short("newer_best", 20)), resume=True, show_progress=False)
    assert checkpoint.load(run_dir / checkpoint.BEST)["valid_bleu"] == 99.0
    assert checkpoint.load(run_dir / checkpoint.LAST)["progress"]["best_bleu"] == 99.0
    assert "best.pt (step 10, BLEU 99.00) is newer than the checkpoint resumed from" in caplog.text


def test_a_run_stopped_between_validations_is_validated_when_resumed_with_nothing_left(in_tmp, monkeypatch, caplog):
    import logging
    import os
    import signal

    from mt.errors import Interrupted

    caplog.set_level(logging.INFO, logger="mt")
    real_step = Trainer.step

    def step(self, batch_indices):  # Ctrl-C during step 3, before any validation
        out = real_step(self, batch_indices)
        if self.progress.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(Trainer, "step", step)
    with pytest.raises(Interrupted, match="stopped by SIGINT at step 3"):
        train(load_config(TINY, short("stopped", 0)), show_progress=False)
    assert "no stopping condition (train.max_steps, max_epochs, max_minutes and patience are all 0)" in caplog.text
    run_dir = in_tmp / "runs" / "stopped"
    assert "WARNING mt.train: stopped by SIGINT at step 3; checkpoint saved. Resume with: mt train --config " \
        in (run_dir / checkpoint.LOG).read_text()  # the log says how the run ended
    assert not (run_dir / checkpoint.BEST).exists()
    train(load_config(TINY, short("stopped", 3)), resume=True, show_progress=False)
    assert "the run has already met train.max_steps (3): raise it with --set" in caplog.text
    assert [r["step"] for r in metrics(run_dir) if "valid_bleu" in r] == [3]
    assert checkpoint.load(run_dir / checkpoint.BEST)["step"] == 3
    train(load_config(TINY, short("stopped", 3)), resume=True, show_progress=False)  # nothing more to do
    assert [r["step"] for r in metrics(run_dir) if "valid_bleu" in r] == [3]


def short(name: str, steps: int) -> list[str]:
    # 150 pairs make a handful of batches: 20 steps cross several epoch boundaries. Dropout on, so the
    # random state matters.
    return [f"name={name}", f"train.max_steps={steps}", "data.max_pairs=150", "model.dropout=0.1",
            "train.valid_every=10", "train.log_every=5", "train.valid_sentences=20"]


def test_resumed_run_ends_identical_to_a_straight_run(in_tmp):
    """Resume against straight through: the same losses, validations and weights; and the same config and seed
    give the same tokenizer and losses."""
    straight = train(load_config(TINY, short("straight", 20)), show_progress=False)
    split = train(load_config(TINY, short("split", 10)), show_progress=False)
    assert checkpoint.load(split / checkpoint.LAST)["progress"]["step"] == 10
    train(load_config(TINY, short("split", 20)), resume=True, show_progress=False)
    assert checkpoint.load(split / checkpoint.LAST)["progress"]["step"] == 20
    assert checkpoint.load(straight / "last.pt")["progress"]["epoch"] >= 2
    assert (straight / "tokenizer.model").read_bytes() == (split / "tokenizer.model").read_bytes()
    assert [r["step"] for r in metrics(split) if "valid_bleu" in r] == [10, 20]
    losses = [[r["train_loss"] for r in metrics(run) if "train_loss" in r] for run in (straight, split)]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    a, b = (checkpoint.load(run / "last.pt")["model"] for run in (straight, split))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_resumed_run_keeps_the_batch_layout_it_started_with(in_tmp, monkeypatch, caplog):
    import mt.train

    run_dir = train(load_config(TINY, short("layout", 8)), show_progress=False)
    state = checkpoint.load(run_dir / checkpoint.LAST)
    assert state["progress"]["batch_layout"] in {str(layout) for layout in LAYOUTS}
    state["progress"]["batch_layout"] = "target 6"  # as if the data had made that layout the best at the start
    checkpoint.save(state, run_dir / checkpoint.LAST)
    used, real = [], mt.train.make_batches
    monkeypatch.setattr(mt.train, "make_batches", lambda *args, **kw: used.append(kw["layout"]) or real(*args, **kw))
    train(load_config(TINY, short("layout", 12)), resume=True, show_progress=False)
    assert used and set(used) == {Layout("target", 6)}
    del state["progress"]["batch_layout"]  # a checkpoint of an older mt, saved mid-epoch
    state["progress"]["batch_in_epoch"] = 1
    checkpoint.save(state, run_dir / checkpoint.LAST)
    train(load_config(TINY, short("layout", 12)), resume=True, show_progress=False)
    assert "does not say how its batches were cut" in caplog.text
    assert checkpoint.load(run_dir / checkpoint.LAST)["progress"]["batch_layout"] != ""


def test_tokenized_data_stays_in_the_run_until_it_finishes(in_tmp, monkeypatch):
    import datasets

    def arrow_files(folder: Path) -> list[Path]:
        return sorted(folder.rglob("*.arrow"))

    during = []
    validate = Trainer.validate_and_save
    monkeypatch.setattr(Trainer, "validate_and_save",
                        lambda self: during.extend(arrow_files(self.run_dir / checkpoint.CACHE)) or validate(self))
    train(load_config(TINY, short("one", 2)), show_progress=False)
    shared = arrow_files(Path(datasets.config.HF_DATASETS_CACHE))
    run_dir = train(load_config(TINY, [*short("two", 2), "tokenizer.vocab_size=500"]), show_progress=False)
    assert during  # the tokenized pairs were in the run's cache/ while it trained ...
    assert not (run_dir / checkpoint.CACHE).exists()  # ... and went when it finished
    assert arrow_files(Path(datasets.config.HF_DATASETS_CACHE)) == shared  # a new tokenizer added nothing there


def test_resume_falls_back_to_the_newest_valid_checkpoint(in_tmp, caplog):
    run_dir = train(load_config(TINY, short("fallback", 20)), show_progress=False)
    assert sorted(p.name for p in run_dir.glob("step_*.pt")) == ["step_0000010.pt", "step_0000020.pt"]
    (run_dir / "last.pt").unlink()
    (run_dir / "step_0000020.pt").write_bytes(b"truncated")
    train(load_config(TINY, short("fallback", 25)), resume=True, show_progress=False)
    assert "resuming from step_0000010.pt instead" in caplog.text
    assert checkpoint.load(run_dir / "last.pt")["progress"]["step"] == 25
    # Steps 15 and 20 were logged, lost with their checkpoint, and trained again: logged once each.
    assert [r["step"] for r in metrics(run_dir) if "train_loss" in r] == [5, 10, 15, 20, 25]


def test_resuming_a_finished_run_logs_its_checkpoint_average_once(in_tmp):
    config = load_config(TINY, [*short("averaged", 20), "train.average_last=2"])
    run_dir = train(config, show_progress=False)
    train(config, resume=True, show_progress=False)  # as after a kill while tuning, which follows averaging
    assert [r["step"] for r in metrics(run_dir) if "averaged" in r] == [20]


def test_resume_refuses_another_model_names_changed_settings_and_keeps_the_runs_decoding(in_tmp, caplog):
    from dataclasses import replace

    from mt.config import save_config
    from mt.errors import ConfigError

    config = load_config(TINY, short("changes", 10))
    run_dir = train(config, show_progress=False)
    with pytest.raises(ConfigError, match=r"cannot resume .*: model\.d_ff: 64 → 96; tokenizer\.vocab_size: 600 → 500 "):
        train(load_config(TINY, [*short("changes", 20), "model.d_ff=96", "tokenizer.vocab_size=500"]), resume=True)
    tuned = replace(config, decode=replace(config.decode, beam_size=2, length_penalty=0.6))  # as mt tune stores it
    save_config(tuned, run_dir / checkpoint.CONFIG)
    with pytest.raises(ConfigError, match=r"cannot resume .*: data\.max_pairs: 150 → 5 \("):  # alone: the others pass
        train(load_config(TINY, [*short("changes", 20), "data.max_pairs=5", "data.workers=2",
                                 "data.test=multi30k:test_2017_flickr"]), resume=True)
    train(load_config(TINY, [*short("changes", 12), "train.lr=0.001", "data.test=multi30k:test_2017_flickr"]),
          resume=True, show_progress=False)
    assert ("with changed settings: data.test: multi30k:test_2016_flickr → multi30k:test_2017_flickr; "
            "train.lr: 0.003 → 0.001\n") in caplog.text  # max_steps: not worth a word
    assert "with changed settings: data.test" in (run_dir / checkpoint.LOG).read_text()  # kept with the run
    assert "decode section it has (mt tune may have chosen it), not this config's (decode.length_penalty: " \
           "0.6 → 1.0)" in caplog.text
    assert load_config(run_dir / checkpoint.CONFIG).decode == tuned.decode


def test_early_stopping_stops_after_patience(in_tmp):
    run_dir = train(load_config(TINY, [*short("patient", 1000), "train.patience=1", "train.valid_every=2",
                                       "train.lr=1e-9"]), show_progress=False)
    progress = checkpoint.load(run_dir / "last.pt")["progress"]
    assert progress["step"] == 4 and progress["bad_validations"] == 1  # lr 1e-9: greedy output, so BLEU, unchanged


def test_loss_is_torch_label_smoothed_cross_entropy():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = Transformer(load_config(TINY).model, 30).eval()
    batch = collate([[5, 6, 7], [5, 6, 7, 8, 9, 10]], [[8, 9], [4, 5, 6, 7, 8]])
    loss, nll = loss_fn(model, batch, 0.1)
    logits = model(batch.src, batch.tgt_in)
    expected = F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(), ignore_index=0,
                               label_smoothing=0.1, reduction="sum")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(nll, F.cross_entropy(logits.flatten(0, 1), batch.tgt_out.flatten(),
                                                    ignore_index=0, reduction="sum"))


def test_tensorboard_logging(in_tmp, monkeypatch):
    import sys
    import types

    from mt.errors import MtError

    written = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter
        def __init__(self, folder):
            written.append(("folder", folder))

        def add_scalar(self, name, value, step):
            written.append((name, step))

        def flush(self):
            pass

        def close(self):
            written.append(("closed", None))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    train(load_config(TINY, [*short("board", 10), "train.tensorboard=true"]), show_progress=False)
    assert written[0][1].endswith("runs/board/tensorboard")
    assert ("train_loss", 5) in written and ("valid_bleu", 10) in written
    assert written[-1] == ("closed", None)  # its writer thread ended with the run
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(MtError, match=r"needs the tensorboard package: pip install tensorboard"):
        train(load_config(TINY, [*short("board2", 10), "train.tensorboard=true"]), show_progress=False)


def poison_training_steps(monkeypatch, steps):
    """Makes the loss NaN at these training steps (1-based; validation passes are left alone)."""
    import mt.train

    real_loss, calls = mt.train.loss_fn, {"n": 0}

    def loss_fn(model, batch, smoothing, compiled=False):
        loss, nll = real_loss(model, batch, smoothing, compiled)
        if not model.training:
            return loss, nll
        calls["n"] += 1
        return (loss * float("nan"), nll) if calls["n"] in steps else (loss, nll)

    monkeypatch.setattr(mt.train, "loss_fn", loss_fn)


def test_nonfinite_updates_are_skipped_and_training_goes_on(in_tmp, monkeypatch, caplog):
    poison_training_steps(monkeypatch, {6, 7, 8})
    config = load_config(TINY, ["name=nan", "train.max_steps=12", "train.valid_every=6", "train.log_every=2",
                                "train.max_nonfinite=4", "data.max_pairs=300"])
    run_dir = train(config, show_progress=False)
    # Reported at the logging steps 6 and 8: the NaN of step 6, then those of steps 7 and 8.
    assert "1 update(s) skipped for a non-finite gradient by step 6" in caplog.text
    assert "2 update(s) skipped for a non-finite gradient by step 8 (3 in a row at most)" in caplog.text
    saved = checkpoint.load(run_dir / checkpoint.LAST)
    assert saved["progress"]["step"] == 12
    assert all(torch.isfinite(t).all() for t in saved["model"].values())  # the NaN updates were never applied
    # Adam took 9 updates, not 12: the skipped ones left its state (and step count) untouched.
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {9}


def test_nonfinite_updates_in_a_row_stop_the_run(in_tmp, monkeypatch):
    from mt.errors import MtError

    poison_training_steps(monkeypatch, set(range(6, 100)))
    config = load_config(TINY, ["name=nan", "train.max_steps=40", "train.valid_every=5", "train.log_every=2",
                                "train.max_nonfinite=4", "data.max_pairs=300"])
    # Checked at logging intervals (every 2 steps here): the 4th in a row or the one after it stops the run.
    with pytest.raises(MtError, match="[45] non-finite updates in a row"):
        train(config, show_progress=False)


def test_train_compile_trains_the_compiled_layers(in_tmp, monkeypatch):
    torch._dynamo.reset()  # graphs and guards of earlier tests in this process would be checked and recompiled
    made, compile_ = [], torch.compile

    class Counted(torch.nn.Module):  # counts the forward passes that go through a compiled layer
        def __init__(self, inner):
            super().__init__()
            self.inner, self.passes = inner, 0

        def forward(self, *args, **kwargs):
            self.passes += 1
            return self.inner(*args, **kwargs)

    def eager_compile(model, **options):  # inductor would take a minute here; the wiring is what is tested
        made.append((type(model).__name__, options, Counted(compile_(model, backend="eager", **options))))
        return made[-1][-1]

    monkeypatch.setattr("mt.fastpaths.torch.compile", eager_compile)
    run = train(load_config(TINY, short("compiled", 10) + ["train.compile=true"]), show_progress=False)
    assert [(kind, options) for kind, options, _ in made] == [("EncoderLayer", {"dynamic": True})] * 2 + [
        ("DecoderLayer", {"dynamic": True})] * 2
    # Every training step went through each of them, one batch each; validation runs uncompiled.
    assert [net.passes for *_, net in made] == [10] * 4
    losses = [r["train_loss"] for r in metrics(run) if "train_loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_bf16_on_a_cpu_without_bf16_instructions_is_warned_about(in_tmp, monkeypatch, caplog):
    monkeypatch.setattr("mt.devices.cpu_has_bf16", lambda: False)
    train(load_config(TINY, short("bf16", 2) + ["train.precision=bf16", "train.device=cpu"]),
          show_progress=False)
    assert "this CPU has no bf16 instructions" in caplog.text


def test_bf16_is_asked_for_in_vain_only_on_a_cpu_without_bf16_instructions(monkeypatch):
    from mt.devices import bf16_without_instructions

    config = load_config(TINY, ["train.precision=bf16"])
    for has_bf16 in (False, True):
        monkeypatch.setattr("mt.devices.cpu_has_bf16", lambda has_bf16=has_bf16: has_bf16)
        assert bf16_without_instructions(config, torch.device("cpu")) == (not has_bf16)
    assert not bf16_without_instructions(load_config(TINY), torch.device("cpu"))  # auto: fp32 there
