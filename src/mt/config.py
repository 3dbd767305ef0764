"""Every setting of a run, with its default, in one typed tree of frozen dataclasses.

A YAML file gives any subset of the keys; `--set section.key=value` overrides single keys. Unknown keys are
rejected with the nearest valid name, and every value is checked against its type and range, so a run never
starts on a typo. `Config()` is the built-in default and equals `configs/multi30k.yaml`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import reprlib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from mt.errors import ConfigError
from mt.files import write_bytes

CorpusSpec = str | dict[str, str]
"""A corpus: `name:split` (e.g. `multi30k:train`), `{src: PATH, tgt: PATH}` for an aligned pair of files, or a
Hugging Face dataset, `{hub: NAME, ...}` or `{disk: FOLDER, ...}` (mt.corpora)."""

CorpusList = str | dict[str, str] | list
"""One corpus spec or a list of them, each optionally repeated: `multi30k:train*3` or `{..., repeat: 3}`."""

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)


def option(default: Any, help: str, *, min: float | None = None, max: float | None = None,
           above: float | None = None, inf: bool = False, empty: bool = False) -> Any:
    """A config field with its help text (shown in the README's reference), an allowed range (`above`: a
    bound the value must exceed), whether `.inf` is a meaningful value of it (NaN never is), and whether a
    string may be empty."""
    return field(default=default, metadata={"help": help, "min": min, "max": max, "above": above, "inf": inf,
                                            "empty": empty})


@dataclass(frozen=True)
class DataConfig:
    train: CorpusList = option("multi30k:train", "training corpus: `name:split`, `{src: PATH, tgt: PATH}`, a "
                               "dataset (`{hub: NAME, ...}`, `{disk: FOLDER, ...}`), or a list of them; "
                               "`name:split*N` repeats one N times")
    valid: CorpusSpec = option("multi30k:valid", "validation corpus (loss, BLEU, early stopping)")
    test: CorpusSpec = option("multi30k:test_2016_flickr", "default test set of `mt eval`; `mt train` checks at "
                              "the start that it can be found")
    src_lang: str = option("fr", "file suffix of the source side")
    tgt_lang: str = option("en", "file suffix of the target side")
    max_pairs: int = option(0, "use only the first N pairs of each training corpus (0 = all)", min=0, max=10**10)
    max_tokens: int = option(128, "drop training pairs with a side longer than this many subwords", min=1, max=100_000)
    max_ratio: float = option(3.0, "drop training pairs whose subword length ratio exceeds this (.inf = keep all)",
                              min=1.0, inf=True)
    normalize: bool = option(True, "NFC, whitespace, apostrophes and quotes normalised (training data and input)")
    dedupe: bool = option(True, "remove exact duplicate training pairs (within each corpus)")
    workers: int = option(1, "processes that tokenize the training data (once per run; a resume reuses it)",
                          min=1, max=1024)


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = option(8000, "joint French+English SentencePiece vocabulary size", min=16, max=1_000_000)
    type: Literal["unigram", "bpe"] = option("unigram", "SentencePiece model type")
    character_coverage: float = option(1.0, "share of characters covered by the vocabulary", min=0.9, max=1.0)
    sample_sentences: int = option(2_000_000, "train the tokenizer on at most this many sentences", min=100, max=10**9)


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = option(256, "width of embeddings and hidden states", min=8, max=65_536)
    heads: int = option(4, "attention heads; must divide d_model", min=1, max=1024)
    encoder_layers: int = option(3, "encoder layers", min=1, max=1000)
    decoder_layers: int = option(3, "decoder layers", min=1, max=1000)
    d_ff: int = option(1024, "hidden width of the feed-forward blocks", min=1, max=1_000_000)
    dropout: float = option(0.2, "dropout on embeddings, sublayer outputs and feed-forward", min=0.0, max=0.9)
    attention_dropout: float = option(0.0, "dropout on attention weights", min=0.0, max=0.9)
    activation_dropout: float = option(0.0, "dropout inside the feed-forward block, after the activation",
                                       min=0.0, max=0.9)
    activation: Literal["relu", "gelu"] = option("relu", "feed-forward activation")
    norm: Literal["post", "pre"] = option("post", "Add & Norm after each sublayer (post) or before it (pre)")
    max_positions: int = option(1024, "longest sequence the sinusoidal table covers", min=16, max=100_000)


@dataclass(frozen=True)
class TrainConfig:
    batch_tokens: int = option(4096, "tokens (source + target, padding included) per batch", min=16, max=10**8)
    accumulate: int = option(1, "batches whose gradients are summed before each update", min=1, max=100_000)
    lr: float = option(1e-3, "peak learning rate, reached at the end of warmup", above=0.0)
    warmup_steps: int = option(600, "linear warmup, then inverse-square-root decay", min=1, max=10**9)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    adam_betas: tuple[float, float] = option((0.9, 0.98), "AdamW betas")
    label_smoothing: float = option(0.1, "label smoothing of the cross-entropy", min=0.0, max=0.99)
    clip_norm: float = option(1.0, "clip the gradient norm to this (0 = off)", min=0.0)
    max_steps: int = option(0, "stop after this many updates (0 = no limit)", min=0, max=10**12)
    max_epochs: int = option(0, "stop after this many epochs (0 = no limit)", min=0, max=10**9)
    max_minutes: float = option(40.0, "stop after this much training time (0 = no limit)", min=0.0, max=10.0**7)
    valid_every: int = option(500, "validate (loss and greedy BLEU) every N updates", min=1, max=10**12)
    valid_sentences: int = option(0, "validation BLEU on the first N valid sentences (0 = all)", min=0, max=10**9)
    log_every: int = option(50, "log training loss and speed every N updates (metrics.jsonl, train.log, "
                                "console)", min=1, max=10**12)
    seed: int = option(1, "seed of model initialisation and batch order", min=0, max=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = option("auto", "auto = CUDA when present, else CPU")
    precision: Precision = option(
        "auto", "auto = bf16 autocast on CUDA and on CPUs with AVX512-BF16/AMX, else fp32; bf16 = bf16 autocast "
        "on any device")
    tensorboard: bool = option(False, "also log to TensorBoard in runs/<name>/tensorboard (pip install "
                                      "tensorboard)")
    threads: int = option(0, "CPU threads for torch (0 = torch's default)", min=0, max=4096)
    compile: bool = option(False, "compile each encoder and decoder layer for training with torch.compile "
                           "(dynamic shapes; the first steps compile). Unmeasured on a GPU; slower on the CPU")
    keep_checkpoints: int = option(3, "numbered checkpoints kept besides last.pt and best.pt", min=1, max=100_000)
    patience: int = option(0, "stop after N validations without a better BLEU (0 = never)", min=0, max=10**9)
    average_last: int = option(3, "at the end, average the last N numbered checkpoints; kept as best.pt if "
                               "its validation BLEU is higher (0 = off; needs keep_checkpoints >= N)", min=0,
                               max=100_000)
    tune_decoding: bool = option(True, "at the end, choose beam size and length penalty on the valid set and "
                                 "store them as the run's decode defaults")
    max_nonfinite: int = option(10, "stop after N non-finite updates in a row (each is skipped)", min=1, max=10**9)


# The grid `mt train` (train.tune_decoding) and `mt tune` search for the decode section's beam and penalty.
TUNE_BEAMS = (1, 4, 5, 8)
TUNE_PENALTIES = (0.6, 1.0, 1.4)


@dataclass(frozen=True)
class DecodeConfig:
    beam_size: int = option(5, "beam width (1 = greedy)", min=1, max=1000)
    length_penalty: float = option(1.0, "beam score = log-prob / length ** length_penalty", min=0.0, max=100.0)
    max_len_a: float = option(1.5, "longest output = max_len_a * source length + max_len_b", min=0.0, max=1000.0)
    max_len_b: int = option(10, "see max_len_a", min=1, max=100_000)
    no_repeat_ngram_size: int = option(3, "repetition guard: no n-gram of this many pieces twice in an output "
                                       "(0 = off); 3 stops the loops at no cost in valid BLEU (BENCHMARKS.md)",
                                       min=0, max=1000)
    batch_tokens: int = option(16000, "source tokens per decoding batch (times beam size)", min=1, max=10**8)
    inter_threads: int = option(2, "batches decoded at once on a CPU, sharing torch's threads (mt train's own "
                                   "decoding: one)", min=1, max=1024)
    precision: Precision = option(
        "auto", "auto = bf16 autocast on CUDA and on CPUs with AVX512-BF16/AMX, else fp32; bf16 = bf16 autocast "
        "on any device")


@dataclass(frozen=True)
class Config:
    name: str = option("multi30k", "run name: the run folder is runs_dir/name")
    runs_dir: str = option("runs", "folder that holds run folders")
    init_from: str = option("", "run folder whose weights and tokenizer this run starts from (fine-tuning; "
                            "mt train --init-from): its model and tokenizer sections are the parent's",
                            empty=True)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir).expanduser() / self.name


# Keys and values that earlier versions of mt wrote into run folders: a saved run's config.yaml is read without
# them (the run translates and resumes as before); a config given to `mt train` is told what became of them.
REMOVED = {
    "train.attention": "mt chooses the attention kernels itself (mt.fastpaths.attention_kernels)",
}
RENAMED_VALUES = {("train.precision", "bf16-weights"): "bf16"}
# Top-level keys added since: a run saved before them lacks them, and they take their defaults.
ADDED_TOP_LEVEL = {"init_from"}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Reads a YAML config (or the built-in default when `path` is None) and applies `key=value` overrides.

    Raises:
        ConfigError: naming the file or override, the key, and what was expected.
    """
    raw: dict[str, Any] = {}
    source = "built-in default"
    if path is not None:
        path = Path(path)
        source = str(path)
        raw = _read_sections(path)
        raw.setdefault("name", path.stem)
    config = read = _build(Config, raw, "", source)
    for override in overrides:
        config = apply_override(config, override, across=False)
    if problem := _broken_rule(config):  # blamed on the overrides where the file alone keeps the rules
        blame = source if _broken_rule(read) or not overrides else " ".join(f"--set {o}" for o in overrides)
        raise ConfigError(f"{blame}: {problem}")
    return config


