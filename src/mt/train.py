"""Training: data preparation, the loss, the learning-rate schedule, the loop, validation and checkpoints.

The schedule is the Transformer paper's (Vaswani et al., 2017, section 5.3) with the peak given directly:
linear warmup to `train.lr`, then decay with the inverse square root of the step. The loss is label-smoothed
cross-entropy (Szegedy et al., 2016) over the real (non-padding) target tokens only, so no output
projection is spent on padding. `train.precision` says in which dtype the forward pass runs.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.fx.experimental import _config as shapes_config
from tqdm import tqdm

from mt import checkpoint, corpora, distributed
from mt.attention import check_kernel_order, fast_kernels
from mt.config import TUNE_BEAMS, TUNE_PENALTIES, Config, config_to_dict, load_run_config, save_config
from mt.data import (
    LAYOUTS,
    Batch,
    Layout,
    PairTable,
    batch_layout,
    clean_pairs,
    collate,
    filter_pairs,
    lengths,
    load_corpus,
    make_batches,
    normalize_text,
    tokenize,
)
from mt.devices import (
    MasterWeights,
    autocast,
    autocast_dtype,
    bf16_without_instructions,
    resolve_device,
    training_precision,
)
from mt.errors import CheckpointError, ConfigError, DataError, Interrupted, MtError
from mt.evaluate import bleu
from mt.files import free_mib, write_bytes
from mt.model import Transformer
from mt.tokenizer import Tokenizer
from mt.translate import translate_ids

log = logging.getLogger(__name__)

# Decoding inside `mt train` (validation, and choosing the decoding defaults) runs one stream, whatever
# `decode.inter_threads` says: a second thread's allocations stay in its own malloc arena, on top of the
# training's memory. In 2.5-minute runs of the default config it raised `mt train`'s peak RSS by half a
# gigabyte, at about the same speed (BENCHMARKS.md, "Memory").
IN_TRAINING_STREAMS = 1


@dataclass
class Progress:
    """Where training stands: everything besides weights and optimizer that resume must restore."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed
    seconds: float = 0.0  # training time over all sessions of the run
    best_bleu: float = -1.0
    best_step: int = 0
    bad_validations: int = 0  # validations in a row without a better BLEU (early stopping)
    nonfinite_in_a_row: int = 0
    batch_layout: str = ""  # str(mt.data.Layout), chosen at the run's start; "" in older runs
    ranks: int = 0  # processes that trained it last (torchrun's world size); 0 in older runs
    validated_step: int = -1  # the step of the last validation; -1: none yet, or an older run


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: Any  # datasets.Dataset with src_ids / tgt_ids
    valid: Any
    src_len: np.ndarray
    tgt_len: np.ndarray

    @functools.cached_property
    def valid_columns(self) -> dict[str, list]:
        """The validation set as column lists, read from Arrow once per run rather than at every validation."""
        return self.valid[:]


