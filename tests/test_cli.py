"""The command line, end to end on a slice of real Multi30k, and its one-line errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from unittest.mock import Mock

import pytest
import torch
from typer.testing import CliRunner

from conftest import ROOT, one_line_error, write_pair
from mt import checkpoint
from mt.cli import app
from mt.errors import DataError
from mt.tokenizer import Tokenizer
from mt.translate import Translator

TINY = str(ROOT / "configs" / "tiny.yaml")


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def trained(tiny_run, tmp_path):
    """A copy of the session's tiny run (conftest.tiny_run), which a test may change."""
    folder = tmp_path / "trained"
    shutil.copytree(tiny_run, folder, symlinks=True)
    return folder


def test_train_leaves_a_complete_run_folder(trained):
    run_dir = trained / "runs" / "tiny"
    for name in ("config.yaml", "tokenizer.model", "best.pt", "last.pt", "metrics.jsonl", "train.log", "data.json"):
        assert (run_dir / name).is_file(), name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0] - 1.0  # it learned something
    assert any("valid_bleu" in r for r in records)
    log = (run_dir / "train.log").read_text()  # --quiet: nothing on the console, but the log has it all
    assert re.search(r"step 10, epoch \d+: train loss \d+\.\d{3}, lr \d\.\d\de-\d\d, [\d,]+ target tokens/s", log)


def test_translate_text_file_and_stdin(trained, monkeypatch):
    monkeypatch.chdir(trained)
    result = run("translate", "Deux hommes marchent dans la rue.")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 1 and result.stdout.strip()
    lines = [f"Un homme numéro {i} marche." for i in range(100)]
    lines[50] = ""
    result = run("translate", "--beam", 1, input="\n".join(lines) + "\n")
    out = result.stdout.splitlines()
    assert result.exit_code == 0 and len(out) == 100 and out[50] == ""
    one_by_one = [run("translate", "--beam", 1, lines[i]).stdout.strip() for i in (0, 99)]
    assert [out[0], out[99]] == one_by_one  # in order, and batching changes nothing
    Path("in.fr").write_text("Un chat.\nUn chien.\n", encoding="utf-8")
    result = run("translate", "--input", "in.fr", "--run", "runs/tiny")
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2
    assert run("translate", "--input", "-", input="Un chat.\nUn chien.\n").stdout == result.stdout  # - is stdin
    assert run("translate", "--run", "runs/tiny", "Un chat.\nUn chien.").stdout == result.stdout  # TEXT's lines
    assert run("translate", "Un", "chat.").stdout == result.stdout.splitlines()[0] + "\n"  # unquoted: its words
    one_line_error(run("translate", "Un chat.\nUn chien.", "--attention", "a.png"),
                   r"--attention draws one sentence; TEXT has 2 lines")


def test_eval_prints_scores_with_signatures(trained, monkeypatch, data_path):
    monkeypatch.chdir(trained)
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    result = run("eval", "--test", "multi30k:test_2016_flickr", "--beam", 1)
    assert result.exit_code == 0, result.output
    assert "BLEU" in result.stdout and "chrF2" in result.stdout and "tok:13a" in result.stdout
    assert result.stdout.splitlines()[1].startswith("multi30k:test_2016_flickr")  # one row per test set
    assert "looping" in result.stdout.splitlines()[0]
    result = run("eval", "--run", "runs/tiny", "--json", "--beam", 1)
    [report] = json.loads(result.stdout)
    assert report["test"] == "multi30k:test_2016_flickr" and report["sentences"] == 1000
    assert {s["metric"] for s in report["scores"]} == {"BLEU", "chrF2"}
    hyps = Path(report["hypotheses"]).read_text(encoding="utf-8").splitlines()
    assert len(hyps) == 1000
    # Other repetition guards than the run's: their hypotheses go beside the run's own, not over them. No
    # bigram twice leaves no piece, pair or triple 4 times in a row: nothing loops.
    result = run("eval", "--run", "runs/tiny", "--json", "--beam", 1, "--no-repeat-ngram-size", 0)
    [unguarded] = json.loads(result.stdout)
    assert Path(unguarded["hypotheses"]).name == Path(report["hypotheses"]).name.replace(".beam1", ".beam1.norepeat0")
    [guarded] = json.loads(run("eval", "--run", "runs/tiny", "--json", "--beam", 1, "--no-repeat-ngram-size", 2).stdout)
    assert unguarded["looping"] > 0 and guarded["looping"] == 0
    assert Path(report["hypotheses"]).read_text(encoding="utf-8").splitlines() == hyps
    result = run("eval", "--run", "runs/tiny", "--json", "--beam", 1, "--precision", "fp32")  # and another precision
    assert Path(json.loads(result.stdout)[0]["hypotheses"]).name == Path(report["hypotheses"]).name.replace(
        ".beam1", ".beam1.fp32")
    src, ref = write_pair(trained / "own", "t", ["Un chien.", "Un chat."], ["A dog.", "A cat."])
    result = run("eval", "--src", src, "--ref", ref, "--json", "--beam", 1)
    assert json.loads(result.stdout)[0]["sentences"] == 2


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_full_disk_is_a_one_line_error(in_tmp, monkeypatch):
    from mt import files

    def full_disk(fd, mode):  # every write fails with ENOSPC, as on a full disk
        os.close(fd)
        return open("/dev/full", mode)

    monkeypatch.setattr(files.os, "fdopen", full_disk)
    one_line_error(run("train", "--config", TINY), r"cannot write runs/tiny/\S+: No space left on device "
                                                   r"\(.* MiB free on its disk\)")