def load_run_config(path: Path) -> Config:
    """A run's saved config.yaml. mt writes every section into it: one that lacks a section was emptied or cut
    short, and the built-in defaults in the section's place would decode or resume with settings the run never
    had. Keys missing inside a section, and the top-level keys in ADDED_TOP_LEVEL, still take their defaults: a
    run saved by an older mt lacks the keys added since.

    Raises:
        ConfigError: naming the file and what it lacks, or as `load_config`.
    """
    raw = _without_removed(_read_sections(path))
    missing = [f.name for f in fields(Config) if f.name not in raw and f.name not in ADDED_TOP_LEVEL]
    if missing:
        raise ConfigError(f"{path} lacks {', '.join(missing)}: a run's config holds every section, so this one "
                          "was emptied or cut short; restore it, e.g. from a copy of the run")
    config = _build(Config, raw, "", str(path))
    if problem := _broken_rule(config):
        raise ConfigError(f"{path}: {problem}")
    return config


def _without_removed(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` without the keys in REMOVED, and with the values in RENAMED_VALUES replaced."""
    for key in REMOVED:
        section, _, name = key.partition(".")
        if isinstance(raw.get(section), dict):
            raw[section].pop(name, None)
    for (key, old), new in RENAMED_VALUES.items():
        section, _, name = key.partition(".")
        if isinstance(raw.get(section), dict) and raw[section].get(name) == old:
            raw[section][name] = new
    return raw


def _read_sections(path: Path) -> dict[str, Any]:
    """The top-level mapping of a YAML config file ({} for an empty one)."""
    try:
        loaded = _load_yaml(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {_one_line(e).replace('<unicode string>', str(path))}") \
            from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(loaded).__name__}")
    return loaded or {}


def apply_override(config: Config, override: str, across: bool = True) -> Config:
    """Returns `config` with one `section.key=value` override applied (value parsed as YAML). Without
    `across`, the rules between keys (model.heads divides model.d_model, ...) are left for the caller to check
    once every override is in: one override may need the next."""
    source = f"--set {override}"
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"{source}: expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = _load_yaml(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: value is not valid YAML: {_one_line(e)}") from None
    raw = config_to_dict(config)
    node = raw
    parts = key.strip().split(".")
    for depth, part in enumerate(parts):
        prefix = ".".join(parts[:depth])
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {prefix} is a value, not a section with keys")
        if part not in node:
            raise ConfigError(_unknown_key(source, prefix, part, list(node)))
        if depth == len(parts) - 1:
            node[part] = value
        else:
            node = node[part]
    config = _build(Config, raw, "", source)
    if across and (problem := _broken_rule(config)):
        raise ConfigError(f"{source}: {problem}")
    return config


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = []
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys given after it override it
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice",
                                                        key_node.start_mark)
            seen.append(key)
        return super().construct_mapping(node, deep=deep)


MAX_YAML_BYTES = 1 << 20
MAX_YAML_VALUES = 100_000


def _load_yaml(text: str) -> Any:
    """Plain data from YAML (a SafeLoader), bounded: a config of more than MAX_YAML_BYTES, or whose aliases
    expand to more than MAX_YAML_VALUES values (a "billion laughs" file), is refused before anything walks it.

    Raises:
        yaml.YAMLError: for either, as for malformed YAML.
    """
    if len(text) > MAX_YAML_BYTES:
        raise yaml.YAMLError(f"the file is {len(text):,} characters long; a config is at most {MAX_YAML_BYTES:,}")
    data = yaml.load(text, Loader=_StrictLoader)
    budget = [MAX_YAML_VALUES]

    def count(value: Any) -> None:  # every value as a reader of the config would meet it, aliases expanded
        budget[0] -= 1
        if budget[0] < 0:
            raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_VALUES:,} values")
        for item in value.items() if isinstance(value, dict) else value if isinstance(value, list) else ():
            if isinstance(item, tuple):
                count(item[0])
                count(item[1])
            else:
                count(item)

    count(data)
    return data


def config_to_dict(config: Config) -> dict[str, Any]:
    """The config as plain YAML-ready data (tuples become lists)."""
    return _plain(dataclasses.asdict(config))


def save_config(config: Config, path: Path) -> None:
    write_bytes(path, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True).encode())


def reference() -> list[tuple[str, str, str]]:
    """(key, default, help) for every setting, in order: the README's config reference is made from this."""
    rows = []

    def walk(cls: type, prefix: str) -> None:
        for f in fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(hint):
                walk(hint, f"{prefix}{f.name}.")
            else:
                text = f.metadata["help"]
                if typing.get_origin(hint) is Literal:
                    text = f"one of {', '.join(typing.get_args(hint))}: {text}"
                rows.append((prefix + f.name, yaml.safe_dump(_plain(f.default), default_flow_style=True)
                             .strip().removesuffix("\n..."), text))

    walk(Config, "")
    return rows


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _build(cls: type, raw: Any, prefix: str, source: str) -> Any:
    section = prefix.rstrip(".") or "top level"
    if raw is None and prefix:  # a section whose keys are all commented out
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: '{section}' must be a mapping of keys, got {_short(raw)}")
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if f"{prefix}{key}" in REMOVED:
            raise ConfigError(f"{source}: {prefix}{key} was removed: {REMOVED[f'{prefix}{key}']}; delete the key")
        if key not in known:
            raise ConfigError(_unknown_key(source, prefix.rstrip("."), str(key), list(known)))
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = _build(hint, value, f"{prefix}{name}.", source)
        else:
            values[name] = _check(value, hint, known[name].metadata, f"{prefix}{name}", source)
    return cls(**values)


def _broken_rule(config: Config) -> str:
    """The first rule that ties keys together (or the values of one pair) that `config` breaks, or ""."""
    train, model = config.train, config.model
    if train.average_last > train.keep_checkpoints:
        return (f"train.average_last ({train.average_last}) must be <= train.keep_checkpoints "
                f"({train.keep_checkpoints})")
    if model.d_model % model.heads:
        return f"model.heads ({model.heads}) must divide model.d_model ({model.d_model})"
    if not all(0 <= beta < 1 for beta in train.adam_betas):
        return f"train.adam_betas must be two numbers in [0, 1), got {list(train.adam_betas)}"
    return ""


def _check(value: Any, hint: Any, meta: dict, key: str, source: str) -> Any:
    """Returns `value` converted to the field's type, or raises a ConfigError saying what is allowed."""

    def fail(expected: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: {key} must be {expected}, got {_short(value)}")

    origin = typing.get_origin(hint)
    if hint is CorpusSpec or hint is CorpusList:
        from mt.corpora import parse_corpus, parse_corpus_list  # late import: corpora needs no config

        try:
            parse_corpus_list(value) if hint is CorpusList else parse_corpus(value)
        except ValueError as e:
            raise ConfigError(f"{source}: {key}: {e}") from None
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            fail("one of " + ", ".join(map(repr, choices)))
        return value
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            fail(f"a list of {len(args)} numbers")
        return tuple(_check(v, a, {}, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
    elif hint is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail("a number")
        value = float(value)
        if math.isnan(value):
            fail("a number, not NaN")
        if math.isinf(value) and not meta.get("inf"):
            fail("a finite number")
    elif hint is str:
        what = "a string" if meta.get("empty") else "a non-empty string"
        if isinstance(value, bool | int | float):  # YAML reads 2024, no, off... as numbers and booleans
            fail(f"{what} (quote it: YAML reads some words and numbers as other types)")
        if not isinstance(value, str) or not (value or meta.get("empty")):
            fail(what)
    elif isinstance(hint, types.UnionType):
        raise AssertionError(f"unsupported config type {hint}")
    low, high = meta.get("min"), meta.get("max")
    if low is not None and value < low:
        fail(f">= {low}" + (f" and <= {high}" if high is not None else ""))
    if high is not None and value > high:
        fail(f"<= {high}" + (f" and >= {low}" if low is not None else ""))
    above = meta.get("above")
    if above is not None and value <= above:
        fail(f"> {above}")
    return value


def _unknown_key(source: str, prefix: str, key: str, choices: list[str]) -> str:
    full = f"{prefix}.{key}" if prefix else key
    close = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    hint = f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)" if close else ""
    valid = ", ".join(choices)
    return f"{source}: unknown key '{_shorten(full, 80)}'{hint}; valid keys here: {valid}"


def _one_line(error: Exception) -> str:
    return _shorten(" ".join(str(error).split()), 300)


def _short(value: Any) -> str:
    """`repr(value)`, cut short: an error message never prints a whole value."""
    return _shorten(_REPR.repr(value), 120)


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxdict = _REPR.maxlevel = 4