def inverse_sqrt_schedule(step: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at update `step` (1-based)."""
    step = max(step, 1)
    return min(step / warmup, math.sqrt(warmup / step))


def prepare_run_dir(config: Config, resume: bool, overwrite: bool) -> Path:
    """Creates (or, with `overwrite`, empties) the run folder, or checks it for `resume`.

    Raises:
        MtError: if the folder exists and neither flag says what to do with it, if it holds files mt did not
            write, or if the name is not a folder name.
    """
    check_trainable(config)
    run_dir = config.run_dir
    if resume:
        if not (run_dir / checkpoint.CONFIG).is_file():
            raise CheckpointError(f"cannot resume: {run_dir} is not a run folder (no {checkpoint.CONFIG})")
        saved = load_run_config(run_dir / checkpoint.CONFIG)
        # The tokenizer and the training data are the run's; how many processes read them, and mt eval's test
        # set, are not.
        free = ("data.workers:", "data.test:")
        fixed = [change for section in ("model", "tokenizer", "data") for change in _changes(saved, config, section)
                 if not change.startswith(free)]
        if fixed:
            raise ConfigError(f"cannot resume {run_dir}: {'; '.join(fixed[:4])} (the run's {checkpoint.CONFIG} "
                              "against this config): resume with the run's own settings or train a new run")
        # Longer or shorter is what a resume is for; any other change is worth a word.
        stops = ("train.max_steps:", "train.max_epochs:", "train.max_minutes:")
        changed = [c for c in _changes(saved, config, "data") if c.startswith(free)]
        changed += [c for c in _changes(saved, config, "train") if not c.startswith(stops)]
        if changed:
            log.warning("resuming %s with changed settings: %s", run_dir, "; ".join(changed))
        if changed := _changes(saved, config, "decode"):
            log.warning("resuming %s with the decode section it has (mt tune may have chosen it), not this "
                        "config's (%s): edit its %s to change it", run_dir, "; ".join(changed), checkpoint.CONFIG)
        checkpoint.remove_partial_files(run_dir)
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        foreign = checkpoint.foreign_files(run_dir)
        if foreign:  # never delete what mt did not write
            raise MtError(f"{run_dir} exists and holds files mt did not write ({', '.join(foreign[:3])}); choose "
                          "another name with --set name=NEW or another runs_dir")
        if not checkpoint.has_checkpoint(run_dir):  # an earlier start that stopped early: nothing to resume
            log.info("%s holds no checkpoint (an earlier start stopped early): starting it again", run_dir)
        elif not overwrite:
            raise MtError(f"run folder {run_dir} already exists; pass --resume to continue it, --overwrite to "
                          "start it again, or choose another name with --set name=NEW")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def in_its_own_folder(config: Config, path: Path, overrides: Sequence[str] = ()) -> Config:
    """`config`, read from `path`, set to resume the folder `path` is in when `path` is a run's own config.yaml
    (one beside checkpoints) and that folder is not where its runs_dir and name point: a run copied or moved
    elsewhere, or a relative runs_dir read from another folder. Unchanged for any other config, and when an
    override names the run."""
    folder = Path(os.path.abspath(path.parent))  # as given: a symlinked folder keeps its own name
    named = {override.partition("=")[0].strip() for override in overrides}
    if (path.name != checkpoint.CONFIG or not checkpoint.has_checkpoint(folder) or named & {"name", "runs_dir"}
            or (config.run_dir.exists() and config.run_dir.samefile(folder))):
        return config
    log.info("resuming %s, the run folder of %s (its config names %s)", folder, path, config.run_dir)
    return replace(config, name=folder.name, runs_dir=str(folder.parent))


def _changes(saved: Config, config: Config, section: str) -> list[str]:
    """"section.key: saved → new" for each key of `section` whose value differs between the two configs."""
    before, after = config_to_dict(saved)[section], config_to_dict(config)[section]
    return [f"{section}.{key}: {before[key]} → {after[key]}" for key in before if before[key] != after[key]]


def check_trainable(config: Config) -> None:
    """What training needs of a config beyond what loading one checks (a saved run's config that fails here
    still translates).

    Raises:
        ConfigError: for a run name that is not a folder name, sentences longer than the model's positions, or
            an attention kernel order this torch cannot set.
    """
    if config.name in (".", "..") or any(c in config.name for c in "/\\"):
        raise ConfigError(f"name must be a folder name, without '/' and not '.' or '..' (the run folder is "
                          f"runs_dir/name), got {config.name!r}")
    if config.model.max_positions <= config.data.max_tokens:  # + EOS or BOS
        raise ConfigError(f"model.max_positions ({config.model.max_positions}) must exceed data.max_tokens "
                          f"({config.data.max_tokens}): sentences get an EOS or BOS token")
    check_kernel_order(config.train.attention)


def _resolve(key: str, spec: Any, config: Config, fetch: bool = True):
    """`corpora.resolve` for one corpus of the config; its errors name the config key."""
    try:
        return corpora.resolve(spec, config.data.src_lang, config.data.tgt_lang, fetch=fetch)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None


def prepare_data(config: Config, run_dir: Path) -> PreparedData:
    """Reads, tokenizes and filters the corpora; trains the tokenizer unless the run already has one."""
    import datasets

    data = config.data
    valid_files = _resolve("data.valid", data.valid, config)  # a typo fails before the long read
    # mt eval's test set, checked now rather than after training; a corpus mt would download is not fetched yet
    _resolve("data.test", data.test, config, fetch=False)
    parts, names, cleaning = [], [], []
    for spec, repeat in corpora.parse_corpus_list(data.train):
        files = _resolve("data.train", spec, config)
        plain = not isinstance(files, corpora.CorpusFiles) or str(files.src) in files.name  # a dataset, or paths
        where = "" if plain else f" ({files.src}, {files.tgt})"
        log.info("reading %s%s", files.name, where)
        corpus = load_corpus(files, data.max_pairs)
        if len(corpus) == 0:
            raise DataError(f"training corpus {files.name} is empty")
        corpus, report = clean_pairs(corpus, data.normalize, data.dedupe)
        log.info("%s: %s%s", files.name, report.describe(), f"; repeated {repeat} times" if repeat > 1 else "")
        parts += [corpus] * repeat
        names.append(files.name + (f"*{repeat}" if repeat > 1 else ""))
        cleaning.append({"corpus": files.name, "repeat": repeat, **asdict(report)})
    train = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    valid = load_corpus(valid_files)
    if len(valid) == 0:
        raise DataError(f"validation corpus {valid_files.name} is empty")
    if data.normalize:
        valid = valid.map(_normalize_source, batched=True)
    tokenizer_path = run_dir / checkpoint.TOKENIZER
    if tokenizer_path.is_file():
        tokenizer = Tokenizer.load(tokenizer_path)
        log.info("reusing %s (%d pieces)", tokenizer_path, tokenizer.vocab_size)
    else:
        t = config.tokenizer
        log.info("training a %s SentencePiece tokenizer of %d pieces", t.type, t.vocab_size)
        sample = train
        if 2 * len(train) > t.sample_sentences:  # a random sample of pairs: the corpus is never all in memory
            picked = np.random.default_rng(config.train.seed).choice(len(train), t.sample_sentences // 2, replace=False)
            sample = train.select(np.sort(picked))
        tokenizer = Tokenizer.train(list(sample["src"]) + list(sample["tgt"]), t.vocab_size, t.type,
                                    t.character_coverage, t.sample_sentences, seed=config.train.seed)
        tokenizer.save(tokenizer_path)
    cache = run_dir / checkpoint.CACHE
    try:
        train, report = filter_pairs(tokenize(train, tokenizer, data.workers, cache), data.max_tokens,
                                     data.max_ratio, cache)
        valid = tokenize(valid, tokenizer, cache=cache)
    except OSError as e:  # datasets' and Arrow's writes name no file
        raise DataError(f"cannot write the tokenized data to {cache}/: {e.strerror or e} "
                        f"({free_mib(run_dir):,.0f} MiB free on its disk)") from None
    log.info("training data: %s", report.describe())
    if report.kept == 0:
        raise DataError(f"no training pairs left after filtering {' + '.join(names)} "
                        f"(data.max_tokens={data.max_tokens}, data.max_ratio={data.max_ratio})")
    src_len, tgt_len = lengths(train)
    stats = {"train": names, "valid": valid_files.name, "cleaning": cleaning, "filter": asdict(report),
             "valid_pairs": len(valid), "vocab_size": tokenizer.vocab_size,
             "train_src_tokens": int(src_len.sum()), "train_tgt_tokens": int(tgt_len.sum())}
    write_bytes(run_dir / checkpoint.DATA_STATS, (json.dumps(stats, indent=2) + "\n").encode())
    return PreparedData(tokenizer, train, valid, src_len, tgt_len)


def _normalize_source(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    # Validation sources are normalised as translation input is; references stay as they are.
    return {"src": [normalize_text(t) for t in batch["src"]]}


def compiled(model: Transformer, **options) -> Transformer:
    """`model` for training with each encoder and decoder layer compiled by torch.compile (`train.compile`);
    `options` go to torch.compile.

    It returns a view of `model`: the same parameters, buffers and modules, but layers that run compiled.
    Validation and decoding use `model` itself, uncompiled. Regional compilation: the layers of a stack run the
    same code, and torch.compile guards on a layer's class and settings, not on which layer it is, so one
    encoder layer graph and one decoder layer graph serve all of them (tests/test_train.py). The whole
    6+6-layer model of configs/multi30k-gpu.yaml had still not compiled after 390 s on an H100. The embedding,
    the output projection and the loss stay eager.

    Dynamic shapes: length-bucketed batches change their size and lengths at every step, and one graph with
    symbolic sizes serves them all instead of a compilation per shape. The graphs keep the attention kernels
    in force when they were traced (`train.attention`): torch.compile does not check them again.
    """
    view = copy.copy(model)
    view._modules = dict(model._modules)  # its own list of children, so that replacing the layers leaves `model`'s
    for stack in ("encoder_layers", "decoder_layers"):
        layers = (_WithoutDuckSizing(torch.compile(layer, dynamic=True, **options)) for layer in getattr(model, stack))
        setattr(view, stack, torch.nn.ModuleList(layers))
    return view


class _WithoutDuckSizing(torch.nn.Module):
    """Calls a compiled module with duck sizing off, so that its graph is traced for every batch shape.

    With it on, sizes that happen to be equal in the batch traced share one symbol: with configs/tiny.yaml, a
    first batch whose source and target were both 44 positions long gave a graph for equal lengths only, and
    the next batch compiled a second one (TORCH_LOGS=recompiles scripts/bench_levers.py names the guard).
    tests/test_train.py checks that one graph serves such batches.
    """

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *args, **kwargs):
        with _no_duck_sizing():
            return self.net(*args, **kwargs)


# Duck sizing off while torch.compile traces (a setting of torch.fx's symbolic shapes), where this torch has it;
# asked once here, not at every training step.
_no_duck_sizing = (functools.partial(shapes_config.patch, use_duck_shape=False)
                   if hasattr(shapes_config, "use_duck_shape") else contextlib.nullcontext)


def loss_fn(model: torch.nn.Module, batch: Batch, label_smoothing: float,
            attention: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross-entropy and summed plain NLL over the batch's real target tokens, with
    `attention` kernels first (`train.attention`).

    `model` is a Transformer or its DistributedDataParallel wrapper: it is called, not taken apart, so
    that DDP sees the forward pass.
    """
    with fast_kernels(batch.src.device, attention):
        logits = model(batch.src, batch.tgt_in, batch.real)  # (N, V): only real positions
    return SmoothedCrossEntropy.apply(logits, batch.tgt_out.flatten().index_select(0, batch.real), label_smoothing)


class SmoothedCrossEntropy(torch.autograd.Function):
    """Summed label-smoothed cross-entropy of logits (N, V) against targets (N,), and the summed NLL.

    The target distribution q puts 1 - ε on the target token and ε / V on every token (ε = label smoothing),
    as `F.cross_entropy(label_smoothing=ε)`. The backward pass is written out, since the gradient is simply
    softmax(logits) - q: one pass over the (N, V) scores where autograd's chain (log-softmax, gather, sum,
    conversion) took five: a CPU training step 1.18x faster (scripts/profile_step.py). The NLL is for logging.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, smoothing: float):
        log_probs = logits.log_softmax(dim=-1, dtype=torch.float32)
        nll = -log_probs.gather(1, target[:, None]).sum()
        loss = (1.0 - smoothing) * nll - (smoothing / log_probs.size(-1)) * log_probs.sum()
        ctx.save_for_backward(log_probs, target)
        ctx.smoothing, ctx.logits_dtype = smoothing, logits.dtype
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        log_probs, target = ctx.saved_tensors
        grad = log_probs.exp_()  # softmax, in place: the saved log-probabilities are not needed again
        grad.sub_(ctx.smoothing / grad.size(-1))
        grad[torch.arange(grad.size(0), device=grad.device), target] -= 1.0 - ctx.smoothing
        return grad.mul_(grad_loss).to(ctx.logits_dtype), None, None


@torch.no_grad()
def validate(model: Transformer, data: PreparedData, config: Config, device: torch.device,
             amp: torch.dtype | None) -> dict[str, float]:
    """Validation loss (per token, no smoothing) on all valid pairs, and greedy BLEU on the first
    `train.valid_sentences` of them."""
    model.eval()
    valid = data.valid_columns
    limit = model.config.max_positions - 1
    src_ids = [ids[:limit] for ids in valid["src_ids"]]
    tgt_ids = [ids[: limit - 1] for ids in valid["tgt_ids"]]
    total_nll, total_tokens = 0.0, 0
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    for start in range(0, len(order), 64):
        chunk = order[start : start + 64]
        batch = collate([src_ids[i] for i in chunk], [tgt_ids[i] for i in chunk]).to(device)
        with autocast(device, amp):
            _, nll = loss_fn(model, batch, 0.0, config.train.attention)
        total_nll += float(nll)
        total_tokens += batch.target_tokens
    n = config.train.valid_sentences or len(src_ids)
    greedy = replace(config.decode, beam_size=1, inter_threads=IN_TRAINING_STREAMS)
    hyps = translate_ids(model, src_ids[:n], greedy, amp=amp)
    outputs = data.tokenizer.decode([h[0].tokens for h in hyps])
    model.train()
    loss = total_nll / max(total_tokens, 1)
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50)), "valid_bleu": bleu(outputs, valid["tgt"][:n])}


def _rng_state() -> dict[str, Any]:
    """The random state that training consumes: dropout draws from torch's generators. (Batch order comes
    from its own generator, seeded with seed + epoch.)"""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


class _StopSignals:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second one stops at once."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint after this step (again to stop at once)", self.received)


def train(config: Config, resume: bool = False, overwrite: bool = False, show_progress: bool | None = None) -> Path:
    """Trains a model as `config` says and returns its run folder.

    Raises:
        MtError: for bad config values, data or run folders, before any training starts.
        Interrupted: after saving a checkpoint, on SIGINT or SIGTERM.
    """
    ctx = distributed.setup()
    logger = logging.getLogger("mt")
    level = logger.level
    if not ctx.is_main:
        logger.setLevel(logging.WARNING)
        show_progress = False
    file_log = trainer = None
    try:  # from here on the process group is torn down whatever happens: a rank left in it aborts at exit
        if ctx.is_main and resume and (config.run_dir / checkpoint.CONFIG).is_file():
            file_log = _log_to(config.run_dir, logger)  # first: what the resume changes goes into the log too
        run_dir = _main_first(ctx, lambda: prepare_run_dir(config, resume, overwrite),
                              others=lambda: config.run_dir)
        if resume:  # the run's own decoding settings: mt tune may have chosen them
            config = replace(config, decode=load_run_config(run_dir / checkpoint.CONFIG).decode)
        if ctx.is_main and file_log is None:
            file_log = _log_to(run_dir, logger)
        tc = config.train
        if not (tc.max_steps or tc.max_epochs or tc.max_minutes or tc.patience):  # said before the long read
            log.warning("no stopping condition (train.max_steps, max_epochs, max_minutes and patience are all 0): "
                        "training goes on until Ctrl-C")
        trainer = Trainer(config, run_dir, resume, ctx)
        with _StopSignals() as signals:
            try:
                trainer.run(signals, show_progress)
            except Interrupted as e:  # the CLI prints it; train.log keeps it too
                if file_log:
                    file_log.handle(log.makeRecord(log.name, logging.WARNING, __file__, 0, str(e), None, None))
                raise
        if config.train.tune_decoding and ctx.is_main:
            from mt.evaluate import describe_setting, tune_run

            best = tune_run(run_dir, TUNE_BEAMS, TUNE_PENALTIES, device=str(trainer.device),
                            streams=IN_TRAINING_STREAMS)[0]
            log.info("decoding defaults chosen on the valid set: %s (BLEU %.2f)", describe_setting(best), best["bleu"])
        if ctx.is_main:  # the tokenized data: a resume of the finished run makes it again
            shutil.rmtree(run_dir / checkpoint.CACHE, ignore_errors=True)
        return run_dir
    finally:
        if trainer is not None and trainer.tensorboard is not None:
            trainer.tensorboard.close()
        if file_log:
            logger.removeHandler(file_log)
            file_log.close()
        logger.setLevel(level)
        distributed.teardown(ctx)


def _log_to(run_dir: Path, logger: logging.Logger) -> logging.Handler:
    """Adds a handler that appends the log to the run's train.log, and returns it."""
    handler = logging.FileHandler(run_dir / checkpoint.LOG, encoding="utf-8", delay=True)  # opened when used
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    return handler


