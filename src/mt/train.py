"""Training: the loss, the learning-rate schedule, validation and the loop, top to bottom.

`train` prepares the run folder and the data, then `Trainer.run` loops: cut the epoch into length-bucketed
batches, take one update from each `train.accumulate` of them (`Trainer.step`), log, validate and save, and
stop on `train.max_steps`, `max_epochs`, `max_minutes`, early stopping or a signal. The schedule is the
Transformer paper's (Vaswani et al., 2017, section 5.3) with the peak given directly: linear warmup to
`train.lr`, then decay with the inverse square root of the step. The loss is label-smoothed cross-entropy
(Szegedy et al., 2016) over the real (non-padding) target tokens only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from mt import checkpoint, distributed, fastpaths
from mt.config import TUNE_BEAMS, TUNE_PENALTIES, Config, config_to_dict, load_run_config, save_config
from mt.data import (
    LAYOUTS,
    Batch,
    Layout,
    PairTable,
    PreparedData,
    batch_layout,
    check_corpora,
    collate,
    make_batches,
    prepare_data,
)
from mt.devices import autocast, autocast_dtype, bf16_without_instructions, resolve_device, training_precision
from mt.errors import CheckpointError, DataError, Interrupted, MtError
from mt.evaluate import bleu
from mt.files import write_bytes
from mt.model import Transformer
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


def inverse_sqrt_schedule(step: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at update `step` (1-based)."""
    step = max(step, 1)
    return min(step / warmup, math.sqrt(warmup / step))


