"""Nothing the user has is lost, and bad input is one line: the run-folder lock, checkpoints that back each other
up, what --overwrite and --resume do with a folder, and the error messages of careless or hostile input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, one_line_error, write_pair
from mt import checkpoint
from mt.cli import app
from mt.config import load_config
from mt.errors import ConfigError, MtError

TINY = str(ROOT / "configs" / "tiny.yaml")


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def mt(*args, cwd, data_path, stdin=subprocess.DEVNULL, **popen):
    """`mt` in a process of its own."""
    return subprocess.Popen([sys.executable, "-m", "mt", *map(str, args)], cwd=cwd, stdin=stdin,
                            env={**os.environ, "MT_DATA_PATH": str(data_path)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **popen)


def finish(process, timeout=120):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


# The lock ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_command_on_a_run_in_use_is_refused_and_a_killed_run_leaves_no_stale_lock(tmp_path, data_path):
    long = ["--quiet", "--set", "train.max_steps=100000", "--set", "train.valid_every=100000", "--set",
            "data.max_pairs=300"]
    first = mt("train", "--config", TINY, *long, cwd=tmp_path, data_path=data_path)
    run_dir = tmp_path / "runs" / "tiny"
    deadline = time.monotonic() + 120
    while not (run_dir / checkpoint.TOKENIZER).is_file():  # it holds the lock and has started to train
        assert first.poll() is None and time.monotonic() < deadline, first.stderr.read()
        time.sleep(0.2)
    seconds = [mt("train", "--config", TINY, *flags, cwd=tmp_path, data_path=data_path)  # all three at once
               for flags in ([], ["--resume"], ["--overwrite"])]
    for second in seconds:
        code, _, err = finish(second)
        assert code == 2, err
        assert err.startswith(f"error: runs/tiny is in use by process {first.pid} (mt train --config {TINY} ")
        assert err.strip().endswith("); wait for it to end or stop it") and len(err.strip().splitlines()) == 1
    assert run_dir.is_dir() and first.poll() is None  # the first run goes on, its folder untouched
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=30)
    # The lock went with the killed process: a resume takes it (and starts a run that has no checkpoint yet).
    code, _, err = finish(mt("train", "--config", TINY, "--resume", "--set", "train.max_steps=2", "--set",
                             "data.max_pairs=300", cwd=tmp_path, data_path=data_path))
    assert code == 0, err
    assert checkpoint.load(run_dir / checkpoint.LAST)["progress"]["step"] == 2


def test_the_lock_is_released_at_the_end_and_names_its_holder(tmp_path):
    run_dir = tmp_path / "runs" / "x"
    with checkpoint.RunLock(run_dir), pytest.raises(MtError, match=rf"^{run_dir} is in use by process "
                                                                   rf"{os.getpid()} \("), checkpoint.RunLock(run_dir):
        pass
    with checkpoint.RunLock(run_dir):  # free again
        pass
    assert not run_dir.exists()  # the lock file lies beside the run folder, which it does not make


def test_a_runs_folder_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "open", read_only)
    with pytest.raises(MtError, match=rf"^cannot write in {tmp_path / 'runs'}: Read-only file system"):
        checkpoint.RunLock(tmp_path / "runs" / "x").__enter__()


# Checkpoints ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "zero-filled"])
def test_a_numbered_checkpoint_keeps_its_bytes_when_last_pt_is_damaged_in_place(tiny_run, tmp_path, monkeypatch,
                                                                                 data_path, damage):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    run_dir = Path("runs/tiny")
    newest = checkpoint.numbered_checkpoints(run_dir)[0]
    size = (run_dir / checkpoint.LAST).stat().st_size
    with open(run_dir / checkpoint.LAST, "r+b") as f:  # in place, as an editor or a crashed copy tool does
        if damage == "truncated":
            f.truncate(0)
        else:
            f.write(bytes(size))
    assert newest.stat().st_size == size
    assert checkpoint.load(newest)["progress"]["step"] == 60  # the fallback is whole
    if damage == "zero-filled":
        return  # the resume is the same for both
    result = run("train", "--config", TINY, "--resume", "--set", "train.max_steps=62")
    assert result.exit_code == 0, result.output
    assert checkpoint.load(run_dir / checkpoint.LAST)["progress"]["step"] == 62  # no step lost
    assert run("average", "--last", 2).exit_code == 0


@pytest.mark.parametrize("replacement", ["best.pt", "another model's"])
def test_resume_falls_back_when_last_pt_is_not_this_runs_resumable_checkpoint(tiny_run, tmp_path, monkeypatch,
                                                                               data_path, caplog, replacement):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    run_dir = Path("runs/tiny")
    if replacement == "best.pt":
        shutil.copy(run_dir / checkpoint.BEST, run_dir / checkpoint.LAST)
    else:
        state = checkpoint.load(run_dir / checkpoint.LAST)
        state["model"] = {name: torch.zeros(3, 3) for name in state["model"]}
        checkpoint.save(state, run_dir / checkpoint.LAST)
    from mt.train import train

    train(load_config(TINY, ["train.max_steps=62"]), resume=True, show_progress=False)
    assert checkpoint.load(run_dir / checkpoint.LAST)["progress"]["step"] == 62
    assert "resuming from step_0000060.pt instead" in caplog.text
    for path in [run_dir / checkpoint.LAST, *checkpoint.numbered_checkpoints(run_dir)]:
        path.write_bytes(b"")  # none loads now: an error, not a new start
    one_line_error(run("train", "--config", TINY, "--resume"), r"cannot resume runs/tiny: no checkpoint loads")


# What --overwrite and --resume do with a run folder ------------------------------------------------------------


def test_overwrite_deletes_nothing_mt_did_not_write_and_checks_before_it_deletes(tiny_run, tmp_path, monkeypatch,
                                                                                 data_path):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    run_dir = Path("runs/tiny")
    before = sorted(p.name for p in run_dir.iterdir())
    one_line_error(run("train", "--config", TINY, "--overwrite", "--set", "data.train=multi30k:trian"),
                   r"data.train: .*trian")
    assert sorted(p.name for p in run_dir.iterdir()) == before  # checked first: nothing deleted
    for foreign in ("cache/my_notes.txt", "eval/mytest.beam5.en"):
        (run_dir / foreign).parent.mkdir(exist_ok=True)
        (run_dir / foreign).write_text("mine\n")
        one_line_error(run("train", "--config", TINY, "--overwrite"), rf"holds files mt did not write \({foreign}\)")
        assert (run_dir / foreign).read_text() == "mine\n" and (run_dir / checkpoint.BEST).is_file()
        (run_dir / foreign).unlink()
    result = run("eval", "--test", "multi30k:valid", "--beam", 1)  # mt eval's own file, listed in eval/index.json
    assert result.exit_code == 0, result.output
    result = run("train", "--config", TINY, "--overwrite", "--set", "train.max_steps=2")
    assert result.exit_code == 0, result.output
    assert not (run_dir / "eval").exists()


def test_resume_starts_a_run_that_has_no_checkpoint_yet(in_tmp, caplog):
    from mt.train import train

    run_dir = in_tmp / "runs" / "tiny"
    (run_dir / "cache").mkdir(parents=True)  # killed in its data preparation: a config and a cache, no checkpoint
    from mt.config import save_config

    save_config(load_config(TINY), run_dir / checkpoint.CONFIG)
    train(load_config(TINY, ["train.max_steps=2"]), resume=True, show_progress=False)
    assert "has no checkpoint yet (its first start stopped early): --resume starts it" in caplog.text
    assert checkpoint.load(run_dir / checkpoint.LAST)["progress"]["step"] == 2
    train(load_config(TINY, ["name=new", "train.max_steps=2"]), resume=True, show_progress=False)
    assert "does not exist yet: --resume starts the run" in caplog.text


def test_eval_of_test_files_of_the_same_name_in_two_commands_keeps_both(trained_copy):
    d1 = write_pair(trained_copy / "d1", "test", ["Un chat."], ["A cat."])
    d2 = write_pair(trained_copy / "d2", "test", ["Un chien.", "Deux chiens."], ["A dog.", "Two dogs."])
    for src, ref in (d1, d2):
        assert run("eval", "--src", src, "--ref", ref, "--beam", 1).exit_code == 0
    index = checkpoint.read_eval_index(trained_copy / "runs" / "tiny" / "eval")
    assert len(index) == 2
    lengths = sorted(len((trained_copy / "runs" / "tiny" / "eval" / name).read_text().splitlines())
                     for name in index)
    assert lengths == [1, 2]


@pytest.fixture
def trained_copy(tiny_run, tmp_path, monkeypatch, data_path):
    import shutil

    shutil.copytree(tiny_run, tmp_path / "w")
    monkeypatch.chdir(tmp_path / "w")
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    return tmp_path / "w"


# Config values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["train.seed=99999999999999999999", "train.threads=99999999999999",
                                      "model.max_positions=100000000000000000000", "model.d_model=1e20",
                                      "model.d_model=100000000000000000000", "decode.max_len_b=99999999999999999999",
                                      "decode.max_len_a=1.0e+30"])
def test_huge_numbers_are_refused_with_their_key(override):
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"^--set {key}=.*: {key} must be (<=|an integer)"):
        load_config(overrides=[override])


def test_every_integer_key_has_a_range():
    import dataclasses
    import typing

    from mt.config import Config

    def walk(cls, prefix=""):
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from walk(hint, f"{prefix}{f.name}.")
            elif hint in (int, float):
                yield prefix + f.name, f.metadata

    unbounded = [key for key, meta in walk(Config) if meta.get("max") is None and meta.get("inf") is False
                 and key not in ("train.lr", "train.weight_decay", "train.clip_norm")]
    assert unbounded == []


def test_a_yaml_alias_bomb_is_refused_at_once_in_a_short_message(tmp_path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[i]
        lines.append(f"{name}: &{name} [*{previous},*{previous},*{previous},*{previous},*{previous},*{previous},"
                     f"*{previous},*{previous},*{previous}]")
    lines.append("train: *i")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert time.monotonic() - started < 5
    assert "aliases expand to more than" in str(error.value) and len(str(error.value)) < 400


def test_a_wrong_value_is_never_printed_whole(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("train:\n  lr: [" + ", ".join(["1"] * 5000) + "]\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert len(str(error.value)) < 400


def test_runs_dir_starting_with_a_tilde_is_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(overrides=["runs_dir=~/x"]).run_dir == tmp_path / "x" / "multi30k"


# Errors of training --------------------------------------------------------------------------------------------


def test_a_run_that_diverges_before_its_first_save_says_no_checkpoint_was_saved(in_tmp):
    one_line_error(run("train", "--config", TINY, "--set", "train.lr=1e30", "--set", "train.max_nonfinite=2",
                       "--set", "train.log_every=2"),
                   r"non-finite updates in a row by step \d+; stopping\. No checkpoint was saved; lower train\.lr")


def test_a_corpus_with_old_mac_line_ends_is_named(in_tmp):
    src, tgt = in_tmp / "mac.fr", in_tmp / "mac.en"
    src.write_bytes(b"Un chat.\rUn chien.\r" * 50)
    tgt.write_bytes(b"A cat.\rA dog.\r" * 50)
    one_line_error(run("train", "--config", TINY, "--set", f"data.train={{src: {src}, tgt: {tgt}}}"),
                   r"mac\.(fr|en), line 1: a carriage return \(CR\) inside the line; lines must end with LF")


@pytest.mark.parametrize("phase", ["prepare_data", "tune_run"])
def test_sigterm_outside_the_training_loop_says_where_it_stopped(in_tmp, monkeypatch, phase):
    import mt.evaluate
    import mt.train

    def stopped(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first
        raise AssertionError("not interrupted")

    target = mt.train if phase == "prepare_data" else mt.evaluate
    monkeypatch.setattr(target, phase, stopped)
    overrides = ["--set", "train.max_steps=2"] + (["--set", "train.tune_decoding=true"] if phase == "tune_run" else [])
    result = run("train", "--config", TINY, *overrides)
    assert result.exit_code == 130, result.output
    where = "preparing the data" if phase == "prepare_data" else "choosing the decoding settings"
    assert f"stopped by SIGTERM while {where}" in result.stderr


def test_a_dangling_symlink_in_a_run_folder_is_skipped_with_a_warning(trained_copy):
    (trained_copy / "runs" / "tiny" / "gone").symlink_to(trained_copy / "nowhere")
    (trained_copy / "runs" / "broken").symlink_to(trained_copy / "nowhere")
    result = run("runs")
    assert result.exit_code == 0, result.output
    assert "tiny" in result.stdout


# The command line and the Translator API -----------------------------------------------------------------------


@pytest.mark.parametrize(("args", "message"), [
    (["translate", "--beam", "0", "x"], r"^error: Invalid value for '--beam'"),
    (["trnslate"], r"^error: No such command 'trnslate'"),
    (["train", "--set"], r"^error: Option '--set' requires an argument"),
])
def test_usage_errors_are_one_line(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "mt", *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    import re

    assert re.search(message, result.stderr)


@pytest.mark.slow
def test_translate_with_stdin_closed_is_one_line(tiny_run):
    result = subprocess.run([sys.executable, "-m", "mt", "translate"], cwd=tiny_run, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.close(0))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: no input: standard input is closed; give TEXT or --input FILE"


def test_text_lines_are_split_as_stdin_splits_them_and_blank_lines_get_every_nbest_line(trained_copy):
    one = run("translate", "Un chat.\fUn chien.\u2028Deux.", "--beam", 1)
    assert one.exit_code == 0 and len(one.stdout.splitlines()) == 1
    assert run("translate", "--beam", 1, input="Un chat.\fUn chien.\u2028Deux.\n").stdout == one.stdout
    result = run("translate", "--nbest", 3, input="Un chat.\n\n")
    assert result.exit_code == 0, result.output
    assert [line.split(" ||| ")[0] for line in result.stdout.splitlines()] == ["0"] * 3 + ["1"] * 3


def test_the_translator_refuses_bad_arguments_and_reads_a_generator(trained_copy):
    from mt.translate import Translator

    translator = Translator.load("runs/tiny")
    assert len(translator.translate(t for t in ["Un chat.", "Un chien."])) == 2
    with pytest.raises(ValueError, match="beam_size must be an integer of at least 1"):
        translator.translate(["Un chat."], beam_size=0)
    with pytest.raises(ValueError, match=r"nbest must be an integer from 1 to the beam size \(2\), got 3"):
        translator.translate_nbest(["Un chat."], beam_size=2, nbest=3)
    with pytest.raises(ValueError, match="nbest must be an integer from 1"):
        translator.translate_nbest(["Un chat."], nbest=0)