def _main_first(ctx: distributed.Context, make: Callable[[], Any], others: Callable[[], Any] | None = None) -> Any:
    """Runs `make` on rank 0 first, then (`others` or `make`) on the other ranks, which may reuse what rank 0
    wrote. An MtError on rank 0 is raised on every rank, so that none waits for it forever."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = make()
        except MtError as e:
            error = e
    error = distributed.from_main(ctx, error)
    if error is not None:
        raise error
    if not ctx.is_main:
        result = (others or make)()
    distributed.barrier(ctx)
    return result


class Trainer:
    """The model, optimizer, data and progress of one run, and the loop that trains it."""

    def __init__(self, config: Config, run_dir: Path, resume: bool, ctx: distributed.Context):
        tc = self.tc = config.train
        self.config, self.run_dir, self.ctx = config, run_dir, ctx
        self.device = resolve_device(config)
        if self.device.type == "cuda" and self.ctx.active:
            self.device = torch.device("cuda", self.ctx.local_rank)
        self.amp = autocast_dtype(config, self.device)
        if bf16_without_instructions(config, self.device) and self.ctx.is_main:
            log.warning("train.precision is %s, but this CPU has no bf16 instructions (AVX512-BF16 or AMX): its bf16 "
                        "matrix products run hundreds of times slower than fp32; 'auto' trains in fp32 here",
                        tc.precision)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        if self.ctx.is_main:
            save_config(config, run_dir / checkpoint.CONFIG)
        self.data = _main_first(self.ctx, lambda: prepare_data(config, run_dir))
        self.model = Transformer(config.model, self.data.tokenizer.vocab_size).to(self.device)
        # With bf16 weights, training runs on a bf16 copy; `self.model` holds the fp32 master weights.
        self.master = MasterWeights(self.model) if tc.precision == "bf16-weights" else None
        trained = self.master.work if self.master else self.model
        log.info("model: %s parameters, device %s, %s", f"{self.model.num_parameters():,}", self.device,
                 training_precision(config, self.amp))
        self.per_step = tc.accumulate * self.ctx.world  # batches per update, over all ranks
        if self.ctx.active:
            log.info("distributed: %d ranks × %d accumulated batches of %d tokens per update", self.ctx.world,
                     tc.accumulate, tc.batch_tokens)
        # The model as training calls it: its layers compiled, then wrapped by DDP when there are several ranks.
        if tc.compile:
            trained = compiled(trained)
        self.ddp = (torch.nn.parallel.DistributedDataParallel(
            trained, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.ctx.active else None)
        self.net = trained if self.ddp is None else self.ddp
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": [p for p in params if p.dim() > 1], "weight_decay": tc.weight_decay},
             {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
            # Fused: one kernel per step instead of a dozen per parameter group, and it can skip a non-finite
            # update on the device (`step`).
            lr=tc.lr, betas=tc.adam_betas, eps=1e-9, fused=True,
        )
        self.tensorboard = _tensorboard_writer(run_dir) if tc.tensorboard and self.ctx.is_main else None
        self.progress = Progress()
        if resume:
            self._restore(checkpoint.load_newest_valid(run_dir, map_location=self.device))
        if self.progress.ranks not in (0, self.ctx.world) and self.ctx.is_main:
            log.warning("the run trained on %d process(es) and goes on with %d: an update now takes %d batches of "
                        "%d tokens instead of %d (train.accumulate × processes)", self.progress.ranks,
                        self.ctx.world, self.per_step, tc.batch_tokens, tc.accumulate * self.progress.ranks)
        self.progress.ranks = self.ctx.world
        self.nonfinite = _NonFinite(self.device, self.progress.nonfinite_in_a_row)
        self.rows = PairTable(self.data.train)
        self.layout = self._batch_layout()

    def _batch_layout(self) -> Layout:
        """The run's batch layout: chosen once, at its start (trying every layout costs ten cuts of the corpus),
        and kept in its checkpoints, so that a resumed epoch goes on with the batches it started."""
        p = self.progress
        known = {str(layout): layout for layout in LAYOUTS}
        if p.batch_layout in known:
            return known[p.batch_layout]
        layout = batch_layout(self.data.src_len, self.data.tgt_len, self.tc.batch_tokens, self.tc.seed)
        if p.batch_in_epoch:
            log.warning("the checkpoint does not say how its batches were cut (an older mt saved it): the rest of "
                        "epoch %d is cut afresh, so some of its pairs may come twice and others not at all",
                        p.epoch + 1)
        p.batch_layout = str(layout)
        return layout

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.master:
            self.master.weights_to_work()
        self.optimizer.load_state_dict(state["optimizer"])
        self.progress = Progress(**state["progress"])
        if self.ctx.is_main:
            checkpoint.drop_metrics_after(self.run_dir, self.progress.step)
            self._keep_a_newer_best()
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log.info("resuming %s at step %d (epoch %d)", self.run_dir, self.progress.step, self.progress.epoch + 1)

    @property
    def resume_hint(self) -> str:
        return f"Resume with: mt train --config {self.run_dir / checkpoint.CONFIG} --resume"

    def _keep_a_newer_best(self) -> None:
        """Takes best.pt's BLEU as the best so far where it beats the checkpoint resumed from: one written after
        that checkpoint (a kill between best.pt and last.pt, or a damaged last.pt). A later, worse validation
        then does not overwrite it."""
        p = self.progress
        best = checkpoint.peek(self.run_dir / checkpoint.BEST)
        if best is not None and best.get("valid_bleu", -math.inf) > p.best_bleu:  # none yet, or damaged: skipped
            log.warning("%s (step %d, BLEU %.2f) is newer than the checkpoint resumed from (step %d): kept as the "
                        "best so far", checkpoint.BEST, best["step"], best["valid_bleu"], p.step)
            p.best_bleu, p.best_step = best["valid_bleu"], best["step"]

    def finished(self) -> bool:
        """Whether a stopping condition is met; under DDP, rank 0's answer holds on every rank."""
        return bool(distributed.from_main(self.ctx, self._stop_reason()))

    def _stop_reason(self) -> str:
        """The stopping condition met here, or "" while training goes on."""
        tc, p = self.tc, self.progress
        if tc.max_steps and p.step >= tc.max_steps:
            return f"train.max_steps ({tc.max_steps})"
        if tc.max_epochs and p.epoch >= tc.max_epochs:
            return f"train.max_epochs ({tc.max_epochs})"
        if tc.max_minutes and p.seconds >= tc.max_minutes * 60:
            return f"train.max_minutes ({tc.max_minutes:g})"
        if tc.patience and p.bad_validations >= tc.patience:
            return f"early stopping (train.patience {tc.patience})"
        return ""

    def run(self, signals: _StopSignals, show_progress: bool | None) -> None:
        tc, p = self.tc, self.progress
        bar = tqdm(total=tc.max_steps or None, initial=p.step, unit="step", dynamic_ncols=True, desc="train",
                   disable=(not show_progress) if show_progress is not None else None)
        self.model.train()
        if p.step and (reason := self._stop_reason()):
            log.info("the run has already met %s: raise it with --set to train longer", reason)
        window = _Window(self.device)
        clock = time.perf_counter()
        try:
            while not self.finished():
                batches = make_batches(self.data.src_len, self.data.tgt_len, tc.batch_tokens, seed=tc.seed + p.epoch,
                                       layout=self.layout)
                if len(batches) < self.per_step:
                    raise DataError(f"the training data makes {len(batches)} batches, fewer than the {self.per_step} "
                                    "an update takes (train.accumulate × ranks); lower train.accumulate or "
                                    "train.batch_tokens")
                for first in range(p.batch_in_epoch, len(batches) - self.per_step + 1, self.per_step):
                    mine = first + self.ctx.rank * tc.accumulate  # this rank's share of the update
                    loss, tokens, lr = self.step(batches[mine : mine + tc.accumulate])
                    p.batch_in_epoch = first + self.per_step
                    window.add(loss, tokens)
                    now = time.perf_counter()  # training time includes validation: the wall time the run costs
                    p.seconds, clock = p.seconds + now - clock, now
                    bar.update(1)
                    if p.step % tc.log_every == 0:
                        self.check_nonfinite()
                        record = {"step": p.step, "epoch": p.epoch + 1, **window.flush(self.ctx), "lr": lr,
                                  "seconds": round(p.seconds, 1)}
                        self.record(record)
                        log.info("step %d, epoch %d: train loss %.3f, lr %.2e, %s target tokens/s", p.step,
                                 p.epoch + 1, record["train_loss"], lr, f"{record['tokens_per_s']:,.0f}")
                        bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{lr:.1e}",
                                        tok_s=f"{record['tokens_per_s']:.0f}", epoch=p.epoch + 1,
                                        bleu=f"{max(p.best_bleu, 0):.1f}")
                    # Rank 0 decides both at once: one message per step under DDP.
                    finished, stop = distributed.from_main(self.ctx, (bool(self._stop_reason()), signals.received))
                    if p.step % tc.valid_every == 0 or finished:
                        self.validate_and_save()
                        now = time.perf_counter()
                        window.start += now - clock  # the window's tokens/s counts training time only
                        p.seconds, clock = p.seconds + now - clock, now
                        finished = self.finished()
                    if stop:
                        self.save_last()
                        distributed.barrier(self.ctx)
                        raise Interrupted(f"stopped by {stop} at step {p.step}; checkpoint saved. {self.resume_hint}")
                    if finished:
                        break
                else:
                    p.epoch += 1
                    p.batch_in_epoch = 0
                    log.info("epoch %d done at step %d", p.epoch, p.step)
        except KeyboardInterrupt:  # a second signal: stop at once, keeping the last checkpoint
            raise Interrupted(f"stopped at once at step {p.step}; the last saved checkpoint is kept. "
                              f"{self.resume_hint}") from None
        finally:
            bar.close()
        if p.validated_step != p.step:  # e.g. a resume with no time left, after a stop between validations
            self.validate_and_save()
        if tc.average_last and self.ctx.is_main:
            self.average_checkpoints(tc.average_last)
        log.info("done: %d steps in %.0f s; best valid BLEU %.2f at step %d", p.step, p.seconds, p.best_bleu,
                 p.best_step)

    def step(self, batch_indices: list[np.ndarray]) -> tuple[torch.Tensor, int, float]:
        """One update from `accumulate` batches. Returns the summed loss (a tensor: reading it would wait
        for the device), the target tokens and the learning rate.

        Raises:
            MtError: on CUDA out-of-memory.
        """
        tc, p = self.tc, self.progress
        batches, tokens = [], 0
        for idx in batch_indices:
            batch = self.rows.batch(idx)
            tokens += batch.target_tokens  # counted on the host, before the copy: no wait for the device
            batches.append(batch.to(self.device))
        lr = tc.lr * inverse_sqrt_schedule(p.step + 1, tc.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # The loss is normalised by the target tokens of the whole update, over all ranks; DDP averages
        # gradients over ranks, so each rank scales by the world size to make it a sum.
        all_tokens = int(distributed.sum_all(self.ctx, [tokens], self.device)[0])
        scale = self.ctx.world / all_tokens
        total = torch.zeros((), device=self.device)
        try:
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
                with sync, autocast(self.device, None if self.master else self.amp):
                    loss, _ = loss_fn(self.net, batch, tc.label_smoothing, tc.attention)
                (loss * scale).backward()
                total += loss.detach()
        except torch.OutOfMemoryError:
            raise MtError(f"CUDA out of memory at step {p.step + 1} with train.batch_tokens={tc.batch_tokens}; "
                          "lower train.batch_tokens (and raise train.accumulate to keep the batch size)") from None
        if self.master:
            self.master.grads_to_master()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_norm or float("inf"))
        # A non-finite gradient skips the update on the device: fused AdamW reads `found_inf` (the mechanism
        # torch's GradScaler uses), so the host never waits for the norm. `check_nonfinite` reads the count
        # at logging intervals.
        found_inf = (~torch.isfinite(norm)).float()
        self.optimizer.found_inf = found_inf
        self.optimizer.step()
        self.nonfinite.add(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        if self.master:
            self.master.weights_to_work()
        p.step += 1
        return total, tokens, lr

    def check_nonfinite(self) -> None:
        """Reports the updates skipped for a non-finite gradient since the last check.

        Raises:
            MtError: when `train.max_nonfinite` of them came in a row.
        """
        tc, p = self.tc, self.progress
        skipped, p.nonfinite_in_a_row, worst = self.nonfinite.read()
        if skipped:
            log.warning("%d update(s) skipped for a non-finite gradient by step %d (%d in a row at most)", skipped,
                        p.step, worst)
        if worst >= tc.max_nonfinite:
            raise MtError(f"{worst} non-finite updates in a row by step {p.step}; stopping. The last good "
                          f"checkpoint is {self.run_dir / checkpoint.LAST}; lower train.lr or raise "
                          "train.warmup_steps")

    def validate_and_save(self) -> None:
        """Validates and saves on rank 0; every rank then takes rank 0's progress (best BLEU, patience)."""
        self.check_nonfinite()  # on every rank: each holds the same count, and all stop together
        if self.ctx.is_main:
            self._validate_and_save()
        for name, value in distributed.from_main(self.ctx, asdict(self.progress)).items():
            setattr(self.progress, name, value)
        distributed.barrier(self.ctx)

    def _validate_and_save(self) -> None:
        p = self.progress
        started = time.perf_counter()
        metrics = validate(self.model, self.data, self.config, self.device, self.amp)
        record = {"step": p.step, "epoch": p.epoch + 1, **metrics,
                  "validation_seconds": round(time.perf_counter() - started, 2)}
        self.record(record)
        p.validated_step = p.step
        improved = metrics["valid_bleu"] > p.best_bleu
        if improved:
            p.best_bleu, p.best_step, p.bad_validations = metrics["valid_bleu"], p.step, 0
            checkpoint.save({"model": self.model.state_dict(), "step": p.step, "valid_bleu": metrics["valid_bleu"]},
                            self.run_dir / checkpoint.BEST)
        else:
            p.bad_validations += 1
        log.info("step %d: valid loss %.3f, valid BLEU %.2f%s", p.step, metrics["valid_loss"], metrics["valid_bleu"],
                 " (best)" if improved else f" (best {p.best_bleu:.2f} at step {p.best_step})")
        if self.tc.patience and p.bad_validations >= self.tc.patience:
            log.info("early stopping: no better validation BLEU in %d validations", p.bad_validations)
        self.save_last()

    def average_checkpoints(self, n: int) -> None:
        """Averages the last `n` numbered checkpoints into averaged.pt; it becomes best.pt if it validates
        better."""
        paths = checkpoint.numbered_checkpoints(self.run_dir)[:n]
        if len(paths) < 2:
            log.info("averaging skipped: only %d numbered checkpoint(s)", len(paths))
            return
        averaged = checkpoint.average(paths)
        trained = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(averaged)
        metrics = validate(self.model, self.data, self.config, self.device, self.amp)
        self.model.load_state_dict(trained)
        p = self.progress
        self.record({"step": p.step, "averaged": [path.name for path in paths], **metrics})
        state = {"model": averaged, "step": p.step, "valid_bleu": metrics["valid_bleu"],
                 "averaged": [path.name for path in paths]}
        checkpoint.save(state, self.run_dir / checkpoint.AVERAGED)
        better = metrics["valid_bleu"] > p.best_bleu
        log.info("average of %d checkpoints: valid BLEU %.2f (%s best %.2f)", len(paths), metrics["valid_bleu"],
                 "better than" if better else "not better than", p.best_bleu)
        if better:
            checkpoint.save(state, self.run_dir / checkpoint.BEST)
            p.best_bleu = metrics["valid_bleu"]
            self.save_last()

    def record(self, record: dict[str, Any]) -> None:
        """Appends a metrics record to metrics.jsonl (and TensorBoard, when on); rank 0 only."""
        if not self.ctx.is_main:
            return
        checkpoint.append_metrics(self.run_dir, record)
        if self.tensorboard is not None:
            prefix = "averaged/" if "averaged" in record else ""
            for name, value in record.items():
                if name not in ("step", "epoch") and isinstance(value, int | float):
                    self.tensorboard.add_scalar(prefix + name, value, record["step"])
            self.tensorboard.flush()

    def save_last(self) -> None:
        if not self.ctx.is_main:
            return
        self.progress.nonfinite_in_a_row = self.nonfinite.current()  # up to date, also when a signal stops the run
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "progress": asdict(self.progress), "rng": _rng_state(), "config": config_to_dict(self.config)}
        checkpoint.save_numbered(state, self.run_dir, self.progress.step, keep=self.tc.keep_checkpoints)