def test_a_full_disk_while_tokenizing_names_the_folder(in_tmp, monkeypatch):
    import errno

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as Arrow's writer raises it: no file named

    monkeypatch.setattr("mt.data.tokenize", no_space)
    one_line_error(run("train", "--config", TINY), r"cannot write the tokenized data to runs/tiny/cache/: "
                                                   r"No space left on device")


def test_misspelt_config_key(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("bad.yaml").write_text("model:\n  d_modle: 32\n", encoding="utf-8")
    one_line_error(run("train", "--config", "bad.yaml"), r"bad\.yaml: unknown key 'model\.d_modle'.*'model\.d_model'")


def test_misaligned_corpus(in_tmp):
    src, tgt = write_pair(in_tmp, "pair", ["un", "deux", "trois"], ["one", "two"])
    result = run("train", "--config", TINY, "--set", f"data.train={{src: {src}, tgt: {tgt}}}")
    one_line_error(result, r"pair\.fr has 3 lines but .*pair\.en has 2")


def test_translate_without_a_trained_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_line_error(run("translate", "Bonjour."), r"no trained run found in runs/?")
    one_line_error(run("translate", "--run", "nowhere", "Bonjour."), r"run folder not found: nowhere")


def test_existing_run_folder_is_not_overwritten(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "config.yaml").write_text("name: tiny\n")
    (tmp_path / "runs" / "tiny" / "last.pt").write_text("a checkpoint")
    one_line_error(run("train", "--config", TINY), r"runs/tiny already exists; pass --resume .* --overwrite")
    assert (tmp_path / "runs" / "tiny" / "last.pt").is_file()


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_a_folder_that_is_no_run_is_never_deleted(tmp_path, monkeypatch, overwrite):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "photos").mkdir(parents=True)
    (tmp_path / "runs" / "photos" / "precious.jpg").write_text("keep me")
    (tmp_path / "runs" / "photos" / "config.yaml").write_text("camera: true\n")  # a common name: not proof
    one_line_error(run("train", "--config", TINY, "--set", "name=photos", *overwrite),
                   r"runs/photos exists and holds files mt did not write \(precious\.jpg\)")
    assert (tmp_path / "runs" / "photos" / "precious.jpg").is_file()


