"""The run folder and its checkpoints, written atomically so that a kill never leaves a half-written file.

    runs/<name>/
        config.yaml       the resolved config of the run
        tokenizer.model   the SentencePiece model
        last.pt           model, optimizer, schedule, data position, random state: what resume needs
        step_NNNNNNN.pt   the same at earlier saves (the newest `train.keep_checkpoints`)
        best.pt           the model weights with the best validation BLEU, for translation
        averaged.pt       the mean of the last N numbered checkpoints (`mt average`, `train.average_last`)
        metrics.jsonl     one JSON object per log or validation event
        data.json         what data preparation read and removed
        train.log         the training log
        cache/            the tokenized training data while the run trains; removed when it finishes
        eval/             the hypotheses of `mt eval`
        tensorboard/      TensorBoard's event files (`train.tensorboard`)
"""

from __future__ import annotations

import fcntl
import fnmatch
import functools
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mt.config import Config, config_to_dict, load_run_config
from mt.errors import CheckpointError, ConfigError, MtError
from mt.files import write_atomically, write_bytes

if TYPE_CHECKING:  # torch loads with the first checkpoint: `mt translate` of an export needs none
    import torch

CONFIG, TOKENIZER, LAST, BEST, AVERAGED = "config.yaml", "tokenizer.model", "last.pt", "best.pt", "averaged.pt"
METRICS, DATA_STATS, LOG, CACHE = "metrics.jsonl", "data.json", "train.log", "cache"

log = logging.getLogger(__name__)


def save(state: dict[str, Any], path: Path) -> None:
    """Writes `state` with torch.save through `files.write_atomically`: a kill or a full disk leaves `path` as it
    was, and the error (an MtError) names the file."""
    import torch

    write_atomically(path, functools.partial(torch.save, state))