def label_smoothed_loss(logits: torch.Tensor, target: torch.Tensor, smoothing: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross-entropy of (N, V) logits against (N,) targets, and the summed NLL.

    The smoothed target distribution puts 1 - ε on the target token and ε / V on every token, so the loss is
    (1 - ε) · NLL + ε · (mean over the vocabulary of -log p), as `F.cross_entropy(label_smoothing=ε)`.
    """
    log_probs = logits.log_softmax(dim=-1, dtype=torch.float32)  # (N, V)
    nll = -log_probs.gather(1, target[:, None]).sum()
    loss = (1.0 - smoothing) * nll - (smoothing / log_probs.size(-1)) * log_probs.sum()
    return loss, nll.detach()


def loss_fn(model: torch.nn.Module, batch: Batch, label_smoothing: float, compiled: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's summed label-smoothed loss and summed NLL over its real target tokens.

    `model` is a Transformer or its DistributedDataParallel wrapper: it is called, not taken apart, so that
    DDP sees the forward pass. `compiled`: its layers are compiled, and inductor chooses their kernels.
    """
    device = batch.src.device
    kernels = contextlib.nullcontext() if compiled else fastpaths.cpu_kernels(device)
    with fastpaths.attention_kernels(device), kernels:
        logits = model(batch.src, batch.tgt_in, batch.real)  # (N, V): only the real target positions
    target = batch.tgt_out.flatten().index_select(0, batch.real)  # (N,)
    return fastpaths.label_smoothed_loss(logits, target, label_smoothing)


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
            _, nll = loss_fn(model, batch, 0.0)
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
    """SIGINT and SIGTERM while `mt train` runs. In training, the first asks the loop to stop after the current
    step and save a checkpoint, and a second one stops at once. In any other phase (preparing the data, choosing
    the decoding settings) the first one stops at once, saying what was stopped."""

    def __init__(self) -> None:
        self.received: str | None = None
        self.phase = "checking the run"
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
        name = signal.Signals(signum).name
        if self.phase != "training":
            raise Interrupted(f"stopped by {name} while {self.phase}")
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = name
        log.warning("%s received: saving a checkpoint after this step (again to stop at once)", self.received)


def train(config: Config, resume: bool = False, overwrite: bool = False, show_progress: bool | None = None) -> Path:
    """Trains a model as `config` says and returns its run folder.

    Raises:
        MtError: for bad config values, data or run folders, before any training starts.
        Interrupted: after saving a checkpoint, on SIGINT or SIGTERM.
    """
    if config.init_from:  # fine-tuning: the parent's model and tokenizer, checked before anything else
        config = checkpoint.with_parent(config)
    ctx = distributed.setup()
    logger = logging.getLogger("mt")
    level = logger.level
    if not ctx.is_main:
        logger.setLevel(logging.WARNING)
        show_progress = False
    file_log = trainer = None
    lock = checkpoint.RunLock(config.run_dir)
    try:  # from here on the process group is torn down whatever happens: a rank left in it aborts at exit
        with _StopSignals() as signals:
            if ctx.is_main and resume and (config.run_dir / checkpoint.CONFIG).is_file():
                file_log = _log_to(config.run_dir, logger)  # first: what the resume changes goes into the log too
            # Rank 0 takes the run folder's lock, then checks all it can (device, corpora) before it changes it.
            resuming = _main_first(ctx, lambda: _take_run_dir(config, lock, resume, overwrite), others=lambda: resume)
            run_dir = config.run_dir
            if ctx.is_main and file_log is None:
                file_log = _log_to(run_dir, logger)
            if resuming:  # the run's own decoding settings: mt tune may have chosen them
                config = replace(config, decode=load_run_config(run_dir / checkpoint.CONFIG).decode)
            tc = config.train
            if not (tc.max_steps or tc.max_epochs or tc.max_minutes or tc.patience):  # said before the long read
                log.warning("no stopping condition (train.max_steps, max_epochs, max_minutes and patience are all 0): "
                            "training goes on until Ctrl-C")
            if ctx.is_main:
                save_config(config, run_dir / checkpoint.CONFIG)
                if config.init_from and not (run_dir / checkpoint.TOKENIZER).is_file():  # the parent's, as it is
                    write_bytes(run_dir / checkpoint.TOKENIZER,
                                (Path(config.init_from) / checkpoint.TOKENIZER).read_bytes())
            signals.phase = "preparing the data"
            data = _main_first(ctx, lambda: prepare_data(config, run_dir))
            trainer = Trainer(config, data, ctx, run_dir, resuming)
            signals.phase = "training"
            try:
                trainer.run(signals, show_progress)
            except Interrupted as e:  # the CLI prints it; train.log keeps it too
                if file_log:
                    file_log.handle(log.makeRecord(log.name, logging.WARNING, __file__, 0, str(e), None, None))
                raise
            signals.phase = "choosing the decoding settings (the trained run is saved; mt tune does it later)"
            if config.train.tune_decoding and ctx.is_main:
                from mt.evaluate import describe_setting, tune_run

                best = tune_run(run_dir, TUNE_BEAMS, TUNE_PENALTIES, device=str(trainer.device),
                                streams=IN_TRAINING_STREAMS)[0]
                log.info("decoding defaults chosen on the valid set: %s (BLEU %.2f)", describe_setting(best),
                         best["bleu"])
            if ctx.is_main:  # the tokenized data: a resume of the finished run makes it again
                shutil.rmtree(run_dir / checkpoint.CACHE, ignore_errors=True)
            return run_dir
    finally:
        lock.__exit__()
        if trainer is not None and trainer.tensorboard is not None:
            trainer.tensorboard.close()
        if file_log:
            logger.removeHandler(file_log)
            file_log.close()
        logger.setLevel(level)
        distributed.teardown(ctx)


def _take_run_dir(config: Config, lock: checkpoint.RunLock, resume: bool, overwrite: bool) -> bool:
    """Takes the run folder's lock, checks the device and the corpora, then prepares the folder (deleting
    nothing before every check has passed). Returns whether the run resumes from a checkpoint."""
    checkpoint.check_trainable(config)  # a name that is no folder name gets no lock file either
    lock.__enter__()

    def checks() -> None:
        resolve_device(config)
        check_corpora(config)

    return checkpoint.prepare_run_dir(config, resume, overwrite, checks)


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
    """The model, optimizer, data and progress of one run, and the loop that trains it.

    `run_dir` None makes a trainer that saves and records nothing: `mt bench` times its `step`.
    """

    def __init__(self, config: Config, data: PreparedData, ctx: distributed.Context, run_dir: Path | None = None,
                 resume: bool = False):
        tc = self.tc = config.train
        self.config, self.data, self.ctx, self.run_dir = config, data, ctx, run_dir
        self.device = resolve_device(config)
        if self.device.type == "cuda" and self.ctx.active:
            self.device = torch.device("cuda", self.ctx.local_rank)
        self.amp = autocast_dtype(tc.precision, self.device)
        if bf16_without_instructions(config, self.device) and self.ctx.is_main:
            log.warning("train.precision is %s, but this CPU has no bf16 instructions (AVX512-BF16 or AMX): its bf16 "
                        "matrix products run hundreds of times slower than fp32; 'auto' trains in fp32 here",
                        tc.precision)
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)
        self.model = Transformer(config.model, data.tokenizer.vocab_size).to(self.device)
        if config.init_from and not resume:  # fine-tuning: the parent's weights, a new optimizer and schedule
            weights = checkpoint.parent_weights(Path(config.init_from))
            self.model.load_state_dict(checkpoint.load(weights, map_location=self.device)["model"])
            log.info("starting from the weights of %s", weights)
        log.info("model: %s parameters, device %s, %s", f"{self.model.num_parameters():,}", self.device,
                 training_precision(config, self.amp))
        self.per_step = tc.accumulate * self.ctx.world  # batches per update, over all ranks
        if self.ctx.active:
            log.info("distributed: %d ranks × %d accumulated batches of %d tokens per update", self.ctx.world,
                     tc.accumulate, tc.batch_tokens)
        # The model as training calls it: its layers compiled, then wrapped by DDP when there are several ranks.
        trained = fastpaths.compiled(self.model) if tc.compile else self.model
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
        saves = run_dir is not None and self.ctx.is_main
        self.tensorboard = _tensorboard_writer(run_dir) if tc.tensorboard and saves else None
        self.progress = Progress()
        if resume:
            self._restore(checkpoint.load_newest_valid(run_dir, map_location=self.device, accept=self._fits))
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

    def _fits(self, state: dict[str, Any]) -> None:
        """Raises a CheckpointError if `state` is not a checkpoint of this model (another model's, copied in)."""
        try:
            self.model.load_state_dict(state["model"])
        except (RuntimeError, TypeError) as e:  # torch's message: a header line, then one line per mismatch
            lines = str(e).splitlines()
            raise CheckpointError(f"its weights do not fit this run's model ({(lines[1:] or lines)[0].strip()[:200]})"
                                  ) from None

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
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
        """Trains until a stopping condition or a signal, validating and saving on the way."""
        tc, p = self.tc, self.progress
        bar = tqdm(total=tc.max_steps or None, initial=p.step, unit="step", dynamic_ncols=True, desc="train",
                   disable=(not show_progress) if show_progress is not None else None)
        self.model.train()
        if p.step and (reason := self._stop_reason()):
            log.info("the run has already met %s: raise it with --set to train longer", reason)
        self.window = _Window(self.device)
        self.clock = time.perf_counter()
        try:
            for batches in self.updates():
                loss, tokens, lr = self.step(batches)
                self.window.add(loss, tokens)
                self._count_time()
                bar.update(1)
                if p.step % tc.log_every == 0:
                    self.log_training(lr, bar)
                # Rank 0 decides both at once: one message per step under DDP.
                finished, stop = distributed.from_main(self.ctx, (bool(self._stop_reason()), signals.received))
                if p.step % tc.valid_every == 0 or finished:
                    self.validate_and_save()
                    self._count_time(validation=True)
                    finished = self.finished()
                if stop:
                    self.save_last()
                    distributed.barrier(self.ctx)
                    raise Interrupted(f"stopped by {stop} at step {p.step}; checkpoint saved. {self.resume_hint}")
                if finished:
                    break
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

    def updates(self) -> Iterator[list[np.ndarray]]:
        """The batches (as row indices) of this rank's share of each update, epoch after epoch, from where the
        run stands, while no stopping condition is met."""
        tc, p = self.tc, self.progress
        while not self.finished():
            batches = make_batches(self.data.src_len, self.data.tgt_len, tc.batch_tokens, seed=tc.seed + p.epoch,
                                   layout=self.layout)
            if len(batches) < self.per_step:
                raise DataError(f"the training data makes {len(batches)} batches, fewer than the {self.per_step} "
                                "an update takes (train.accumulate × ranks); lower train.accumulate or "
                                "train.batch_tokens")
            for first in range(p.batch_in_epoch, len(batches) - self.per_step + 1, self.per_step):
                mine = first + self.ctx.rank * tc.accumulate  # this rank's share of the update
                p.batch_in_epoch = first + self.per_step
                yield batches[mine : mine + tc.accumulate]
            p.epoch += 1
            p.batch_in_epoch = 0
            log.info("epoch %d done at step %d", p.epoch, p.step)

    def _count_time(self, validation: bool = False) -> None:
        """Adds the time since the last call to the run's training time (validation included: the wall time
        the run costs); the speed window counts training steps only."""
        now = time.perf_counter()
        if validation:
            self.window.start += now - self.clock
        self.progress.seconds, self.clock = self.progress.seconds + now - self.clock, now

    def log_training(self, lr: float, bar: tqdm) -> None:
        """Logs the loss and speed since the last log to metrics.jsonl, train.log and the progress bar."""
        p = self.progress
        self.check_nonfinite()
        record = {"step": p.step, "epoch": p.epoch + 1, **self.window.flush(self.ctx), "lr": lr,
                  "seconds": round(p.seconds, 1)}
        self.record(record)
        log.info("step %d, epoch %d: train loss %.3f, lr %.2e, %s target tokens/s", p.step, p.epoch + 1,
                 record["train_loss"], lr, f"{record['tokens_per_s']:,.0f}")
        bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{lr:.1e}", tok_s=f"{record['tokens_per_s']:.0f}",
                        epoch=p.epoch + 1, bleu=f"{max(p.best_bleu, 0):.1f}")

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
                with sync, autocast(self.device, self.amp):
                    loss, _ = loss_fn(self.net, batch, tc.label_smoothing, compiled=tc.compile)
                (loss * scale).backward()
                total += loss.detach()
        except torch.OutOfMemoryError:
            raise MtError(f"CUDA out of memory at step {p.step + 1} with train.batch_tokens={tc.batch_tokens}; "
                          "lower train.batch_tokens (and raise train.accumulate to keep the batch size)") from None
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.clip_norm or float("inf"))
        # A non-finite gradient skips the update on the device: fused AdamW reads `found_inf` (the mechanism
        # torch's GradScaler uses), so the host never waits for the norm. `check_nonfinite` reads the count
        # at logging intervals.
        found_inf = (~torch.isfinite(norm)).float()
        self.optimizer.found_inf = found_inf
        self.optimizer.step()
        self.nonfinite.add(found_inf)
        self.optimizer.zero_grad(set_to_none=True)
        p.step += 1
        return total, tokens, lr

    def one_batch_step(self, batch_indices: np.ndarray) -> None:
        """An update from one batch (`mt bench`)."""
        self.step([batch_indices])

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
            saved = (f"The last good checkpoint is {self.run_dir / checkpoint.LAST}" if self.run_dir is not None
                     and (self.run_dir / checkpoint.LAST).is_file() else "No checkpoint was saved")
            raise MtError(f"{worst} non-finite updates in a row by step {p.step}; stopping. {saved}; lower train.lr "
                          "or raise train.warmup_steps")

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