@pytest.mark.parametrize("name", ["..", ".", "a/b", "/tmp/x"])
def test_run_name_must_be_a_folder_name(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    one_line_error(run("train", "--config", TINY, "--set", f"name={name}", "--overwrite"),
                   r"name must be a folder name")
    assert list(tmp_path.iterdir()) == []


def test_a_start_that_failed_early_is_started_again_and_a_trained_run_is_kept(in_tmp, monkeypatch):
    with monkeypatch.context() as patch:  # a typo in data.valid fails before the training data is read
        patch.setattr("mt.data.load_corpus", lambda *a, **k: pytest.fail("read a corpus first"))
        one_line_error(run("train", "--config", TINY, "--set", "data.valid={src: nope.fr, tgt: nope.en}"),
                       r"data\.valid: corpus file not found: nope\.fr")
    assert not (in_tmp / "runs" / "tiny").exists()  # checked before the run folder is made
    from mt.config import load_config, save_config

    (in_tmp / "runs" / "tiny" / "cache").mkdir(parents=True)  # what a start killed in its tokenizer leaves
    save_config(load_config(TINY), in_tmp / "runs" / "tiny" / "config.yaml")
    short = ["--set", "train.max_steps=2", "--set", "train.valid_every=2"]
    result = run("train", "--config", TINY, *short)  # the corrected command, as it was
    assert result.exit_code == 0, result.output
    one_line_error(run("train", "--config", TINY, *short), r"runs/tiny already exists; pass --resume .* --overwrite")
    (in_tmp / "runs" / "tiny" / "eval").mkdir(exist_ok=True)
    (in_tmp / "runs" / "tiny" / "eval" / "my_scores.txt").write_text("mine")  # a user's file in mt's folder
    one_line_error(run("train", "--config", TINY, *short, "--overwrite"), r"holds files mt did not write "
                   r"\(eval/my_scores\.txt\)")


def test_a_test_set_typo_fails_before_training_and_no_test_set_is_downloaded(in_tmp, monkeypatch):
    monkeypatch.setattr("mt.data.load_corpus", lambda *a, **k: pytest.fail("read a corpus first"))
    monkeypatch.setattr("mt.corpora.download", lambda *a, **k: pytest.fail("downloaded a test set"))
    one_line_error(run("train", "--config", TINY, "--set", "data.test=multi30k:test_2061_flickr"),
                   r"data\.test: corpus multi30k:test_2061_flickr not found .*known splits of multi30k")
    one_line_error(run("train", "--config", TINY, "--set", "data.test={src: nope.fr, tgt: nope.en}", "--overwrite"),
                   r"data\.test: corpus file not found: nope\.fr")
    monkeypatch.setenv("MT_DATA_PATH", str(in_tmp))  # multi30k nowhere: its test set is mt eval's to download
    monkeypatch.setattr("mt.data.load_corpus", Mock(side_effect=DataError("reached the training data")))
    src, tgt = write_pair(in_tmp, "pairs", ["Un chat."], ["A cat."])
    pair = f"{{src: {src}, tgt: {tgt}}}"
    one_line_error(run("train", "--config", TINY, "--set", f"data.train={pair}", "--set", f"data.valid={pair}",
                       "--overwrite"), r"reached the training data")


def test_training_goes_on_when_the_reader_of_its_log_goes_away(tmp_path, data_path):
    process = subprocess.Popen(  # `mt train ... 2>&1 | head -1`
        [sys.executable, "-m", "mt", "train", "--config", TINY, "--set", "train.log_every=1", "--set",
         "train.max_steps=30", "--set", "data.max_pairs=300"], cwd=tmp_path,
        env={**os.environ, "MT_DATA_PATH": str(data_path)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout.readline()
    process.stdout.close()
    assert process.wait(timeout=300) == 0
    run_dir = tmp_path / "runs" / "tiny"
    assert checkpoint.load(run_dir / checkpoint.LAST)["progress"]["step"] == 30  # trained to its end
    assert "step 30, epoch" in (run_dir / checkpoint.LOG).read_text()  # the log kept every line


def test_real_process_shows_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mt", "train", "--set", "model.heads=3"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --set model.heads=3: model.heads (3) must divide model.d_model (256)"


def test_help_lists_the_commands_with_examples():
    result = run("--help")
    for command in ("train", "translate", "eval"):
        assert command in result.stdout
    for command in ("train", "translate", "eval"):
        assert "Example" in run(command, "--help").stdout
    import mt

    version = run("--version")
    assert version.exit_code == 0 and version.stdout == f"mt {mt.__version__}\n"


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(in_tmp):
    import signal
    import time

    process = subprocess.Popen(
        [sys.executable, "-m", "mt", "train", "--config", TINY, "--quiet", "--set", "train.max_steps=100000",
         "--set", "train.log_every=1", "--set", "train.valid_every=100000", "--set", "data.max_pairs=300"],
        stderr=subprocess.PIPE, text=True,
    )
    metrics = in_tmp / "runs" / "tiny" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 3) and time.time() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr and "Traceback" not in stderr
    from mt import checkpoint

    assert checkpoint.load(in_tmp / "runs" / "tiny" / "last.pt")["progress"]["step"] >= 3


def test_resuming_a_copied_run_continues_the_copy(trained, monkeypatch, tmp_path, data_path):
    import shutil

    from mt import checkpoint

    monkeypatch.chdir(trained)  # where the copy's config (runs_dir: runs, name: tiny) points at the original
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    original = trained / "runs" / "tiny"
    copy = tmp_path / "backup" / "tiny-copy"
    shutil.copytree(original, copy)
    step = checkpoint.load(original / "last.pt")["progress"]["step"]
    before = sorted(p.name for p in original.iterdir())
    result = run("train", "--config", copy / "config.yaml", "--resume", "--quiet",
                 "--set", f"train.max_steps={step + 2}")
    assert result.exit_code == 0, result.output
    assert f"run saved in {copy}" in result.stdout
    assert checkpoint.load(copy / "last.pt")["progress"]["step"] == step + 2
    assert checkpoint.load(original / "last.pt")["progress"]["step"] == step
    assert sorted(p.name for p in original.iterdir()) == before
    link = tmp_path / "link"  # reached through a symbolic link, the folder keeps the name it is given by
    link.symlink_to(shutil.copytree(original, tmp_path / "elsewhere" / "tiny"))
    result = run("train", "--config", link / "config.yaml", "--resume", "--quiet",
                 "--set", f"train.max_steps={step + 2}")
    assert result.exit_code == 0, result.output
    assert f"run saved in {link}" in result.stdout
    assert checkpoint.load(link / "last.pt")["progress"]["step"] == step + 2
    assert sorted(p.name for p in original.iterdir()) == before
    # A config.yaml beside no checkpoint is no run's: --resume goes where it points (runs/tiny-2, not there),
    # and starts that run, which does not exist yet.
    mine = tmp_path / "mine" / "config.yaml"
    mine.parent.mkdir()
    mine.write_text((original / "config.yaml").read_text().replace("name: tiny\n", "name: tiny-2\n")
                    .replace("max_steps: 60\n", "max_steps: 2\n").replace("max_pairs: 3000\n", "max_pairs: 300\n"))
    result = run("train", "--config", mine, "--resume")
    assert result.exit_code == 0, result.output
    assert "runs/tiny-2 does not exist yet: --resume starts the run" in result.stderr
    assert (trained / "runs" / "tiny-2" / "last.pt").is_file() and sorted(p.name for p in mine.parent.iterdir()) == [
        "config.yaml"]


def test_average_and_tune(trained, monkeypatch, data_path):
    import shutil

    monkeypatch.chdir(trained)
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    shutil.copytree("runs/tiny", "runs/tuned")
    result = run("average", "--run", "runs/tuned", "--last", 2)
    assert result.exit_code == 0, result.output
    from mt import checkpoint

    averaged = checkpoint.load(Path("runs/tuned/averaged.pt"))
    parts = [checkpoint.load(Path("runs/tuned") / name)["model"] for name in averaged["averaged"]]
    name = "embed.weight"
    torch_mean = (parts[0][name] + parts[1][name]) / 2
    assert (averaged["model"][name] - torch_mean).abs().max() < 1e-6
    assert run("translate", "--run", "runs/tuned", "--weights", "averaged.pt", "Un chat.").exit_code == 0
    one_line_error(run("average", "--run", "runs/tuned", "--last", 9), r"fewer than --last 9")
    result = run("tune", "--run", "runs/tuned", "--beams", "1,2", "--penalties", "0.5,1.5")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 4  # beam 1 once, beam 2 twice, and the summary
    from mt.config import load_config

    decode = load_config(Path("runs/tuned/config.yaml")).decode
    best = result.stdout.splitlines()[0].split()
    assert decode.beam_size == int(best[1])
    assert decode.length_penalty == (1.0 if best[4] == "-" else float(best[4]))  # greedy keeps the run's own
    assert result.stdout.count("length penalty    -") == 1  # beam 1: no penalty to show
    from mt.evaluate import tune_run

    before = decode.inter_threads
    tune_run(Path("runs/tuned"), [1, 2], [1.0], device="cpu", streams=before + 1)  # as `mt train` tunes
    assert load_config(Path("runs/tuned/config.yaml")).decode.inter_threads == before  # the run's own setting
    import mt.evaluate

    penalty = load_config(Path("runs/tuned/config.yaml")).decode.length_penalty
    monkeypatch.setattr(mt.evaluate, "tune_decoding", lambda *a: [{"beam_size": 1, "length_penalty": None, "bleu": 9},
                                                                   {"beam_size": 2, "length_penalty": 0.5, "bleu": 1}])
    tune_run(Path("runs/tuned"), [1, 2], [0.5], device="cpu")  # greedy wins: no length penalty was tuned
    decode = load_config(Path("runs/tuned/config.yaml")).decode
    assert (decode.beam_size, decode.length_penalty) == (1, penalty)


def test_nbest_json(trained, monkeypatch):
    monkeypatch.chdir(trained)
    result = run("translate", "--json", "--nbest", 3, input="Un chat.\nDeux chiens courent.\n")
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["source"] for o in objects] == ["Un chat.", "Deux chiens courent."]
    for o in objects:
        scores = [t["score"] for t in o["translations"]]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        assert all(isinstance(t["text"], str) for t in o["translations"])


def test_nbest_lines_number_each_hypothesis_by_its_input_line(trained, monkeypatch):
    monkeypatch.chdir(trained)
    result = run("translate", "--nbest", 2, input="Un chat.\nDeux chiens courent.\nUne femme.\n")
    assert result.exit_code == 0, result.output
    fields = [line.split(" ||| ") for line in result.stdout.splitlines()]
    assert [int(f[0]) for f in fields] == [0, 0, 1, 1, 2, 2] and all(len(f) == 3 for f in fields)
    scores = [float(f[2]) for f in fields]
    assert all(scores[i] >= scores[i + 1] for i in (0, 2, 4))


def test_interactive_prompt(trained, monkeypatch):
    monkeypatch.chdir(trained)
    expected = run("translate", "Un chat.").stdout
    result = run("translate", "--interactive", input="Un chat.\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected
    assert result.stderr.count("fr> ") == 2  # asked again, then EOF ends it


def test_lines_before_a_bad_one_are_translated_and_a_bad_typed_line_costs_only_itself(trained, monkeypatch):
    monkeypatch.chdir(trained)
    expected = run("translate", "Un chat.").stdout
    result = run("translate", input=b"Un chat.\ncaf\xe9\n")
    assert result.exit_code == 2 and result.stdout == expected
    result = run("translate", "--interactive", input=b"caf\xe9\nUn chat.\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == expected
    assert "error: that line: not valid UTF-8 (byte 0xe9)" in result.stderr


def test_a_line_longer_than_the_model_takes_is_cut_with_a_warning(trained, caplog):
    from mt.translate import Translator

    translator = Translator.load(trained / "runs" / "tiny")
    limit = translator.config.model.max_positions - 1
    with caplog.at_level("WARNING", logger="mt"):
        ids = translator.encode(["Un chat.", "un chat " * limit])
    assert len(ids[1]) == limit
    assert f"1 input line(s) longer than {limit} tokens cut" in caplog.text
    caplog.clear()
    translator.encode(["Un chat."])
    assert not caplog.text
    with pytest.raises(TypeError, match=r"translate a list of texts: \['Un chat\.'\], not one string"):
        translator.translate("Un chat.")


def test_attention_grid_has_a_panel_per_layer_and_head(trained, monkeypatch):
    from mt import plots
    from mt.translate import Translator

    monkeypatch.chdir(trained)
    result = run("translate", "Un homme joue de la guitare.", "--attention", "a.png")
    assert result.exit_code == 0, result.output
    assert Path("a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    translator = Translator.load("runs/tiny")
    [best] = translator.translate_nbest(["Un homme joue."])
    weights = translator.cross_attention("Un homme joue.", best[0].tokens)
    layers, heads = translator.config.model.decoder_layers, translator.config.model.heads
    assert weights.shape[:2] == (layers, heads)
    torch_sum = weights.sum(-1)
    assert (torch_sum - 1).abs().max() < 1e-4  # each row is a distribution over the source
    fig = plots.attention_figure(weights, ["s"] * weights.shape[3], ["o"] * weights.shape[2])
    assert len(fig.axes) == layers * heads
    assert {ax.get_xlabel() for ax in fig.axes} == {"source (French)"}
    assert {ax.get_ylabel() for ax in fig.axes} == {"output (English)"}
    one = plots.attention_figure(weights, ["s"] * weights.shape[3], ["o"] * weights.shape[2], layer=1, head=0)
    assert len(one.axes) == 1 and one.axes[0].get_title() == "layer 2, head 1"
    one_line_error(run("translate", "Un chat.", "--attention", "b.png", "--layer", 9),
                   r"--layer 9 is out of range: the model has 2 layers")


def test_plot_runs_and_info(trained, monkeypatch):
    from mt import plots

    monkeypatch.chdir(trained)
    result = run("plot", "runs/tiny", "-o", "curves.png")
    assert result.exit_code == 0, result.output
    assert Path("curves.png").read_bytes()[:4] == b"\x89PNG"
    fig = plots.training_figure([Path("runs/tiny")])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["training loss (label-smoothed)", "validation loss", "validation BLEU (greedy)"]
    assert all(ax.get_lines() for ax in fig.axes)
    listing = run("runs")
    assert listing.exit_code == 0 and "tiny" in listing.stdout
    copy = Path("elsewhere/tiny")
    shutil.copytree("runs/tiny", copy)
    (copy / "metrics.jsonl").write_text((copy / "metrics.jsonl").read_text().splitlines()[0] + "\n")  # step 10
    assert re.search(r"^tiny +60 ", run("runs", "--runs-dir", "elsewhere").stdout, re.MULTILINE)  # last.pt's step
    for name in ("last.pt", "best.pt", *(p.name for p in copy.glob("step_*.pt"))):
        (copy / name).unlink()  # as a run stopped before its first checkpoint leaves it
    assert re.search(r"^tiny +- ", run("runs", "--runs-dir", "elsewhere").stdout, re.MULTILINE)
    details = run("info", "runs/tiny")
    assert details.exit_code == 0 and "parameters:" in details.stdout and "vocabulary: 600" in details.stdout
    assert re.search(r"^data read:\n  train:\n  - multi30k:train\n", details.stdout, re.MULTILINE)
    assert run("info", "--run", "runs/tiny").stdout == details.stdout  # as the other commands take a run


@pytest.mark.parametrize(
    ("setup", "args", "pattern"),
    [
        (lambda d: None, ["train", "--config", "nowhere.yaml"], r"config file not found: nowhere\.yaml"),
        (lambda d: None, ["train", "--config", TINY, "--set", "data.train={src: no.fr, tgt: no.en}"],
         r"data\.train: corpus file not found: no\.fr \(a relative path: read from /\S+\)"),
        (lambda d: (d / "bad.fr").write_bytes(b"ok\n\xff\n") and (d / "bad.en").write_bytes(b"ok\nok\n"),
         ["train", "--config", TINY, "--set", "data.train={src: bad.fr, tgt: bad.en}"],
         r"bad\.fr, line 2: not valid UTF-8"),
        (lambda d: None, ["train", "--config", TINY, "--set", "data.max_tokens=1"],
         r"no training pairs left after filtering multi30k:train \(data\.max_tokens=1"),
        (lambda d: None, ["train", "--config", TINY, "--set", "tokenizer.vocab_size=90000"],
         r"tokenizer\.vocab_size=90000 is too large"),
        (lambda d: (d / "runs" / "x").mkdir(parents=True), ["translate", "--run", "runs/x", "Bonjour."],
         r"runs/x is not a run folder: it has no config\.yaml"),
        (lambda d: (d / "runs" / "tiny").mkdir(parents=True) or (d / "runs" / "tiny" / "x").write_text("x"),
         ["train", "--config", TINY, "--resume"], r"cannot resume runs/tiny: it is not a run folder \(no config"),
        (lambda d: write_pair(d, "e", [], []),
         ["train", "--config", TINY, "--set", "data.train={src: e.fr, tgt: e.en}"],
         r"training corpus e\.fr \| e\.en is empty"),
        (lambda d: write_pair(d, "e", [], []),
         ["train", "--config", TINY, "--set", "data.valid={src: e.fr, tgt: e.en}"],
         r"validation corpus e\.fr \| e\.en is empty"),
        (lambda d: (d / "runs" / "tiny").mkdir(parents=True) or (d / "runs" / "tiny" / "config.yaml").write_text(
            (ROOT / "configs" / "tiny.yaml").read_text()),  # what a start killed before its tokenizer leaves
         ["average", "--run", "runs/tiny"], r"runs/tiny holds no trained model \(no tokenizer\.model, no checkpoint\)"),
    ],
    ids=["missing-config", "missing-corpus", "non-utf8", "empty-after-filtering", "vocab-too-large",
         "run-without-config", "resume-nothing", "empty-training-corpus", "empty-validation-corpus",
         "run-that-failed-to-start"],
)
def test_bad_input_gets_one_line_and_exit_2(in_tmp, setup, args, pattern):
    setup(in_tmp)
    one_line_error(run(*args), pattern)


@pytest.mark.parametrize("error", [
    # torch's CPU allocator, as it words it (a real one would depend on the machine's overcommit setting)
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 240000000000 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB."),
    MemoryError(),
], ids=["cpu", "cuda", "python"])
def test_running_out_of_memory_is_one_line(in_tmp, monkeypatch, error):
    def too_large(*args, **kwargs):
        raise error

    monkeypatch.setattr("mt.train.Transformer", too_large)
    one_line_error(run("train", "--config", TINY), r"out of memory \((can't allocate memory: you tried to allocate "
                   r"240000000000 bytes|CUDA out of memory|MemoryError).*\); a smaller batch .* model\.d_ff")


def test_run_folder_missing_tokenizer_or_checkpoint(trained, monkeypatch, tmp_path):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained / "runs" / "tiny", "broken")
    Path("broken/tokenizer.model").unlink()
    one_line_error(run("translate", "--run", "broken", "Un chat."), r"tokenizer not found: broken/tokenizer\.model")
    Path("broken/tokenizer.model").write_bytes(b"")
    one_line_error(run("translate", "--run", "broken", "Un chat."), r"tokenizer broken/tokenizer\.model is empty")
    shutil.copytree(trained / "runs" / "tiny", "swapped")
    Tokenizer.train([f"phrase {i} mot{i}" for i in range(300)], 100).save(Path("swapped/tokenizer.model"))
    one_line_error(run("translate", "--run", "swapped", "Un chat."),
                   r"swapped/best\.pt was trained with a vocabulary of 600 pieces, but swapped/tokenizer\.model "
                   r"has 100: the tokenizer is not the run's own")
    shutil.copytree(trained / "runs" / "tiny", "edited")
    config = Path("edited/config.yaml")
    config.write_text(config.read_text().replace("encoder_layers: 2", "encoder_layers: 3"))
    one_line_error(run("translate", "--run", "edited", "Un chat."), r"edited/best\.pt does not match the model "
                   r"that edited/config\.yaml describes \(was its model section edited\?\): Missing key\(s\)")
    text = config.read_text()
    config.write_text(text[: text.rindex("\n", 0, 300) + 1])  # cut short: no defaults may fill the rest in
    one_line_error(run("translate", "--run", "edited", "Un chat."),
                   r"edited/config\.yaml lacks .*model.*decode: a run's config holds every section")
    config.write_text("")
    one_line_error(run("eval", "--run", "edited"), r"edited/config\.yaml lacks name, runs_dir, data, ")
    shutil.copytree(trained / "runs" / "tiny", "empty")
    for name in Path("empty").glob("*.pt"):
        name.unlink()
    one_line_error(run("translate", "--run", "empty", "Un chat."), r"empty has neither best\.pt nor last\.pt: "
                   r"no checkpoint at all")
    Path("empty/last.pt").write_bytes(b"not a checkpoint")
    one_line_error(run("eval", "--run", "empty"), r"checkpoint empty/last\.pt is corrupt or truncated")
    monkeypatch.setattr("mt.bench.train_ours", lambda *a: pytest.fail("measured training first"))
    one_line_error(run("bench", "--config", TINY, "--run", "empty"), r"checkpoint empty/last\.pt is corrupt")


@pytest.mark.parametrize(
    ("args", "stdin", "pattern"),
    [
        (["translate", "--beam", 301, "Un chat."], None,
         r"beam size 301 is too large for this model's vocabulary of 600 pieces: at most 300"),
        (["translate", "--nbest", 3, "--beam", 1, "Un chat."], None, r"--nbest 3 needs a beam at least as wide"),
        (["translate", "--device", "mps", "Un chat."], None, r"--device must be auto, cpu, cuda or cuda:N, got 'mps'"),
        (["translate"], b"Un chat.\ncaf\xe9\n", r"stdin, line 2: not valid UTF-8 \(byte 0xe9\)"),
        (["translate", "caf\udce9"], None, r"TEXT: not valid UTF-8 \(byte 0xe9\)"),  # as Python passes argv
        (["eval", "--test", "garbage"], None, r"--test: expected name:split .* or SRC\|REF .*; got 'garbage'"),
        (["eval", "--test", "multi30k:test_2016_flickr,"], None, r"--test: expected .*; got ''"),
        (["eval", "--src", "runs", "--ref", "e.en"], None, r"corpus file runs is a folder"),
        (["translate", "--run", "e.en", "Un chat."], None, r"e\.en is a file, not a run folder"),
        (["translate", "Un chat.", "--attention", "nodir/a.png"], None, r"cannot draw nodir/a\.png: folder nodir "
         "not found"),
        (["plot", "runs/tiny", "-o", "nodir/p.png"], None, r"cannot draw nodir/p\.png: folder nodir not found"),
        (["translate", "--attention", "a.png", "un chat " * 200], None,
         r"--attention draws sentences of up to 150 subwords a side; this one has \d+"),
        (["plot", "runs/tiny", "-o", "p.xyz"], None, r"cannot draw p\.xyz: matplotlib writes .*png.*, not xyz"),
        (["plot", "runs/tiny", "-o", "runs"], None, r"runs is a folder; give a file name"),
        (["plot", "runs/nope"], None, r"run folder not found: runs/nope"),
        (["info", "runs/tiny", "--run", "e.en"], None, r"two runs given: runs/tiny and --run e\.en"),
        (["average", "--run", "nope"], None, r"run folder not found: nope"),
        (["tune", "--run", "nope"], None, r"run folder not found: nope"),
        (["eval", "--run", "e.en"], None, r"e\.en is a file, not a run folder"),
        (["tune", "--penalties", "nan"], None, r"length penalties finite numbers >= 0"),
        (["eval", "--src", "e.fr", "--ref", "e.en"], None, r"test set e\.fr \| e\.en is empty"),
        (["bench", "--config", TINY, "--run", "runs/tiny", "--test", "multi30k:typo"], None,
         r"corpus multi30k:typo not found"),
        (["train", "--config", TINY, "--set", "train.lr.x=1"], None, r"train\.lr is a value, not a section"),
    ],
    ids=["beam-wider-than-vocabulary", "nbest-wider-than-beam", "unknown-device", "non-utf8-stdin", "non-utf8-text",
         "test-no-corpus", "test-empty-item", "src-is-a-folder", "run-is-a-file", "attention-into-no-folder",
         "plot-into-no-folder", "attention-too-long", "plot-format", "plot-into-folder", "plot-no-run",
         "info-two-runs", "average-no-run",
         "tune-no-run", "eval-run-is-a-file", "tune-nan", "eval-empty",
         "bench-test-typo-before-training", "override-below-a-value"],
)
def test_bad_requests_to_a_trained_run(trained, monkeypatch, args, stdin, pattern):
    monkeypatch.chdir(trained)
    write_pair(trained, "e", [], [])
    one_line_error(run(*args, input=stdin), pattern)


@pytest.mark.parametrize("command", ["eval", "tune"])
def test_a_read_only_run_fails_before_decoding(trained, monkeypatch, command):
    import mt.evaluate

    monkeypatch.chdir(trained)
    monkeypatch.setattr(mt.evaluate.os, "access", lambda path, mode: mode != os.W_OK)  # a read-only mount
    monkeypatch.setattr(mt.evaluate, "tune_decoding", lambda *a: pytest.fail("decoded first"))
    monkeypatch.setattr("mt.translate.Translator.translate_nbest", lambda *a, **k: pytest.fail("decoded first"))
    one_line_error(run(command, "--run", "runs/tiny"), r"cannot write to runs/tiny\S*: it is read-only")


def test_empty_input_and_crlf_lines_translate(trained, monkeypatch):
    monkeypatch.chdir(trained)
    Path("empty.fr").write_text("")
    result = run("translate", "--input", "empty.fr")
    assert result.exit_code == 0 and result.stdout == ""
    result = run("translate", "--json", "--beam", 1, input=b"Un chat.\r\nUn chien.\r\n")
    assert [json.loads(line)["source"] for line in result.stdout.splitlines()] == ["Un chat.", "Un chien."]


def test_a_reader_that_stops_early_ends_translation_quietly(trained, tmp_path):
    lines = "".join(f"Un homme numéro {i} marche dans la rue avec son chien.\n" for i in range(400))
    (tmp_path / "many.fr").write_text(lines, encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-m", "mt", "translate", "--beam", "1", "--input",
                                str(tmp_path / "many.fr")], cwd=trained, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline()  # `mt translate --input many.fr | head -1`
    process.stdout.close()
    assert process.wait(timeout=300) == 0
    assert process.stderr.read() == b""
    process = subprocess.Popen([sys.executable, "-m", "mt", "info", "runs/tiny"], cwd=trained,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.readline().startswith(b"run: ")  # `mt info runs/tiny | head -1`
    process.stdout.close()
    assert (process.wait(timeout=60), process.stderr.read()) == (0, b"")


def test_eval_keeps_the_hypotheses_of_test_files_of_the_same_name(trained, monkeypatch):
    monkeypatch.chdir(trained)
    write_pair(trained / "d1", "test", ["Un chat."], ["A cat."])
    write_pair(trained / "d2", "test", ["Un chien.", "Deux chiens."], ["A dog.", "Two dogs."])
    result = run("eval", "--test", "d1/test.fr|d1/test.en,d2/test.fr|d2/test.en", "--beam", 1, "--json")
    assert result.exit_code == 0, result.output
    paths = [Path(r["hypotheses"]) for r in json.loads(result.stdout)]
    assert len(set(paths)) == 2 and [len(p.read_text().splitlines()) for p in paths] == [1, 2]
    # Other weights' hypotheses go beside best.pt's, not over them.
    result = run("eval", "--test", "d1/test.fr|d1/test.en", "--beam", 1, "--json", "--weights", "last.pt")
    assert result.exit_code == 0, result.output
    [other] = [Path(r["hypotheses"]) for r in json.loads(result.stdout)]
    assert other.name == paths[0].name.replace(".beam1", ".last.beam1") and paths[0].is_file()
    shutil.copytree("runs/tiny", "runs/nobest", ignore=shutil.ignore_patterns("best.pt", "eval"))
    result = run("eval", "--run", "runs/nobest", "--test", "d1/test.fr|d1/test.en", "--beam", 1, "--json")
    assert Path(json.loads(result.stdout)[0]["hypotheses"]).name == other.name  # last.pt's, named so


def test_damaged_metrics_and_data_stats_are_skipped(trained, monkeypatch, tmp_path, caplog):
    import shutil

    monkeypatch.chdir(tmp_path)
    shutil.copytree(trained / "runs" / "tiny", "runs/tiny")
    with open("runs/tiny/metrics.jsonl", "ab") as f:
        f.write(b'{"step": 70, "valid_bleu": "abc"}\n{"no step": 1}\n\xff\xfe\n{"step": 71, "train_lo')
    Path("runs/tiny/data.json").write_text('{"train": ["multi')
    listing = run("runs")
    assert listing.exit_code == 0 and re.search(r"tiny +60 ", listing.stdout), listing.output
    details = run("info", "runs/tiny")
    assert details.exit_code == 0 and "data.json is unreadable" in details.stdout
    assert run("plot", "runs/tiny", "-o", "curves").stdout.strip() == "wrote curves.png"
    assert "skipped 4 unreadable line(s)" in caplog.text


def test_bench_prints_every_row_of_the_table(trained, monkeypatch, data_path):
    monkeypatch.chdir(trained)
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    result = run("bench", "--config", TINY, "--run", "runs/tiny", "--seconds", 1, "--sentences", 20, "--rounds", 2)
    assert result.exit_code == 0, result.output
    values = {}
    for line in result.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 4 and cells[1].replace(",", "").replace(".", "").isdigit():
            values[cells[0]] = float(cells[1].replace(",", ""))
    rows = ["train ours: MFU", "train speed-up, ours ÷ nn.Transformer", "train ours: peak memory"]
    peers = ["recompute prefix"] + ["CTranslate2 float32", "CTranslate2 int8"] * bool(find_spec("ctranslate2"))
    rows += [f"{search} ours (KV cache) ÷ {peer}" for search in ("greedy", "beam 5") for peer in peers]
    for row in rows:
        assert values[row] > 0, row
    assert len(re.findall(r"fastest of 2 alternating rounds each; identical outputs: \d+/20", result.stdout)) == len(
        peers) * 2


def test_bench_no_decode_plain_and_a_reference_that_runs_out_of_memory(trained, monkeypatch, data_path):
    monkeypatch.chdir(trained)
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))

    def out_of_memory(model, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.32 GiB.")

    monkeypatch.setattr("mt.bench._reference_loss", out_of_memory)
    result = run("bench", "--config", TINY, "--run", "runs/tiny", "--seconds", 1, "--no-decode", "--plain",
                 "--set", "train.batch_tokens=2000")
    assert result.exit_code == 0, result.output
    assert "train ours: MFU" in result.stdout and "2000 tokens/batch" in result.stdout
    assert "fast paths off (--plain)" in result.stdout
    assert re.search(r"out of cpu memory with random batches of \d+ sentences: not compared", result.stdout)
    assert "ours ÷ nn.Transformer" not in result.stdout
    assert "greedy" not in result.stdout and "decoding" not in result.stdout
    from mt import fastpaths

    assert fastpaths.ENABLED  # back on for the rest of the process


def test_bench_no_reference_stopped_by_sigterm_prints_the_rows_measured_so_far(trained, monkeypatch, data_path):
    import signal

    monkeypatch.chdir(trained)
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    monkeypatch.setattr("mt.bench._decoding_rows", lambda *a: os.kill(os.getpid(), signal.SIGTERM))  # `timeout`
    result = run("bench", "--config", TINY, "--run", "runs/tiny", "--seconds", 1, "--no-reference")
    assert result.exit_code == 130
    assert "roof: 2048² matmul" in result.stdout and "train ours: MFU" in result.stdout
    assert "nn.Transformer" not in result.stdout
    assert "stopped before the end: the rows measured so far" in result.stderr
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # as it was


def test_roof_is_timed_at_least_once_and_at_a_size_a_slow_cpu_multiplies_in_time(monkeypatch):
    from mt import bench

    flops, size = bench.matmul_roof(torch.device("cpu"), torch.float32, 256, seconds=0.0)
    assert size == 256 and flops > 0  # one timing even when the time is up
    # A product taking 1 s at 256² (bf16 on a CPU without bf16 instructions) gives the smallest size tried.
    monkeypatch.setattr(bench, "_product_seconds", lambda device, dtype, size: 1.0)
    assert bench.matmul_roof(torch.device("cpu"), torch.float32, 2048, seconds=0.01)[1] == 256


def test_device_name_gives_the_cpus_widest_vector_instructions(monkeypatch):
    from mt import bench

    for flags, named in (({"avx", "avx2", "fma"}, "AVX2"), ({"avx2", "avx512f", "avx512_bf16"}, "AVX512-BF16"),
                         ({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}, "AMX"), ({"sse2"}, "no AVX2")):
        monkeypatch.setattr("mt.devices.cpu_flags", lambda flags=flags: frozenset(flags))
        assert bench._device_name(torch.device("cpu")).endswith(f" threads, {named}")


def test_translate_samples_reproducibly_and_completes_a_prefix(tiny_run):
    run_dir, text = tiny_run / "runs" / "tiny", "Un homme fait du vélo."
    greedy = run("translate", "--run", run_dir, "--beam", "1", text)
    assert greedy.exit_code == 0, greedy.output
    assert run("translate", "--run", run_dir, "--sample", "topk=1", text).stdout == greedy.stdout
    draws = [run("translate", "--run", run_dir, "--sample", "topp=0.9", "--temperature", "1.5", "--seed", seed,
                 "--json", text, "\nDeux chiens jouent.").stdout for seed in ("3", "3")]
    assert draws[0] == draws[1] and len(draws[0].splitlines()) == 2
    prefixed = run("translate", "--run", run_dir, "--prefix", "Two dogs", text)
    assert prefixed.exit_code == 0 and prefixed.stdout.startswith("Two dogs"), prefixed.output
    one_line_error(run("translate", "--run", run_dir, "--sample", "topq=3", text), r"--sample: expected topk=K")
    one_line_error(run("translate", "--run", run_dir, "--sample", "topk=2", "--beam", "3", text),
                   "neither --beam nor --nbest")


def test_translate_with_the_repetition_guard(tiny_run):
    run_dir, text = tiny_run / "runs" / "tiny", "Deux chiens jouent dans la neige avec une balle rouge."
    translator = Translator.load(run_dir)
    [[loose]] = translator.translate_nbest([text], 1)
    assert len(set(loose.tokens)) < len(loose.tokens)  # the tiny run repeats itself
    guarded = run("translate", "--run", run_dir, "--beam", "1", "--no-repeat-ngram-size", "1", text)
    assert guarded.exit_code == 0, guarded.output
    translator.config = replace(translator.config, decode=replace(translator.config.decode, no_repeat_ngram_size=1))
    [[output]] = translator.translate_nbest([text], 1)
    assert guarded.stdout.strip() == output.text != loose.text
    assert len(set(output.tokens)) == len(output.tokens)  # no piece twice


def test_translate_in_another_precision_than_the_runs(tiny_run):
    run_dir, text = tiny_run / "runs" / "tiny", "Un chat dort."
    assert Translator.load(run_dir, precision="fp32").amp is None
    assert Translator.load(run_dir, precision="bf16").amp is torch.bfloat16
    assert Translator.load(run_dir, precision="fp32").config.decode.precision == "fp32"  # as /info shows it
    result = run("translate", "--run", run_dir, "--precision", "fp32", text)
    assert result.exit_code == 0 and result.stdout.strip() == Translator.load(run_dir, precision="fp32").translate(
        [text])[0]
    one_line_error(run("translate", "--run", run_dir, "--precision", "fp16", text),
                   r"--precision fp16: it is one of auto, fp32, bf16")


@pytest.mark.slow
def test_importing_mt_or_configuring_the_command_leaves_the_environment_alone():
    code = ("import os; before = dict(os.environ)\n"
            "import mt, mt.cli, mt.serve, mt.train, mt.translate\n"
            "assert dict(os.environ) == before, set(os.environ) ^ set(before)\n"
            "mt.cli.configure_process()  # the allocator only: no variable for torch or oneDNN\n"
            "assert dict(os.environ) == before, set(os.environ) ^ set(before)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("exported, expected", [(None, "256"), ("64", "64")])
def test_mt_train_alone_caps_onednns_kernel_cache_unless_the_user_did(monkeypatch, tmp_path, exported, expected):
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    if exported is not None:
        monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", exported)
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 2
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == expected
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    CliRunner().invoke(app, ["translate", "--run", str(tmp_path / "missing"), "Un chat."])
    assert "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ  # decoding keeps torch's 1,024