def load(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Loads a checkpoint; with `mmap`, memory-mapped, so that weights nobody reads are not read.

    Raises:
        CheckpointError: naming the file, if it is missing, truncated or not a checkpoint.
    """
    import torch

    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated, or no checkpoint at all "
                              f"({type(e).__name__})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not an mt checkpoint")
    return state


def save_numbered(state: dict[str, Any], run_dir: Path, step: int, keep: int) -> None:
    """Saves `state` as step_<step>.pt and as last.pt, keeping the newest `keep` numbered checkpoints.

    Each is written in full, not linked: a numbered checkpoint is the fallback of last.pt, and must not share
    its bytes with the file it backs up (a truncation of last.pt in place would truncate both)."""
    save(state, run_dir / f"step_{step:07d}.pt")
    save(state, run_dir / LAST)
    for old in numbered_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)


def remove_partial_files(run_dir: Path) -> None:
    """Deletes temporary files that a run killed while saving left behind, and ends a metrics line it cut
    short, so that the next record starts a line of its own."""
    for path in [*run_dir.glob(".*.tmp"), *run_dir.glob(".*.link")]:
        path.unlink(missing_ok=True)
    metrics = run_dir / METRICS
    if metrics.is_file() and metrics.stat().st_size:
        with open(metrics, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")


def has_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a checkpoint of a run: last.pt, best.pt or a numbered one."""
    return (folder / LAST).is_file() or (folder / BEST).is_file() or bool(numbered_checkpoints(folder))


def peek(path: Path) -> dict[str, Any] | None:
    """The checkpoint at `path`, memory-mapped (`load`); None where there is none that loads."""
    try:
        return load(path, mmap=True)
    except CheckpointError:
        return None


def saved_step(run_dir: Path) -> int | None:
    """The step of the run's last.pt, where a resume goes on; None without a readable one."""
    state = peek(run_dir / LAST)
    return int(state["progress"]["step"]) if state is not None and "progress" in state else None


def numbered_checkpoints(run_dir: Path) -> list[Path]:
    """The step_*.pt checkpoints of a run, newest first."""
    return sorted(run_dir.glob("step_*.pt"), reverse=True)


RESUMABLE = ("model", "optimizer", "progress", "rng")  # what last.pt and step_*.pt hold, and best.pt does not


def load_newest_valid(run_dir: Path, map_location: str | torch.device = "cpu",
                      accept: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Loads last.pt, or, when it is missing, corrupt, not a resumable checkpoint or refused by `accept` (which
    raises a CheckpointError for a state it cannot use, e.g. another model's), the newest numbered checkpoint
    that passes.

    Raises:
        CheckpointError: if no checkpoint of the run passes.
    """
    problems = []
    for path in [run_dir / LAST, *numbered_checkpoints(run_dir)]:
        try:
            state = load(path, map_location)
            if missing := [key for key in RESUMABLE if key not in state]:
                raise CheckpointError(f"{path} lacks {', '.join(missing)}: a checkpoint to translate with (best.pt?), "
                                      "not one to resume from")
            if accept is not None:
                accept(state)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        if problems:
            log.warning("%s; resuming from %s instead", "; ".join(problems), path.name)
        return state
    raise CheckpointError(f"cannot resume {run_dir}: no checkpoint loads ({'; '.join(problems)})")


def average(paths: list[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the model weights in these checkpoints (Vaswani et al., 2017, section 6.1).

    Raises:
        CheckpointError: if a checkpoint does not load or the models differ in shape.
    """
    if not paths:
        raise CheckpointError("no checkpoints to average")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for path in paths:
        model = load(path)["model"]
        if total and model.keys() != total.keys():
            raise CheckpointError(f"{path} holds a different model from {paths[0]}")
        for name, tensor in model.items():
            if name not in total:
                total[name], dtypes[name] = tensor.double(), tensor.dtype
            elif total[name].shape != tensor.shape:
                raise CheckpointError(f"{path}: {name} has shape {tuple(tensor.shape)}, not {tuple(total[name].shape)}")
            else:
                total[name] += tensor.double()
    return {name: (t / len(paths)).to(dtypes[name]) for name, t in total.items()}


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    path = run_dir / METRICS
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise MtError(f"cannot write {path}: {e.strerror}") from None


def drop_metrics_after(run_dir: Path, step: int) -> None:
    """Deletes the metrics records of steps after `step`, the checkpoint a run resumes from, and those of
    checkpoint averaging at `step`: a run killed between two checkpoints logged steps that it trains and logs
    again, and a finished run killed after averaging (while tuning, say) averages again when resumed."""
    path = run_dir / METRICS
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if not _step_after(line, step)]
    if len(kept) < len(lines):
        write_bytes(path, b"".join(kept))
        log.info("%s: dropped %d record(s) after step %d, the checkpoint resumed", path, len(lines) - len(kept),
                 step)


def _step_after(line: bytes, step: int) -> bool:
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return (isinstance(record, dict) and _is_number(record.get("step"))
            and (record["step"] > step or (record["step"] == step and "averaged" in record)))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's metrics.jsonl. A line that a kill or a full disk cut short, or that is not a
    record with a numeric step and numeric losses and BLEU, is skipped with a warning."""
    path = run_dir / METRICS
    if not path.is_file():
        return []
    records, skipped = [], []
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and _is_number(record.get("step")) \
                and all(_is_number(record[key]) for key in _NUMBERS if key in record):
            records.append(record)
        else:
            skipped.append(number)
    if skipped:
        log.warning("%s: skipped %d unreadable line(s): %s", path, len(skipped), ", ".join(map(str, skipped[:5])))
    return records


_NUMBERS = ("train_loss", "valid_loss", "valid_bleu", "lr", "tokens_per_s", "seconds")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


EVAL_INDEX = "index.json"  # in eval/: the hypothesis files mt eval wrote, and the source each translates


def foreign_files(run_dir: Path) -> list[str]:
    """The names in `run_dir`, and in the folders mt writes into it, that `mt` did not write: a folder holding
    any is never deleted.

    mt's own are its files (config.yaml, tokenizer.model, last.pt, best.pt, averaged.pt, step_*.pt,
    metrics.jsonl, data.json, train.log, and temporary files of a save cut short), the tokenized data in cache/
    (Arrow files named by their fingerprint), TensorBoard's event files in tensorboard/, and in eval/ the
    hypotheses that eval/index.json lists."""
    ours = {CONFIG, TOKENIZER, LAST, BEST, AVERAGED, METRICS, DATA_STATS, LOG}
    foreign = [p.name for p in run_dir.iterdir()
               if not (p.name in ours and p.is_file()) and p.name not in (CACHE, "eval", "tensorboard")
               and not fnmatch.fnmatch(p.name, "step_*.pt") and not fnmatch.fnmatch(p.name, ".*.tmp")]
    written = set(read_eval_index(run_dir / "eval")) | {EVAL_INDEX}
    for folder, is_ours in ((CACHE, lambda name: re.fullmatch(r"[0-9a-f]{16,64}\.arrow|tmp\w+", name)),
                            ("tensorboard", lambda name: name.startswith("events.out.tfevents.")),
                            ("eval", lambda name: name in written or fnmatch.fnmatch(name, ".*.tmp"))):
        if (run_dir / folder).is_dir():
            foreign += [f"{folder}/{p.name}" for p in (run_dir / folder).iterdir()
                        if not (p.is_file() and is_ours(p.name))]
        elif (run_dir / folder).exists():
            foreign.append(folder)
    return sorted(foreign)


def read_eval_index(eval_dir: Path) -> dict[str, str]:
    """eval/index.json: {hypothesis file name: what it translates}; empty where there is none or it is
    damaged."""
    try:
        index = json.loads((eval_dir / EVAL_INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in index.items()} if isinstance(index, dict) else {}


class RunLock:
    """An exclusive lock on a run folder while a command changes it (`mt train`, `mt tune`, `mt average`).

    The lock is the file runs_dir/.NAME.lock, held with flock(2), which the system releases when the process
    ends, however it ends: a killed run leaves no stale lock behind, and the next `--resume` takes it. The
    file, which lies beside the run folder so that `--overwrite` never deletes it, names the process that
    holds it. Under torchrun, rank 0 alone takes it.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir.parent / f".{run_dir.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise MtError(f"cannot write in {self.path.parent}: {e.strerror} (a run needs its runs_dir "
                          "writable)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise MtError(f"{self.run_dir} is in use by {holder}; wait for it to end or stop it") from None
        os.ftruncate(fd, 0)
        command = " ".join(["mt", *sys.argv[1:]])[:200]
        os.pwrite(fd, f"process {os.getpid()} ({command})\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the last descriptor releases the lock
            self.fd = None


def check_run(run_dir: Path) -> Path:
    """`run_dir`, if it is a run folder (it holds a config.yaml) that training has got far enough in to use.

    Raises:
        CheckpointError: saying what it is instead.
    """
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run folder" if run_dir.exists()
                              else f"run folder not found: {run_dir}")
    if not (run_dir / CONFIG).is_file():
        raise CheckpointError(f"{run_dir} is not a run folder: it has no {CONFIG}")
    if not (run_dir / TOKENIZER).is_file() and not has_checkpoint(run_dir):
        raise CheckpointError(f"{run_dir} holds no trained model (no {TOKENIZER}, no checkpoint): its training "
                              "stopped before it got that far, or has only just started")
    return run_dir


@dataclass
class RunSummary:
    """One line of `mt runs`."""

    folder: Path
    step: int | None  # of last.pt; None: no checkpoint yet, or none that reads
    best_bleu: float | None
    changed: float  # the newest modification time in the folder


def list_runs(runs_dir: Path) -> list[RunSummary]:
    """The run folders (those holding a config.yaml) under `runs_dir`, by name. An entry that cannot be read (a
    dangling symlink, a folder without permission) is skipped with a warning, not the whole list."""
    runs = []
    for folder in sorted(runs_dir.iterdir()) if runs_dir.is_dir() else []:
        try:
            if not (folder / CONFIG).is_file():
                continue
            bleus = [r["valid_bleu"] for r in read_metrics(folder) if "valid_bleu" in r]
            changed = max(p.lstat().st_mtime for p in [folder, *folder.iterdir()])
        except OSError as e:
            log.warning("skipped %s: %s", folder, e.strerror or e)
            continue
        runs.append(RunSummary(folder, saved_step(folder), max(bleus) if bleus else None, changed))
    return runs


def latest_run(runs_dir: Path) -> Path:
    """The most recently trained run folder (by its newest checkpoint) under `runs_dir`.

    Raises:
        CheckpointError: if there is none, saying how to make one.
    """
    candidates = []
    if runs_dir.is_dir():
        for folder in runs_dir.iterdir():
            times = [(folder / name).stat().st_mtime for name in (BEST, LAST) if (folder / name).is_file()]
            if times and (folder / CONFIG).is_file():
                candidates.append((max(times), folder))
    if not candidates:
        raise CheckpointError(f"no trained run found in {runs_dir}/; train one with `mt train` "
                              "or name one with --run")
    return max(candidates)[1]


def prepare_run_dir(config: Config, resume: bool, overwrite: bool,
                    checks: Callable[[], None] = lambda: None) -> bool:
    """Creates the run folder (with `overwrite`, empties it of mt's files first), or checks it for `resume`.
    Returns whether the run resumes from a checkpoint: a `--resume` of a run that has none yet (its first start
    was stopped before its first save) starts it, and says so. `checks` (the device, the corpora) runs before
    anything is deleted or created.

    Raises:
        MtError: if the folder exists and neither flag says what to do with it, if it holds files mt did not
            write, if a resumed run's model or data settings changed, or if the name is not a folder name.
    """
    check_trainable(config)
    run_dir = config.run_dir
    if resume and (run_dir / CONFIG).is_file():
        _check_resumable(run_dir, config)
        checks()
        remove_partial_files(run_dir)
        if has_checkpoint(run_dir):
            return True
        log.warning("%s has no checkpoint yet (its first start stopped early): --resume starts it", run_dir)
        return False
    if resume:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise CheckpointError(f"cannot resume {run_dir}: it is not a run folder (no {CONFIG})")
        log.warning("%s does not exist yet: --resume starts the run", run_dir)
    elif run_dir.exists() and any(run_dir.iterdir()):
        if foreign := foreign_files(run_dir):  # never delete what mt did not write
            raise MtError(f"{run_dir} exists and holds files mt did not write ({', '.join(foreign[:3])}); choose "
                          "another name with --set name=NEW or another runs_dir")
        if not has_checkpoint(run_dir):  # an earlier start that stopped early: nothing to resume
            log.info("%s holds no checkpoint (an earlier start stopped early): starting it again", run_dir)
        elif not overwrite:
            raise MtError(f"run folder {run_dir} already exists; pass --resume to continue it, --overwrite to "
                          "start it again, or choose another name with --set name=NEW")
        checks()
        shutil.rmtree(run_dir)  # only mt's files, checked just above
    checks()
    run_dir.mkdir(parents=True, exist_ok=True)
    return False


def _check_resumable(run_dir: Path, config: Config) -> None:
    """Raises a ConfigError if `config` changes what a resume of `run_dir` cannot change (the model, the
    tokenizer, the training data); warns of the other changes."""
    saved = load_run_config(run_dir / CONFIG)
    # The tokenizer and the training data are the run's; how many processes read them, and mt eval's test
    # set, are not.
    free = ("data.workers:", "data.test:")
    fixed = [change for section in ("model", "tokenizer", "data") for change in _changes(saved, config, section)
             if not change.startswith(free)]
    if fixed:
        raise ConfigError(f"cannot resume {run_dir}: {'; '.join(fixed[:4])} (the run's {CONFIG} "
                          "against this config): resume with the run's own settings or train a new run")
    # Longer or shorter is what a resume is for; any other change is worth a word.
    stops = ("train.max_steps:", "train.max_epochs:", "train.max_minutes:")
    changed = [c for c in _changes(saved, config, "data") if c.startswith(free)]
    changed += [c for c in _changes(saved, config, "train") if not c.startswith(stops)]
    if changed:
        log.warning("resuming %s with changed settings: %s", run_dir, "; ".join(changed))
    if changed := _changes(saved, config, "decode"):
        log.warning("resuming %s with the decode section it has (mt tune may have chosen it), not this "
                    "config's (%s): edit its %s to change it", run_dir, "; ".join(changed), CONFIG)


def in_its_own_folder(config: Config, path: Path, overrides: Sequence[str] = ()) -> Config:
    """`config`, read from `path`, set to resume the folder `path` is in when `path` is a run's own config.yaml
    (one beside checkpoints) and that folder is not where its runs_dir and name point: a run copied or moved
    elsewhere, or a relative runs_dir read from another folder. Unchanged for any other config, and when an
    override names the run."""
    folder = Path(os.path.abspath(path.parent))  # as given: a symlinked folder keeps its own name
    named = {override.partition("=")[0].strip() for override in overrides}
    if (path.name != CONFIG or not has_checkpoint(folder) or named & {"name", "runs_dir"}
            or (config.run_dir.exists() and config.run_dir.samefile(folder))):
        return config
    log.info("resuming %s, the run folder of %s (its config names %s)", folder, path, config.run_dir)
    return replace(config, name=folder.name, runs_dir=str(folder.parent))


def _changes(saved: Config, config: Config, section: str) -> list[str]:
    """"section.key: saved → new" for each key of `section` whose value differs between the two configs."""
    before, after = config_to_dict(saved)[section], config_to_dict(config)[section]
    return [f"{section}.{key}: {before[key]} → {after[key]}" for key in before if before[key] != after[key]]


# What a fine-tuning run may set otherwise than its parent: regularisation, not the weights' shapes.
FINE_TUNING_FREE = ("model.dropout", "model.attention_dropout", "model.activation_dropout")


def with_parent(config: Config) -> Config:
    """`config` for a run that starts from the weights and tokenizer of the run `config.init_from` (fine-tuning):
    its model and tokenizer sections are the parent's, except the dropout rates. Keys of those sections that
    `config` leaves at their defaults are taken from the parent.

    Raises:
        CheckpointError: if the parent is not a run folder with weights to start from.
        ConfigError: if `config` sets a model or tokenizer key to another value than the parent's, naming it.
    """
    parent = check_run(Path(config.init_from).expanduser())
    parent_weights(parent)
    saved = load_run_config(parent / CONFIG)
    kept, asked, defaults = (config_to_dict(c) for c in (saved, config, Config()))
    changed = [f"{section}.{key}: {kept[section][key]} → {value}" for section in ("model", "tokenizer")
               for key, value in asked[section].items()
               if value not in (kept[section][key], defaults[section][key])
               and f"{section}.{key}" not in FINE_TUNING_FREE]
    if changed:
        raise ConfigError(f"init_from {parent}: a fine-tuned run keeps its parent's model and tokenizer, but this "
                          f"config changes {'; '.join(changed[:4])}; leave those keys out (or as the parent has them)")
    dropouts = {key.split(".")[1]: getattr(config.model, key.split(".")[1]) for key in FINE_TUNING_FREE}
    return replace(config, init_from=str(parent), model=replace(saved.model, **dropouts), tokenizer=saved.tokenizer)


def parent_weights(parent: Path) -> Path:
    """The checkpoint a fine-tuned run starts from: the parent's best.pt, else its last.pt.

    Raises:
        CheckpointError: if it has neither.
    """
    for name in (BEST, LAST):
        if (parent / name).is_file():
            return parent / name
    raise CheckpointError(f"init_from {parent}: it has neither {BEST} nor {LAST} to start from")


def check_trainable(config: Config) -> None:
    """What training needs of a config beyond what loading one checks (a saved run's config that fails here
    still translates).

    Raises:
        ConfigError: for a run name that is not a folder name, or sentences longer than the model's positions.
    """
    if config.name in (".", "..") or any(c in config.name for c in "/\\"):
        raise ConfigError(f"name must be a folder name, without '/' and not '.' or '..' (the run folder is "
                          f"runs_dir/name), got {config.name!r}")
    if config.model.max_positions <= config.data.max_tokens:  # + EOS or BOS
        raise ConfigError(f"model.max_positions ({config.model.max_positions}) must exceed data.max_tokens "
                          f"({config.data.max_tokens}): sentences get an EOS or BOS token")
