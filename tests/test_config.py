"""Config loading: defaults, every file in configs/, and the messages for bad keys and values."""

import math
from dataclasses import replace
from pathlib import Path

import pytest

from mt.config import Config, apply_override, load_config, reference
from mt.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.name == path.stem


def test_builtin_default_is_configs_multi30k():
    assert load_config(None) == Config()
    assert load_config(Path(__file__).resolve().parents[1] / "configs" / "multi30k.yaml") == Config()


def test_misspelt_key_names_file_key_and_nearest(tmp_path):
    path = write(tmp_path, "model:\n  d_modle: 64\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown key 'model\.d_modle' \(did you mean 'model\.d_model'"):
        load_config(path)


def test_misspelt_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'"):
        load_config(write(tmp_path, "trian:\n  lr: 0.1\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model:\n  d_model: big\n", r"model\.d_model must be an integer, got 'big'"),
        ("model:\n  norm: middle\n", r"model\.norm must be one of 'post', 'pre'"),
        ("train:\n  lr: -1\n", r"train\.lr must be > 0\.0, got -1\.0"),
        ("train:\n  lr: 0\n", r"train\.lr must be > 0\.0, got 0\.0"),
        ("model:\n  dropout: 1.5\n", r"model\.dropout must be <= 0\.9"),
        ("model:\n  d_model: 30\n  heads: 4\n", r"model\.heads \(4\) must divide model\.d_model \(30\)"),
        ("train: 3\n", r"'train' must be a mapping"),
        ("data:\n  train: multi30k\n", r"data\.train: expected 'name:split'"),
        ("train:\n  adam_betas: [0.9]\n", r"train\.adam_betas must be a list of 2 numbers"),
        ("[1, 2]\n", r"expected a mapping of sections"),
        ("model: {d_model: 8\n", r"not valid YAML"),
        ("train:\n  lr: .nan\n", r"train\.lr must be a number, not NaN, got nan"),
        ("train:\n  max_minutes: .inf\n", r"train\.max_minutes must be a finite number, got inf"),
        ("train:\n  adam_betas: [2, 3]\n", r"train\.adam_betas must be two numbers in \[0, 1\)"),
        ("train:\n  seed: -5\n", r"train\.seed must be >= 0"),
        ("name: 2024\n", r"name must be a non-empty string \(quote it"),
        ("model:\n  d_model: 32\nmodel:\n  heads: 2\n", r"c\.yaml: not valid YAML: key 'model' appears twice in "
         r"\"\S*c\.yaml\", line 3"),
    ],
)
def test_bad_values_are_named_with_what_is_allowed(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_yaml_exponent_without_dot_is_a_number(tmp_path):
    assert load_config(write(tmp_path, "train:\n  lr: 3e-4\n")).train.lr == 3e-4


def test_a_section_with_every_key_commented_out_takes_the_defaults(tmp_path):
    assert load_config(write(tmp_path, "model:\n  # d_model: 512\ntrain:\n  lr: 3e-4\n")).model.d_model == 256


def test_pair_of_files_is_a_corpus(tmp_path):
    config = load_config(write(tmp_path, "data:\n  train: {src: a.fr, tgt: a.en}\n"))
    assert config.data.train == {"src": "a.fr", "tgt": "a.en"}


def test_overrides(tmp_path):
    config = load_config(None, ["train.lr=3e-4", "model.norm=pre", "name=x", "data.train={src: a, tgt: b}"])
    assert (config.train.lr, config.model.norm, config.name) == (3e-4, "pre", "x")
    assert config.data.train == {"src": "a", "tgt": "b"}
    with pytest.raises(ConfigError, match=r"--set train\.lrr=1: unknown key 'train\.lrr' \(did you mean 'train\.lr'"):
        apply_override(config, "train.lrr=1")
    with pytest.raises(ConfigError, match=r"--set train\.lr: expected KEY=VALUE"):
        apply_override(config, "train.lr")
    with pytest.raises(ConfigError, match=r"--set model\.heads=0: model\.heads must be >= 1"):
        apply_override(config, "model.heads=0")
    with pytest.raises(ConfigError, match=r"--set model\.heads=6: model\.heads \(6\) must divide model\.d_model"):
        apply_override(config, "model.heads=6")


@pytest.mark.parametrize("order", [1, -1])
def test_keys_that_go_together_can_be_set_in_either_order(order):
    pair = ["train.average_last=5", "train.keep_checkpoints=6"][::order]
    assert load_config(None, pair).train.average_last == 5
    assert load_config(None, ["model.d_model=96", "model.heads=6"][::order]).model.heads == 6
    with pytest.raises(ConfigError, match=r"^--set train\.\w+=\d --set train\.\w+=\d --set train\.keep_checkpoints=4: "
                                          r"train\.average_last \(5\) must be <= train\.keep_checkpoints \(4\)$"):
        load_config(None, [*pair, "train.keep_checkpoints=4"])


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_reference_covers_every_key():
    keys = [key for key, _, _ in reference()]
    assert "train.lr" in keys and "decode.beam_size" in keys and "name" in keys
    assert all(help_text for _, _, help_text in reference())
    texts = {key: text for key, _, text in reference()}
    assert texts["train.precision"].startswith("one of auto, fp32, bf16: ")  # the values it takes


def test_a_saved_run_config_loads_though_training_would_refuse_it(tmp_path):
    from mt.checkpoint import check_trainable

    config = load_config(write(tmp_path, "name: exp/a\nmodel:\n  max_positions: 128\ndata:\n  max_ratio: .inf\n"))
    assert config.data.max_ratio == math.inf  # no ratio filter
    with pytest.raises(ConfigError, match="name must be a folder name"):
        check_trainable(config)
    with pytest.raises(ConfigError, match=r"model\.max_positions \(128\) must exceed data\.max_tokens \(128\)"):
        check_trainable(replace(config, name="a"))


def test_yaml_anchors_and_merge_keys_still_load(tmp_path):
    text = "data:\n  valid: &pair {src: a.fr, tgt: a.en}\n  test:\n    <<: *pair\n    src: b.fr\n"
    assert load_config(write(tmp_path, text)).data.test == {"src": "b.fr", "tgt": "a.en"}


def test_a_run_saved_before_a_top_level_key_was_added_still_loads(tmp_path):
    import yaml

    from mt.config import ADDED_TOP_LEVEL, config_to_dict, load_run_config

    saved = {k: v for k, v in config_to_dict(Config()).items() if k not in ADDED_TOP_LEVEL}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(saved), encoding="utf-8")
    assert load_run_config(tmp_path / "config.yaml") == Config()