def _tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MtError("train.tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


class _NonFinite:
    """Updates skipped for a non-finite gradient, counted on the device: the current run of them in a row,
    the longest run and the total since the last `read`."""

    def __init__(self, device: torch.device, in_a_row: int = 0):
        self.in_a_row, self.worst = (torch.full((), float(in_a_row), device=device) for _ in range(2))
        self.skipped = torch.zeros((), device=device)

    def add(self, found_inf: torch.Tensor) -> None:
        self.in_a_row = (self.in_a_row + found_inf) * found_inf
        self.worst = torch.maximum(self.worst, self.in_a_row)
        self.skipped += found_inf

    def current(self) -> int:
        """How many updates in a row have been skipped up to now."""
        return int(self.in_a_row)

    def read(self) -> tuple[int, int, int]:
        """(skipped, in a row now, longest run in a row) since the last read, which resets the count."""
        skipped, in_a_row, worst = (int(x) for x in torch.stack([self.skipped, self.in_a_row, self.worst]).tolist())
        self.skipped.zero_()
        self.worst.copy_(self.in_a_row)
        return skipped, in_a_row, worst


class _Window:
    """Training loss and tokens/s over the steps since the last flush, summed on the device."""

    def __init__(self, device: torch.device):
        self.loss = torch.zeros((), device=device)
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, loss: torch.Tensor, tokens: int) -> None:
        self.loss += loss
        self.tokens += tokens

    def flush(self, ctx: distributed.Context) -> dict[str, float]:
        """Loss per target token and target tokens/s since the last flush, over all ranks."""
        elapsed = time.perf_counter() - self.start
        loss, tokens = distributed.sum_all(ctx, [float(self.loss), self.tokens], self.loss.device)
        out = {"train_loss": loss / max(tokens, 1), "tokens_per_s": tokens / max(elapsed, 1e-9)}
        self.loss.zero_()
        self.tokens, self.start = 0, time.perf_counter()
        return out
